"""How bin photos become tensors.

Photos are decoded and resized once per run into a uint8 tensor; training
augments that tensor each epoch instead of decoding JPEGs again. Resizing is to
a square without cropping: a crop can cut an item out of the photo and so
change the label.
"""

from __future__ import annotations

import io

# Mean and std per architecture family live in bincount.models; these are the
# torchvision ImageNet defaults used by the ResNets.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(raw: bytes, size: int):
    """JPEG/PNG bytes -> uint8 tensor (3, size, size)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(io.BytesIO(raw)) as image:
        image = image.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    return F.pil_to_tensor(image)


def decode_all(raws, size: int, *, progress: bool = True, desc: str = "decoding"):
    """Many photos -> uint8 tensor (N, 3, size, size)."""
    import torch
    from bincount.progress import progress_bar

    raws = list(raws)
    out = torch.empty((len(raws), 3, size, size), dtype=torch.uint8)
    for i, raw in enumerate(progress_bar(raws, desc=desc, unit=" img", disable=not progress)):
        out[i] = decode(raw, size)
    return out


def thumbnail(raw: bytes, px: int) -> bytes:
    """A photo shrunk to at most ``px`` a side, as JPEG bytes (for reports)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        image = image.convert("RGB")
        image.thumbnail((px, px))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=80)
    return out.getvalue()


def train_augment():
    """Augmentations that keep the count: flips and mild colour jitter."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
    ])


def normalizer(mean, std):
    """uint8 batch -> normalised float batch."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])
