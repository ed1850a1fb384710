"""Stage `preprocess`: validate the raw records, normalise their images once, write the training-ready dataset.

Every input record ends up either in `${paths.processed}/<split>.parquet` (its page in `images.parquet`) or in
`quarantine.jsonl` with its reason; `${paths.reports}/data_quality.json` counts both. Three passes: the question
tables (small: no image bytes) are checked first, which fixes the pages to normalise and their order; worker
processes then read those pages from the raw `pages.parquet` themselves and decode, orient and resize them, a few at
a time with a bounded number of tasks in flight, so memory stays flat however large the dataset is; last, the
questions are written. Output does not depend on the number of workers: results are written in a fixed order.
With `data.encode_pages`, each page written is also handed to the build of the train stage's vision-feature cache,
which encodes it on the GPU while the workers normalise the next pages (`florence_ops.vision.preprocess_build`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from florence_ops.artifacts import DATA_QUALITY_FILE, publish_directory, write_json
from florence_ops.config import Params
from florence_ops.data import validation as checks
from florence_ops.data.images import ImageResult, normalize_images
from florence_ops.data.parallel import batched, ordered_map, worker_count
from florence_ops.data.processed import (
    IMAGE_FEATURES,
    IMAGES_FILE,
    QUARANTINE_FILE,
    QUESTION_FEATURES,
    SPLITS,
    ParquetSink,
    image_ids,
    model_input_size,
)
from florence_ops.data.raw import PAGES_FILE, REJECTED_LINES_FILE, PageReader
from florence_ops.errors import DataQualityError, DataSourceError

log = logging.getLogger(__name__)

PAGES_PER_TASK = 4  # pages per worker task: a few hundred ms of work, and little memory in flight
BATCH_ROWS = 4096  # question rows read at once
MAX_LISTED_BAD = 1000  # bad records listed in the report; quarantine.jsonl lists all
PENDING = checks.Problem("pending", "sent to a worker")  # replaced by the result before any record reads it


@dataclass
class Tally:
    """Counts of good and bad records, and the bad ones themselves."""

    n_ok: int = 0
    n_bad: int = 0
    n_images: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_split: Counter = field(default_factory=Counter)
    bad: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, max_bad_fraction: float) -> dict[str, Any]:
        """The data-quality report: counts, bad fraction, reasons, and the listed bad records."""
        n_in = self.n_ok + self.n_bad
        return {
            "n_in": n_in,
            "n_ok": self.n_ok,
            "n_bad": self.n_bad,
            "bad_fraction": self.n_bad / n_in if n_in else 0.0,
            "max_bad_fraction": max_bad_fraction,
            "n_images": self.n_images,
            "n_ok_by_split": dict(sorted(self.by_split.items())),
            "by_reason": dict(sorted(self.by_reason.items())),
            "bad": self.bad,
        }


def preprocess(params: Params) -> dict[str, Any]:
    """Run the stage with `params.paths` and `params.data`; return the data-quality summary.

    Raises `DataQualityError` (after writing the report) when more than `data.max_bad_fraction` of the records fail.
    """
    paths, data = params.paths, params.data
    raw_dir, report_path = Path(paths.raw), Path(paths.reports) / DATA_QUALITY_FILE
    splits = [split for split in SPLITS if (raw_dir / f"{split}.parquet").is_file()]
    if not splits:
        raise DataSourceError(f"no raw splits in {raw_dir}: run `florence-ops download` first")
    if not (raw_dir / PAGES_FILE).is_file():
        raise DataSourceError(f"{raw_dir / PAGES_FILE} not found: run `florence-ops download` again")
    size = model_input_size(Path(paths.base_model))
    workers = worker_count(data.num_workers)
    start = time.perf_counter()
    with publish_directory(paths.processed) as staging:
        writer = Preprocessor(staging, splits, size, data.max_image_pixels, set(data.unlabeled_splits),
                              _vision_cache_build(params))  # fmt: skip
        try:
            writer.run(raw_dir, workers)
            summary = writer.tally.summary(data.max_bad_fraction)
            write_json(report_path, summary)
            n_in, n_bad, fraction = summary["n_in"], summary["n_bad"], summary["bad_fraction"]
            if n_in == 0:
                raise DataQualityError(f"no input records in {raw_dir}; see {report_path}")
            if fraction > data.max_bad_fraction:
                raise DataQualityError(
                    f"{n_bad} of {n_in} input records failed validation ({fraction:.1%} > data.max_bad_fraction "
                    f"{data.max_bad_fraction:.1%}); see {report_path}"
                )
        except BaseException:
            if writer.cache is not None:
                writer.cache.abandon()
            raise
        if writer.cache is not None:
            waited = time.perf_counter()
            writer.cache.finish(writer.written)
            log.info("waited %.1f s for the vision cache", time.perf_counter() - waited)
    seconds = time.perf_counter() - start
    log.info(
        "preprocessed %d records (%d quarantined, %d distinct pages) at %dx%d with %d workers in %.1f s "
        "(%.1f pages/s)", summary["n_in"], summary["n_bad"], summary["n_images"], size[1], size[0], workers, seconds,
        summary["n_images"] / max(seconds, 1e-9),
    )  # fmt: skip
    return summary


def _vision_cache_build(params: Params):
    """`PreprocessBuild` for `data.encode_pages` (given the pages to try), or None."""
    if not params.data.encode_pages:  # the build's modules import torch: left out of a stage that needs none
        return None
    from florence_ops.vision.preprocess_build import PreprocessBuild, encodes_pages

    return partial(PreprocessBuild, params) if encodes_pages(params) else None


class Preprocessor:
    """Writes the processed files of one run into `out_dir`, tallying every record it reads; with `cache_build`
    (`_vision_cache_build`), hands each page it writes to the vision cache's build (`cache`)."""

    def __init__(
        self, out_dir: Path, splits: list[str], size: tuple[int, int], max_pixels: int, unlabeled: set[str],
        cache_build=None,
    ) -> None:  # fmt: skip
        self.out_dir, self.splits, self.size, self.max_pixels = out_dir, splits, size, max_pixels
        self.unlabeled, self.cache_build, self.cache = unlabeled, cache_build, None
        self.written: list[str] = []  # image ids in images.parquet, in order
        self.tally = Tally()
        self.record_problems: dict[str, list[checks.Problem | None]] = {}  # per split, in row order
        self.image_problems: dict[str, checks.Problem | None] = {}  # None: stored in images.parquet

    def run(self, raw_dir: Path, workers: int) -> None:
        """Read the raw splits (and rejected annotation lines) and write everything under `out_dir`."""
        pages = self._check_records(raw_dir)
        if self.cache_build is not None:
            self.cache = self.cache_build([page for page, row in pages if row is not None])
        with open(self.out_dir / QUARANTINE_FILE, "w", encoding="utf-8") as self.quarantine:
            self._read_rejected_lines(raw_dir / REJECTED_LINES_FILE)
            self._normalize_pages(raw_dir / PAGES_FILE, pages, workers)
            for split in self.splits:
                self._write_split(raw_dir, split)

    def _check_records(self, raw_dir: Path) -> list[tuple[str, int | None]]:
        """Record problems of every split; return the pages that valid records need, in first-use order, with their
        row in pages.parquet (None when it is not there)."""
        row_of = {page_id: row for row, page_id in enumerate(image_ids(raw_dir / PAGES_FILE))}
        seen_ids: set[str] = set()
        pages: list[tuple[str, int | None]] = []
        columns = ["questionId", "question", "answers", "image_id"]
        for split in self.splits:
            problems = self.record_problems[split] = []
            for row in _rows(raw_dir / f"{split}.parquet", columns):
                problem = _record_problem(row, seen_ids, labeled=split not in self.unlabeled)
                problems.append(problem)
                image_id = row["image_id"]
                if problem is None and image_id is not None and image_id not in self.image_problems:
                    self.image_problems[image_id] = PENDING
                    pages.append((image_id, row_of.get(image_id)))
        return pages

    def _normalize_pages(self, path: Path, pages: list[tuple[str, int | None]], workers: int) -> None:
        """Normalise `pages` in worker processes and store them in images.parquet, in order."""
        normalize = partial(normalize_pages, path=path, size=self.size, max_pixels=self.max_pixels)
        start = time.perf_counter()
        with ParquetSink(self.out_dir / IMAGES_FILE, IMAGE_FEATURES) as images:
            for results in ordered_map(normalize, batched(pages, PAGES_PER_TASK), workers):
                for image in results:
                    self.image_problems[image.image_id] = image.problem
                    if image.problem is None:
                        images.write({"image_id": image.image_id, "image": {"bytes": image.png, "path": None},
                                      "width": image.width, "height": image.height})  # fmt: skip
                        self.tally.n_images += 1
                        self.written.append(image.image_id)
                        if self.cache is not None:
                            self.cache.add(image.image_id, image.png)
        _page_reader.cache_clear()  # with one worker, the reader was this process's
        seconds = time.perf_counter() - start
        log.info("normalised %d pages in %.1f s (%.1f pages/s)", len(pages), seconds, len(pages) / max(seconds, 1e-9))

    def _write_split(self, raw_dir: Path, split: str) -> None:
        """Write the valid questions of `split` and quarantine the others, in input order."""
        rows = _rows(raw_dir / f"{split}.parquet")
        with ParquetSink(self.out_dir / f"{split}.parquet", QUESTION_FEATURES, 4096) as questions:
            for row, problem in zip(rows, self.record_problems[split], strict=True):
                image_id = row["image_id"]
                if problem is None:
                    problem = _missing_image() if image_id is None else self.image_problems[image_id]
                if problem is not None:
                    self._reject(row["questionId"], split, _with_path(problem, row["image_path"]))
                    continue
                questions.write(_question_row(row, image_id))
                self.tally.n_ok += 1
                self.tally.by_split[split] += 1

    def _read_rejected_lines(self, path: Path) -> None:
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as stream:
            for text in stream:
                entry = json.loads(text)
                problem = checks.Problem(entry["reason"], entry["detail"])
                self._reject(entry.get("id"), entry.get("split"), problem, entry.get("line"))

    def _reject(self, qid: str | None, split: str | None, problem: checks.Problem, line: int | None = None) -> None:
        entry = {"id": qid, "split": split, "reason": problem.reason, "detail": problem.detail, "line": line}
        self.quarantine.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.tally.n_bad += 1
        self.tally.by_reason[problem.reason] += 1
        if len(self.tally.bad) < MAX_LISTED_BAD:
            self.tally.bad.append(entry)


