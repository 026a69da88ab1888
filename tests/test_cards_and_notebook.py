"""Run reports: every step's card holds its components and renders offline; a broken card never
fails a step; the inspection notebook runs end to end against a run the tests made."""

import os
import re

import pytest

from bincount.flow import cards

from conftest import DATASTORE, REPO, card_components

NOTEBOOK = REPO / "notebooks" / "inspect_runs.ipynb"

# What each step's card must hold: markdown text, image labels or table cells, by step.
EXPECTED = {
    "gather_subset": {"images": 1, "text": ["# Subset", "300 bins kept", "## Sample photos per count",
                                           "Bins kept per count", "## Skipped objects"]},
    "split": {"images": 1, "text": ["# Split", "210 train, 45 val, 45 test", "Bins per count in each split",
                                    "total"]},
    "train": {"images": 3, "text": ["# Grid point", "## Learning curves", "Learning curves: tiny-",
                                    "## Throughput", "Throughput and time per epoch", "## Profile",
                                    "Where each epoch's time went", "data: augment + load",
                                    "forward + backward + step", "### Resources",
                                    "mean CPU utilisation (% of cores)", "### Rules", "## Every epoch"]},
    "join": {"images": 2, "text": ["# Grid: 2 points", cards.WINNER_MARK, "Served: the mean softmax of",
                                   "over the four flips of each photo",
                                   "Validation accuracy against each hyperparameter",
                                   "Validation curves of every grid point"]},
    "evaluate": {"images": 2, "text": ["# Test: 45 bins", "Confusion matrix", "## Per count", "precision",
                                       "## Calibration", "Reliability diagram", "## Worst mistakes"]},
    "deploy": {"images": 0, "text": ["# Deployment", "Deployed to **local**", "## Champion decision",
                                     "reason", "## What went where", "package_sha256",
                                     "## Smoke test", "16 requests over HTTP", "p50", "p95"]},
}


def walk(node):
    """Every dict, list and value in a component tree."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def texts(components) -> list[str]:
    """Every string in the card (markdown, labels, headers, table cells), but image data."""
    return [n for n in walk(components) if isinstance(n, str) and not n.startswith("data:image/")]


def images(components, kind: str = "") -> list[dict]:
    """Image components whose source starts with data:image/``kind``."""
    return [n for n in walk(components) if isinstance(n, dict) and n.get("type") == "image"
            and str(n.get("src", "")).startswith(f"data:image/{kind}")]


@pytest.fixture
def in_datastore(monkeypatch):
    # Local cards are looked up under the current directory's .metaflow (ENVIRONMENT.md).
    monkeypatch.chdir(DATASTORE)


def report_cards(run, step):
    from metaflow.cards import get_cards

    return {task.pathspec: get_cards(task, id="report") for task in run[step]}


@pytest.mark.flow
@pytest.mark.parametrize("step", list(EXPECTED))
def test_each_step_has_a_report_card_with_its_components(synthetic_run, in_datastore, step):
    by_task = report_cards(synthetic_run, step)
    assert len(by_task) == (2 if step == "train" else 1)
    for pathspec, found in by_task.items():
        assert len(found) == 1, f"{pathspec}: {len(found)} report cards"
        components = card_components(found[0].get())
        strings = texts(components)
        for marker in EXPECTED[step]["text"]:
            assert any(marker in s for s in strings), f"{pathspec}: {marker!r} not in its card"
        assert not any("could not be built" in s for s in strings)
        charts = images(components, "png")
        assert len(charts) >= EXPECTED[step]["images"], f"{pathspec}: {len(charts)} charts"


@pytest.mark.flow
def test_photo_galleries_hold_thumbnails_of_the_run_s_bins(synthetic_run, in_datastore):
    subset_ids = set(synthetic_run.data.subset["id"])
    fetch = next(iter(report_cards(synthetic_run, "gather_subset").values()))[0]
    photos = images(card_components(fetch.get()), "jpeg")
    assert len(photos) == 5 * cards.PHOTOS_PER_COUNT and {p["label"] for p in photos} <= subset_ids
    evaluate = next(iter(report_cards(synthetic_run, "evaluate").values()))[0]
    wrong = sum(p["count"] != label for p, label in zip(
        (synthetic_run.data.test_predictions[i] for i in synthetic_run.data.split_table.query("split == 'test'")["id"]),
        synthetic_run.data.split_table.query("split == 'test'")["label"]))
    gallery = images(card_components(evaluate.get()), "jpeg")
    assert len(gallery) == min(wrong, cards.WORST_MISTAKES)


def metaflow_bundle() -> tuple[str, str]:
    """The JavaScript and CSS Metaflow inlines into every card (not ours)."""
    from metaflow.plugins.cards.card_modules import basic

    with open(basic.JS_PATH) as js, open(basic.CSS_PATH) as css:
        return js.read(), css.read()


@pytest.mark.flow
def test_cards_render_offline(synthetic_run, in_datastore):
    """Nothing in a card is fetched from the network, except Metaflow's own CSS font @import.

    Metaflow 2.19's bundled card CSS begins with ``@import "https://fonts.googleapis.com/..."`` (Roboto);
    offline, the browser falls back to a system font and the card renders the same. Everything else,
    its JavaScript and our charts and photos, is inline.
    """
    js, css = metaflow_bundle()
    for step in EXPECTED:
        for pathspec, found in report_cards(synthetic_run, step).items():
            html = found[0].get()
            assert js in html and css in html  # inlined, not linked
            ours = html.replace(js, "").replace(css, "")
            assert not re.search(r"https?://", ours), f"{pathspec}: an external URL outside Metaflow's bundle"
            assert not re.search(r"<(script|img|iframe)[^>]+src\s*=\s*[\"']?(https?:)?//", html, re.I)
            assert not re.search(r"<link[^>]+href\s*=\s*[\"']?(https?:)?//", html, re.I)
            imports = re.findall(r"@import\s*(?:url\()?[\"']?([^\"')\s;]+)", html)
            assert all(u.startswith("https://fonts.googleapis.com/") for u in imports), imports
            components = card_components(html)
            kinds = [n.get("type") for n in walk(components) if isinstance(n, dict)]
            assert kinds.count("image") == len(images(components))  # every image is inline data
            assert "vegaChart" not in kinds  # Vega would need its library at view time


@pytest.mark.flow
def test_train_history_times_its_phases(synthetic_run):
    for history in synthetic_run.data.grid_histories.values():
        for row in history:
            assert {"data_seconds", "compute_seconds", "val_seconds", "cpu_percent", "max_rss_mb"} <= set(row)
            assert 0 < row["data_seconds"] + row["compute_seconds"] + row["val_seconds"] <= row["epoch_seconds"] + 1e-6


SORTABLE = "bincount_sortable_table"  # the card type in metaflow_extensions/bincount/plugins/cards


def sortable_rows(html: str) -> list[list[str]]:
    """The body rows of a sortable-table card, each as its cells' (still escaped) text."""
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r'<tr data-order="\d+">(.*?)</tr>', html)]


