"""SageMaker: training jobs per grid point and endpoints for the served model.

    training      one SageMaker training job per grid point (ModelTrainer, spot, torchrun)
    training_job  bincount's script-mode entry point inside the training container
    endpoint      the SageMaker deploy target (model, endpoint config, endpoint, smoke test)
"""
