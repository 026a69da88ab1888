"""Serving a trained model: the one handler, its HTTP server, its package.

    handler    the SageMaker PyTorch serving contract (model_fn, input_fn, predict_fn, output_fn)
    server     the local HTTP endpoint (GET /ping, POST /invocations), micro-batching
    package    model.tar.gz as SageMaker expects it, carrying this whole library
    endpoint   starting a packaged model locally, smoke-testing it, stopping it
    toolkit    SageMaker's own PyTorch serving toolkit and TorchServe, run here without Docker
    capture    the local server's data capture, in SageMaker's format
    lifetime   a local endpoint never outlives the process that started it
"""
