"""One train task's grid point: a fixed point, or a trial of a search, from its values to its outcome.

A search's trials are separate train tasks, perhaps on separate machines. What they share is a
folder of :class:`~bincount.model.search.TrialRecord` objects in the run's storage
(:class:`TrialStore`): each trial writes only its own record, when it starts (its values) and
when it ends (its curve and score, or its failure). An adaptive trial reads the others' to draw
its values, and every searched trial reads them after each epoch to decide whether to stop early.

A retried or resumed trial keeps the values it drew the first time (its record in this run, or
in the run a ``resume`` continues), so it goes on from its checkpoint rather than starting a
different trial.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from bincount.data.blobs import join, list_blobs, read_blob, write_blob
from bincount.model.grid import trial_config
from bincount.model.search import Search, TrialRecord, should_stop, suggest


@dataclass(frozen=True)
class TrialStore:
    """The records of one search: ``folder`` is this run's, ``resume_from`` the resumed run's,
    ``warm`` the records of earlier runs a ``--warm-start`` brought."""

    folder: str
    resume_from: str | None = None
    warm: tuple = ()

    def _read(self, folder: str | None) -> dict[str, TrialRecord]:
        records = {}
        for url in list_blobs(folder) if folder else []:
            if url.endswith(".json"):
                raw = read_blob(url)
                if raw is not None:
                    record = TrialRecord.from_dict(json.loads(raw))
                    records[record.name] = record
        return records

    def records(self) -> dict[str, TrialRecord]:
        """This run's trials by name, with those a resume cloned from the run it continues."""
        return {**self._read(self.resume_from), **self._read(self.folder)}

    def history(self, exclude: str | None = None, records: dict[str, TrialRecord] | None = None) -> list[TrialRecord]:
        """What a trial learns from: every other trial of this search (``records``, if already read),
        and the warm start's."""
        records = self.records() if records is None else records
        return [r for name, r in records.items() if name != exclude] + list(self.warm)

    def put(self, record: TrialRecord) -> None:
        write_blob(join(self.folder, f"{record.name}.json"), json.dumps(record.to_dict()).encode())


@dataclass
class GridPoint:
    """The settings one train task trains, and, for a search trial, its record."""

    config: object  # TrainConfig
    record: TrialRecord | None = None
    search: Search | None = None
    store: TrialStore | None = None

    def should_stop(self, result) -> bool:
        """After an epoch: whether this trial's curve so far says stop, judged against the trials
        finished by now (the others' records are read again each time)."""
        curve = [row["val_accuracy"] for row in result.history]
        return should_stop(self.search.early_stopping, self.search, self.record.params, curve,
                           self.store.history(exclude=self.record.name))

    @property
    def stopping(self):
        """``should_stop`` where this point may stop early (a trial of a search that stops early),
        else None: training then never asks."""
        return self.should_stop if self.record is not None and self.search.early_stopping else None

    def finish(self, result) -> None:
        if self.record is None:
            return
        self.record.status = "stopped" if result.stopped_after else "complete"
        self.record.value = result.val_accuracy
        self.record.curve = [row["val_accuracy"] for row in result.history]
        self.store.put(self.record)


def open_point(item: dict, *, defaults: dict, search: Search | None, store: TrialStore | None,
               run_id: str | None = None) -> GridPoint:
    """The grid point of a train foreach item (bincount.model.grid.plan_grid): a fixed point as it
    is; a trial with the values it already has (drawn up front, or by its own earlier attempt),
    or, in an adaptive search, values drawn now from the trials recorded so far."""
    from bincount.model.grid import TrainConfig

    if item.get("trial") is None:
        return GridPoint(TrainConfig(**item["config"]))
    name = item["name"]
    records = store.records()  # one read of the store (on S3 a listing and a GET per trial) serves both uses
    earlier = records.get(name)
    if earlier is not None:  # a retry, or a resumed run: go on with the same values
        params, informed_by = earlier.params, earlier.informed_by
        print(f"{name}: the values it drew before: {params}", flush=True)
    elif item.get("params") is not None:
        params, informed_by = item["params"], 0
    else:
        history = store.history(exclude=name, records=records)
        params, informed_by = suggest(search, item["trial"], history)
        print(f"{name}: drew {params} ({search.strategy}, from {informed_by} finished trials)", flush=True)
    record = TrialRecord(name=name, index=item["trial"], params=params, informed_by=informed_by, run_id=run_id)
    store.put(record)
    config = trial_config(defaults, {**params, "name": name}, f"search trial {name!r}")
    return GridPoint(config, record=record, search=search, store=store)


@contextmanager
def grid_point(item: dict, *, defaults: dict, search: Search | None, store: TrialStore | None,
               run_id: str | None = None, lock=None):
    """:func:`open_point` as a context: a trial that raises is recorded as failed (no other trial then
    counts it as still running), and the error goes on. ``lock`` (the machine's training lock) is held
    from an adaptive trial's draw to its end, so that on one machine each trial draws after the trials
    before it have finished, and learns from all of them."""
    drawing = item.get("trial") is not None and item.get("params") is None
    with lock() if lock is not None and drawing else nullcontext():
        point = open_point(item, defaults=defaults, search=search, store=store, run_id=run_id)
        try:
            yield point
        except BaseException:
            if point.record is not None:
                point.record.status = "failed"
                store.put(point.record)
            raise
