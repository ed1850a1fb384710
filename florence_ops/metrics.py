"""Answer metrics for DocVQA: ANLS (the official metric), the tutorial's Levenshtein similarity, exact match.

All scores lie in [0, 1]. `score_predictions` adds them to prediction rows and `aggregate` turns rows into the
corpus figures written to metrics.json, overall and per question type.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rapidfuzz.distance import Levenshtein

from florence_ops.artifacts import SCORE_NAMES

ANLS_THRESHOLD = 0.5


def normalize_answer(text: str) -> str:
    """Lower-case `text`, strip it and collapse every run of (Unicode) whitespace to one space.

    This is the official DocVQA normalisation and nothing more: punctuation and accents are kept.
    """
    return " ".join(text.lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    """Levenshtein distance between `a` and `b` divided by the longer length in code points; 0.0 for two empties."""
    longest = max(len(a), len(b))
    return 0.0 if longest == 0 else Levenshtein.distance(a, b) / longest


def _thresholded_similarity(a: str, b: str, threshold: float) -> float:
    distance = normalized_levenshtein(a, b)
    return 1.0 - distance if distance < threshold else 0.0


def _require_answers(answers: Sequence[str]) -> None:
    # A plain string is a Sequence[str] too; scoring its characters as answers would be silently wrong.
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a string")
    if len(answers) == 0:
        raise ValueError("a question needs at least one accepted answer")


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Per-question ANLS (Biten et al., ICCV 2019), the official DocVQA metric.

    ANLS = max over accepted answers a of s(a), where s = 1 - NL if NL < threshold else 0, and
    NL = Levenshtein(norm(prediction), norm(a)) / max(len(norm(prediction)), len(norm(a))) with `normalize_answer`
    as norm. Two strings that are empty after normalisation have NL = 0 and score 1. The corpus ANLS is the mean of
    this over questions. Raises ValueError when `answers` is empty.
    """
    _require_answers(answers)
    pred = normalize_answer(prediction)
    return max(_thresholded_similarity(pred, normalize_answer(answer), threshold) for answer in answers)


def levenshtein_similarity(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The score the common Florence-2 DocVQA tutorial reports as "Levenshtein similarity" (its "0 -> 57.0"); NOT ANLS.

    s = 1 - NL if NL < threshold else 0, with NL the normalised Levenshtein distance between the raw prediction and the
    FIRST accepted answer only: case-sensitive, whitespace-sensitive, no normalisation. It is usually below `anls`
    (other accepted answers and case are not forgiven) but can exceed it, e.g. when padding spaces dilute the distance.
    Raises ValueError when `answers` is empty.
    """
    _require_answers(answers)
    return _thresholded_similarity(prediction, answers[0], threshold)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised accepted answer, else 0.0."""
    _require_answers(answers)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(answer) for answer in answers))


def score_predictions(
    records: Iterable[Mapping[str, Any]],
    prediction_key: str = "prediction",
    answers_key: str = "answers",
) -> list[dict[str, Any]]:
    """Copy each record and add its `anls`, `levenshtein_similarity` and `exact_match` (see those functions)."""
    rows = []
    for record in records:
        prediction, answers = record[prediction_key], record[answers_key]
        row = dict(record)
        row["anls"] = anls(prediction, answers)
        row["levenshtein_similarity"] = levenshtein_similarity(prediction, answers)
        row["exact_match"] = exact_match(prediction, answers)
        rows.append(row)
    return rows


def _summary(rows: Sequence[Mapping[str, Any]], names: Sequence[str] = SCORE_NAMES) -> dict[str, float | int | None]:
    # No questions means no score: None (JSON null), never a made-up 0.0.
    summary: dict[str, float | int | None] = {
        name: math.fsum(row[name] for row in rows) / len(rows) if rows else None for name in names
    }
    summary["n_questions"] = len(rows)
    return summary


def aggregate(
    rows: Iterable[Mapping[str, Any]],
    types_key: str = "question_types",
    type_metrics: Sequence[str] = ("anls",),
) -> dict[str, Any]:
    """Corpus figures of scored rows: the mean of each metric and `n_questions`, overall and by question type.

    Returns `{"anls", "levenshtein_similarity", "exact_match", "n_questions", "by_type": {type: {...}}}` where each
    type holds the means of `type_metrics` and its `n_questions` (few keys keep `dvc metrics show` readable).
    A question with several types counts once in each of them; one without types counts only overall. Means of zero
    questions are None. `by_type` is sorted by type name.
    """
    rows = list(rows)
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        for question_type in dict.fromkeys(row.get(types_key) or ()):
            grouped[question_type].append(row)
    result: dict[str, Any] = _summary(rows)
    result["by_type"] = {name: _summary(grouped[name], type_metrics) for name in sorted(grouped)}
    return result


def flatten_metrics(metrics: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Nested metrics as one level: `{"by_type": {"layout": {"anls": x}}}` becomes `{"by_type/layout/anls": x}`.

    For trackers that take flat names (MLflow, dvclive); `dvc metrics show` flattens nested JSON itself (with ".").
    """
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}{sep}{inner}": v for inner, v in flatten_metrics(value, sep).items()})
        else:
            flat[key] = value
    return flat
