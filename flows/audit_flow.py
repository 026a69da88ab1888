"""Inventory audit at scale: flag bins whose photo disagrees with their record.

    start -> list_ids -> score (foreach shard) -> join -> end

start picks the model (--run ID; else --champion TARGET, the BinCountFlow run
tagged champion:TARGET on this audit run's own project branch; else the latest
successful BinCountFlow run on that branch) and chooses the flag threshold on
that run's validation split; list_ids lists the bins of --source (or reads --ids);
each score task fetches and scores one shard with the same data path
(open_source, fetch_subset) and handler (bincount.serving.handler) as everything
else; join writes one report (audit.csv, audit.html, summary.json) to --out
and keeps it as artifacts. The logic is in bincount/audit.py.

    python flows/audit_flow.py run --source ../shared/abid-sample --out audit-report
    python flows/audit_flow.py run --source s3://aft-vbi-pds --ids ids.txt --shard-size 1000
    python flows/audit_flow.py --production run --source s3://aft-vbi-pds --champion sagemaker

Both flows are one @project ("bincount"): an audit run on a branch (your own
user.<name>, --branch NAME, --production) reads that branch's models, so a
production audit uses the production champion.

One bad bin is a row with its reason, never a failed task. When a task does
fail (the source down as a whole, a machine lost), `resume` keeps what was
scored: Metaflow clones every score task that finished, by its foreach index,
and runs only the failed shards and the steps after. (The CLI's
`bincount audit`, which has no datastore, saves each scored shard under
--out instead.) The report set is replaced as a whole (bincount.audit.write_report).

    python flows/audit_flow.py resume
"""

import os

from metaflow import FlowSpec, Parameter, current, project, step


@project(name="bincount")
class AuditFlow(FlowSpec):
    source = Parameter("source", required=True,
                       help="s3://bucket[/prefix], a local folder in the bucket layout, or 'synthetic'.")
    ids = Parameter("ids", default="",
                    help="Only these bins: a Udacity file_list.json or a text file with one id a line.")
    model_run_id = Parameter("run", default="",
                             help="BinCountFlow run id of the model, whoever made it (default: the latest "
                                  "successful BinCountFlow run on this run's project branch).")
    champion = Parameter("champion", default="",
                         help="Use the BinCountFlow run tagged champion:TARGET (e.g. local) on this run's "
                              "project branch (--production: the production champion).")
    target_precision = Parameter("target-precision", default=0.9, type=float,
                                 help="Precision the threshold must reach on the validation split.")
    shard_size = Parameter("shard-size", default=500, type=int, help="Bins per scoring task.")
    out = Parameter("out", default="audit-report", help="Folder for audit.csv, audit.html and summary.json.")
    workers = Parameter("workers", default=32, type=int, help="Parallel downloads per scoring task.")

    @step
    def start(self):
        """Choose the model run and the threshold (on that run's validation split)."""
        from bincount.audit import threshold_for_run
        from bincount.flow.run_choice import choose_run
        from bincount.flow.runs import ProjectBranch, model_of
        from bincount.model.predictor import load_predictor

        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")
        # This run's own project branch scopes the lookup: a production audit never picks up a
        # model from someone's test branch.
        branch = None if self.model_run_id else ProjectBranch(current.branch_name, current.project_name)
        choice = choose_run(self.model_run_id or None, champion=self.champion or None, branch=branch)
        print(choice.line())
        run = choice.run
        self.model_run = run.pathspec
        self.model_choice = choice.why
        self.model_state, meta = model_of(run)  # kept here: the shards need no other run
        self.model_meta = meta.to_dict()
        predictor = load_predictor(self.model_state, meta)
        self.threshold = threshold_for_run(run, predictor, target_precision=self.target_precision).as_dict()
        self.model_classes = meta.classes
        self.out_dir = os.path.abspath(self.out)
        print(f"model {self.model_run}; threshold {self.threshold['value']:.3f} "
              f"({self.threshold['note']})")
        self.next(self.list_ids)

    @step
    def list_ids(self):
        """The bins to audit, in shards."""
        from bincount.audit import chunks_of, read_ids
        from bincount.data.sources import open_source

        if self.ids:
            ids = read_ids(self.ids)
        else:
            source = open_source(self.source, classes=self.model_classes)
            source.check()
            ids = list(source.list_ids())
        self.n_ids = len(ids)
        self.shards = chunks_of(ids, self.shard_size)
        print(f"{self.n_ids} bins in {len(self.shards)} shards")
        self.next(self.score, foreach="shards")

    @step
    def score(self):
        """Fetch and score one shard."""
        from bincount.audit import score_bins
        from bincount.data.sources import open_source
        from bincount.model.predictor import load_predictor

        predictor = load_predictor(self.model_state, self.model_meta)
        source = open_source(self.source, classes=predictor.classes, max_pool_connections=self.workers)
        part = score_bins(source, predictor, self.threshold["value"], candidate_ids=self.input,
                          workers=self.workers)
        self.rows, self.thumbnails = part.rows, part.thumbnails
        self.next(self.join)

    @step
    def join(self, inputs):
        """One report from every shard: written to --out and kept as artifacts."""
        from bincount.audit import (AuditPart, Threshold, combine, render_html, rows_table, summary_line, to_csv,
                                    write_report)

        self.merge_artifacts(inputs, exclude=["rows", "thumbnails"])
        # one shard's thumbnails at a time: combine keeps only those the report shows
        report = combine((AuditPart(inp.rows, inp.thumbnails) for inp in inputs),
                         threshold=Threshold(**self.threshold), model_run=self.model_run, source=self.source,
                         classes=self.model_classes)
        self.audit = rows_table(report.rows)  # id, expected, predicted, ..., flagged, status, reason
        self.flagged_ids = [r["id"] for r in report.flagged()]
        self.summary = report.summary()
        self.report_csv = to_csv(report.rows)
        self.report_html = render_html(report)
        self.report_paths = {k: str(v) for k, v in write_report(report, self.out_dir).items()}
        print(summary_line(report))
        self.next(self.end)

    @step
    def end(self):
        print(f"{self.summary['flagged']} flagged; report: {self.report_paths['html']}")


if __name__ == "__main__":
    AuditFlow()
