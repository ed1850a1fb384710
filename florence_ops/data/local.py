"""Read a local DocVQA-style folder: `annotations.jsonl` plus the images it names.

One JSON object a line: `question_id` (unique string or integer), `question`, `answers` (list of accepted answers),
`image` (path relative to the folder), and optionally `doc_id`, `question_types` (list of strings) and `split`
(train, validation or test). Records without `split` are split by document (`doc_id`, or the image path when absent)
with the seed, so no document lands in two splits. A line whose `split` is one of `data.unlabeled_splits` may leave
`answers` out (or empty).

Lines that cannot become a record (not UTF-8, malformed JSON, wrong field types, duplicate ids, blank questions or
answers) come out as `RejectedLine`s with their line number; preprocess counts them as quarantined. A missing or
unreadable image file is not judged here: its record carries null image bytes and preprocess quarantines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from florence_ops.config import LocalData
from florence_ops.data import validation as checks
from florence_ops.errors import DataSourceError

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.jsonl"
SPLITS = ("train", "validation", "test")
TEXT_CHARS = 200
INT64 = 2**63


@dataclass(frozen=True)
class RejectedLine:
    """A line of annotations.jsonl that is not a valid record, kept with its number and (escaped) text."""

    line: int
    reason: str
    detail: str
    text: str
    id: str | None = None
    split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to rejected_lines.jsonl."""
        return asdict(self)


@dataclass(frozen=True)
class Annotation:
    """A valid annotation line."""

    line: int
    question_id: str
    question: str
    answers: list[str]
    image: str
    doc_key: str
    doc_id: int | None
    question_types: list[str]
    split: str | None


def read_local(
    cfg: LocalData, seed: int, unlabeled: Collection[str] = ()
) -> Iterator[tuple[str, dict[str, Any]] | RejectedLine]:
    """Yield (split, DocumentVQA raw record) for each valid line, and a `RejectedLine` for each invalid one.

    Lines naming a split in `unlabeled` need no answers.
    """
    folder = Path(cfg.path or "")
    annotations = folder / ANNOTATIONS_FILE
    if not annotations.is_file():
        raise DataSourceError(f"data.local.path: {annotations} not found")
    explicit: dict[str, str] = {}
    unsplit: set[str] = set()
    for item in parse_annotations(annotations, unlabeled):
        if isinstance(item, Annotation):
            if item.split:
                explicit.setdefault(item.doc_key, item.split)
            else:
                unsplit.add(item.doc_key)
    assigned = assign_documents(unsplit - explicit.keys(), seed, cfg.validation_fraction, cfg.test_fraction)
    assigned.update(explicit)
    missing = 0
    for item in parse_annotations(annotations, unlabeled):
        if isinstance(item, RejectedLine):
            yield item
            continue
        record = raw_record(item, folder)
        missing += record["image"]["bytes"] is None
        yield item.split or assigned[item.doc_key], record
    if missing:
        log.warning("%d annotation(s) in %s name an image that cannot be read", missing, annotations)


def assign_documents(
    doc_keys: Iterable[str], seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, str]:
    """Map each document to a split: a seeded shuffle, then the first shares go to test and validation."""
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
        raise DataSourceError("data.local: validation_fraction and test_fraction must be >= 0 and sum to < 1")
    keys = sorted(doc_keys)
    random.Random(seed).shuffle(keys)
    n_test = min(round(test_fraction * len(keys)), max(len(keys) - 1, 0))
    n_validation = min(round(validation_fraction * len(keys)), max(len(keys) - 1 - n_test, 0))
    splits = ["test"] * n_test + ["validation"] * n_validation
    return {key: splits[index] if index < len(splits) else "train" for index, key in enumerate(keys)}


def parse_annotations(path: Path, unlabeled: Collection[str] = ()) -> Iterator[Annotation | RejectedLine]:
    """Parse annotations.jsonl line by line from bytes, so one bad line costs only itself.

    Lines naming a split in `unlabeled` may omit answers.
    """
    first_seen: dict[str, int] = {}
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            item = _parse_line(raw, number, unlabeled)
            if isinstance(item, Annotation):
                if item.question_id in first_seen:
                    detail = f"question_id {item.question_id!r} first seen on line {first_seen[item.question_id]}"
                    item = _reject(item.line, checks.Problem(checks.DUPLICATE_ID, detail), raw, item.question_id)
                else:
                    first_seen[item.question_id] = number
            yield item


