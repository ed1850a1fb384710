"""What a model directory says about how to ask it questions, and which version of it is on disk.

A directory that `florence-ops export` wrote holds `florence_ops.json` beside the weights: the task prompt and the
question-token limit the model was trained with, and its headline metrics. Decoding (beams, answer length) is in its
`generation_config.json`, which export also writes. Any other directory in the Hugging Face layout is asked with the
params.yaml values (`train.prompt`, `train.max_question_tokens`, `evaluate.num_beams`, `evaluate.max_new_tokens`).

This module reads JSON and file metadata only, so export and the HTTP processes of the server import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florence_ops.artifacts import CHAMPION_FILE, HEADLINE_METRICS, REGISTRY_FILE, SETTINGS_FILE, write_json
from florence_ops.config import Params
from florence_ops.errors import UserError

GENERATION_FILE = "generation_config.json"
# Files whose replacement means a new model: promotion and export replace the whole directory, and write these anew.
VERSION_FILES = ("config.json", "model.safetensors", CHAMPION_FILE, SETTINGS_FILE)


@dataclass(frozen=True)
class AskSettings:
    """How questions are put to a model and its answers decoded: what evaluation did for it."""

    prompt: str
    max_question_tokens: int
    num_beams: int
    max_new_tokens: int
    source: str  # where prompt and limit came from: the settings file or params.yaml

    @property
    def limit_setting(self) -> str:
        """Where `max_question_tokens` is set, as a user would look for it."""
        if self.source == SETTINGS_FILE:
            return f"max_question_tokens in the model directory's {SETTINGS_FILE}"
        return "train.max_question_tokens in params.yaml"


def write_settings(folder: Path, prompt: str, max_question_tokens: int, metrics: dict[str, Any]) -> None:
    """Write `florence_ops.json` into an exported model directory: prompt, question-token limit, headline metrics."""
    settings = {
        "prompt": prompt,
        "max_question_tokens": max_question_tokens,
        "metrics": {name: metrics.get(name) for name in HEADLINE_METRICS},
    }
    write_json(folder / SETTINGS_FILE, settings)


def read_settings(model_dir: Path, params: Params) -> AskSettings:
    """The prompt, question-token limit and decoding of `model_dir`; params.yaml's values where it has none."""
    saved = _read_json(model_dir / SETTINGS_FILE)
    if saved is None:
        train, evaluate = params.train, params.evaluate
        return AskSettings(train.prompt, train.max_question_tokens, evaluate.num_beams, evaluate.max_new_tokens,
                           "params.yaml")  # fmt: skip
    generation = _read_json(model_dir / GENERATION_FILE) or {}
    return AskSettings(
        prompt=str(saved["prompt"]),
        max_question_tokens=int(saved["max_question_tokens"]),
        num_beams=int(generation.get("num_beams") or params.evaluate.num_beams),
        max_new_tokens=int(generation.get("max_new_tokens") or params.evaluate.max_new_tokens),
        source=SETTINGS_FILE,
    )


def model_metrics(model_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The model's headline metrics and their file: the champion record if promoted, else the export's settings."""
    champion = _read_json(model_dir / CHAMPION_FILE)
    if champion and isinstance(champion.get("metrics"), dict):
        metrics = champion["metrics"]
        return {name: metrics.get(name) for name in HEADLINE_METRICS}, CHAMPION_FILE
    saved = _read_json(model_dir / SETTINGS_FILE)
    if saved and isinstance(saved.get("metrics"), dict):
        return saved["metrics"], SETTINGS_FILE
    return None, None


def registry_entry(model_dir: Path) -> dict[str, Any] | None:
    """The registry version a fetched model directory holds (`registry.fetch` wrote it), or None."""
    return _read_json(model_dir / REGISTRY_FILE)


def version_of(model_dir: Path) -> str | None:
    """A short id that changes whenever the model in `model_dir` is replaced; None while the directory is missing.

    Made from the inode and modification time of the directory and of the files promotion and export write anew,
    so a swap is seen even when a later directory reuses an earlier one's inode.
    """
    try:
        stats = [os.stat(model_dir)]
    except FileNotFoundError:
        return None
    for name in VERSION_FILES:
        try:
            stats.append(os.stat(model_dir / name))
        except FileNotFoundError:
            continue
    identity = [(s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats]
    return hashlib.sha1(repr(identity).encode()).hexdigest()[:12]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data
