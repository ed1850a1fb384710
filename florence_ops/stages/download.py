"""Stage `download`: materialise the raw dataset and the base model as DVC outputs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from florence_ops.artifacts import publish_directory
from florence_ops.base_models import (
    SHAPES,
    build_reference_model,
    build_reference_processor,
    build_tiny_model,
    build_tiny_processor,
)
from florence_ops.config import Params
from florence_ops.data.sources import materialize_raw
from florence_ops.modeling import load_pretrained, save_processor

log = logging.getLogger(__name__)


def download(params: Params) -> dict:
    """Write raw records to `paths.raw` and the base model + processor to `paths.base_model`; return counts.

    The base model comes first, so a model name that resolves to nothing fails before any data is fetched, except the
    tiny model, whose tokenizer is trained on the raw text."""
    tiny = params.model.name == "tiny"
    if not tiny:
        save_base_model(params)
    counts = materialize_raw(params.data, params.seed, Path(params.paths.raw))
    if tiny:
        save_base_model(params)
    log.info("raw records per split: %s", counts)
    return {"records": counts, "model": params.model.name}


def save_base_model(params: Params) -> Path:
    """Build the tiny model (tokenizer trained on the raw training text) or a real shape with random weights, or fetch
    the named one; save it atomically."""
    target = Path(params.paths.base_model)
    if params.model.name == "tiny":
        corpus = training_text(Path(params.paths.raw) / "train.parquet", params.train.prompt)
        processor = build_tiny_processor(params.model.tiny, corpus)
        model = build_tiny_model(params.model.tiny, processor, params.seed)
    elif params.model.name in SHAPES:
        processor = build_reference_processor(params.model.reference_files)
        model = build_reference_model(params.model.name, params.model.reference_files, processor, params.seed)
    else:
        model, processor = load_pretrained(params.model.name, params.model, params.model.revision)
    with publish_directory(target) as staging:
        model.save_pretrained(staging)
        save_processor(processor, staging)
    log.info("base model %s saved to %s", params.model.name, target)
    return target


def training_text(raw_train: Path, prompt: str) -> Iterator[str]:
    """Prompt, questions and answers of the raw training split: the tiny tokenizer's corpus."""
    yield prompt
    table = pq.ParquetFile(raw_train)
    for batch in table.iter_batches(columns=["question", "answers"], batch_size=4096):
        for question, answers in zip(batch.column("question").to_pylist(), batch.column("answers").to_pylist()):
            yield question or ""
            yield from (a for a in answers or [] if isinstance(a, str))
