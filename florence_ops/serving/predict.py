"""`florence-ops predict`: answers from a model directory for one page, a JSONL file of questions, or a processed split.

- one page: `answer_page` (an image, or a page of a PDF);
- many: `predict_jsonl` reads lines in the local source's annotation format (images relative to the file) and writes
  each line back with `answer`, or with `error` and `detail` when that line cannot be answered;
- a processed split (DocVQA's test split, whose answers the hub withholds): `write_submission` writes the DocVQA
  leaderboard file, a JSON list of `{"questionId": int, "answer": str}` with every question once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from florence_ops.artifacts import write_text_atomic
from florence_ops.config import Params
from florence_ops.data import validation as checks
from florence_ops.data.images import InvalidImage
from florence_ops.data.parallel import batched
from florence_ops.errors import UserError
from florence_ops.serving.answering import Answerer
from florence_ops.serving.pages import model_page, page_id, read_page_file

log = logging.getLogger(__name__)
CHUNK_BATCHES = 8  # batches of questions whose pages are decoded and answered together


def require_file(path: Path) -> Path:
    """`path`, when it is a file; UserError saying that it is a directory or that it is not found."""
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{path} not found")
    return path


def answer_page(answerer: Answerer, data: bytes, question: str, params: Params, page: int | None = None) -> str:
    """The answer to `question` about an image or a PDF page (`data` are the file's bytes; `page` counts from 1)."""
    problem = checks.check_question(question) or answerer.question_problem(question)
    if problem:
        raise UserError(f"{problem.reason}: {problem.detail}")
    try:
        image = _model_page(answerer, data, page, params)
    except InvalidImage as error:
        raise UserError(f"{error.problem.reason}: {error.problem.detail}") from None
    image_id = page_id(data, page)
    return answerer.answer([{"question": question, "image_id": image_id}], {image_id: image})[0]


def _model_page(answerer: Answerer, data: bytes, page: int | None, params: Params) -> Image.Image:
    """The page at the model's size, under preprocess's pixel limit (predict answers what evaluation would)."""
    max_pixels, dpi = params.data.max_image_pixels, params.predict.pdf_dpi
    return model_page(data, answerer.input_size, max_pixels, page, dpi, setting="data.max_image_pixels")


def predict_jsonl(answerer: Answerer, input_path: Path, output_path: Path, params: Params) -> dict[str, Any]:
    """Answer every line of `input_path` into `output_path` (written atomically); return counts and seconds."""
    require_file(input_path)
    start, n_lines = time.perf_counter(), sum(1 for line in input_path.open("rb") if line.strip())
    chunk_size = answerer.decoding.batch_size * CHUNK_BATCHES
    out, n_errors = [], 0
    with tqdm(total=n_lines, unit="q", desc="answering", disable=None) as progress:
        for chunk in batched(_read_lines(input_path), chunk_size):
            answered = _answer_chunk(answerer, chunk, input_path.parent, params)
            n_errors += sum("error" in row for row in answered)
            out += [json.dumps(row, ensure_ascii=False) + "\n" for row in answered]
            progress.update(len(chunk))
    write_text_atomic(output_path, "".join(out))
    seconds = time.perf_counter() - start
    return {"questions": n_lines, "answered": n_lines - n_errors, "errors": n_errors, "seconds": round(seconds, 2)}


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Each non-blank line as a record to answer, or with `error` set when it is not one."""
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            if raw.strip():
                yield _parse_line(raw, number)


def _parse_line(raw: bytes, number: int) -> dict[str, Any]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return _failed({"line": number}, checks.NOT_UTF8, str(error))
    except json.JSONDecodeError as error:
        return _failed({"line": number}, checks.MALFORMED_JSON, f"{error.msg} at column {error.colno}")
    if not isinstance(record, dict):
        return _failed({"line": number}, checks.NOT_AN_OBJECT, f"expected an object, got {checks.short_repr(record)}")
    problem = checks.check_question(record.get("question"))
    if problem:
        return _failed(record, problem.reason, problem.detail)
    if not isinstance(record.get("image"), str) or not record["image"]:
        image = checks.short_repr(record.get("image"))
        return _failed(record, checks.FIELD_INVALID, f"image must be a path relative to the file, got {image}")
    page = record.get("page")
    if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
        return _failed(record, checks.FIELD_INVALID, f"page must be an integer from 1, got {checks.short_repr(page)}")
    return record


def _failed(record: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {**record, "error": reason, "detail": detail}


def _answer_chunk(answerer: Answerer, chunk: list[dict[str, Any]], folder: Path, params: Params) -> list[dict]:
    """The chunk's records with `answer` or `error`; pages are decoded once each, in the answerer's threads."""
    for record in chunk:
        problem = None if "error" in record else answerer.question_problem(record["question"])
        if problem:
            record.update(error=problem.reason, detail=problem.detail)
    wanted = sorted({(r["image"], r.get("page")) for r in chunk if "error" not in r}, key=lambda k: (k[0], k[1] or 0))
    loaded = dict(zip(wanted, answerer.pool.map(lambda key: _load_page(answerer, folder, *key, params), wanted)))
    rows, targets = [], []
    for record in chunk:
        if "error" in record:
            continue
        page = loaded[(record["image"], record.get("page"))]
        if isinstance(page, checks.Problem):
            record.update(error=page.reason, detail=page.detail)
            continue
        rows.append({"question": record["question"], "image_id": page[0]})
        targets.append(record)
    images = {image_id: image for image_id, image in (v for v in loaded.values() if isinstance(v, tuple))}
    for record, text in zip(targets, answerer.answer(rows, images) if rows else []):
        record["answer"] = text
    return chunk


def _load_page(
    answerer: Answerer, folder: Path, image: str, page: int | None, params: Params
) -> tuple[str, Image.Image] | checks.Problem:
    data = read_page_file(folder / image)
    if data is None:
        detail = "is a directory, not a file" if (folder / image).is_dir() else "cannot be read"
        return checks.Problem(checks.IMAGE_MISSING, f"{image} {detail}")
    try:
        pixels = _model_page(answerer, data, page, params)
    except InvalidImage as error:
        return error.problem
    return page_id(data, page), pixels


def write_submission(answerer: Answerer, processed_dir: Path, split: str, output_path: Path) -> dict[str, Any]:
    """Answer every question of a processed split and write the DocVQA leaderboard file; return counts and seconds."""
    from florence_ops.data.processed import ImageTable, read_questions  # needs `datasets`; the server does not

    start = time.perf_counter()
    rows = read_questions(processed_dir, split).select_columns(["questionId", "question", "image_id"]).to_list()
    ids = [row["questionId"] for row in rows]
    if len(set(ids)) != len(ids):
        raise UserError(f"{split} split of {processed_dir} lists a questionId twice: a submission answers each once")
    images = ImageTable(processed_dir)
    order = sorted(range(len(rows)), key=lambda i: rows[i]["image_id"])  # a document's questions in one chunk
    answers: list[str] = [""] * len(rows)
    chunk_size = answerer.decoding.batch_size * CHUNK_BATCHES
    with tqdm(total=len(rows), unit="q", desc=f"answering {split}", disable=None) as progress:
        for begin in range(0, len(order), chunk_size):
            chosen = order[begin : begin + chunk_size]
            for i, text in zip(chosen, answerer.answer([rows[i] for i in chosen], images)):
                answers[i] = text
            progress.update(len(chosen))
    submission = [{"questionId": i, "answer": a} for i, a in zip(submission_ids(ids), answers)]
    write_text_atomic(output_path, json.dumps(submission, ensure_ascii=False, indent=1) + "\n")  # keys as DocVQA has
    return {"questions": len(rows), "seconds": round(time.perf_counter() - start, 2)}


def submission_ids(ids: list[str]) -> list[int | str]:
    """DocVQA's questionIds as the integers the leaderboard expects; other data keeps its own ids, with a warning."""
    if all(i.isdigit() for i in ids):
        return [int(i) for i in ids]
    log.warning("questionIds such as %r are not integers: the file is no DocVQA leaderboard submission",
                next(i for i in ids if not i.isdigit()))  # fmt: skip
    return list(ids)
