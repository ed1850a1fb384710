"""Raw materialisation from the synthetic, hub (offline: local Parquet through the same code) and local sources."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import datasets
import pytest
from PIL import Image

from florence_ops.config import DataConfig, HubData, LocalData, SyntheticData
from florence_ops.data import validation as checks
from florence_ops.data.local import assign_documents
from florence_ops.data.raw import PAGE_FEATURES, PAGES_FILE, RAW_QUESTION_FEATURES, REJECTED_LINES_FILE
from florence_ops.data.sources import materialize_raw
from florence_ops.errors import DataSourceError
from tests.data.offline_hub import emulate_hub, png, write_hub_split


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub emulated offline (`tests.data.offline_hub`)."""
    return emulate_hub(monkeypatch)


def read_raw(raw_dir: Path, split: str) -> datasets.Dataset:
    """The questions of a raw split."""
    return datasets.Dataset.from_parquet(str(raw_dir / f"{split}.parquet"))


def read_pages(raw_dir: Path) -> dict[str, bytes]:
    """The raw pages by image_id, in file order."""
    table = datasets.Dataset.from_parquet(str(raw_dir / PAGES_FILE)).cast_column("image", datasets.Image(decode=False))
    return {row["image_id"]: row["image"]["bytes"] for row in table}


def test_synthetic_source_writes_each_page_once(tmp_path):
    spec = SyntheticData(train_documents=2, validation_documents=1, test_documents=0, questions_per_document=2)
    counts = materialize_raw(DataConfig(synthetic=spec), seed=7, raw_dir=tmp_path / "raw")

    assert counts == {"train": 4, "validation": 2}
    names = sorted(path.name for path in (tmp_path / "raw").iterdir())
    assert names == ["pages.parquet", "train.parquet", "validation.parquet"]
    train = read_raw(tmp_path / "raw", "train")
    assert train.features == RAW_QUESTION_FEATURES
    record = train[0]
    assert isinstance(record["questionId"], str) and record["answers"] and record["question_types"]
    pages = datasets.Dataset.from_parquet(str(tmp_path / "raw" / PAGES_FILE))
    assert pages.features == PAGE_FEATURES and len(pages) == 3
    assert isinstance(pages[0]["image"], Image.Image) and pages[0]["image"].mode == "RGB"
    by_doc = defaultdict(set)
    for row in train:
        by_doc[row["docId"]].add(row["image_id"])
    assert len(by_doc) == 2 and all(len(ids) == 1 for ids in by_doc.values())
    stored = read_pages(tmp_path / "raw")
    assert all(hashlib.sha1(data).hexdigest() == page_id for page_id, data in stored.items())
    assert set(train["image_id"]) | set(read_raw(tmp_path / "raw", "validation")["image_id"]) == set(stored)


def test_raw_data_holds_each_page_once_however_many_questions_it_has(tmp_path):
    spec = SyntheticData(train_documents=3, validation_documents=1, test_documents=0, questions_per_document=6)
    materialize_raw(DataConfig(synthetic=spec), seed=7, raw_dir=tmp_path / "raw")

    page_bytes = sum(len(data) for data in read_pages(tmp_path / "raw").values())
    raw_bytes = sum(path.stat().st_size for path in (tmp_path / "raw").iterdir())
    assert len(read_raw(tmp_path / "raw", "train")) == 18
    assert raw_bytes < 1.1 * page_bytes  # not six copies of every page


def test_synthetic_raw_files_do_not_depend_on_worker_count(tmp_path, caplog):
    spec = SyntheticData(train_documents=7, validation_documents=3, test_documents=2, questions_per_document=3)
    outputs = []
    for workers in (1, 3):
        raw = tmp_path / f"raw{workers}"
        with caplog.at_level(logging.INFO):
            materialize_raw(DataConfig(synthetic=spec, num_workers=workers), seed=5, raw_dir=raw)
        assert re.search(rf"rendered 12 synthetic pages in .* in {workers} process\(es\)", caplog.text)
        outputs.append({path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(raw.iterdir())})
    assert list(outputs[0]) == ["pages.parquet", "test.parquet", "train.parquet", "validation.parquet"]
    assert outputs[0] == outputs[1]


def test_hub_source_streams_splits_with_revision_and_cap(tmp_path, offline_hub, caplog):
    files, calls = offline_hub
    files["train"] = write_hub_split(tmp_path / "train.parquet", 5)
    files["val"] = write_hub_split(tmp_path / "val.parquet", 3)
    hub = HubData(dataset="someone/docvqa", revision="abc123", validation_split="val", test_split=None, max_samples=4)
    with caplog.at_level(logging.WARNING):
        counts = materialize_raw(DataConfig(source="hf", hf=hub), seed=0, raw_dir=tmp_path / "raw")

    assert counts == {"train": 4, "validation": 3}
    assert calls == [("someone/docvqa", "abc123", "train"), ("someone/docvqa", "abc123", "val")]
    assert "revision" not in caplog.text
    train = read_raw(tmp_path / "raw", "train")
    assert train.features == RAW_QUESTION_FEATURES
    assert train["questionId"] == ["100", "101", "102", "103"]
    assert train["image_path"] == ["100.png", "100.png", "101.png", "101.png"]
    pages = read_pages(tmp_path / "raw")
    assert len(pages) == 2  # two questions a page, and validation's pages are also train's: stored once
    assert Image.open(io.BytesIO(pages[train[3]["image_id"]])).getpixel((0, 0)) == (101, 0, 0)