def normalize_pages(
    pages: list[tuple[str, int | None]], path: Path, size: tuple[int, int], max_pixels: int
) -> list[ImageResult]:
    """Read (image_id, row) pages from pages.parquet at `path` and normalise them; run in the workers."""
    stat = path.stat()
    reader = _page_reader(path, (stat.st_mtime_ns, stat.st_size))
    return normalize_images([(page, None if row is None else reader.read(row)) for page, row in pages],
                                   size, max_pixels)  # fmt: skip


@lru_cache(maxsize=1)
def _page_reader(path: Path, version: tuple[int, int]) -> PageReader:
    """One reader per process for all its tasks, as opening one parses the footer (a few ms for DocVQA's 12k pages);
    `version` (mtime, size) makes a rewritten file open anew."""
    return PageReader(path)


def _rows(path: Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    for batch in pq.ParquetFile(path).iter_batches(BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def _record_problem(row: dict[str, Any], seen_ids: set[str], labeled: bool) -> checks.Problem | None:
    qid = row["questionId"]
    if qid is None or not str(qid).strip():
        return checks.Problem(checks.ID_MISSING, "questionId is empty")
    if qid in seen_ids:
        return checks.Problem(checks.DUPLICATE_ID, f"questionId {qid!r} appeared before")
    seen_ids.add(qid)
    return checks.check_fields(row["question"], row["answers"], labeled=labeled)


def _missing_image() -> checks.Problem:
    return checks.Problem(checks.IMAGE_MISSING, "no image bytes (file missing or unreadable)")


def _with_path(problem: checks.Problem, path: str | None) -> checks.Problem:
    return checks.Problem(problem.reason, f"{problem.detail} [{path}]") if path else problem


def _question_row(row: dict[str, Any], image_id: str) -> dict[str, Any]:
    return {
        "questionId": str(row["questionId"]),
        "question": row["question"].strip(),
        "question_types": row.get("question_types") or [],
        "docId": "" if row.get("docId") is None else str(row["docId"]),
        "answers": [answer.strip() for answer in row["answers"] or []],
        "image_id": image_id,
    }
