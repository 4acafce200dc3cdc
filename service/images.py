"""Reference images: decode, validate, crop and resize to the model's resolution."""

from __future__ import annotations

import io
import warnings

import numpy as np
import structlog
from PIL import Image

log = structlog.get_logger("avatarforcing.images")

ALLOWED_FORMATS = ("PNG", "JPEG")


class ImageError(ValueError):
    """An image that cannot be used; the message is for a person."""


def load_reference_image(data: bytes, width: int, height: int, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [height, width, 3], center-cropped to the model's aspect ratio."""
    if not data:
        raise ImageError("the reference image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"the reference image is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            fmt = img.format
            w, h = img.size
            if fmt not in ALLOWED_FORMATS:
                raise ImageError(f"the reference image is {fmt or 'not a recognised format'}; send PNG or JPEG")
            if w * h > max_pixels:
                raise ImageError(f"the reference image is {w}x{h} pixels; the limit is {max_pixels} pixels")
            if w < 16 or h < 16:
                raise ImageError(f"the reference image is {w}x{h} pixels; it must be at least 16x16")
            img.load()
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"the reference image could not be decoded as PNG or JPEG ({type(e).__name__}: {e})") from None
    img = img.convert("RGB")
    target = width / height
    if w / h > target:  # too wide: crop the sides
        cw = round(h * target)
        box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
    else:
        ch = round(w / target)
        box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
    if (box[2] - box[0], box[3] - box[1]) != (w, h) or (w, h) != (width, height):
        log.info("reference image fitted to the model", source=f"{w}x{h}",
                 cropped_to=f"{box[2] - box[0]}x{box[3] - box[1]} (centre, the model's aspect)",
                 resized_to=f"{width}x{height}")
    img = img.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()
