"""The bincount command: serve, query, score, audit and monitor the models the flow trains."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bincount import __version__


def _cmd_serve(args) -> int:
    from bincount.flow.runs import model_of
    from bincount.serving.handler import model_fn
    from bincount.serving.package import build_package, extract_package
    from bincount.serving.server import serve_with_arguments

    run = _chosen_run(args, sys.stdout)
    # The package is loaded as the endpoint loads it, then its folder goes: however the server
    # ends later (uvicorn re-raises SIGTERM, so no finally would run), nothing is left behind.
    with tempfile.TemporaryDirectory(prefix="bincount-serve-") as tmp:
        predictor = model_fn(str(extract_package(build_package(*model_of(run)), tmp)))
    serve_with_arguments(predictor, args, args.parser)
    return 0


def _chosen_run(args, say):
    """The run ``--run``, ``--champion``, ``--branch``/``--production`` or the default pick
    (bincount.flow.run_choice.choose_run); one line to ``say`` tells which run and why."""
    from bincount.flow.run_choice import choose_run
    from bincount.flow.runs import ProjectBranch

    branch = (ProjectBranch.from_options(production=args.production, branch=args.branch)
              if args.production or args.branch else None)
    choice = choose_run(args.run, champion=args.champion, branch=branch)
    print(f"bincount: {choice.line()}", file=say, flush=True)
    return choice.run


def _add_run_choice(parser: argparse.ArgumentParser, *, what: str = "run") -> None:
    """--run, --champion, --branch and --production: which run a command reads."""
    group = parser.add_argument_group(
        f"which {what}",
        "Default: the latest successful run in your own Metaflow namespace (user:<name>). The branch options "
        "name @project branches as the flow's own --branch/--production do.")
    one = group.add_mutually_exclusive_group()
    one.add_argument("--run", metavar="ID", help="this run id, whoever made it")
    one.add_argument("--champion", metavar="TARGET",
                     help="the run tagged champion:TARGET (e.g. local, sagemaker) on a project branch: your own "
                          "(user.<name>) unless --production or --branch says another")
    group.add_argument("--production", action="store_true",
                       help="the production branch (prod; prod.<name> with --branch): its champion, or its "
                            "latest successful run")
    group.add_argument("--branch", metavar="NAME", help="the test branch test.<NAME> (prod.<NAME> with --production)")


def _print_predictions(paths, predictions) -> None:
    for path, p in zip(paths, predictions):
        probs = " ".join(f"{k}:{v:.2f}" for k, v in p["probabilities"].items())
        print(f"{path}\tcount={p['count']}\tp={p['probabilities'][str(p['count'])]:.2f}\t[{probs}]")


def _cmd_predict(args) -> int:
    from bincount.serving.handler import RequestError, input_fn

    raws = {}
    for path in args.images:
        try:
            raws[path] = input_fn(Path(path).read_bytes(), "application/x-image")[0]
        except (OSError, RequestError) as e:
            print(f"{path}: skipped: {e}", file=sys.stderr)
    if not raws:
        return 2
    if args.endpoint:
        from bincount.serving.endpoint import invoke

        predictions = [invoke(args.endpoint.rstrip("/"), raw)["predictions"][0] for raw in raws.values()]
    elif args.endpoint_name:
        from bincount.sagemaker.endpoint import invoke_sagemaker, make_clients

        from bincount.aws.clients import default_region

        runtime = make_clients(args.region or default_region())["sagemaker-runtime"]
        predictions = [invoke_sagemaker(runtime, args.endpoint_name, raw, args.content_type) for raw in raws.values()]
    else:
        from bincount.flow.runs import predictor_of

        predictions = predictor_of(_chosen_run(args, sys.stderr)).predict_bytes(list(raws.values()))
    if args.json:
        print(json.dumps(dict(zip(raws, predictions)), indent=2))
    else:
        _print_predictions(raws, predictions)
    return 0 if len(raws) == len(args.images) else 1


def _cmd_evaluate(args) -> int:
    import tempfile

    from bincount.data.fetch import fetch_subset, read_file_list
    from bincount.data.shards import Photos, ShardSink
    from bincount.data.sources import open_source
    from bincount.flow.runs import predictor_of
    from bincount.model.metrics import count_metrics

    run = _chosen_run(args, sys.stderr)  # stdout is the JSON
    predictor = predictor_of(run)
    classes = predictor.classes
    source = open_source(args.source, classes=classes)
    # The photos go to shards in a temporary folder and stream through the model from there,
    # so memory stays flat however many bins are evaluated.
    with tempfile.TemporaryDirectory(prefix="bincount-evaluate-") as tmp:
        sink = ShardSink(tmp)
        subset = fetch_subset(source, classes=classes, per_class=args.per_class or None,
                              candidate_ids=read_file_list(args.file_list) if args.file_list else None,
                              workers=args.workers, progress=not args.quiet, sink=sink)
        photos = Photos(sink.close(), subset.table())
        predictions = predictor.predict_photos(photos, subset.ids, progress=not args.quiet)
    metrics = count_metrics(subset.labels, [p["count"] for p in predictions], classes)
    metrics.update(run=run.pathspec, source=args.source, skipped=[{"id": i, "reason": r} for i, r in subset.skipped])
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_audit(args) -> int:
    """0: nothing flagged; 1: some bin flagged; 2: error (from main, like every command's)."""
    return _audit(args)


def _audit(args) -> int:
    from bincount import audit
    from bincount.data.sources import open_source
    from bincount.flow.runs import predictor_of

    ids = audit.read_ids(args.ids) if args.ids else None
    run = _chosen_run(args, sys.stdout)
    predictor = predictor_of(run)
    source = open_source(args.source, classes=predictor.classes)
    source.check()  # an unusable source fails before the validation split is scored
    threshold = audit.threshold_for_run(run, predictor, target_precision=args.target_precision)
    if ids is None:
        ids = list(source.list_ids())
    # A chunk at a time (one chunk's photos in memory), each saved under --out as it is scored:
    # a rerun after a failure scores only what is left.
    chunks = audit.ScoredChunks(args.out, model_run=run.pathspec, threshold=threshold.value, source=args.source,
                                classes=predictor.classes)
    parts = audit.score_chunks(source, predictor, threshold.value, ids, chunks=chunks, workers=args.workers,
                               progress=not args.quiet)
    report = audit.combine(parts, threshold=threshold, model_run=run.pathspec, source=args.source,
                           classes=predictor.classes)
    paths = audit.write_report(report, args.out)
    chunks.clear()
    print(audit.summary_line(report))
    print(f"report: {paths['html']}  table: {paths['csv']}")
    return 1 if report.flagged() else 0


MAX_PROBLEMS_PRINTED = 20  # skipped capture lines on stderr; all of them are in summary.json


def _cmd_monitor(args) -> int:
    """0: no drift; 1: drift; 2: error (from main, like every command's)."""
    from bincount import monitor

    settings = monitor.Settings(bucket=args.bucket, psi_threshold=args.psi_threshold, alpha=args.alpha,
                                relabel=args.relabel)
    run = _chosen_run(args, sys.stdout)
    report = monitor.run_monitor(args.capture, run, settings, progress=not args.quiet)
    for problem in report.problems[:MAX_PROBLEMS_PRINTED]:
        print(f"capture: skipped {problem}", file=sys.stderr)
    if len(report.problems) > MAX_PROBLEMS_PRINTED:
        print(f"capture: ... and {len(report.problems) - MAX_PROBLEMS_PRINTED} more skipped (all in summary.json)",
              file=sys.stderr)
    others = report.answered_by_others()
    if others:
        print(f"monitor: {sum(others.values())} captured answers came from other model runs than {run.id}: {others}",
              file=sys.stderr)
    paths = monitor.write_report(report, args.out)
    print(monitor.verdict_line(report))
    print(f"report: {paths['html']}  table: {paths['csv']}  summary: {paths['summary']}")
    return 1 if report.drift else 0


# argparse prints this as it is: plain text, not the docstring's reStructuredText.
DESCRIPTION = """\
Serve, query, score, audit and monitor the models that the bincount flow trains.
Training itself is the flow: python flows/bin_flow.py run --help"""


def build_parser() -> argparse.ArgumentParser:
    from bincount.data.fetch import DEFAULT_WORKERS
    from bincount.serving.server import add_server_arguments

    parser = argparse.ArgumentParser(
        prog="bincount", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Runs are read from the Metaflow datastore this shell points at "
               "(METAFLOW_DATASTORE_SYSROOT_LOCAL or the S3 datastore).")
    parser.add_argument("--version", action="version", version=f"bincount {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a run's model on SageMaker's protocol (GET /ping, POST /invocations)")
    _add_run_choice(serve)
    add_server_arguments(serve)
    serve.set_defaults(func=_cmd_serve, parser=serve)

    predict = sub.add_parser("predict", help="print counts with probabilities for image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    where = predict.add_mutually_exclusive_group()
    where.add_argument("--endpoint", help="ask a running endpoint (e.g. http://127.0.0.1:8080) instead of a run")
    where.add_argument("--endpoint-name", help="ask a SageMaker endpoint by name (InvokeEndpoint) instead of a run")
    predict.add_argument("--region", help="the SageMaker endpoint's region (default: AWS_DEFAULT_REGION, "
                                          "AWS_REGION, else us-east-1)")
    predict.add_argument("--content-type", default="image/jpeg", choices=["image/jpeg", "application/json"],
                         help="how --endpoint-name sends each photo: as it is, or base64 in a JSON body")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_run_choice(predict)
    predict.set_defaults(func=_cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a run's model on labelled data in the bucket layout; print JSON")
    _add_run_choice(evaluate)
    evaluate.add_argument("--source", required=True,
                          help="s3://bucket[/prefix], a local folder in the bucket layout, or 'synthetic'")
    evaluate.add_argument("--file-list", help="only these bins (Udacity file_list.json format)")
    evaluate.add_argument("--per-class", type=int, default=0, help="at most this many per class (0: all)")
    evaluate.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parallel downloads")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=_cmd_evaluate)

    audit = sub.add_parser(
        "audit", help="flag bins whose photo disagrees with their record (EXPECTED_QUANTITY)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict the count of every bin and compare it with the count its record expects.\n"
                    "A bin is flagged when predicted != expected and the model's probability that the\n"
                    "count is not the expected one, 1 - p(expected), is at least a threshold. The threshold\n"
                    "is the lowest that reaches --target-precision at finding altered records on the run's\n"
                    "validation split (each bin with its true count, and shifted by each of +-1 and +-2).\n"
                    "Counts outside the model's classes are listed as not judged; unusable objects as bad.\n"
                    "Writes audit.csv, audit.html (self-contained) and summary.json to --out.",
        epilog="exit status: 0 nothing flagged, 1 some bin flagged, 2 error")
    audit.add_argument("--source", required=True,
                       help="s3://bucket[/prefix], a local folder in the bucket layout, 'synthetic', or capture:PATH "
                            "(the photos of captured endpoint requests, PATH a folder or s3:// prefix; each photo's "
                            "record is its request's custom attribute expected_quantity=N)")
    audit.add_argument("--ids", help="only these bins: a Udacity file_list.json, or a text file with one id a line")
    _add_run_choice(audit, what="model run")
    audit.add_argument("--target-precision", type=float, default=0.9,
                       help="precision the threshold must reach on the validation split (default: %(default)s)")
    audit.add_argument("--out", default="audit-report", help="folder for the report (default: %(default)s)")
    audit.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parallel downloads")
    audit.add_argument("--quiet", action="store_true", help="no progress bars")
    audit.set_defaults(func=_cmd_audit)

    from bincount.monitor import BUCKETS, DEFAULT_ALPHA, DEFAULT_BUCKET, DEFAULT_PSI_THRESHOLD, DEFAULT_RELABEL

    monitor = sub.add_parser(
        "monitor", help="compare an endpoint's captured traffic with its model run: drift, confidence, what to relabel",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read the requests an endpoint captured (bincount serve --capture-dir, or a SageMaker\n"
                    "endpoint's data capture) and compare their predictions with the model run's answers on\n"
                    "its test split: the predicted counts by their population stability index (drift at\n"
                    "PSI >= --psi-threshold, where a chi-square test also gives p < --alpha) and the\n"
                    "confidences (highest probability) by a Kolmogorov-Smirnov test (drift at p < --alpha),\n"
                    "overall and per hour or day. Lists the least confident photos, worth relabelling.\n"
                    "Capture lines or files that cannot be read are skipped and listed by file and line.\n"
                    "Writes monitor.html (self-contained), monitor.csv and summary.json to --out.",
        epilog="exit status: 0 no drift, 1 drift, 2 error")
    monitor.add_argument("--capture", required=True, metavar="PATH",
                         help="the capture folder (--capture-dir of the local endpoint) or an s3:// prefix "
                              "(a SageMaker endpoint's capture_s3_uri, or below it), read recursively")
    _add_run_choice(monitor, what="model run")
    monitor.add_argument("--bucket", choices=sorted(BUCKETS), default=DEFAULT_BUCKET,
                         help="time buckets of the report, in UTC (default: %(default)s)")
    monitor.add_argument("--psi-threshold", type=float, default=DEFAULT_PSI_THRESHOLD,
                         help="PSI of the predicted counts from which they have drifted (default: %(default)s)")
    monitor.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                         help="significance level of the chi-square and KS tests (default: %(default)s)")
    monitor.add_argument("--relabel", type=int, default=DEFAULT_RELABEL,
                         help="least confident photos listed with a thumbnail (default: %(default)s)")
    monitor.add_argument("--out", default="monitor-report", help="folder for the report (default: %(default)s)")
    monitor.add_argument("--quiet", action="store_true", help="no progress bars")
    monitor.set_defaults(func=_cmd_monitor)
    return parser


DEBUG_ENV = "BINCOUNT_DEBUG"  # set to 1 to see the traceback behind an error


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user's input or environment can cause; their messages say what to fix."""
    from bincount.aws.errors import AwsError
    from bincount.data.shards import ShardError
    from bincount.data.sources import SourceUnreachable
    from bincount.flow.runs import RunNotFound
    from bincount.serving.endpoint import EndpointError

    return RunNotFound, SourceUnreachable, ShardError, EndpointError, AwsError, OSError, ValueError


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error is one line on stderr and exit status 2 (the audit's 1 means
    "flagged", so a failure must never be 1). BINCOUNT_DEBUG=1 shows the traceback instead."""
    import os

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bincount: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for a person; the traceback on request
        if os.environ.get(DEBUG_ENV):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, _expected_errors()):
            message = f"internal error: {type(e).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)"
        print(f"bincount: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
