"""Run reports: the components of each step's Metaflow card, built from its artifacts.

Each ``*_card(card, flow)`` function is called on the last line of a step with
``current.card`` (``current.card[ID]`` on the join step, which has two cards) and
the step's ``self``; it reads artifacts and appends
components. The components are built by plain functions (``*_components``)
that take artifacts and return a list, so they can be used and tested without
a run.

Everything here works offline: charts are matplotlib figures rendered to PNG
(through ``matplotlib.figure.Figure``, never pyplot, so no GUI backend is
touched) and photos are small JPEG thumbnails, embedded in the card as
``Image`` components. No VegaChart: the card must not depend on anything it
would fetch.

A card never fails a run: if building one raises, ``appends_safely`` prints a
warning on stderr, puts an ``Error`` component (with the traceback) in the
card instead, and the step carries on.
"""

from __future__ import annotations

import functools
import io
import json
import math
import sys
import traceback

from bincount.data.shards import read_photos
from bincount.flow.runs import photos_in

THUMBNAIL_PX = 96
PHOTOS_PER_COUNT = 5
WORST_MISTAKES = 12
CALIBRATION_BINS = 10
WINNER_MARK = "★ chosen"


# --- plumbing ----------------------------------------------------------------

def appends_safely(build):
    """Turn ``build(flow) -> [components]`` into ``f(card, flow)`` that appends them, and never raises."""

    @functools.wraps(build)
    def append(card, *args, **kwargs):
        try:
            components = list(build(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - a report must never cost the run
            print(f"warning: card {build.__name__} could not be built, the step goes on: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            try:
                components = _error_components(build.__name__, e)
            except Exception:  # noqa: BLE001
                components = []
        try:
            for component in components:
                card.append(component)
        except Exception as e:  # noqa: BLE001 - e.g. no @card on the step
            print(f"warning: card {build.__name__} could not be appended: {type(e).__name__}: {e}",
                  file=sys.stderr)
        return components

    return append


def _error_components(name: str, error: Exception) -> list:
    from metaflow.cards import Markdown

    return [Markdown(f"## This report could not be built\n\n`{name}` raised `{type(error).__name__}: "
                     f"{error}`. The step itself went on; its artifacts are intact."),
            Markdown("```\n" + "".join(traceback.format_exception(error))[-4000:] + "\n```")]


def _md(text: str):
    from metaflow.cards import Markdown

    return Markdown(text)


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _image(fig, label: str | None = None):
    """A matplotlib Figure as an embedded PNG ``Image``."""
    from metaflow.cards import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image(buf.getvalue(), label=label)


def _photo(jpeg: bytes, label: str | None = None):
    from metaflow.cards import Image

    from bincount.data.images import thumbnail

    return Image(thumbnail(jpeg, THUMBNAIL_PX), label=label)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(rows: list[list], headers: list[str]):
    from metaflow.cards import Table

    return Table([[c if hasattr(c, "render") else _fmt(c) for c in row] for row in rows] or [[]],
                 headers=headers)


def _kv_table(mapping: dict, headers=("", "")):
    return _table([[k, v] for k, v in mapping.items()], list(headers))


def _df_table(df, index: bool = False):
    frame = df.reset_index() if index else df
    return _table(frame.values.tolist(), [str(c) for c in frame.columns])


# --- fetch_subset --------------------------------------------------------------

def class_histogram(class_counts: dict, title: str = "Bins kept per count"):
    fig, ax = _figure(5, 2.6)
    ax = ax[0, 0]
    labels = [str(c) for c in class_counts]
    bars = ax.bar(labels, list(class_counts.values()), color="#4c72b0")
    ax.bar_label(bars)
    ax.margins(y=0.15)
    ax.set(xlabel="items in the bin", ylabel="bins", title=title)
    return _image(fig, title)


def photo_grid(subset, images: dict, per_count: int = PHOTOS_PER_COUNT):
    """A table: one row per count, the first ``per_count`` photos of that count as thumbnails."""
    shown = {label: [i for i in list(ids)[:per_count] if i in images]
             for label, ids in subset.groupby("label", sort=True)["id"]}
    raws = dict(read_photos(images, [i for ids in shown.values() for i in ids]))  # each shard read once
    rows = []
    for label, ids in shown.items():
        photos = [_photo(raws[i], i) for i in ids]
        rows.append([f"{label}"] + photos + [""] * (per_count - len(photos)))
    return _table(rows, ["count"] + [f"photo {k + 1}" for k in range(per_count)])


def skipped_components(skipped) -> list:
    if skipped is None or len(skipped) == 0:
        return [_md("## Skipped objects\n\nNone: every chosen object was a readable photo with a valid count.")]
    reason_kind = skipped["reason"].astype(str).str.split(":").str[0]
    summary = reason_kind.value_counts()
    return [_md(f"## Skipped objects ({len(skipped)})\n\nEach object left out of the subset, and why."),
            _table([[k, v] for k, v in summary.items()], ["reason", "objects"]),
            _df_table(skipped[["id", "reason"]])]


def fetch_components(subset, skipped, class_counts: dict, images: dict, source: str = "") -> list:
    return [_md(f"# Subset\n\n{len(subset)} bins kept, {len(skipped)} skipped"
                + (f", from `{source}`" if source else "") + "."),
            class_histogram(class_counts),
            _md(f"## Sample photos per count\n\nThe first {PHOTOS_PER_COUNT} photos of each count "
                f"(thumbnails, at most {THUMBNAIL_PX} px)."),
            photo_grid(subset, images),
            *skipped_components(skipped)]


@appends_safely
def fetch_card(flow) -> list:
    return fetch_components(flow.subset, flow.skipped, flow.class_counts, photos_in(flow), str(flow.source))


# --- split ------------------------------------------------------------------------

def split_histogram(split_counts):
    import numpy as np

    fig, ax = _figure(6, 2.8)
    ax = ax[0, 0]
    labels = [str(c) for c in split_counts.index]
    x = np.arange(len(labels))
    width = 0.8 / max(len(split_counts.columns), 1)
    for k, split in enumerate(split_counts.columns):
        bars = ax.bar(x + k * width, split_counts[split].values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x + width * (len(split_counts.columns) - 1) / 2, labels)
    ax.margins(y=0.15)
    ax.set(xlabel="items in the bin", ylabel="bins", title="Bins per count in each split")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _image(fig, "Bins per count in each split")


def split_components(split_counts) -> list:
    table = split_counts.copy()
    table.loc["total"] = table.sum()
    table["all"] = table.sum(axis=1)
    table.index.name = "count"
    return [_md(f"# Split\n\n{int(split_counts.values.sum())} bins: "
                + ", ".join(f"{int(split_counts[s].sum())} {s}" for s in split_counts.columns) + "."),
            split_histogram(split_counts),
            _df_table(table, index=True)]


@appends_safely
def split_card(flow) -> list:
    return split_components(flow.split_counts)


# --- train ------------------------------------------------------------------------

PHASES = (("data_seconds", "data: augment + load", "#dd8452"),
          ("compute_seconds", "forward + backward + step", "#4c72b0"),
          ("val_seconds", "validation", "#55a868"))


def learning_curves(history: list[dict], best_epoch: int | None = None, title: str = "Learning curves"):
    fig, axes = _figure(9, 3, ncols=2)
    epochs = [r["epoch"] for r in history]
    for ax, metric in zip(axes[0], ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label=f"train {metric}")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "s-", label=f"validation {metric}")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        if metric == "loss":
            _log_if_spread(ax, [r[k] for r in history for k in ("train_loss", "val_loss")])
        ax.set(xlabel="epoch", title=metric)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _image(fig, title)


def _log_if_spread(ax, values, ratio: float = 20.0) -> None:
    """A log scale when one early spike would flatten the rest of a (positive) curve."""
    positive = [v for v in values if v is not None and v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > ratio:
        ax.set_yscale("log")


def throughput_chart(history: list[dict]):
    fig, axes = _figure(9, 2.6, ncols=2)
    epochs = [r["epoch"] for r in history]
    axes[0, 0].bar(epochs, [r["train_images_per_second"] for r in history], color="#4c72b0")
    axes[0, 0].set(xlabel="epoch", ylabel="images/s", title="training throughput")
    axes[0, 1].bar(epochs, [r["epoch_seconds"] for r in history], color="#8172b3")
    axes[0, 1].set(xlabel="epoch", ylabel="seconds", title="time per epoch (train + validation)")
    return _image(fig, "Throughput and time per epoch")


def profile_chart(history: list[dict]):
    fig, ax = _figure(7.5, 2.8)
    ax = ax[0, 0]
    epochs = [r["epoch"] for r in history]
    bottom = [0.0] * len(history)
    for key, label, color in PHASES:
        values = [r.get(key, 0.0) for r in history]
        ax.bar(epochs, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    other = [max(r["epoch_seconds"] - b, 0.0) for r, b in zip(history, bottom)]
    ax.bar(epochs, other, bottom=bottom, label="other", color="#c0c0c0")
    ax.set(xlabel="epoch", ylabel="seconds", title="Where each epoch's time went")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _image(fig, "Where each epoch's time went")


def profile_rules(history: list[dict], best_epoch: int | None) -> list[str]:
    """Findings in the spirit of SageMaker Debugger's rules: what looks wrong, with numbers."""
    findings = []
    total = sum(r["epoch_seconds"] for r in history)
    data = sum(r.get("data_seconds", 0.0) for r in history)
    if total and data / total > 0.3:
        findings.append(f"**Data bottleneck**: preparing batches took {data / total:.0%} of the time; "
                        "the network waited for augmentation.")
    cpu = [r["cpu_percent"] for r in history if "cpu_percent" in r]
    if cpu and "gpu_max_memory_mb" not in history[0] and sum(cpu) / len(cpu) < 50:
        findings.append(f"**Low CPU utilisation**: {sum(cpu) / len(cpu):.0f}% of the cores on average "
                        "(another process shared them, or threads waited).")
    gpu = [r["gpu_utilization_percent"] for r in history if "gpu_utilization_percent" in r]
    if gpu and sum(gpu) / len(gpu) < 50:
        findings.append(f"**Low GPU utilisation**: {sum(gpu) / len(gpu):.0f}% on average.")
    if best_epoch and best_epoch < len(history):
        after = history[best_epoch - 1:]
        if after[-1]["train_loss"] < after[0]["train_loss"] and after[-1]["val_loss"] > after[0]["val_loss"]:
            findings.append(f"**Overfitting**: after epoch {best_epoch} the training loss kept falling while "
                            "the validation loss rose; the best epoch's weights were kept.")
    if len(history) >= 2 and history[-1]["train_loss"] >= history[0]["train_loss"]:
        findings.append("**Loss not decreasing**: the last epoch's training loss is not below the first's.")
    return findings or ["No rule fired: no data bottleneck, overfitting or stalled loss found."]


def profile_components(history: list[dict], best_epoch: int | None = None) -> list:
    out = [_md("## Profile\n\nSeconds per epoch: preparing batches (augmentation, normalisation, copy to "
               "the device) against the network's forward, backward and optimizer step, and validation.")]
    if not history or "data_seconds" not in history[0]:
        return out + [_md("_This run's train loop did not time its phases._")]
    total = sum(r["epoch_seconds"] for r in history) or 1.0
    sums = {label: sum(r.get(key, 0.0) for r in history) for key, label, _ in PHASES}
    sums["other"] = max(total - sum(sums.values()), 0.0)
    out += [profile_chart(history),
            _table([[label, s, f"{s / total:.0%}"] for label, s in sums.items()], ["phase", "seconds", "share"])]
    resources = {"mean CPU utilisation (% of cores)": _mean(history, "cpu_percent"),
                 "peak process memory (MB)": _max(history, "max_rss_mb"),
                 "peak GPU memory (MB)": _max(history, "gpu_max_memory_mb"),
                 "mean GPU utilisation (%)": _mean(history, "gpu_utilization_percent")}
    out += [_md("### Resources"),
            _kv_table({k: ("not available" if v is None else v) for k, v in resources.items()},
                      ("resource", "value")),
            _md("### Rules\n\n" + "\n".join(f"- {f}" for f in profile_rules(history, best_epoch)))]
    return out


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _max(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


CURVE_COLUMNS = {"epoch": "epoch", "train_loss": "train loss", "train_accuracy": "train acc",
                 "val_loss": "val loss", "val_accuracy": "val acc", "lr": "lr"}
TIMING_COLUMNS = {"epoch": "epoch", "epoch_seconds": "epoch s", "train_images_per_second": "images/s",
                  "data_seconds": "data s", "compute_seconds": "compute s", "val_seconds": "validation s",
                  "cpu_percent": "CPU %", "max_rss_mb": "RSS MB", "gpu_max_memory_mb": "GPU MB",
                  "gpu_utilization_percent": "GPU %"}


def _epoch_table(history: list[dict], columns: dict):
    keys = [k for k in columns if history and k in history[0]]
    return _table([[r.get(k) for k in keys] for r in history], [columns[k] for k in keys])


def train_components(history: list[dict], scores: dict) -> list:
    config = scores.get("config", {})
    name = config.get("name", "?")
    summary = {"best epoch": scores.get("best_epoch"), "validation accuracy": scores.get("val_accuracy"),
               "validation loss": scores.get("val_loss"), "training seconds": scores.get("train_seconds"),
               "images/s (whole run)": scores.get("images_per_second"), "device": scores.get("device")}
    return [_md(f"# Grid point `{name}`"),
            _kv_table(summary, ("score", "value")),
            _md("## Hyperparameters"),
            _kv_table(config, ("hyperparameter", "value")),
            _md("## Learning curves"),
            learning_curves(history, scores.get("best_epoch"), f"Learning curves: {name}"),
            _md("## Throughput"),
            throughput_chart(history),
            *profile_components(history, scores.get("best_epoch")),
            _md("## Every epoch"),
            _epoch_table(history, CURVE_COLUMNS),
            _epoch_table(history, TIMING_COLUMNS)]


@appends_safely
def train_card(flow) -> list:
    return train_components(flow.history, flow.scores)


def progress_components(result, epochs: int) -> list:
    """The train card while its grid point trains: the curves so far, the speed, the time left."""
    history = result.history
    done, last = len(history), history[-1]
    per_epoch = sum(r["epoch_seconds"] for r in history[-3:]) / len(history[-3:])  # recent epochs: the pace now
    left = (epochs - done) * per_epoch
    name = result.config.get("name", "?")
    return [_md(f"# Grid point `{name}`: training, epoch {done} of {epochs}\n\n"
                f"Best so far: epoch {result.best_epoch}, validation accuracy {result.val_accuracy:.3f}. "
                f"Last epoch: {last['epoch_seconds']:.0f} s, {last['train_images_per_second']:.1f} images/s. "
                f"About {_duration(left)} left. This card is redrawn as epochs end (at most every "
                f"{TRAIN_CARD_INTERVAL_S:.0f} s); the final report replaces it when the point is done."),
            learning_curves(history, result.best_epoch, f"Learning curves so far: {name}")]


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 \
        else f"{minutes} min"


JOB_CARD_INTERVAL_S = 10.0  # a SageMaker job's log can be many lines a second; each card render is a process
# Each redraw of a card is a process of its own (``flow.py card create``): short epochs would keep one
# busy beside training, so the train card is redrawn after the first epoch and then at most this often.
TRAIN_CARD_INTERVAL_S = 10.0


def _redraw_throttled(card, interval_s: float, *, force: bool = False):
    """``redraw(components_of, urgent=False)``: replace ``card``'s components with
    ``components_of()`` and refresh it, the first time, when ``urgent``, or once ``interval_s``
    has passed since the last redraw; otherwise do nothing. A failure is a warning: a report
    must never cost the run."""
    import time

    last_drawn = [float("-inf")]

    def redraw(components_of, urgent: bool = False) -> None:
        now = time.monotonic()
        if not urgent and now - last_drawn[0] < interval_s:
            return
        last_drawn[0] = now
        try:
            components = components_of()
            card.clear()
            card.extend(components)
            card.refresh(force=force)
        except Exception as e:  # noqa: BLE001 - a report must never cost the run
            print(f"warning: the train card could not be refreshed: {type(e).__name__}: {e}", file=sys.stderr)

    return redraw


def job_progress(card, grid_point: str, keep: int = 25, interval_s: float = JOB_CARD_INTERVAL_S):
    """A ``log`` for a grid point trained by a SageMaker job: each line is printed as before, and the
    train step's card shows the job's latest status and its last ``keep`` log lines (redrawn when the
    status changes, else at most every ``interval_s``)."""
    from collections import deque

    lines: deque = deque(maxlen=keep)
    status = ["the job is being started"]
    redraw = _redraw_throttled(card, interval_s)

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        changed = line.startswith(("training job ", "started SageMaker training job"))
        if changed:
            status[0] = line
        redraw(lambda: [_md(f"# Grid point `{grid_point}`: SageMaker training job\n\n{status[0]}\n\n"
                            f"The job's last {len(lines)} log lines:"),
                        _md("```\n" + "\n".join(lines) + "\n```")], urgent=changed)

    return log


def train_progress(card, epochs: int, interval_s: float = TRAIN_CARD_INTERVAL_S):
    """A ``fit(on_epoch=...)`` callback that redraws this train step's card after an epoch: the
    first, then any that ends ``interval_s`` or more after the last redraw (Metaflow's dynamic
    cards: the step's ``@card`` has a ``refresh_interval`` short enough that none is dropped)."""
    redraw = _redraw_throttled(card, interval_s, force=True)
    return lambda result: redraw(lambda: progress_components(result, epochs))


# --- join -------------------------------------------------------------------------

SCORE_COLUMNS = {"best_epoch", "val_accuracy", "val_loss", "train_seconds", "train_images_per_second", "device",
                 "stopped_after", "outcome"}


def varying_hyperparameters(grid_results) -> list[str]:
    return [c for c in grid_results.columns
            if c not in SCORE_COLUMNS | {"name"} and grid_results[c].astype(str).nunique() > 1]


LOG_SCALED = {"lr", "weight_decay"}  # charted on a log axis, like any a search draws log-uniformly


def _numeric(values) -> bool:
    return bool(values.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all())


def _stopped(grid_results) -> list[bool]:
    if "stopped_after" not in grid_results:  # runs from before early stopping
        return [False] * len(grid_results)
    return [bool(v) for v in grid_results["stopped_after"].fillna(0)]


def hyperparameter_chart(grid_results, chosen: str, log_scaled: set[str] = frozenset()):
    params = varying_hyperparameters(grid_results)
    if not params:
        return _md("_Every grid point has the same hyperparameters but its name: nothing to chart._")
    ncols = min(len(params), 4)
    nrows = -(-len(params) // ncols)
    fig, axes = _figure(max(3.2 * ncols, 5.0), 3.0 * nrows, ncols=ncols, nrows=nrows)
    label = len(grid_results) <= 12  # names on the points while they can be read
    for ax, param in zip(axes.flat, params):
        values = grid_results[param]
        numeric = _numeric(values)
        xs = values.astype(float) if numeric else values.astype(str)
        colors = ["#c44e52" if n == chosen else "#4c72b0" for n in grid_results["name"]]
        ax.scatter(xs, grid_results["val_accuracy"], c=colors, s=40, alpha=0.85, linewidths=1.2,
                   edgecolors=[(0, 0, 0, 1) if s else (0, 0, 0, 0) for s in _stopped(grid_results)])
        for x, y, n in zip(xs, grid_results["val_accuracy"], grid_results["name"]):
            if label or n == chosen:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if numeric and param in LOG_SCALED | set(log_scaled) and (xs > 0).all():
            ax.set_xscale("log")
        ax.margins(0.15)
        ax.set(xlabel=param, ylabel="validation accuracy")
    for ax in list(axes.flat)[len(params):]:
        ax.set_visible(False)
    fig.suptitle("Validation accuracy by hyperparameter (red: chosen; black edge: stopped early)", fontsize=10)
    return _image(fig, "Validation accuracy against each hyperparameter")


def parallel_coordinates(grid_results, chosen: str, log_scaled: set[str] = frozenset()):
    """One line per grid point across an axis per varying hyperparameter (each scaled to its own
    range, log where searched so), coloured by validation accuracy: which combinations score."""
    import numpy as np
    from matplotlib import cm
    from matplotlib.colors import Normalize

    params = varying_hyperparameters(grid_results)
    if len(params) < 2 or len(grid_results) < 3:
        return None
    columns, ticks = [], []
    for param in params:
        values = grid_results[param]
        if _numeric(values):
            x = values.astype(float).to_numpy()
            if (param in LOG_SCALED | set(log_scaled)) and (x > 0).all():
                x = np.log10(x)
            low, high = x.min(), x.max()
            shown = values.astype(float)
            ticks.append((_fmt(shown.min()), _fmt(shown.max())))
        else:
            levels = sorted(values.astype(str).unique())
            x = values.astype(str).map(levels.index).to_numpy().astype(float)
            low, high = 0.0, float(len(levels) - 1)
            ticks.append((levels[0], levels[-1]))
        columns.append((x - low) / (high - low) if high > low else np.full(len(x), 0.5))
    data = np.column_stack(columns)
    accuracy = grid_results["val_accuracy"].to_numpy(dtype=float)
    norm = Normalize(accuracy.min(), accuracy.max() if accuracy.max() > accuracy.min() else accuracy.min() + 1e-9)
    fig, axes = _figure(max(1.6 * len(params), 6.0), 3.6)
    ax = axes[0, 0]
    for row, acc, name in sorted(zip(data, accuracy, grid_results["name"]), key=lambda t: t[1]):  # best on top
        ax.plot(range(len(params)), row, color=cm.viridis(norm(acc)), lw=3 if name == chosen else 1.2, alpha=0.9)
    for i, (low, high) in enumerate(ticks):
        ax.axvline(i, color="0.6", lw=0.8)
        ax.annotate(low, (i, 0), xytext=(2, -12), textcoords="offset points", fontsize=7)
        ax.annotate(high, (i, 1), xytext=(2, 4), textcoords="offset points", fontsize=7)
    ax.set_xticks(range(len(params)), params, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.12)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="validation accuracy")
    ax.set_title("Every grid point across its hyperparameters (thick: chosen)", fontsize=10)
    return _image(fig, "Parallel coordinates of the hyperparameters, coloured by validation accuracy")


def grid_curves(grid_histories: dict, chosen: str):
    fig, axes = _figure(9, 3, ncols=2)
    for name, history in grid_histories.items():
        epochs = [r["epoch"] for r in history]
        width = 2.5 if name == chosen else 1.2
        axes[0, 0].plot(epochs, [r["val_accuracy"] for r in history], "o-", lw=width, label=name)
        axes[0, 1].plot(epochs, [r["val_loss"] for r in history], "o-", lw=width, label=name)
    axes[0, 0].set(xlabel="epoch", title="validation accuracy")
    axes[0, 1].set(xlabel="epoch", title="validation loss")
    _log_if_spread(axes[0, 1], [r["val_loss"] for h in grid_histories.values() for r in h])
    if len(grid_histories) <= 12:
        axes[0, 0].legend(fontsize=8)
    return _image(fig, "Validation curves of every grid point")


def grid_table(grid_results, chosen: str):
    """One row per grid point, ranked best first: what varies across the grid, and the scores."""
    varying = varying_hyperparameters(grid_results)
    scores = [c for c in ("val_accuracy", "val_loss", "best_epoch", "train_seconds", "train_images_per_second",
                          "device") if c in grid_results.columns]
    table = grid_results[["name", *varying, *scores]].copy()
    if any(_stopped(grid_results)):
        epochs = grid_results["epochs"] if "epochs" in grid_results else [None] * len(grid_results)
        table["outcome"] = [f"stopped after epoch {int(s)} of {e}" if s else "every epoch"
                            for s, e in zip(grid_results["stopped_after"].fillna(0), epochs)]
    table.insert(0, "rank", range(1, len(table) + 1))
    table.insert(1, "chosen", [WINNER_MARK if n == chosen else "" for n in table["name"]])
    return table


def served_text(model_meta: dict | None) -> str:
    """What the endpoint serves, when it is more than the best point alone."""
    from bincount.model.metadata import ModelMeta

    if model_meta is None:
        return ""
    model_meta = ModelMeta.from_dict(model_meta)
    members = [m.grid_point for m in model_meta.members]
    if len(members) <= 1 and not model_meta.tta:
        return ""
    what = f"the mean softmax of **{' + '.join(members)}**" if len(members) > 1 else f"**{members[0]}**"
    tta = " over the four flips of each photo" if model_meta.tta else ""
    rule = ("the count nearest its expected value" if model_meta.decision == "expected"
            else "its likeliest count")
    return f"\n\nServed: {what}{tta}, answering {rule}; validation accuracy {model_meta.val_accuracy:.3f}."


def failed_components(failed_points: list[dict]) -> list:
    """The grid points that failed after their retries, with their errors (empty when none did)."""
    if not failed_points:
        return []
    return [_md(f"## Failed grid points ({len(failed_points)})\n\nThese failed after their retries and were left "
                "out of the choice; each task's log has the traceback."),
            _table([[f["name"], f["error"]] for f in failed_points], ["grid point", "error"])]


def search_text(search, search_trials: list[dict], warm_trials: list[dict]) -> str:
    """A line on the grid's search: strategy, space, how its trials ended, what it learnt from."""
    if search is None:
        return ""
    ended = {status: sum(1 for t in search_trials if t["status"] == status)
             for status in ("complete", "stopped", "failed")}
    stopping = search.early_stopping
    return (f"\n\nSearch: **{search.strategy}**, {search.trials} trials over "
            + ", ".join(f"{k} {json.dumps(v)}" for k, v in search.space.items())
            + f" (seed {search.seed}): {ended['complete']} trained every epoch, {ended['stopped']} stopped early"
            + (f" (median rule after {stopping.warmup_epochs} epoch(s), once {stopping.min_trials} trials had "
               "finished)" if stopping else "")
            + f", {ended['failed']} failed."
            + (f" Warm-started from {len(warm_trials)} trials of run {warm_trials[0]['run_id']}." if warm_trials
               else ""))


def join_components(grid_results, grid_histories: dict, chosen: str, model_meta: dict | None = None,
                    failed_points: list[dict] = (), search=None, search_trials: list[dict] = (),
                    warm_trials: list[dict] = ()) -> list:
    varying = varying_hyperparameters(grid_results)
    shared = {c: grid_results[c].iloc[0] for c in grid_results.columns
              if c not in SCORE_COLUMNS | {"name"} and c not in varying}
    best = grid_results[grid_results["name"] == chosen].iloc[0]
    log_scaled = search.log_scaled() if search else set()
    coordinates = parallel_coordinates(grid_results, chosen, log_scaled)
    return [_md(f"# Grid: {len(grid_results)} points\n\nBest: **{chosen}**, validation accuracy "
                f"{best['val_accuracy']:.3f} (loss {best['val_loss']:.3f}). Ranked by validation accuracy, "
                "then lower validation loss. To sort by any column, open this step's `grid` card."
                + served_text(model_meta) + search_text(search, search_trials, warm_trials)),
            _df_table(grid_table(grid_results, chosen)),
            _md("Shared by every point: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shared.items())
                if shared else "No hyperparameter is shared by every point."),
            *failed_components(failed_points),
            hyperparameter_chart(grid_results, chosen, log_scaled),
            *([coordinates] if coordinates is not None else []),
            grid_curves(grid_histories, chosen)]


@appends_safely
def join_card(flow) -> list:
    from bincount.model.grid import grid_search

    return join_components(flow.grid_results, flow.grid_histories, flow.chosen, flow.model_meta,
                           getattr(flow, "failed_points", []), search=grid_search(flow.grid.to_dict()),
                           search_trials=flow.search_trials, warm_trials=flow.warm_trials)


# The join step's second card, @card(type="bincount_sortable_table", id="grid"): the same table, which
# can be re-sorted in the page by clicking a column header (Metaflow's Table cannot). The card type is
# this repository's Metaflow extension, metaflow_extensions/bincount/plugins/cards/sortable_table.

def grid_components(grid_results, chosen: str, failed_points: list[dict] = ()) -> list:
    return [_df_table(grid_table(grid_results, chosen)), *failed_components(failed_points)]


@appends_safely
def grid_card(flow) -> list:
    return grid_components(flow.grid_results, flow.chosen, getattr(flow, "failed_points", []))


# --- evaluate ---------------------------------------------------------------------

def confusion_heatmap(matrix: list[list[int]], classes: list):
    import numpy as np

    m = np.asarray(matrix)
    size = 1.0 + 0.6 * len(classes)
    fig, ax = _figure(size + 1.2, size)
    ax = ax[0, 0]
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set(xlabel="predicted count", ylabel="true count", title="Confusion matrix (test)")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _image(fig, "Confusion matrix")


def calibration(labels: list[int], predictions: list[dict], bins: int = CALIBRATION_BINS) -> list[dict]:
    """Reliability per confidence bin: mean confidence of the predicted count against its accuracy."""
    rows = [{"low": k / bins, "high": (k + 1) / bins, "n": 0, "confidence": 0.0, "accuracy": 0.0}
            for k in range(bins)]
    for label, p in zip(labels, predictions):
        confidence = p["probabilities"][str(p["count"])]
        row = rows[min(int(confidence * bins), bins - 1)]
        row["n"] += 1
        row["confidence"] += confidence
        row["accuracy"] += float(p["count"] == label)
    for row in rows:
        if row["n"]:
            row["confidence"] /= row["n"]
            row["accuracy"] /= row["n"]
    return rows


def expected_calibration_error(rows: list[dict]) -> float:
    n = sum(r["n"] for r in rows) or 1
    return sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / n


def reliability_diagram(rows: list[dict]):
    fig, ax = _figure(4.2, 3.6)
    ax = ax[0, 0]
    used = [r for r in rows if r["n"]]
    width = rows[0]["high"] - rows[0]["low"]
    ax.bar([r["low"] for r in used], [r["accuracy"] for r in used], width=width, align="edge",
           edgecolor="black", color="#4c72b0", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], "o", color="#c44e52",
            label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence in the predicted count", ylabel="accuracy",
           title=f"Reliability (ECE {expected_calibration_error(rows):.3f})")
    ax.legend(fontsize=7, loc="upper left")
    return _image(fig, "Reliability diagram")


def worst_mistakes(labels: dict, predictions: dict, k: int = WORST_MISTAKES) -> list[tuple]:
    """The ``k`` most confident wrong answers: (id, true, predicted, p(predicted), p(true))."""
    wrong = []
    for bin_id, p in predictions.items():
        true = labels[bin_id]
        if p["count"] != true:
            wrong.append((bin_id, true, p["count"], p["probabilities"][str(p["count"])],
                          p["probabilities"].get(str(true), 0.0)))
    return sorted(wrong, key=lambda w: (-w[3], w[4]))[:k]


def evaluate_components(test_metrics: dict, test_predictions: dict, split_table, images: dict) -> list:
    test = split_table[split_table["split"] == "test"]
    labels = dict(zip(test["id"], test["label"]))
    ids = [i for i in test_predictions if i in labels]
    rows = calibration([labels[i] for i in ids], [test_predictions[i] for i in ids])
    per_class = [[c, m["precision"], m["recall"], m["f1"], m["support"]]
                 for c, m in test_metrics["per_class"].items()]
    mistakes = worst_mistakes(labels, test_predictions)
    raws = dict(read_photos(images, [m[0] for m in mistakes if m[0] in images]))
    gallery = [[_photo(raws[i], i) if i in raws else "", i, t, p, f"{pp:.3f}", f"{pt:.3f}", abs(p - t)]
               for i, t, p, pp, pt in mistakes]
    return [_md(f"# Test: {test_metrics['n']} bins\n\naccuracy **{test_metrics['accuracy']:.3f}**, "
                f"RMSE {test_metrics['rmse']:.3f}, MAE {test_metrics['mae']:.3f} (items)."),
            confusion_heatmap(test_metrics["confusion_matrix"], test_metrics["classes"]),
            _md("## Per count"),
            _table(per_class, ["count", "precision", "recall", "F1", "support"]),
            _md("## Calibration\n\nHow often the model is right when it is this sure; ECE is the "
                "bin-weighted gap between confidence and accuracy."),
            reliability_diagram(rows),
            _table([[f"{r['low']:.1f}-{r['high']:.1f}", r["n"], r["confidence"], r["accuracy"]]
                    for r in rows if r["n"]], ["confidence bin", "bins", "mean confidence", "accuracy"]),
            _md(f"## Worst mistakes\n\nThe {len(mistakes)} most confident wrong answers."
                if mistakes else "## Worst mistakes\n\nNone: every test bin was counted right."),
            *([_table(gallery, ["photo", "id", "true count", "predicted", "p(predicted)", "p(true)", "off by"])]
              if mistakes else [])]


@appends_safely
def evaluate_card(flow) -> list:
    return evaluate_components(flow.test_metrics, flow.test_predictions, flow.split_table, photos_in(flow))


# --- deploy -------------------------------------------------------------------------

def deploy_components(deployment: dict, champion_decision: dict | None) -> list:
    target = deployment.get("target", "?")
    deployed = bool(champion_decision and champion_decision.get("deploy"))
    if target == "none":
        headline = "Not deployed: `--deploy-target none`."
    elif deployed:
        headline = f"Deployed to **{target}**."
    else:
        headline = f"Not deployed to **{target}**: {champion_decision.get('reason') if champion_decision else ''}."
    out = [_md(f"# Deployment\n\n{headline}")]
    if champion_decision:
        out += [_md("## Champion decision"), _kv_table(champion_decision, ("field", "value"))]
    details = {k: v for k, v in deployment.items() if k != "smoke_test" and not isinstance(v, (dict, list))}
    if deployed:
        out += [_md("## What went where"), _kv_table(details, ("field", "value"))]
    smoke = deployment.get("smoke_test")
    if smoke:
        latency = {k: v for k, v in smoke.items() if k.startswith("latency")}
        out += [_md(f"## Smoke test\n\n{smoke.get('requests', 0)} requests over HTTP, "
                    f"{len(smoke.get('mismatches', []))} answers differing from in-process predictions."),
                _kv_table({k.replace("latency_ms_", ""): v for k, v in latency.items()},
                          ("latency", "ms"))]
        others = {k: v for k, v in smoke.items() if k not in latency and k not in {"requests", "mismatches"}}
        if others:
            out.append(_kv_table(others, ("field", "value")))
    return out


@appends_safely
def deploy_card(flow) -> list:
    return deploy_components(flow.deployment, flow.champion_decision)
