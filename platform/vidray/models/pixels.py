"""The pixels a frames model sees of a clip: frames picked evenly and squared to ``model.image_size``.

One copy for every reader of a frames set's JPEGs (the trainers' examples and the VQ extractor's
codes), so a tokenizer's codes describe exactly the pixels a trainer reads.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pick_frames(available: int, wanted: int) -> np.ndarray:
    """Indices of ``wanted`` frames spread evenly over ``available`` (repeats when there are fewer)."""
    return np.linspace(0, available - 1, wanted).round().astype(int)


def square(image, image_size: int) -> np.ndarray:
    """A PIL image as ``uint8 [image_size, image_size, 3]`` (resized only when it differs)."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image)


def decode_clip(jpegs: list[bytes], num_frames: int, image_size: int) -> np.ndarray:
    """``uint8 [num_frames, image_size, image_size, 3]`` from a clip's JPEG frames."""
    out = np.empty((num_frames, image_size, image_size, 3), np.uint8)
    for slot, index in enumerate(pick_frames(len(jpegs), num_frames)):
        out[slot] = square(Image.open(io.BytesIO(jpegs[index])).convert("RGB"), image_size)
    return out
