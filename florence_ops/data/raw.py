"""The raw data layout that download writes and preprocess reads: each distinct page stored once.

`${paths.raw}/` holds:
- `pages.parquet`: `image_id` (sha1 of the image bytes, as preprocess names pages), `image` (the original bytes as
  the `datasets` Image feature, with the path of the first record that named it). One row per distinct page.
- `<split>.parquet`: one row per question, the DocumentVQA columns without the image (`questionId, question,
  question_types, docId, ucsf_document_id, ucsf_document_page_no, answers`) plus `image_id` (null when the record's
  image could not be read) and `image_path` (where the image came from, quoted in quarantine details).
- `rejected_lines.jsonl` (local source only): annotation lines that are not records, with their line numbers.

DocumentVQA repeats a page's bytes on each of its questions; storing them once keeps `data/raw` (which DVC hashes
and caches whole) about a question-per-page factor smaller.
"""

from __future__ import annotations

import bisect
import hashlib
from itertools import accumulate
from pathlib import Path
from types import TracebackType
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets import Features, List, Value

from florence_ops.data.processed import ParquetSink

PAGES_FILE = "pages.parquet"
REJECTED_LINES_FILE = "rejected_lines.jsonl"
PAGE_FEATURES = Features({"image_id": Value("string"), "image": datasets.Image()})
RAW_QUESTION_FEATURES = Features(
    {
        "questionId": Value("string"),
        "question": Value("string"),
        "question_types": List(Value("string")),
        "docId": Value("int64"),
        "ucsf_document_id": Value("string"),
        "ucsf_document_page_no": Value("string"),
        "answers": List(Value("string")),
        "image_id": Value("string"),
        "image_path": Value("string"),
    }
)


def image_id(data: bytes) -> str:
    """The name of a page: the sha1 of its bytes."""
    return hashlib.sha1(data).hexdigest()


class RawWriter:
    """Writes one raw dataset into an (empty) directory: pages once each, questions per split.

    A split's file is written once the split is opened or gets a question.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # statistics of the image_id only: those of small images would swell the footer every reader parses
        self.pages = ParquetSink(directory / PAGES_FILE, PAGE_FEATURES, statistics=["image_id"])
        self._questions: dict[str, ParquetSink] = {}
        self._page_ids: set[str] = set()

    def add_page(self, data: bytes | None, path: str | None = None, known_id: str | None = None) -> str | None:
        """Store a page unless stored already; return its image_id (None when there are no bytes to store)."""
        if data is None:
            return None
        page_id = known_id or image_id(data)
        if page_id not in self._page_ids:
            self._page_ids.add(page_id)
            self.pages.write({"image_id": page_id, "image": {"bytes": data, "path": path}})
        return page_id

    def add_question(self, split: str, record: dict[str, Any], page_id: str | None, path: str | None = None) -> None:
        """Store one question of `split`: its DocumentVQA fields (the image aside) and its page's id and path."""
        row = {name: record.get(name) for name in RAW_QUESTION_FEATURES if name not in ("image_id", "image_path")}
        self.open_split(split).write({**row, "image_id": page_id, "image_path": path})

    def add(self, split: str, record: dict[str, Any]) -> None:
        """Store a DocumentVQA record whose `image` is `{"bytes", "path"}` (either may be None)."""
        image = record.get("image") or {}
        path = image.get("path")
        self.add_question(split, record, self.add_page(image.get("bytes"), path), path)

    def counts(self) -> dict[str, int]:
        """Questions written per split."""
        return {split: sink.rows for split, sink in self._questions.items()}

    def open_split(self, split: str) -> ParquetSink:
        """The question file of `split`, created (empty) on first use."""
        if split not in self._questions:
            self._questions[split] = ParquetSink(self.directory / f"{split}.parquet", RAW_QUESTION_FEATURES, 4096)
        return self._questions[split]

    def close(self) -> None:
        """Finish every file."""
        self.pages.close()
        for sink in self._questions.values():
            sink.close()

    def __enter__(self) -> RawWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PageReader:
    """Reads page bytes from pages.parquet by row number, one row group at a time (the last one is kept)."""

    def __init__(self, path: Path) -> None:
        self._file = pq.ParquetFile(path, memory_map=True)
        sizes = [self._file.metadata.row_group(group).num_rows for group in range(self._file.num_row_groups)]
        self._starts = list(accumulate(sizes, initial=0))  # first row of each group
        self._group, self._rows = -1, []

    def read(self, row: int) -> bytes | None:
        """The bytes of page `row`."""
        group = bisect.bisect_right(self._starts, row) - 1
        if group != self._group:
            table = self._file.read_row_group(group, columns=["image"], use_threads=False)
            self._group, self._rows = group, table.column("image").to_pylist()
        return self._rows[row - self._starts[group]]["bytes"]
