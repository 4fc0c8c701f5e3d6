"""Reading images: decoding with bad-input checks (what extraction rejects, chat and captioning refuse), shared by
the pipelines that take images."""

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from align.errors import AlignError

# PIL's own default decompression-bomb threshold.
DEFAULT_MAX_PIXELS = 89_478_485
ImageInput = Union[str, Path, Image.Image]
# What a folder of images is taken to hold (converters, examples).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class BadImage(Exception):
    """An image that is skipped; the message is the reason written to rejects.jsonl."""


# No image format this toolkit reads needs more file bytes than this; a larger file is refused before it is read.
MAX_IMAGE_BYTES = 256 * 2**20


# (size, modification time in ns) of an image file: what tells a changed file from the one that was extracted.
Stamp = tuple[int, int]


def file_stamp(path: Path | str) -> Stamp | None:
    """The stamp of a file now, or None when it cannot be read."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_size, info.st_mtime_ns


def image_file(path: Path, max_bytes: int | None = None) -> tuple[bytes, Stamp]:
    """The bytes of an image file and its stamp as they were read, or BadImage: missing, not a regular file (a FIFO
    would block, a folder is not an image), a symlink loop, unreadable, or larger than `max_bytes` (refused before
    reading it whole)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as exc:  # ELOOP for a symlink loop, EACCES, …
        raise BadImage(f"unreadable file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadImage("not a regular file" + (" (a folder)" if stat.S_ISDIR(info.st_mode) else ""))
    max_bytes = max_bytes or MAX_IMAGE_BYTES
    if info.st_size > max_bytes:
        raise BadImage(f"file too large for an image: {info.st_size} bytes (limit {max_bytes})")
    try:
        # Stamped before reading: a file rewritten meanwhile looks changed next time, never unchanged.
        return Path(path).read_bytes(), (info.st_size, info.st_mtime_ns)
    except OSError as exc:
        raise BadImage(f"unreadable file: {exc.strerror or exc}") from None


def image_bytes(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of an image file, or BadImage saying why not (see `image_file`)."""
    return image_file(path, max_bytes)[0]


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, convert_modes: bool = False) -> Image.Image:
    """An RGB image from file bytes, or BadImage saying why not.

    Images that are not plain RGB (CMYK, palette, grayscale, with alpha) are rejected unless `convert_modes`,
    which converts them as LAVIS does (alpha composited on white): a silent conversion would change the data.
    """
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image file") from None
    except Exception as exc:  # PIL raises many kinds for broken headers
        raise BadImage(f"unreadable image: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"too large: {width}x{height} pixels is over the limit of {max_pixels} (decompression bomb guard)")
    if width < 1 or height < 1:
        raise BadImage(f"degenerate size {width}x{height}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # truncated or corrupt pixel data
        raise BadImage(f"corrupt or truncated image data: {exc}") from None
    if image.mode == "RGB":
        return image
    if not convert_modes:
        raise BadImage(f"colour mode {image.mode} is not RGB (--strict-modes)")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit grayscale: PIL's convert clips every value above 255 to white; scale the 16-bit range to 8 bits.
        levels = np.asarray(image, dtype=np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def read_image(image: ImageInput) -> Image.Image:
    """An RGB image from a path (checked as training inputs are, other colour modes converted) or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image).expanduser()
    try:
        return decode_image(image_bytes(path), convert_modes=True)
    except BadImage as exc:
        raise AlignError(f"cannot read image {path}: {exc}") from None
