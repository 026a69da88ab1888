"""Monitoring an endpoint from its captured traffic, as a flow: the report in a card, the numbers as artifacts.

    start -> end

start picks the model run (--run ID; else --champion TARGET, the BinCountFlow run tagged
champion:TARGET on this run's own project branch; else the latest successful BinCountFlow run on
that branch), reads the traffic captured under --capture (the local endpoint's --capture-dir, or a
SageMaker endpoint's data-capture S3 prefix), compares it with that run's test split and keeps the
report: a card (charts, the per-bucket table, the least confident photos), the summary, the table
of captured photos and the HTML page as artifacts, and, with --out, the files `bincount monitor`
writes. The logic is in bincount/monitor.py; `bincount monitor` is the same without a datastore.

    python flows/monitor_flow.py run --capture capture/ --run 1733390000123456
    python flows/monitor_flow.py --production run --capture s3://bucket/capture/bincount --champion sagemaker
    python flows/monitor_flow.py card view start

A run that finds drift still succeeds: the verdict is the `drift` artifact (and the card's title),
so a scheduler can act on it without a failed run to clean up.
"""

from metaflow import FlowSpec, Parameter, card, current, project, step


@project(name="bincount")
class MonitorFlow(FlowSpec):
    capture = Parameter("capture", required=True,
                        help="The capture folder (the local endpoint's --capture-dir) or an s3:// prefix.")
    model_run_id = Parameter("run", default="",
                             help="BinCountFlow run id of the model, whoever made it (default: the latest "
                                  "successful BinCountFlow run on this run's project branch).")
    champion = Parameter("champion", default="",
                         help="Use the BinCountFlow run tagged champion:TARGET (e.g. local, sagemaker) on this "
                              "run's project branch (--production: the production champion).")
    bucket = Parameter("bucket", default="day", help="Time buckets of the report (UTC): hour or day.")
    psi_threshold = Parameter("psi-threshold", default=0.2, type=float,
                              help="PSI of the predicted counts from which they have drifted.")
    alpha = Parameter("alpha", default=0.01, type=float, help="Significance level of the chi-square and KS tests.")
    relabel = Parameter("relabel", default=50, type=int, help="Least confident photos listed with a thumbnail.")
    out = Parameter("out", default="", help="Also write monitor.html, monitor.csv and summary.json to this folder.")

    @card(type="blank", id="report")
    @step
    def start(self):
        """Choose the model run, read the captured traffic, compare, report."""
        import os

        from bincount import monitor
        from bincount.flow.cards import appends_safely
        from bincount.flow.run_choice import choose_run
        from bincount.flow.runs import ProjectBranch

        settings = monitor.Settings(bucket=self.bucket, psi_threshold=self.psi_threshold, alpha=self.alpha,
                                    relabel=self.relabel)
        # This run's own project branch scopes the lookup, as in AuditFlow.
        branch = None if self.model_run_id else ProjectBranch(current.branch_name, current.project_name)
        choice = choose_run(self.model_run_id or None, champion=self.champion or None, branch=branch)
        print(choice.line())
        self.model_run = choice.run.pathspec
        report = monitor.run_monitor(self.capture, choice.run, settings)
        for problem in report.problems:
            print(f"capture: skipped {problem}")
        self.drift = report.drift
        self.summary = report.summary()
        self.traffic = report.table  # one row per captured photo, as monitor.csv
        self.buckets = report.buckets
        self.report_html = monitor.render_html(report)
        self.report_paths = ({k: str(v) for k, v in monitor.write_report(report, os.path.abspath(self.out)).items()}
                             if self.out else {})
        print(monitor.verdict_line(report))
        appends_safely(monitor.card_components)(current.card, report)
        self.next(self.end)

    @step
    def end(self):
        print(f"{'drift' if self.drift else 'no drift'} in {self.summary['photos']} captured photos against "
              f"{self.model_run}" + (f"; report: {self.report_paths['html']}" if self.report_paths else ""))


if __name__ == "__main__":
    MonitorFlow()
