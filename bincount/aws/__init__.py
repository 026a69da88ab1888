"""AWS plumbing, bottom layer: one boto3 client factory (timeouts, bounded retries), one
error type, one settings check, the SageMaker container images. Imports nothing else
of bincount, so every layer above (the S3 reader in ``data`` included) can use it."""
