"""How bin photos become tensors.

Photos are decoded and resized to uint8 tensors (bincount.data.loader does it in
worker processes, once per run for a split that fits in memory); training augments
whole uint8 batches. Resizing is to
a square without cropping: a crop can cut an item out of the photo and so
change the label.
"""

from __future__ import annotations

import io

# Mean and std per architecture family live in bincount.model.architectures; these are the
# torchvision ImageNet defaults used by the ResNets.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(raw, size: int):
    """JPEG/PNG bytes, or a decoded uint8 array (height x width [x 1, 3 or 4 channels]),
    -> uint8 tensor (3, size, size). An array of a photo's pixels gives what its file gives."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.fromarray(raw) if isinstance(raw, np.ndarray) else Image.open(io.BytesIO(raw)) as image:
        image = image.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    # The same values as torchvision's pil_to_tensor, but contiguous: copying its
    # channels-first view into a batch cost 1.3 ms a photo at 224 px, numpy's copy 0.25.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def decode_all(raws, size: int, *, progress: bool = True, desc: str = "decoding"):
    """Many photos -> uint8 tensor (N, 3, size, size)."""
    import torch

    from bincount.data.progress import progress_bar

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


def augment_batch(images, generator=None, *, jitter: float = 0.2, transpose: bool = False):
    """Augmentations that keep the count, on a whole uint8 batch at once: per photo, a
    random horizontal and vertical flip (and with ``transpose``, a random swap of rows and
    columns: with the flips, any of the square's eight symmetries), and brightness,
    contrast and saturation each scaled by a random factor in [1 - jitter, 1 + jitter].
    Returns floats in [0, 1], on the device of ``images`` (and of ``generator``).

    Vectorised by hand because torchvision's ColorJitter draws one factor per call:
    per-photo factors would mean a Python loop of small tensor ops, which took
    about a third of each training step at 224 px here.
    """
    import torch

    x = images.float().div_(255)
    n = len(x)

    def coin():
        return torch.rand(n, generator=generator, device=x.device) < 0.5

    def factor():
        return 1 + (torch.rand(n, 1, 1, 1, generator=generator, device=x.device) * 2 - 1) * jitter

    def gray(t):
        return (0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3])

    x = torch.where(coin()[:, None, None, None], x.flip(3), x)
    x = torch.where(coin()[:, None, None, None], x.flip(2), x)
    if transpose:  # photos are resized to squares, so a transposed one has the same shape
        x = torch.where(coin()[:, None, None, None], x.transpose(2, 3), x)
    x = (x * factor()).clamp_(0, 1)  # brightness
    c = factor()
    x = (c * x + (1 - c) * gray(x).mean((2, 3), keepdim=True)).clamp_(0, 1)  # contrast
    s = factor()
    return (s * x + (1 - s) * gray(x)).clamp_(0, 1)  # saturation


def normalizer(mean, std):
    """uint8 batch (or floats in [0, 1]) -> normalised float batch."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])
