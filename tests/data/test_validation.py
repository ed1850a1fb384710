"""Bad input of every kind is quarantined with its reason while every good record is kept; odd images are kept.

Pipeline cases run a local folder (four good records plus the bad input) through `materialize_raw` and
`preprocess`; tests/data/test_images.py checks the pixel values of odd image modes.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence_ops.data import validation as checks
from florence_ops.data.processed import QUARANTINE_FILE, ImageTable, read_questions
from florence_ops.data.sources import materialize_raw
from florence_ops.stages.preprocess import preprocess
from tests.conftest import tiny_params

GOOD_IDS = ["g0", "g1", "g2", "g3"]
MODEL_SIZE = 32


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def page(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small distinct RGB page."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels but holds one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def good_record(index: int) -> dict:
    return {
        "question_id": f"g{index}",
        "question": f"What is {index}?",
        "answers": [str(index)],
        "image": f"g{index}.png",
    }


def make_folder(root: Path, extra_lines: list[bytes | dict], files: dict[str, bytes] | None = None) -> Path:
    """A local data folder: four good records (own images), then `extra_lines`; `files` are written beside them."""
    root.mkdir(parents=True)
    lines: list[bytes | dict] = [good_record(i) for i in range(len(GOOD_IDS))] + extra_lines
    for index in range(len(GOOD_IDS)):
        (root / f"g{index}.png").write_bytes(page(index))
    for name, data in (files or {}).items():
        (root / name).write_bytes(data)
    text = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    (root / "annotations.jsonl").write_bytes(text)
    return root


def run_local(tmp_path: Path, folder: Path, **overrides) -> tuple[dict, Path]:
    """Download and preprocess a local folder; return the data-quality summary and the processed dir."""
    settings = {"data.source": "local", "data.local.path": str(folder), "data.max_bad_fraction": 1.0, **overrides}
    params = tiny_params(tmp_path / "ws", **settings)
    materialize_raw(params.data, params.seed, Path(params.paths.raw))
    base = Path(params.paths.base_model)
    base.mkdir(parents=True)
    (base / "preprocessor_config.json").write_text(json.dumps({"size": {"height": MODEL_SIZE, "width": MODEL_SIZE}}))
    return preprocess(params), Path(params.paths.processed)


def kept_ids(processed: Path) -> list[str]:
    ids = []
    for split in ("train", "validation", "test"):
        if (processed / f"{split}.parquet").exists():
            ids += read_questions(processed, split)["questionId"]
    return sorted(ids)


def bad_record(**fields) -> dict:
    return {"question_id": "bad", "question": "Which?", "answers": ["x"], "image": "bad.png", **fields}


JPEG = encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
CASES = {
    # name: (annotation lines after the good ones, files, expected reason, expected line of the bad record or None)
    "truncated_jpeg": ([bad_record()], {"bad.png": JPEG[: len(JPEG) // 2]}, checks.IMAGE_CORRUPT, None),
    "unreadable_png": ([bad_record()], {"bad.png": page(9)[:40] + b"\0" * 200}, checks.IMAGE_CORRUPT, None),
    "zero_byte_image": ([bad_record()], {"bad.png": b""}, checks.IMAGE_EMPTY, None),
    "not_an_image": ([bad_record()], {"bad.png": b"just some text, not pixels\n"}, checks.NOT_AN_IMAGE, None),
    "missing_image_file": ([bad_record()], {}, checks.IMAGE_MISSING, None),
    "decompression_bomb": (
        [bad_record()],
        {"bad.png": png_header_only(100_000, 100_000)},
        checks.IMAGE_TOO_LARGE,
        None,
    ),
    "empty_question": ([bad_record(question="  \t ")], {"bad.png": page(9)}, checks.QUESTION_EMPTY, 5),
    "question_not_string": ([bad_record(question=["a"])], {"bad.png": page(9)}, checks.QUESTION_INVALID, 5),
    "answers_empty": ([bad_record(answers=[])], {"bad.png": page(9)}, checks.ANSWERS_EMPTY, 5),
    "answers_not_list": ([bad_record(answers="x")], {"bad.png": page(9)}, checks.ANSWERS_NOT_LIST, 5),
    "answers_non_string": ([bad_record(answers=["x", 3])], {"bad.png": page(9)}, checks.ANSWERS_INVALID, 5),
    "answers_empty_string": ([bad_record(answers=["x", " "])], {"bad.png": page(9)}, checks.ANSWERS_INVALID, 5),
    "duplicate_id": ([bad_record(question_id="g1")], {"bad.png": page(9)}, checks.DUPLICATE_ID, 5),
    "malformed_json": ([b'{"question_id": "bad", "question": '], {}, checks.MALFORMED_JSON, 5),
    "non_utf8_line": ([b'{"question_id": "bad", "question": "caf\xe9?"}'], {}, checks.NOT_UTF8, 5),
    "not_an_object": ([b'["bad", "Which?"]'], {}, checks.NOT_AN_OBJECT, 5),
    "id_missing": ([bad_record(question_id=None)], {"bad.png": page(9)}, checks.ID_MISSING, 5),
    "unknown_split": ([bad_record(split="dev")], {"bad.png": page(9)}, checks.FIELD_INVALID, 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_quarantined_and_good_records_kept(case, tmp_path):
    lines, files, reason, line = CASES[case]
    summary, processed = run_local(tmp_path, make_folder(tmp_path / "data", lines, files))

    assert summary["by_reason"] == {reason: 1}
    assert (summary["n_in"], summary["n_ok"], summary["n_bad"]) == (5, 4, 1)
    (entry,) = summary["bad"]
    assert entry["reason"] == reason and entry["line"] == line
    assert [json.loads(text) for text in (processed / QUARANTINE_FILE).read_text().splitlines()] == [entry]
    assert kept_ids(processed) == GOOD_IDS


def test_image_over_configured_limit_is_quarantined_before_decoding(tmp_path):
    folder = make_folder(tmp_path / "data", [bad_record()], {"bad.png": page(9, size=(300, 200))})
    summary, processed = run_local(tmp_path, folder, **{"data.max_image_pixels": 40 * 30})
    assert summary["by_reason"] == {checks.IMAGE_TOO_LARGE: 1}
    assert "data.max_image_pixels=1200" in summary["bad"][0]["detail"]
    assert kept_ids(processed) == GOOD_IDS


def test_odd_but_valid_images_are_all_kept(tmp_path):
    rng = np.random.default_rng(0)
    cmyk = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), mode="CMYK")
    odd = {
        "tiny.png": encode(Image.new("RGB", (1, 1), (5, 5, 5))),
        "strip.png": encode(Image.new("L", (2000, 3), 90)),
        "deep.png": encode(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))),
        "cmyk.jpg": encode(cmyk, "JPEG"),
        "rgba.png": encode(Image.new("RGBA", (40, 30), (255, 0, 0, 0))),
        "palette.gif": encode(Image.new("P", (40, 30), 3)),
        "progressive.jpg": encode(Image.new("RGB", (40, 30), (1, 2, 3)), "JPEG", progressive=True),
        "gray.tiff": encode(Image.new("L", (40, 30), 128), "TIFF"),
        "page.webp": encode(Image.new("RGB", (40, 30), (9, 9, 9)), "WEBP"),
        "bilevel.png": encode(Image.new("1", (40, 30), 1)),
    }
    lines = [bad_record(question_id=f"odd-{name}", image=name) for name in odd]
    summary, processed = run_local(tmp_path, make_folder(tmp_path / "data", lines, odd))

    assert (summary["n_bad"], summary["n_ok"], summary["n_images"]) == (0, 4 + len(odd), 4 + len(odd))
    table = ImageTable(processed)
    assert all(table[i].mode == "RGB" and table[i].size == (MODEL_SIZE, MODEL_SIZE) for i in table.ids)


def test_record_checks_accept_good_fields():
    assert checks.check_fields("What?", ["a", "b"]) is None
    assert checks.check_fields(None, ["a"]).reason == checks.QUESTION_EMPTY
    assert checks.check_fields("What?", None).reason == checks.ANSWERS_EMPTY