def test_hub_source_without_revision_warns(tmp_path, offline_hub, caplog):
    files, _ = offline_hub
    files["train"] = files["validation"] = write_hub_split(tmp_path / "train.parquet", 2)
    with caplog.at_level(logging.WARNING):
        materialize_raw(DataConfig(source="hf", hf=HubData(test_split=None)), seed=0, raw_dir=tmp_path / "raw")
    assert "data.hf.revision is not set" in caplog.text


def test_hub_dataset_without_docvqa_columns_fails_and_keeps_old_raw(tmp_path, offline_hub):
    files, _ = offline_hub
    files["train"] = write_hub_split(tmp_path / "train.parquet", 2, drop="answers")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "old.parquet").write_bytes(b"previous run")
    with pytest.raises(DataSourceError, match=r"lacks DocumentVQA columns \['answers'\]"):
        materialize_raw(DataConfig(source="hf", hf=HubData(test_split=None)), seed=0, raw_dir=raw)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".raw")] == []
    assert [path.name for path in raw.iterdir()] == ["old.parquet"]


def local_config(folder: Path, **fields) -> DataConfig:
    return DataConfig(source="local", local=LocalData(path=str(folder), **fields))


def test_local_records_without_split_are_split_by_document(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for doc in range(40):
        (folder / f"p{doc}.png").write_bytes(png((doc, 1, 2)))
        for q in range(3):
            record = {"question_id": f"{doc}-{q}", "question": "Q?", "answers": ["a"], "image": f"p{doc}.png"}
            lines.append(record if doc % 2 else {**record, "doc_id": f"doc-{doc}"})
    # a record pinned to test takes the other records of its document (p1.png, keyed by image path) with it
    lines.append({"question_id": "pinned", "question": "Q?", "answers": ["a"], "image": "p1.png", "split": "test"})
    (folder / "annotations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    counts = materialize_raw(local_config(folder, validation_fraction=0.2), seed=3, raw_dir=tmp_path / "raw")

    docs_of = {split: set(read_raw(tmp_path / "raw", split)["ucsf_document_id"]) for split in ("train", "validation")}
    assert not docs_of["train"] & docs_of["validation"]
    assert counts["rejected_lines"] == 0 and counts["train"] + counts["validation"] + counts["test"] == 121
    test = read_raw(tmp_path / "raw", "test")
    assert {"pinned", "1-0", "1-1", "1-2"} <= set(test["questionId"])
    assert len(set(test["ucsf_document_id"])) == 5  # the pinned document + 10% of the 39 others
    assert len(docs_of["validation"]) == 8  # 20% of the 39 unpinned documents
    again = materialize_raw(local_config(folder, validation_fraction=0.2), seed=3, raw_dir=tmp_path / "raw2")
    assert again == counts


def test_assign_documents_is_seeded_and_keeps_a_training_document():
    keys = [f"d{i}" for i in range(20)]
    first = assign_documents(keys, 1, 0.25, 0.25)
    assert first == assign_documents(reversed(keys), 1, 0.25, 0.25)
    assert first != assign_documents(keys, 2, 0.25, 0.25)
    assert sorted(first.values()).count("validation") == 5
    assert assign_documents(["only"], 1, 0.5, 0.4) == {"only": "train"}
    with pytest.raises(DataSourceError):
        assign_documents(keys, 1, 0.6, 0.4)


def test_local_unreadable_lines_and_images_are_kept_for_preprocess(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(png((1, 2, 3)))
    good = {"question_id": 1, "question": "Q?", "answers": ["a"], "image": "a.png", "split": "train"}
    lines = [
        json.dumps(good).encode(),
        b"",  # blank lines are not records
        b'{"question_id": 2, "question": "caf\xe9"}',
        b"{not json",
        json.dumps({**good, "question_id": "missing", "image": "gone.png"}).encode(),
    ]
    (folder / "annotations.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    counts = materialize_raw(local_config(folder), seed=0, raw_dir=tmp_path / "raw")

    assert counts == {"train": 2, "validation": 0, "rejected_lines": 2}
    rejected = [json.loads(text) for text in (tmp_path / "raw" / REJECTED_LINES_FILE).read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [(3, checks.NOT_UTF8), (4, checks.MALFORMED_JSON)]
    assert rejected[0]["text"] == '{"question_id": 2, "question": "caf\\xe9"}'
    rows = read_raw(tmp_path / "raw", "train")
    assert rows["questionId"] == ["1", "missing"]
    assert (rows[1]["image_id"], rows[1]["image_path"]) == (None, "gone.png")
    assert list(read_pages(tmp_path / "raw")) == [rows[0]["image_id"]]


def test_local_folder_without_annotations_is_a_user_error(tmp_path):
    with pytest.raises(DataSourceError, match="annotations.jsonl not found"):
        materialize_raw(local_config(tmp_path), seed=0, raw_dir=tmp_path / "raw")
