"""The training-ready data format written by preprocess, its Parquet writer and its readers.

`${paths.processed}/` holds:
- `images.parquet`: `image_id` (sha1 of the raw image bytes), `image` (PNG, RGB, exactly the model's input size),
  `width`, `height` (upright original size). Each distinct page is stored once.
- `<split>.parquet`: `questionId`, `question`, `question_types`, `docId`, `answers`, `image_id`; `answers` is empty
  for the questions of an unlabeled split (`data.unlabeled_splits`).
- `quarantine.jsonl`: one `{"id", "split", "reason", "detail", "line"}` per rejected input record.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, List, Value
from PIL import Image

from florence_ops.errors import DataSourceError

SPLITS = ("train", "validation", "test")
IMAGES_FILE = "images.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

IMAGE_FEATURES = Features(
    {"image_id": Value("string"), "image": datasets.Image(), "width": Value("int32"), "height": Value("int32")}
)
QUESTION_FEATURES = Features(
    {
        "questionId": Value("string"),
        "question": Value("string"),
        "question_types": List(Value("string")),
        "docId": Value("string"),
        "answers": List(Value("string")),
        "image_id": Value("string"),
    }
)


class ParquetSink:
    """Append rows to a Parquet file in row groups, with `features` in the schema so `datasets` decodes them.

    A row group is what a reader holds in memory at once: the default of 16 rows keeps that to tens of MB for scans.
    `statistics` names the columns given min/max statistics (all by default).
    """

    def __init__(
        self, path: Path, features: Features, rows_per_group: int = 16, statistics: bool | list[str] = True
    ) -> None:
        self.path, self.rows, self._rows_per_group = path, 0, rows_per_group
        self._schema = features.arrow_schema
        self._buffer: list[dict[str, Any]] = []
        if any(isinstance(feature, datasets.Image) for feature in features.values()):
            # encoded images neither compress nor repeat; a dictionary page of them would be decoded whole on read
            self._writer = pq.ParquetWriter(
                path, self._schema, use_dictionary=False, compression="none", write_statistics=statistics
            )
        else:
            self._writer = pq.ParquetWriter(path, self._schema, write_statistics=statistics)

    def write(self, row: dict[str, Any]) -> None:
        """Buffer one row; a full buffer is written out as a row group."""
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self._rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self._schema))
            self._buffer = []

    def close(self) -> None:
        """Write what is buffered and finish the file."""
        self._flush()
        self._writer.close()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def model_input_size(base_model_dir: Path) -> tuple[int, int]:
    """The model's image input size (height, width): `size` of preprocessor_config.json, or of the image processor
    inside processor_config.json (where transformers 5 saves it when a processor is saved whole)."""
    candidates = [(base_model_dir / PREPROCESSOR_CONFIG, ()), (base_model_dir / PROCESSOR_CONFIG, ("image_processor",))]
    for path, keys in candidates:
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            for key in (*keys, "size"):
                config = config[key]
            return int(config["height"]), int(config["width"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataSourceError(
                f"{path}: expected the image size as size.height and size.width ({error!r})"
            ) from None
    raise DataSourceError(f"no {PREPROCESSOR_CONFIG} in {base_model_dir}: run `florence-ops download` first")


def processed_file(processed_dir: str | Path, name: str) -> Path:
    """The path of one file preprocess writes (`images.parquet`, `<split>.parquet`); DataSourceError when missing."""
    path = Path(processed_dir) / name
    if not path.is_file():
        raise DataSourceError(f"{path} not found: run `florence-ops preprocess` first")
    return path


def read_questions(processed_dir: str | Path, split: str) -> datasets.Dataset:
    """The questions of one split: questionId, question, question_types, docId, answers, image_id."""
    return _from_parquet(processed_file(processed_dir, f"{split}.parquet"), QUESTION_FEATURES)


def _from_parquet(path: Path, features: Features) -> datasets.Dataset:
    """A memory-mapped Dataset of a Parquet file (from_parquet rejects files without rows: those come empty)."""
    if pq.ParquetFile(path).metadata.num_rows == 0:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_parquet(str(path))


def image_ids(path: Path) -> list[str]:
    """The `image_id` column of a Parquet file (raw `pages.parquet`, processed `images.parquet`), in file order."""
    return pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()


class ImageTable:
    """The preprocessed pages by image_id, read from a memory-mapped Dataset one image at a time once `open`.

    The Dataset is an Arrow copy of every page in datasets' cache (as large as the pages, one for every version of
    the file): a stage that reads no page (its vision features are cached) never makes it."""

    def __init__(self, processed_dir: str | Path) -> None:
        self.path = processed_file(processed_dir, IMAGES_FILE)
        self.ids: list[str] = image_ids(self.path)
        self._row = {image_id: row for row, image_id in enumerate(self.ids)}
        self._dataset: datasets.Dataset | None = None

    def open(self) -> None:
        """Make (or find) the memory-mapped Dataset of the pages; DataLoader workers forked after this share it."""
        if self._dataset is None:
            self._dataset = _from_parquet(self.path, IMAGE_FEATURES)

    @property
    def opened(self) -> bool:
        """Whether the Arrow copy is made (or found) already: pages read now cost no more than a lookup."""
        return self._dataset is not None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def __getitem__(self, image_id: str) -> Image.Image:
        self.open()
        image = self._dataset[self._row[image_id]]["image"]
        return image if image.mode == "RGB" else image.convert("RGB")
