"""The bucket layout every source shares (``s3://aft-vbi-pds`` and its mirrors)::

    <root>/bin-images/<id>.jpg
    <root>/metadata/<id>.json
"""

PUBLIC_BUCKET = "s3://aft-vbi-pds"
IMAGE_DIR = "bin-images"
METADATA_DIR = "metadata"


def image_key(bin_id: str) -> str:
    return f"{IMAGE_DIR}/{bin_id}.jpg"


def metadata_key(bin_id: str) -> str:
    return f"{METADATA_DIR}/{bin_id}.json"
