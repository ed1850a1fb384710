"""Materialise the raw data of the configured source as `<split>.parquet` files in the DocumentVQA schema.

Sources (`data.source`): `synthetic` (rendered offline), `hf` (a hub dataset with the DocumentVQA columns, streamed)
and `local` (a folder with annotations.jsonl, see `florence_ops.data.local`). Each raw file holds the columns
`questionId, question, question_types, image, docId, ucsf_document_id, ucsf_document_page_no, answers` with `image`
as the `datasets` Image feature (original bytes), so `datasets.Dataset.from_parquet` decodes it. Records are written
as they come, in row groups, and the whole directory is replaced only once every file is complete.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, List, Value

from florence_ops.config import DataConfig, HubData, LocalData, SyntheticData
from florence_ops.data.local import RejectedLine, read_local
from florence_ops.data.processed import SPLITS, ParquetSink, staged_directory
from florence_ops.data.synthetic import generate_split
from florence_ops.errors import DataSourceError
from florence_ops.hub import dataset_fetch_error

log = logging.getLogger(__name__)

REJECTED_LINES_FILE = "rejected_lines.jsonl"
RAW_FEATURES = Features(
    {
        "questionId": Value("string"),
        "question": Value("string"),
        "question_types": List(Value("string")),
        "image": datasets.Image(),
        "docId": Value("int64"),
        "ucsf_document_id": Value("string"),
        "ucsf_document_page_no": Value("string"),
        "answers": List(Value("string")),
    }
)


def materialize_raw(cfg: DataConfig, seed: int, raw_dir: Path) -> dict[str, int]:
    """Write `raw_dir/<split>.parquet` from `cfg.source` and return the records written per split.

    The local source also writes `rejected_lines.jsonl` and counts it under "rejected_lines".
    """
    with staged_directory(Path(raw_dir)) as staging:
        if cfg.source == "synthetic":
            counts = _write_splits(staging, _synthetic_splits(cfg.synthetic, seed))
        elif cfg.source == "hf":
            counts = _write_splits(staging, _hub_splits(cfg.hf))
        else:
            counts = _write_local(cfg.local, seed, staging)
    log.info("raw data (%s) in %s: %s", cfg.source, raw_dir, counts)
    return counts


def _write_splits(staging: Path, splits: Iterable[tuple[str, Iterable[dict[str, Any]]]]) -> dict[str, int]:
    counts = {}
    for split, records in splits:
        with ParquetSink(staging / f"{split}.parquet", RAW_FEATURES) as sink:
            for record in records:
                sink.write(record)
        counts[split] = sink.rows
    return counts


def _synthetic_splits(spec: SyntheticData, seed: int) -> Iterator[tuple[str, Iterator[dict[str, Any]]]]:
    documents = {"train": spec.train_documents, "validation": spec.validation_documents, "test": spec.test_documents}
    for split, n_documents in documents.items():
        if n_documents > 0:
            yield split, _synthetic_records(split, n_documents, seed, spec.questions_per_document)


def _synthetic_records(split: str, n_documents: int, seed: int, questions: int) -> Iterator[dict[str, Any]]:
    page, data = None, b""
    for record in generate_split(split, n_documents, seed, questions_per_document=questions):
        if record["image"] is not page:  # the questions of a page share its image: encode it once
            page, buffer = record["image"], io.BytesIO()
            page.save(buffer, format="PNG")
            data = buffer.getvalue()
        yield {**record, "image": {"bytes": data, "path": None}}


def load_hub_split(hub: HubData, split: str) -> datasets.IterableDataset:
    """Open one split of the hub dataset, streamed: the only line that reaches the Hugging Face hub."""
    try:
        return datasets.load_dataset(hub.dataset, revision=hub.revision, split=split, streaming=True)
    except (ConnectionError, FileNotFoundError) as error:  # offline or unreachable; no such dataset or revision
        raise dataset_fetch_error(error, hub.dataset) from error


def _hub_splits(hub: HubData) -> Iterator[tuple[str, Iterator[dict[str, Any]]]]:
    if hub.revision is None:
        log.warning("data.hf.revision is not set: %s is read at its latest revision, not reproducibly", hub.dataset)
    names = {"train": hub.train_split, "validation": hub.validation_split, "test": hub.test_split}
    for split, name in names.items():
        if name:
            yield split, _hub_records(hub, name)


def _hub_records(hub: HubData, name: str) -> Iterator[dict[str, Any]]:
    dataset = load_hub_split(hub, name)
    columns = list(RAW_FEATURES)
    if dataset.features is not None:
        missing = [column for column in columns if column not in dataset.features]
        if missing:
            raise DataSourceError(f"data.hf.dataset {hub.dataset} ({name}) lacks DocumentVQA columns {missing}")
    # cast: hub copies differ in integer widths and id types; image bytes pass through undecoded
    dataset = dataset.select_columns(columns).cast(Features({**RAW_FEATURES, "image": datasets.Image(decode=False)}))
    if hub.max_samples is not None:
        dataset = dataset.take(hub.max_samples)
    for record in dataset:
        image = record["image"] or {"bytes": None, "path": None}
        if image["bytes"] is None and image["path"] and Path(image["path"]).is_file():
            image = {"bytes": Path(image["path"]).read_bytes(), "path": image["path"]}
        yield {**record, "image": image}


def _write_local(cfg: LocalData, seed: int, staging: Path) -> dict[str, int]:
    sinks = {split: ParquetSink(staging / f"{split}.parquet", RAW_FEATURES) for split in SPLITS}
    rejected = 0
    try:
        with open(staging / REJECTED_LINES_FILE, "w", encoding="utf-8") as stream:
            for item in read_local(cfg, seed):
                if isinstance(item, RejectedLine):
                    stream.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
                    rejected += 1
                else:
                    sinks[item[0]].write(item[1])
    finally:
        for sink in sinks.values():
            sink.close()
    if not sinks["test"].rows:  # test is optional; train and validation are always written, even empty
        sinks["test"].path.unlink()
    counts = {split: sink.rows for split, sink in sinks.items() if sink.path.exists()}
    if rejected:
        log.warning("%d line(s) of the annotations were rejected; see %s", rejected, REJECTED_LINES_FILE)
    return {**counts, "rejected_lines": rejected}
