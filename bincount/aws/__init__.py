"""AWS plumbing, bottom layer. Imports nothing else of bincount, so every layer above
(the S3 reader in ``data`` included) can use it.

    clients     boto3 clients and sessions with fail-fast timeouts and bounded retries
    errors      AwsError, and one clear message for a failed AWS call
    settings    checks shared by the SageMaker configs (placeholders, role ARN, bucket)
    containers  the SageMaker PyTorch container images and what to pip-install in them
"""
