"""Materialise the raw data of the configured source in the layout of `florence_ops.data.raw`.

Sources (`data.source`): `synthetic` (rendered offline in `data.num_workers` processes), `hf` (a hub dataset with the
DocumentVQA columns, streamed) and `local` (a folder with annotations.jsonl, see `florence_ops.data.local`). Every
source gives DocumentVQA records; each distinct page is stored once in `pages.parquet` and the questions per split
refer to it by `image_id`. Records are written as they come, in row groups, and the whole directory is replaced only
once every file is complete. Output does not depend on the number of workers.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, List, Value

from florence_ops.artifacts import publish_directory
from florence_ops.config import DataConfig, HubData, LocalData
from florence_ops.data.local import RejectedLine, read_local
from florence_ops.data.parallel import ordered_map, worker_count
from florence_ops.data.raw import REJECTED_LINES_FILE, RawWriter, image_id
from florence_ops.data.synthetic import document_records, make_document
from florence_ops.errors import DataSourceError
from florence_ops.hub_errors import dataset_fetch_error

log = logging.getLogger(__name__)

SYNTHETIC_CHUNK = 2  # pages per worker task: ~0.2 s of rendering and PNG encoding
DOCVQA_FEATURES = Features(  # the columns of HuggingFaceM4/DocumentVQA, as a hub copy is cast to
    {
        "questionId": Value("string"),
        "question": Value("string"),
        "question_types": List(Value("string")),
        "image": datasets.Image(decode=False),
        "docId": Value("int64"),
        "ucsf_document_id": Value("string"),
        "ucsf_document_page_no": Value("string"),
        "answers": List(Value("string")),
    }
)


def materialize_raw(cfg: DataConfig, seed: int, raw_dir: Path) -> dict[str, int]:
    """Write the raw data of `cfg.source` to `raw_dir` and return the questions written per split.

    The local source also writes `rejected_lines.jsonl` and counts it under "rejected_lines".
    """
    with publish_directory(raw_dir) as staging:
        if cfg.source == "synthetic":
            counts = _write_synthetic(cfg, seed, staging)
        elif cfg.source == "hf":
            counts = _write_records(staging, _hub_splits(cfg.hf))
        else:
            counts = _write_local(cfg.local, seed, set(cfg.unlabeled_splits), staging)
    log.info("raw data (%s) in %s: %s", cfg.source, raw_dir, counts)
    return counts


def _write_records(staging: Path, splits: Iterable[tuple[str, Iterable[dict[str, Any]]]]) -> dict[str, int]:
    with RawWriter(staging) as writer:
        for split, records in splits:
            writer.open_split(split)  # written even without records
            for record in records:
                writer.add(split, record)
    return writer.counts()


def _write_synthetic(cfg: DataConfig, seed: int, staging: Path) -> dict[str, int]:
    spec, workers = cfg.synthetic, worker_count(cfg.num_workers)
    documents = {"train": spec.train_documents, "validation": spec.validation_documents, "test": spec.test_documents}
    pages = [(split, index) for split, n_documents in documents.items() for index in range(n_documents)]
    render = partial(synthetic_page, seed=seed, questions=spec.questions_per_document, unlabeled=cfg.unlabeled_splits)
    start = time.perf_counter()
    with RawWriter(staging) as writer:
        for split in (split for split, n_documents in documents.items() if n_documents > 0):
            writer.open_split(split)
        for (split, _), (png, page_id, records) in zip(pages, ordered_map(render, pages, workers, SYNTHETIC_CHUNK)):
            writer.add_page(png, known_id=page_id)
            for record in records:
                writer.add_question(split, record, page_id)
    seconds = time.perf_counter() - start
    log.info("rendered %d synthetic pages in %.1f s (%.1f pages/s) in %d process(es)", len(pages), seconds,
             len(pages) / max(seconds, 1e-9), workers)  # fmt: skip
    return writer.counts()


def synthetic_page(
    page: tuple[str, int], *, seed: int, questions: int, unlabeled: list[str]
) -> tuple[bytes, str, list[dict[str, Any]]]:
    """Render synthetic document (split, index): its PNG bytes, their image_id and its question records.

    Records of an unlabeled split carry no answers, as DocVQA's test split.
    """
    split, index = page
    document = make_document(split, index, seed)
    buffer = io.BytesIO()
    document.image.save(buffer, format="PNG")
    png = buffer.getvalue()
    records = document_records(document, split, index, seed, questions)
    for record in records:
        del record["image"]  # the page travels once, as PNG bytes
        if split in unlabeled:
            record["answers"] = None
    return png, image_id(png), records


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
    columns = list(DOCVQA_FEATURES)
    if dataset.features is not None:
        missing = [column for column in columns if column not in dataset.features]
        if missing:
            raise DataSourceError(f"data.hf.dataset {hub.dataset} ({name}) lacks DocumentVQA columns {missing}")
    # cast: hub copies differ in integer widths and id types; image bytes pass through undecoded
    dataset = dataset.select_columns(columns).cast(DOCVQA_FEATURES)
    if hub.max_samples is not None:
        dataset = dataset.take(hub.max_samples)
    for record in dataset:
        image = record["image"] or {"bytes": None, "path": None}
        if image["bytes"] is None and image["path"] and Path(image["path"]).is_file():
            image = {"bytes": Path(image["path"]).read_bytes(), "path": image["path"]}
        yield {**record, "image": image}


def _write_local(cfg: LocalData, seed: int, unlabeled: set[str], staging: Path) -> dict[str, int]:
    rejected = 0
    with RawWriter(staging) as writer:
        writer.open_split("train")  # test is optional; train and validation are always written, even empty
        writer.open_split("validation")
        with open(staging / REJECTED_LINES_FILE, "w", encoding="utf-8") as stream:
            for item in read_local(cfg, seed, unlabeled):
                if isinstance(item, RejectedLine):
                    stream.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
                    rejected += 1
                else:
                    writer.add(*item)
    if rejected:
        log.warning("%d line(s) of the annotations were rejected; see %s", rejected, REJECTED_LINES_FILE)
    return {**writer.counts(), "rejected_lines": rejected}
