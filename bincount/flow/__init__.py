"""Everything that knows Metaflow: the only layer that imports it.

    compute    where the train step runs: local, @batch, @kubernetes or SageMaker
    deploy     the deploy targets (local, sagemaker)
    champion   the champion gate: deploy only a model at least as good
    runs       reading runs back through the Metaflow Client
    cards      run reports as Metaflow cards
"""