@pytest.mark.flow
def test_the_join_step_has_a_sortable_grid_card(synthetic_run, in_datastore):
    from metaflow.cards import get_cards

    join = synthetic_run["join"].task
    assert sorted(c.type for c in get_cards(join)) == sorted(["blank", SORTABLE])  # the report and the grid
    found = get_cards(join, id="grid")
    assert len(found) == 1 and found[0].type == SORTABLE
    html = found[0].get()
    assert '<table class="sortable">' in html and "aria-sort" in html and "<script>" in html
    ranked = synthetic_run.data.grid_results["name"].tolist()  # best first
    rows = sortable_rows(html)
    assert [row[2] for row in rows] == ranked  # rank, chosen, name, ...: every point, in ranked order
    assert [row[0] for row in rows] == [str(k) for k in range(1, len(ranked) + 1)]
    assert rows[ranked.index(synthetic_run.data.chosen)][1] == cards.WINNER_MARK
    numeric = {h: bool(n) for n, h in re.findall(r'<th( data-type="number")?><button type="button">([^<]*)<', html)}
    assert numeric["val_accuracy"] and numeric["rank"] and not numeric["name"]  # numbers sort as numbers
    assert not re.search(r"https?://|\bsrc\s*=|<link", html)  # self-contained: nothing fetched


def test_the_sortable_grid_card_escapes_every_cell():
    import pandas as pd
    from metaflow.plugins import CARDS
    from metaflow.plugins.cards.card_modules.basic import SectionComponent

    card_type = next(c for c in CARDS if c.type == SORTABLE)  # Metaflow found the extension
    hostile = '<img src=x onerror="alert(1)">&'
    grid = pd.DataFrame([{"name": hostile, "lr": 0.001, "val_accuracy": 0.5, "val_loss": float("nan"),
                          "best_epoch": 2},
                         {"name": "plain", "lr": 0.0003, "val_accuracy": 0.25, "val_loss": 1.5, "best_epoch": 3}])
    # What the card is given: the step's components, rendered, in one section (as Metaflow does).
    components = [SectionComponent(contents=[c.render() for c in cards.grid_components(grid, "plain")]).render()]

    class Task:
        pathspec = "BinCountFlow/1/join/2"

    html = card_type(options={"title": "<b>grid</b>"}, components=components).render(Task())
    assert hostile not in html and "<img" not in html and "<b>grid" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in html and "&lt;b&gt;grid&lt;/b&gt;" in html
    rows = sortable_rows(html)
    assert [row[2] for row in rows] == ["&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;", "plain"]
    assert [row[1] for row in rows] == ["", cards.WINNER_MARK]
    assert rows[0][5] == ""  # NaN: an empty cell, sorted last


class FakeCard(list):
    pass


def test_a_failing_card_warns_and_the_step_goes_on(capsys):
    @cards.appends_safely
    def broken_card(flow):
        raise KeyError("test_metrics")

    card = FakeCard()
    broken_card(card, object())  # must not raise
    assert "warning: card broken_card could not be built" in capsys.readouterr().err
    assert card and "could not be built" in card[0].render()["source"]

    class NoCard:
        def append(self, component):
            raise AttributeError("no @card on this step")

    cards.fetch_card(NoCard(), object())  # neither building nor appending may raise
    assert "warning" in capsys.readouterr().err


