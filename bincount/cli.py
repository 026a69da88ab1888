"""``bincount``: serve, query and score the models the flow trains.

Training itself is the flow: ``python flows/bin_flow.py run --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _cmd_serve(args) -> int:
    from bincount.package import build_package, extract_package
    from bincount.runs import get_run, model_of
    from bincount.serve import serve

    run = get_run(args.run)
    model_dir = extract_package(build_package(*model_of(run)), tempfile.mkdtemp(prefix="bincount-serve-"))
    serve(model_dir, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes)
    return 0


def _print_predictions(paths, predictions) -> None:
    for path, p in zip(paths, predictions):
        probs = " ".join(f"{k}:{v:.2f}" for k, v in p["probabilities"].items())
        print(f"{path}\tcount={p['count']}\tp={p['probabilities'][str(p['count'])]:.2f}\t[{probs}]")


def _cmd_predict(args) -> int:
    from bincount.inference import RequestError, input_fn

    raws = {}
    for path in args.images:
        try:
            raws[path] = input_fn(Path(path).read_bytes(), "application/x-image")[0]
        except (OSError, RequestError) as e:
            print(f"{path}: skipped: {e}", file=sys.stderr)
    if not raws:
        return 2
    if args.endpoint:
        from bincount.deploy import invoke

        predictions = [invoke(args.endpoint.rstrip("/"), raw)["predictions"][0] for raw in raws.values()]
    else:
        from bincount.runs import get_run, predictor_of

        predictions = predictor_of(get_run(args.run)).predict_bytes(list(raws.values()))
    if args.json:
        print(json.dumps(dict(zip(raws, predictions)), indent=2))
    else:
        _print_predictions(raws, predictions)
    return 0 if len(raws) == len(args.images) else 1


def _cmd_evaluate(args) -> int:
    from bincount.fetch import fetch_subset, read_file_list
    from bincount.metrics import count_metrics
    from bincount.runs import get_run, predictor_of
    from bincount.sources import open_source

    run = get_run(args.run)
    predictor = predictor_of(run)
    classes = predictor.classes
    source = open_source(args.source, classes=classes)
    subset = fetch_subset(source, classes=classes, per_class=args.per_class or None,
                          candidate_ids=read_file_list(args.file_list) if args.file_list else None,
                          workers=args.workers, progress=not args.quiet)
    predictions = predictor.predict_bytes([subset.images[i] for i in subset.ids])
    metrics = count_metrics(subset.labels, [p["count"] for p in predictions], classes)
    metrics.update(run=run.pathspec, source=args.source, skipped=[{"id": i, "reason": r} for i, r in subset.skipped])
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bincount.fetch import DEFAULT_WORKERS
    from bincount.serve import DEFAULT_MAX_BODY, DEFAULT_PORT

    parser = argparse.ArgumentParser(
        prog="bincount", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Runs are read from the Metaflow datastore this shell points at "
               "(METAFLOW_DATASTORE_SYSROOT_LOCAL or the S3 datastore).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a run's model on SageMaker's protocol (GET /ping, POST /invocations)")
    serve.add_argument("--run", help="run id (default: the latest successful run)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                       help="larger requests get 413 (default: %(default)s)")
    serve.set_defaults(func=_cmd_serve)

    predict = sub.add_parser("predict", help="print counts with probabilities for image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--run", help="run id (default: the latest successful run)")
    predict.add_argument("--endpoint", help="ask a running endpoint (e.g. http://127.0.0.1:8080) instead")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.set_defaults(func=_cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a run's model on labelled data in the bucket layout; print JSON")
    evaluate.add_argument("--run", help="run id (default: the latest successful run)")
    evaluate.add_argument("--source", required=True,
                          help="s3://bucket[/prefix], a local folder in the bucket layout, or 'synthetic'")
    evaluate.add_argument("--file-list", help="only these bins (Udacity file_list.json format)")
    evaluate.add_argument("--per-class", type=int, default=0, help="at most this many per class (0: all)")
    evaluate.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parallel downloads")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from bincount.runs import RunNotFound
    from bincount.sources import SourceUnreachable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RunNotFound, SourceUnreachable) as e:
        print(f"bincount: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
