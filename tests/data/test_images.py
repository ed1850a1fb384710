"""Tests of florence_ops.data.images: decoding untrusted page bytes into the upright RGB pixels the model sees."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from florence_ops.data.images import InvalidImage, decode_image
from tests.data.test_validation import encode, png_header_only


def rgb_pixels(image: Image.Image) -> np.ndarray:
    decoded = decode_image(encode(image, "TIFF" if image.mode in ("CMYK", "I;16") else "PNG"), 10**8)
    assert decoded.mode == "RGB"
    return np.asarray(decoded).astype(int)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 128)])
    assert rgb_pixels(rgba)[0].tolist() == [[255, 255, 255], [255, 127, 127]]
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    assert rgb_pixels(la)[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_palette_with_transparency_goes_through_rgba():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0
    assert rgb_pixels(palette)[0].tolist() == [[255, 255, 255], [255, 0, 0]]
    palette.info.pop("transparency")
    assert rgb_pixels(palette)[0].tolist() == [[0, 0, 0], [255, 0, 0]]


def test_cmyk_and_grayscale_convert_to_rgb():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    assert rgb_pixels(cmyk)[0].tolist() == [[255, 255, 255], [0, 255, 255]]
    assert rgb_pixels(Image.new("L", (1, 1), 77))[0].tolist() == [[77, 77, 77]]


def test_sixteen_bit_is_scaled_not_clipped():
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    assert rgb_pixels(deep)[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    upright = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), 10**8)
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_pixel_limit_message_names_the_setting_that_applied():
    """Preprocess's limit is data.max_image_pixels; the server names its own (serve.max_image_pixels)."""
    bomb = png_header_only(100_000, 100_000)
    with pytest.raises(InvalidImage, match=r"over data\.max_image_pixels=1000: "):
        decode_image(bomb, 1000)
    with pytest.raises(InvalidImage, match=r"over serve\.max_image_pixels=1000: ") as raised:
        decode_image(bomb, 1000, "serve.max_image_pixels")
    assert "data.max_image_pixels" not in str(raised.value)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (768, 768)])
def test_processed_page_png_decodes_to_the_resized_pixels(size):
    """Preprocess stores each page as `encode_model_image` writes it (its own PNG encoder, rows unfiltered): any PNG
    reader gets back exactly the pixels of the bicubic resize, at odd sizes too."""
    from florence_ops.data.images import encode_model_image, resize_for_model

    rng = np.random.default_rng(0)
    page = Image.fromarray(rng.integers(0, 256, (900, 640, 3), dtype=np.uint8))
    stored = Image.open(io.BytesIO(encode_model_image(page, size)))
    assert stored.format == "PNG" and stored.mode == "RGB" and stored.size == size[::-1]
    assert np.array_equal(np.asarray(stored), np.asarray(resize_for_model(page, size)))


def test_processed_page_pixels_are_read_without_a_decoder_exactly_as_pil_reads_them():
    """`rgb_png_pixels` reads preprocess's own PNG (the vision cache's build in preprocess reads every page so) to
    the pixels PIL decodes; any other PNG, or one with a damaged byte, gives None (the caller decodes it with PIL)."""
    from florence_ops.data.images import encode_model_image, rgb_png_pixels

    rng = np.random.default_rng(1)
    page = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    png = encode_model_image(page, (48, 40))
    assert np.array_equal(rgb_png_pixels(png), np.asarray(Image.open(io.BytesIO(png))))
    pil_png = io.BytesIO()
    page.save(pil_png, format="PNG")  # row filters: not this encoder's
    damaged = bytearray(png)
    damaged[len(png) // 2] ^= 0xFF
    assert rgb_png_pixels(pil_png.getvalue()) is None and rgb_png_pixels(bytes(damaged)) is None
    assert rgb_png_pixels(png[:-5]) is None and rgb_png_pixels(b"not a png") is None
