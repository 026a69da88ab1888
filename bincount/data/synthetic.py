"""Generated bin-like photos with a known number of distinct objects.

Lets the whole flow run with no network and no shared data: the images are
written in the bucket layout and read back through the same source and fetch
code as the real dataset. They are deliberately easy (separated, coloured
shapes on a textured bin floor with tape across the front) so that a tiny
model learns them in a few epochs and a test can tell a working pipeline from
a broken one.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from bincount.data.layout import IMAGE_DIR, METADATA_DIR, image_key, metadata_key

DEFAULT_PER_CLASS = 24
IMAGE_SIZE = (160, 144)  # width, height: roughly the photos' aspect ratio


def _draw_bin(rng: random.Random, count: int):
    from PIL import Image, ImageDraw, ImageFilter

    w, h = IMAGE_SIZE
    floor = tuple(rng.randint(90, 140) for _ in range(3))
    image = Image.new("RGB", (w, h), floor)
    draw = ImageDraw.Draw(image)
    for _ in range(300):  # speckle, so the floor is not a flat colour
        x, y = rng.randrange(w), rng.randrange(h)
        shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in floor)
        draw.point((x, y), fill=shade)
    placed: list[tuple[int, int, int, int]] = []
    while len(placed) < count:
        size = rng.randint(18, 30)
        x0, y0 = rng.randint(4, w - size - 4), rng.randint(4, h - size - 4)
        box = (x0, y0, x0 + size, y0 + size)
        if any(not (box[2] + 3 < b[0] or b[2] + 3 < box[0] or box[3] + 3 < b[1] or b[3] + 3 < box[1])
               for b in placed):
            continue  # distinct objects: no overlaps, so the count is unambiguous
        placed.append(box)
        colour = tuple(rng.choice([rng.randint(0, 60), rng.randint(190, 255)]) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour, outline=(20, 20, 20))
    for _ in range(rng.randint(1, 2)):  # translucent-looking tape across the front
        y = rng.randint(0, h - 6)
        draw.rectangle((0, y, w, y + rng.randint(3, 6)), fill=(200, 190, 150))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def synthetic_bin(count: int, seed: int) -> bytes:
    """One JPEG with ``count`` objects, identical for the same seed."""
    buf = io.BytesIO()
    _draw_bin(random.Random(seed), count).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_synthetic_source(root: Path, *, classes: list[int], seed: int = 0,
                           per_class: int = DEFAULT_PER_CLASS) -> Path:
    """Write ``per_class`` images per count under ``root`` in the bucket layout.

    Idempotent: a folder already complete for these arguments is reused.
    """
    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (root / METADATA_DIR).mkdir(parents=True, exist_ok=True)
    for count in classes:
        for i in range(per_class):
            bin_id = f"syn{count}{i:04d}"
            (root / image_key(bin_id)).write_bytes(synthetic_bin(count, seed * 1_000_003 + count * 10_007 + i))
            meta = {"EXPECTED_QUANTITY": count, "image_fname": f"{bin_id}.jpg", "BIN_FCSKU_DATA": {}}
            (root / metadata_key(bin_id)).write_text(json.dumps(meta))
    done.write_text("ok\n")
    return root
