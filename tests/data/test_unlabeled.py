"""Unlabeled splits (`data.unlabeled_splits`, DocVQA's test): records without answers are kept there, with
`answers: []`, and quarantined everywhere else; everything else that is bad is quarantined in every split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florence_ops.config import DataConfig
from florence_ops.data import validation as checks
from florence_ops.data.processed import ImageTable, read_questions
from florence_ops.data.sources import materialize_raw
from florence_ops.errors import ConfigError, DataQualityError
from florence_ops.stages.preprocess import preprocess
from tests.conftest import tiny_params
from tests.data.offline_hub import emulate_hub, png, write_hub_split


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub emulated offline (`tests.data.offline_hub`)."""
    return emulate_hub(monkeypatch)


def prepare(tmp_path: Path, **overrides):
    """Params for a workspace under tmp_path with its raw data written and a 32x32 model input size."""
    params = tiny_params(tmp_path / "ws", **overrides)
    materialize_raw(params.data, params.seed, Path(params.paths.raw))
    base = Path(params.paths.base_model)
    base.mkdir(parents=True)
    (base / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    return params


def hub_with_unlabeled_test(tmp_path: Path, offline_hub, unlabeled: list[str]):
    """The hub emulated offline: labeled train (8) and validation (4), a test split (6) without answers."""
    files, _ = offline_hub
    files["train"] = write_hub_split(tmp_path / "train.parquet", 8, first=100)
    files["validation"] = write_hub_split(tmp_path / "validation.parquet", 4, first=120)
    files["test"] = write_hub_split(tmp_path / "test.parquet", 6, answers=False, first=140)
    overrides = {"data.source": "hf", "data.hf.test_split": "test", "data.unlabeled_splits": unlabeled}
    return prepare(tmp_path, **overrides)


def test_hub_test_split_without_answers_is_kept_when_declared_unlabeled(tmp_path, offline_hub):
    params = hub_with_unlabeled_test(tmp_path, offline_hub, ["test"])
    summary = preprocess(params)

    assert (summary["n_bad"], summary["n_ok_by_split"]) == (0, {"test": 6, "train": 8, "validation": 4})
    processed = Path(params.paths.processed)
    test = read_questions(processed, "test")
    assert test["questionId"] == [str(140 + i) for i in range(6)]
    assert test["answers"] == [[]] * 6
    assert set(test["image_id"]) <= set(ImageTable(processed).ids)
    assert read_questions(processed, "train")["answers"][0] == ["0"]


def test_hub_test_split_without_answers_is_quarantined_when_not_declared(tmp_path, offline_hub):
    params = hub_with_unlabeled_test(tmp_path, offline_hub, [])
    with pytest.raises(DataQualityError, match=r"^6 of 18 input records failed validation"):
        preprocess(params)

    report = json.loads((Path(params.paths.reports) / "data_quality.json").read_text())
    assert report["by_reason"] == {checks.ANSWERS_EMPTY: 6}
    assert {(entry["split"], entry["reason"]) for entry in report["bad"]} == {("test", checks.ANSWERS_EMPTY)}


def local_folder(root: Path) -> Path:
    """Labeled train and validation lines, and test lines without answers, some of them bad in other ways."""
    root.mkdir()
    for page in range(3):
        (root / f"p{page}.png").write_bytes(png((page, 50, 50)))
    labeled = {"question": "Q?", "answers": ["a"], "image": "p0.png"}
    lines = [
        {**labeled, "question_id": "tr", "split": "train"},
        {**labeled, "question_id": "va", "split": "validation"},
        {"question_id": "t1", "question": "Q?", "image": "p1.png", "split": "test"},  # line 3: no answers
        {"question_id": "t2", "question": "Q?", "answers": [], "image": "p2.png", "split": "test"},
        {"question_id": "t3", "question": "Q?", "answers": None, "image": "p2.png", "split": "test"},
        {**labeled, "question_id": "t4", "split": "test"},  # a labeled record in an unlabeled split stays labeled
        {"question_id": "b1", "question": " ", "image": "p1.png", "split": "test"},  # line 7
        {"question_id": "b2", "question": "Q?", "answers": [" "], "image": "p1.png", "split": "test"},
        {"question_id": "b3", "question": "Q?", "answers": "x", "image": "p1.png", "split": "test"},
        {"question_id": "b4", "question": "Q?", "image": "gone.png", "split": "test"},
        {"question_id": "b5", "question": "Q?", "image": "p1.png"},  # line 11: no split, so it must be labeled
    ]
    (root / "annotations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.mark.parametrize("unlabeled", [["test"], []])
def test_local_test_lines_without_answers_are_kept_only_when_test_is_unlabeled(tmp_path, unlabeled):
    folder = local_folder(tmp_path / "data")
    settings = {"data.source": "local", "data.local.path": str(folder), "data.max_bad_fraction": 1.0}
    params = prepare(tmp_path, **settings, **{"data.unlabeled_splits": unlabeled})
    summary = preprocess(params)

    quarantined = {entry["id"]: (entry["reason"], entry["line"]) for entry in summary["bad"]}
    always = {
        "b1": (checks.QUESTION_EMPTY, 7),
        "b2": (checks.ANSWERS_INVALID, 8),
        "b3": (checks.ANSWERS_NOT_LIST, 9),
        "b4": (checks.IMAGE_MISSING, None),
        "b5": (checks.ANSWERS_EMPTY, 11),
    }
    test = read_questions(Path(params.paths.processed), "test")
    if unlabeled:
        assert quarantined == always
        assert dict(zip(test["questionId"], test["answers"])) == {"t1": [], "t2": [], "t3": [], "t4": ["a"]}
    else:
        unanswered = {qid: (checks.ANSWERS_EMPTY, line) for qid, line in [("t1", 3), ("t2", 4), ("t3", 5), ("b4", 10)]}
        assert quarantined == {**always, **unanswered}
        assert test["questionId"] == ["t4"]


def test_synthetic_source_withholds_the_answers_of_an_unlabeled_test_split(tmp_path):
    sizes = {"data.synthetic.train_documents": 2, "data.synthetic.validation_documents": 1}
    labeled = prepare(tmp_path / "labeled", **sizes)
    unlabeled = prepare(tmp_path / "unlabeled", **sizes, **{"data.unlabeled_splits": ["test"]})
    preprocess(labeled)
    summary = preprocess(unlabeled)

    assert summary["n_bad"] == 0 and summary["n_ok_by_split"]["test"] == 8
    before, after = (read_questions(Path(p.paths.processed), "test") for p in (labeled, unlabeled))
    assert all(before["answers"]) and after["answers"] == [[]] * 8
    assert after["questionId"] == before["questionId"] and after["image_id"] == before["image_id"]
    for split in ("train", "validation"):
        assert all(read_questions(Path(unlabeled.paths.processed), split)["answers"])


@pytest.mark.parametrize("split", ["train", "validation", "dev"])
def test_only_test_may_be_declared_unlabeled(split):
    with pytest.raises(ConfigError, match=r"^data.unlabeled_splits: only test may be unlabeled"):
        DataConfig(unlabeled_splits=[split])
