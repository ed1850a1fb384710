"""Page images as the model takes them: decoded from untrusted bytes under a pixel limit, turned upright, converted
to RGB and resized to the model's input size, or refused with the reason preprocess quarantines by.

Preprocess, predict and serve all decode here, so each answers the page evaluation saw. This module imports only PIL
and numpy, so preprocessing workers start fast.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from florence_ops.data.validation import (
    IMAGE_CORRUPT,
    IMAGE_EMPTY,
    IMAGE_MISSING,
    IMAGE_TOO_LARGE,
    IMAGE_UNSUPPORTED,
    NOT_AN_IMAGE,
    Problem,
)

WHITE = (255, 255, 255)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
TURNED = range(2, 9)  # EXIF orientations other than upright (1)
# File signatures of common page formats: bytes that start like an image but do not open are a corrupt image.
IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"II*\x00", b"MM\x00*", b"BM", b"RIFF", b"\x00\x00\x00\x0cjP")


class InvalidImage(Exception):
    """Image bytes that cannot become a training image; `problem` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.problem = Problem(reason, detail)


class ImageResult(NamedTuple):
    """One normalised image: PNG bytes at the model's size and the upright original size, or the problem."""

    image_id: str
    png: bytes | None = None
    width: int = 0
    height: int = 0
    problem: Problem | None = None


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make PIL raise (not warn) on images above `max_pixels`, for the duration of the block."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_image(data: bytes | None, max_pixels: int, setting: str = "data.max_image_pixels") -> Image.Image:
    """Decode image bytes into an upright RGB image; raise `InvalidImage` with the reason when that fails.

    `setting` names where `max_pixels` came from, for the message of an image over it.
    """
    if data is None:
        raise InvalidImage(IMAGE_MISSING, "no image bytes (file missing or unreadable)")
    if not data:
        raise InvalidImage(IMAGE_EMPTY, "zero-byte image")
    with _pixel_limit(max_pixels):
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only; PIL checks the pixel limit here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InvalidImage(IMAGE_TOO_LARGE, f"over {setting}={max_pixels}: {error}") from None
        except UnidentifiedImageError:
            if data.startswith(IMAGE_SIGNATURES):
                raise InvalidImage(IMAGE_CORRUPT, f"{len(data)} bytes with an image signature, unreadable") from None
            raise InvalidImage(NOT_AN_IMAGE, f"not a known image format ({len(data)} bytes)") from None
        except Exception as error:  # any decoder can fail on untrusted bytes; all mean the file is broken
            raise InvalidImage(IMAGE_CORRUPT, f"{type(error).__name__}: {error}") from None
        width, height = image.size  # from the header: nothing is decoded yet
        if width * height > max_pixels:
            raise InvalidImage(IMAGE_TOO_LARGE, f"{width}x{height} pixels exceeds {setting}={max_pixels}")
        if width < 1 or height < 1:
            raise InvalidImage(IMAGE_CORRUPT, f"empty image size {width}x{height}")
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InvalidImage(IMAGE_TOO_LARGE, f"over {setting}={max_pixels}: {error}") from None
        except Exception as error:  # truncated or corrupt data, raised by whichever decoder the format uses
            raise InvalidImage(IMAGE_CORRUPT, f"{type(error).__name__}: {error}") from None
    return to_rgb(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unparsable EXIF block leaves the pixels as stored."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in TURNED:
            return image  # upright already: exif_transpose would only copy it
        return ImageOps.exif_transpose(image) or image
    except Exception:  # broken EXIF is common in scanner and camera output; the pixels themselves are fine
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit and float scaled to 8 bits."""
    try:
        return _convert_to_rgb(image)
    except ValueError as error:  # modes PIL cannot convert, such as premultiplied La
        raise InvalidImage(IMAGE_UNSUPPORTED, f"mode {image.mode}: {error}") from None


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _to_8bit(image).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode != "RGBA":
        return image.convert("RGB")
    background = Image.new("RGB", image.size, WHITE)
    background.paste(image, mask=image.getchannel("A"))
    return background


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer holding 16-bit) grayscale image to 0..255; clip floats."""
    pixels = np.asarray(image).astype(np.float32)
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and pixels.size and pixels.max() > 255):
        pixels = pixels / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def resize_for_model(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An RGB image resized once, bicubic, to exactly `size` (height, width): the pixels the model sees."""
    height, width = size
    return image.resize((width, height), Image.Resampling.BICUBIC)


def encode_model_image(image: Image.Image, size: tuple[int, int]) -> bytes:
    """Resize an RGB image with `resize_for_model` and encode it as PNG (`rgb_png`)."""
    return rgb_png(np.asarray(resize_for_model(image, size)))


def rgb_png(pixels: np.ndarray) -> bytes:
    """A PNG of an (H, W, 3) uint8 array: 8-bit RGB, every row unfiltered, deflated at zlib level 1.

    Pillow's encoder tries its five row filters on every row; on pages (text on flat paper, scans with sensor noise)
    unfiltered rows deflate as small or smaller, and skipping the filters takes this from 17 to 7 ms a 768x768 page,
    a quarter of preprocessing's CPU time per synthetic page (benchmarks/README.md, "preprocess_throughput.py").
    """
    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # each row starts with its filter type, 0: none
    rows[:, 1:] = pixels.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, filter method 0, no interlace
    chunks = [(b"IHDR", header), (b"IDAT", zlib.compress(rows, 1)), (b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(_png_chunk(kind, data) for kind, data in chunks)


def rgb_png_pixels(png: bytes) -> np.ndarray | None:
    """The (H, W, 3) uint8 pixels of a PNG that `rgb_png` wrote (one IDAT, every row unfiltered), read as a zlib
    stream without an image decoder (a quarter of PIL's time); None for any other PNG. Chunk CRCs and the stream's
    checksum are verified, as a decoder would."""
    if not png.startswith(PNG_SIGNATURE) or len(png) < 8 + 25 + 12 + 12:
        return None
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset + 12 <= len(png) and len(chunks) < 3:
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, data = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length] or b"\0\0\0\0")
        if len(data) != length or zlib.crc32(kind + data) != crc:
            return None
        chunks.append((kind, data))
        offset += 12 + length
    if [kind for kind, _ in chunks] != [b"IHDR", b"IDAT", b"IEND"] or offset != len(png):
        return None
    width, height, depth, color, compression, filters, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if (depth, color, compression, filters, interlace) != (8, 2, 0, 0, 0):
        return None
    try:
        rows = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8)
    except zlib.error:
        return None
    if rows.size != height * (1 + 3 * width):
        return None
    rows = rows.reshape(height, 1 + 3 * width)
    if rows[:, 0].any():  # a row with a filter: not this encoder's
        return None
    return rows[:, 1:].reshape(height, width, 3)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def normalize_images(items: list[tuple[str, bytes]], size: tuple[int, int], max_pixels: int) -> list[ImageResult]:
    """Decode, orient, convert and resize a chunk of (image_id, bytes); run in preprocessing workers."""
    results = []
    for image_id, data in items:
        try:
            image = decode_image(data, max_pixels)
            results.append(ImageResult(image_id, encode_model_image(image, size), image.width, image.height))
        except InvalidImage as error:
            results.append(ImageResult(image_id, problem=error.problem))
    return results