def _reject(
    number: int, problem: checks.Problem, raw: bytes, qid: str | None = None, split: object = None
) -> RejectedLine:
    text = raw.decode("utf-8", errors="backslashreplace").strip()[:TEXT_CHARS]
    split = split if split in SPLITS else None
    return RejectedLine(number, problem.reason, problem.detail, text, qid, split)


def _parse_line(raw: bytes, number: int, unlabeled: Collection[str]) -> Annotation | RejectedLine:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        detail = f"byte {error.start} is not UTF-8 ({raw[error.start : error.start + 1]!r})"
        return _reject(number, checks.Problem(checks.NOT_UTF8, detail), raw)
    try:
        obj = json.loads(text.lstrip("\ufeff") if number == 1 else text)
    except json.JSONDecodeError as error:
        return _reject(number, checks.Problem(checks.MALFORMED_JSON, str(error)), raw)
    if not isinstance(obj, dict):
        return _reject(
            number, checks.Problem(checks.NOT_AN_OBJECT, f"expected an object, got {type(obj).__name__}"), raw
        )
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int | str) or not str(qid).strip():
        problem = checks.Problem(checks.ID_MISSING, f"question_id must be a non-empty string or integer, got {qid!r}")
        return _reject(number, problem, raw, split=obj.get("split"))
    qid = str(qid)
    labeled = obj.get("split") not in unlabeled
    problem = _field_problem(obj) or checks.check_fields(obj.get("question"), obj.get("answers"), labeled=labeled)
    if problem:
        return _reject(number, problem, raw, qid, obj.get("split"))
    doc_id = obj.get("doc_id")
    return Annotation(
        line=number,
        question_id=qid,
        question=obj["question"],
        answers=obj.get("answers") or [],
        image=obj["image"],
        doc_key=obj["image"] if doc_id is None else str(doc_id),
        doc_id=doc_id,
        question_types=obj.get("question_types") or [],
        split=obj.get("split"),
    )


def _field_problem(obj: dict[str, Any]) -> checks.Problem | None:
    image, doc_id, types, split = obj.get("image"), obj.get("doc_id"), obj.get("question_types"), obj.get("split")
    if not isinstance(image, str) or not image.strip():
        return checks.Problem(checks.FIELD_INVALID, f"image must be a path relative to the folder, got {image!r}")
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, int | str) or doc_id == ""):
        return checks.Problem(checks.FIELD_INVALID, f"doc_id must be a string or integer, got {doc_id!r}")
    if isinstance(doc_id, int) and not -INT64 <= doc_id < INT64:
        return checks.Problem(checks.FIELD_INVALID, f"doc_id {doc_id} does not fit in 64 bits")
    if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
        return checks.Problem(checks.FIELD_INVALID, f"question_types must be a list of strings, got {types!r}")
    if split is not None and split not in SPLITS:
        return checks.Problem(checks.FIELD_INVALID, f"split must be one of {list(SPLITS)}, got {split!r}")
    return None


def raw_record(item: Annotation, folder: Path) -> dict[str, Any]:
    """The DocumentVQA-schema record of an annotation, with the image file's bytes (None if unreadable)."""
    try:
        data: bytes | None = (folder / item.image).read_bytes()
    except OSError as error:
        log.debug("line %d: cannot read %s: %s", item.line, item.image, error)
        data = None
    return {
        "questionId": item.question_id,
        "question": item.question,
        "question_types": item.question_types,
        "image": {"bytes": data, "path": item.image},
        "docId": item.doc_id if isinstance(item.doc_id, int) else document_number(item.doc_key),
        "ucsf_document_id": item.doc_key,
        "ucsf_document_page_no": None,
        "answers": item.answers,
    }


def document_number(doc_key: str) -> int:
    """A stable non-negative 63-bit integer for a string document key (the raw schema's docId is an integer)."""
    return int.from_bytes(hashlib.sha1(doc_key.encode("utf-8")).digest()[:8], "big") >> 1
