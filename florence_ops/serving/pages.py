"""Page images as the model sees them: decoded, upright RGB, resized exactly as preprocess resizes them.

Images go through `data.images.decode_image` (the checks and reasons preprocess quarantines by) and
`resize_for_model`, so an answer from predict or serve is the answer evaluation gives for the same page. PDF pages
are rendered with pypdfium2 (PDFium, the renderer of Chromium) at `predict.pdf_dpi` and then resized the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from florence_ops.data.images import InvalidImage, decode_image, resize_for_model
from florence_ops.data.validation import IMAGE_TOO_LARGE

PDF_SIGNATURE = b"%PDF-"
PDF_UNREADABLE = "pdf_unreadable"
PAGE_MISSING = "page_missing"
POINTS_PER_INCH = 72


def page_id(data: bytes, page: int | None = None) -> str:
    """An id of a page's content: the sha1 of the file's bytes (as preprocess names images), plus the PDF page."""
    digest = hashlib.sha1(data).hexdigest()
    return digest if page is None else f"{digest}-p{page}"


def model_page(
    data: bytes,
    size: tuple[int, int],
    max_pixels: int,
    page: int | None = None,
    dpi: int = 150,
    setting: str = "data.max_image_pixels",
) -> Image.Image:
    """A page's pixels at the model's input `size` (height, width), from image or PDF bytes; `page` counts from 1.

    Raises `InvalidImage` with the reason when the bytes are no readable page; `setting` names `max_pixels` there.
    """
    if page is not None and page < 1:
        raise InvalidImage(PAGE_MISSING, f"page {page} asked: pages count from 1")
    if data.startswith(PDF_SIGNATURE):
        return resize_for_model(render_pdf_page(data, page or 1, dpi, max_pixels, setting), size)
    if page not in (None, 1):
        raise InvalidImage(PAGE_MISSING, f"page {page} asked of an image, which has one page")
    return resize_for_model(decode_image(data, max_pixels, setting), size)


def model_page_pixels(
    data: bytes, size: tuple[int, int], max_pixels: int, setting: str = "serve.max_image_pixels"
) -> bytes:
    """An image's RGB pixels at the model's input `size` (height, width), raw: the pixels preprocess would store.

    Raw, not PNG: encoding a page costs more than the whole answer on a GPU, and the bytes only cross to a local
    process (`open_pixels` reads them back). The server's hand-off: `max_pixels` is `serve.max_image_pixels` there.
    """
    return resize_for_model(decode_image(data, max_pixels, setting), size).tobytes()


def open_pixels(pixels: bytes, size: tuple[int, int]) -> Image.Image:
    """The RGB image of raw pixels written by `model_page_pixels` for `size` (height, width)."""
    height, width = size
    return Image.frombytes("RGB", (width, height), pixels)


def render_pdf_page(
    data: bytes, page: int, dpi: int, max_pixels: int, setting: str = "data.max_image_pixels"
) -> Image.Image:
    """Render page `page` (from 1) of a PDF at `dpi` into RGB; InvalidImage when it cannot be read or is larger than
    `max_pixels` (the value of `setting`)."""
    import pypdfium2 as pdfium  # only PDF pages need it

    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as error:
        raise InvalidImage(PDF_UNREADABLE, f"not a readable PDF: {error}") from None
    try:
        if not 1 <= page <= len(document):
            raise InvalidImage(PAGE_MISSING, f"page {page} asked, the PDF has {len(document)} page(s)")
        pdf_page = document[page - 1]
        scale = dpi / POINTS_PER_INCH
        width, height = pdf_page.get_size()
        if width * scale * height * scale > max_pixels:
            raise InvalidImage(IMAGE_TOO_LARGE, f"page {page} at {dpi} dpi exceeds {setting}={max_pixels}")
        return pdf_page.render(scale=scale).to_pil().convert("RGB")
    finally:
        document.close()


def read_page_file(path: Path) -> bytes | None:
    """The bytes of a page file, or None when it is missing or unreadable (reported as `image_missing`)."""
    try:
        return path.read_bytes()
    except OSError:
        return None
