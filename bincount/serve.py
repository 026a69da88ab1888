"""The local endpoint: SageMaker's container protocol on a real HTTP server.

``GET /ping`` answers 200 once the model is loaded; ``POST /invocations`` runs
the handler in bincount.inference. Bad requests get a 4xx with a message; the
server keeps serving. Starlette on uvicorn: a maintained ASGI stack, not a
hand-rolled socket loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 10 * 1024 * 1024


def create_app(model_dir: str | Path, *, max_body_bytes: int = DEFAULT_MAX_BODY):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from bincount import inference

    predictor = inference.model_fn(str(model_dir))

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def ping(request: Request) -> Response:
        return JSONResponse({"status": "ok", "run_id": predictor.meta.get("run_id")})

    async def invocations(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            return error(f"body of {declared} bytes is over the {max_body_bytes}-byte limit", 413)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_body_bytes:
                return error(f"body is over the {max_body_bytes}-byte limit", 413)
        try:
            images = inference.input_fn(bytes(body), request.headers.get("content-type", ""))
            prediction = await run_in_threadpool(inference.predict_fn, images, predictor)
            payload = inference.output_fn(prediction, request.headers.get("accept", inference.JSON_TYPE))
        except inference.RequestError as e:
            return error(str(e), e.status)
        return Response(payload, media_type=inference.JSON_TYPE)

    return Starlette(routes=[Route("/ping", ping, methods=["GET"]),
                             Route("/invocations", invocations, methods=["POST"])])


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          max_body_bytes: int = DEFAULT_MAX_BODY) -> None:
    import uvicorn

    app = create_app(model_dir, max_body_bytes=max_body_bytes)
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    print(f"serving run {meta.get('run_id')} ({meta['arch']}) on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an extracted model.tar.gz folder.")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    args = parser.parse_args(argv)
    serve(args.model_dir, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes)


if __name__ == "__main__":
    sys.exit(main())
