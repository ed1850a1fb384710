"""Tests of florence_ops.artifacts: the one JSON style, atomic files, and directories published whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from florence_ops import artifacts
from florence_ops.artifacts import move_directory, publish_directory, write_json, write_text_atomic


def _fill(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_json_is_sorted_indented_with_newline(tmp_path: Path) -> None:
    path = write_json(tmp_path / "nested" / "metrics.json", {"b": 1, "a": {"d": 0.5, "c": "é"}})
    assert path.read_bytes() == '{\n  "a": {\n    "c": "é",\n    "d": 0.5\n  },\n  "b": 1\n}\n'.encode()
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left beside it
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_write_json_rejects_nan_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "metrics.json", {"anls": 0.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            write_json(path, {"anls": bad})
    assert json.loads(path.read_text()) == {"anls": 0.5}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_text_atomic(tmp_path / "report.html", "old")

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert os.listdir(tmp_path) == ["report.html"] and path.read_text() == "old"


def test_publish_replaces_the_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "models" / "base"
    with publish_directory(target) as staging:  # the first publish creates the parent
        _fill(staging, {"config.json": "1", "stale.bin": "x"})
    with publish_directory(target) as staging:
        assert staging.parent == target.parent and not any(staging.iterdir())
        _fill(staging, {"config.json": "2", "sub/weights.bin": "w"})
    assert _files(target) == {"config.json": "2", "sub/weights.bin": "w"}  # nothing of the old one survives
    assert os.listdir(target.parent) == ["base"]


@pytest.mark.parametrize("interruption", [RuntimeError("save failed"), KeyboardInterrupt()])
def test_interrupted_publish_keeps_the_old_directory_and_leaves_no_temp_dir(tmp_path: Path, interruption) -> None:
    target = tmp_path / "processed"
    _fill(target, {"train.parquet": "old", "images.parquet": "old pages"})
    with pytest.raises(type(interruption)), publish_directory(target) as staging:
        _fill(staging, {"train.parquet": "half"})
        raise interruption
    assert _files(target) == {"train.parquet": "old", "images.parquet": "old pages"}
    assert os.listdir(tmp_path) == ["processed"]


def test_publish_clears_what_a_killed_run_left(tmp_path: Path) -> None:
    target = tmp_path / "export"
    _fill(tmp_path / ".export.tmp", {"model.safetensors": "half written"})  # killed while saving
    _fill(tmp_path / ".export.old", {"model.safetensors": "moved aside"})  # killed between the two renames
    with publish_directory(target) as staging:
        assert not any(staging.iterdir())
        _fill(staging, {"model.safetensors": "new"})
    assert _files(target) == {"model.safetensors": "new"} and os.listdir(tmp_path) == ["export"]


def test_move_directory_replaces_the_target_and_takes_the_source(tmp_path: Path) -> None:
    source, target = tmp_path / "checkpoints" / "best", tmp_path / "train" / "model"
    _fill(source, {"model.safetensors": "best"})
    _fill(target, {"model.safetensors": "older", "adapter.bin": "older"})
    move_directory(source, target)
    assert _files(target) == {"model.safetensors": "best"}
    assert not source.exists() and os.listdir(target.parent) == ["model"]
