"""The hub, emulated offline: Parquet files shaped like splits of HuggingFaceM4/DocumentVQA, read through the same
`datasets.load_dataset` streaming call that `florence_ops.data.sources.load_hub_split` makes.

Not a conftest.py: tests elsewhere import the top-level conftest by its bare module name."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pytest
from PIL import Image

from florence_ops.config import HubData
from florence_ops.data import sources

# other integer types than ours, as a hub copy may have
HUB_FEATURES = datasets.Features(
    {**sources.DOCVQA_FEATURES, "questionId": datasets.Value("int64"), "docId": datasets.Value("int32")}
)


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_hub_split(path: Path, n: int, drop: str | None = None, answers: bool = True, first: int = 100) -> str:
    """A Parquet file shaped like a split of HuggingFaceM4/DocumentVQA: n questions, two per page.

    Without `answers`, the split withholds them as DocVQA's test split does (null, or an empty list every third row).
    """
    rows = {
        "questionId": [first + i for i in range(n)],
        "question": [f"What is {i}?" for i in range(n)],
        "question_types": [["form"]] * n,
        "image": [{"bytes": png((first + i // 2, 0, 0)), "path": f"{first + i // 2}.png"} for i in range(n)],
        "docId": [first + i // 2 for i in range(n)],
        "ucsf_document_id": [f"doc{first + i // 2}" for i in range(n)],
        "ucsf_document_page_no": ["1"] * n,
        "answers": [[str(i)] if answers else ([] if i % 3 == 2 else None) for i in range(n)],
    }
    dataset = datasets.Dataset.from_dict(rows, features=HUB_FEATURES)
    dataset.remove_columns(drop).to_parquet(str(path)) if drop else dataset.to_parquet(str(path))
    return str(path)


def emulate_hub(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str], list[tuple[str, str | None, str]]]:
    """Replace the one hub call with the same `load_dataset` call on local Parquet files (split name -> file, to
    fill in); return those files and the list of calls made."""
    files: dict[str, str] = {}
    calls: list[tuple[str, str | None, str]] = []

    def load_local(hub: HubData, split: str) -> datasets.IterableDataset:
        calls.append((hub.dataset, hub.revision, split))
        return datasets.load_dataset("parquet", data_files={split: files[split]}, split=split, streaming=True)

    monkeypatch.setattr(sources, "load_hub_split", load_local)
    return files, calls
