"""A request's first-frame image (image-to-video): checked where it is accepted, decoded where
it is used. Torch-free (Pillow, which imageio already brings), so the coordinator, the HTTP
gateway and the CLI refuse a bad image before anything is queued."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG")
MAX_IMAGE_BYTES = 3 << 20  # the whole request must fit one gRPC message (4 MiB)
MAX_IMAGE_SIDE = 4096      # pixels: diffusers resizes to the video's side anyway


class ImageError(ValueError):
    """An image a request may not carry; the message names the limit."""


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG or JPEG the worker can decode; ImageError otherwise."""
    return _load(data).size


def decode_image(data: bytes) -> Image.Image:
    """The image as RGB, as diffusers' pipelines take a PIL image; ImageError as check_image."""
    return _load(data).convert("RGB")


def _load(data: bytes) -> Image.Image:
    """The image decoded whole (so a truncated or corrupt body fails here, not on a worker)."""
    if not data:
        raise ImageError("must not be empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"must be at most {MAX_IMAGE_BYTES} bytes, got {len(data)}")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise ImageError(f"must be PNG or JPEG, got {image.format}")
        width, height = image.size
        if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
            raise ImageError(f"sides must be in [1, {MAX_IMAGE_SIDE}] pixels, got {width}x{height}")
        image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"is not a decodable PNG or JPEG ({type(exc).__name__}: {exc})"[:300]) from None
    return image
