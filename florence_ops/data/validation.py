"""Pure checks of input records, and the reasons a record is quarantined.

A reason is one of the short, stable strings below (the keys of `by_reason` in reports/data_quality.json); the detail
that goes with it is free text for people. Images are checked by `florence_ops.data.images`, with the image reasons
defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Lines of a local annotations.jsonl that are not a usable record.
NOT_UTF8 = "not_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
FIELD_INVALID = "field_invalid"
# Record fields.
ID_MISSING = "id_missing"
DUPLICATE_ID = "duplicate_id"
QUESTION_EMPTY = "question_empty"
QUESTION_INVALID = "question_invalid"
QUESTION_TOO_LONG = "question_too_long"  # predict and serve: more tokens than the model was trained on
ANSWERS_EMPTY = "answers_empty"
ANSWERS_NOT_LIST = "answers_not_list"
ANSWERS_INVALID = "answers_invalid"
# Images.
IMAGE_MISSING = "image_missing"
IMAGE_EMPTY = "image_empty"
NOT_AN_IMAGE = "not_an_image"
IMAGE_CORRUPT = "image_corrupt"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_UNSUPPORTED = "image_unsupported"

DETAIL_CHARS = 120


@dataclass(frozen=True)
class Problem:
    """Why a record is quarantined: a reason constant and a human-readable detail."""

    reason: str
    detail: str


def short_repr(value: object) -> str:
    """`repr(value)` cut to a length that fits a report line."""
    text = repr(value)
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


def check_question(question: object) -> Problem | None:
    """The problem with a question, or None when it is a non-blank string."""
    if question is None or (isinstance(question, str) and not question.strip()):
        return Problem(QUESTION_EMPTY, "question is empty or whitespace")
    if not isinstance(question, str):
        return Problem(QUESTION_INVALID, f"question must be a string, got {short_repr(question)}")
    return None


def check_answers(answers: object) -> Problem | None:
    """The problem with an answer list, or None when it is a non-empty list of non-blank strings."""
    if answers is None or (isinstance(answers, list) and not answers):
        return Problem(ANSWERS_EMPTY, "no answers")
    if not isinstance(answers, list):
        return Problem(ANSWERS_NOT_LIST, f"answers must be a list of strings, got {short_repr(answers)}")
    for answer in answers:
        if not isinstance(answer, str) or not answer.strip():
            return Problem(ANSWERS_INVALID, f"answers must be non-empty strings, got {short_repr(answer)}")
    return None


def check_fields(question: object, answers: object, *, labeled: bool = True) -> Problem | None:
    """The first problem with a record's question and answers, or None; unlabeled records may have no answers."""
    if not labeled and (answers is None or answers == []):
        return check_question(question)
    return check_question(question) or check_answers(answers)