class RefreshedCard(list):
    """What a dynamic card's step code sees: clear, extend, refresh (Metaflow's own is tested in
    tests/test_fault_tolerance.py, read back from a killed run)."""

    refreshes = 0

    def clear(self):
        del self[:]

    def refresh(self, force=False):
        self.refreshes += 1


def test_a_training_card_shows_the_curves_so_far_and_the_time_left():
    from bincount.model.train import TrainResult

    history = [{"epoch": k, "train_loss": 2.0 / k, "val_loss": 2.2 / k, "train_accuracy": 0.2 * k,
                "val_accuracy": 0.15 * k, "epoch_seconds": 120.0, "train_images_per_second": 42.0}
               for k in (1, 2)]
    result = TrainResult(config={"name": "lite0"}, state_dict=b"", history=history, best_epoch=2, val_accuracy=0.3)
    card = RefreshedCard()
    cards.train_progress(card, epochs=8)(result)
    text = card[0].render()["source"]
    assert "training, epoch 2 of 8" in text and "42.0 images/s" in text and "About 12 min left" in text
    assert card[1].render()["type"] == "image" and card.refreshes == 1
    update = cards.train_progress(card, epochs=8)
    update(result)
    assert len(card) == 2 and card.refreshes == 2  # redrawn, not appended to
    update(result)  # the next epoch, moments later: drawn at the next one after the interval
    assert card.refreshes == 2
    cards.train_progress(card, epochs=8, interval_s=0)(result)
    assert card.refreshes == 3


def test_a_sagemaker_jobs_card_shows_its_status_and_last_log_lines(capsys):
    card = RefreshedCard()
    log = cards.job_progress(card, "lite0", keep=2, interval_s=0)
    for line in ["started SageMaker training job j-1 (1 x ml.g5.xlarge)", "training job j-1: InProgress (Training)",
                 "[algo-1] epoch 1/8 ...", "[algo-1] epoch 2/8 ..."]:
        log(line)
    status, lines = (component.render()["source"] for component in card)
    assert "training job j-1: InProgress (Training)" in status
    assert "epoch 2/8" in lines and "epoch 1/8" in lines and "started" not in lines  # the last two lines
    assert "[algo-1] epoch 2/8" in capsys.readouterr().out  # and the step's log still has every line

    # A chatty job redraws the card when its status changes, else at most once an interval.
    throttled = RefreshedCard()
    log = cards.job_progress(throttled, "lite0", keep=2, interval_s=3600)
    for line in ["started SageMaker training job j-1 (1 x ml.g5.xlarge)", "[algo-1] a", "[algo-1] b",
                 "training job j-1: Completed"]:
        log(line)
    status, lines = (component.render()["source"] for component in throttled)
    assert throttled.refreshes == 2 and "Completed" in status and "[algo-1] b" in lines


def test_calibration_and_worst_mistakes():
    def prediction(count, confidence):
        rest = (1 - confidence) / 4
        return {"count": count, "probabilities": {str(c): confidence if c == count else rest for c in range(1, 6)}}

    labels = {"a": 1, "b": 2, "c": 3, "d": 4}
    predictions = {"a": prediction(1, 0.95), "b": prediction(3, 0.9), "c": prediction(3, 0.55),
                   "d": prediction(5, 0.4)}
    rows = cards.calibration([labels[i] for i in predictions], list(predictions.values()))
    assert sum(r["n"] for r in rows) == 4
    top = rows[9]
    assert top["n"] == 2 and top["accuracy"] == 0.5 and top["confidence"] == pytest.approx(0.925)
    assert cards.expected_calibration_error(rows) == pytest.approx((2 * 0.425 + 0.45 + 0.4) / 4)
    worst = cards.worst_mistakes(labels, predictions)
    assert [w[0] for w in worst] == ["b", "d"] and worst[0][1:3] == (2, 3)


@pytest.mark.flow
def test_the_notebook_runs_against_a_run_of_the_tests(synthetic_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"
    env = dict(os.environ, BINCOUNT_RUN_ID=synthetic_run.id, METAFLOW_USER=os.environ["METAFLOW_USER"],
               METAFLOW_DATASTORE_SYSROOT_LOCAL=str(DATASTORE))
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(DATASTORE)}})
    client.execute(env=env)
    nbformat.write(notebook, tmp_path / "executed.ipynb")  # kept in tmp for a look when this fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert synthetic_run.id in text and "tiny-a" in text and "tiny-b" in text
    assert f"run {synthetic_run.pathspec}: chose {synthetic_run.data.chosen}" in text
    assert re.search(r"true count \d, predicted count \d", text)
    assert any("image/jpeg" in o.get("data", {}) for o in outputs)  # the photo
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the grid chart
    assert "1 card(s) on" in text and "__MF_DATA__" in html  # the evaluate card, shown inline
