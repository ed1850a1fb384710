"""The champion/challenger gate of the retraining flow, and the champion's files. No Prefect here.

The champion is the promoted model directory (`promotion.champion_dir`, a symlink to the current version) plus its
record: the metrics, params, data fingerprint and git revision it was trained with. The record is written into the
version before the link is switched to it, so the switch promotes model and record together; `reports/champion.json`
is the git-tracked copy that the gate reads, re-synced from the directory whenever the two disagree after a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from florence_ops.artifacts import CHAMPION_FILE, write_json
from florence_ops.config import Params, to_dict

log = logging.getLogger(__name__)

# params sections that cannot change the model
NOT_MODEL_INPUTS = ("promotion", "registry", "schedule", "predict", "serve")


class MetricsError(ValueError):
    """A metrics or champion file is missing or malformed, or lacks the metric the gate compares on."""


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: promote or not, with the figures behind it."""

    promote: bool
    metric: str
    margin: float
    candidate: float
    champion: float | None  # None: there is no champion yet
    baseline: float  # what the candidate had to beat: the champion's score, or else the base model's
    against: str  # "champion" or "base model"
    reason: str

    @property
    def delta(self) -> float:
        """Candidate minus baseline on `metric`."""
        return self.candidate - self.baseline

    def as_dict(self) -> dict[str, Any]:
        """The comparison as plain data, for reports."""
        return {**dataclasses.asdict(self), "delta": self.delta}


class PromotionError(OSError):
    """Copying the model into place failed (no space left, permissions, ...); the champion is unchanged."""


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetricsError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MetricsError(f"{what} {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise MetricsError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def metric_value(metrics: Mapping[str, Any], metric: str, source: str) -> float:
    """`metrics[metric]` as a float; MetricsError naming `source` when it is absent, null or not a number."""
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # value != value: NaN
        raise MetricsError(f"{source}: '{metric}' must be a number, got {value!r}")
    return float(value)


def read_metrics(path: str | Path, metric: str) -> dict[str, Any]:
    """The evaluate stage's metrics file, checked to hold a numeric `metric`."""
    path = Path(path)
    metrics = _read_json_object(path, "metrics file")
    metric_value(metrics, metric, str(path))
    return metrics


def read_champion(path: str | Path) -> dict[str, Any] | None:
    """The champion record at `path`, or None when there is no champion yet."""
    path = Path(path)
    if not path.exists():
        return None
    record = _read_json_object(path, "champion record")
    if not isinstance(record.get("metrics"), dict):
        raise MetricsError(f"champion record {path} has no 'metrics' object")
    return record


def judge(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, metric: str, margin: float) -> Verdict:
    """Promote when the candidate beats the champion on `metric` by more than `margin`.

    Without a champion the candidate must beat, by the same margin, the base model it was fine-tuned from, as the
    same evaluation scored it (`before` in the metrics): a run that learnt nothing never becomes the first champion.
    """
    score = metric_value(candidate, metric, "candidate metrics")
    if champion is None:
        before = candidate.get("before")
        best = metric_value(before if isinstance(before, Mapping) else {}, metric, "candidate metrics 'before'")
        against, champion_score = "base model", None
    else:
        best = champion_score = metric_value(champion["metrics"], metric, "champion metrics")
        against = "champion"
    wins = score > best + margin
    relation = "beats" if wins else "does not beat"
    reason = f"candidate {metric} {score:.4f} {relation} {against} {best:.4f} by more than {margin:g}"
    return Verdict(wins, metric, margin, score, champion_score, best, against, reason)


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_inputs(root: Path, path: str) -> dict[str, Any]:
    # Images are identified by size and mtime, not hashed: hashing a large scan collection on every run costs minutes.
    folder = root / path
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "annotations.jsonl")
    listing = [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {
        "path": path,
        "annotations_sha256": _file_sha256(folder / "annotations.jsonl"),
        "n_files": len(listing),
        "files_sha256": _sha256(listing),
    }


def data_fingerprint(params: Params, root: str | Path = ".") -> dict[str, Any]:
    """What identifies the input data of `params.data.source`, and its digest.

    synthetic: the generator's params and the seed. hf: dataset id, revision, splits and max_samples; without a
    pinned revision the hub may serve new data under the same fingerprint, so `pinned` is False. local: a hash of
    annotations.jsonl and of every other file's path, size and mtime under `data.local.path` (relative to `root`).
    """
    data = params.data
    pinned = True
    if data.source == "synthetic":
        inputs: dict[str, Any] = {**dataclasses.asdict(data.synthetic), "seed": params.seed}
    elif data.source == "hf":
        inputs = dataclasses.asdict(data.hf)
        pinned = data.hf.revision is not None
    else:
        inputs = _local_inputs(Path(root), str(data.local.path))
    return {"source": data.source, "pinned": pinned, "inputs": inputs, "digest": _sha256([data.source, inputs])}


def model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` (as a dict) without the sections that cannot change the trained model."""
    return {key: value for key, value in params.items() if key not in NOT_MODEL_INPUTS}


def skip_reason(champion: Mapping[str, Any] | None, fingerprint: Mapping[str, Any], params: Params) -> str | None:
    """Why training can be skipped (the champion was trained on the same data and params), or None to train."""
    if champion is None:
        return None
    if not fingerprint["pinned"]:
        log.warning("%s data is not pinned to a revision and may have changed: training", fingerprint["source"])
        return None
    if champion.get("data_fingerprint", {}).get("digest") != fingerprint["digest"]:
        return None
    if model_params(champion.get("params") or {}) != model_params(json.loads(json.dumps(to_dict(params)))):
        return None
    return f"data ({fingerprint['digest'][:12]}) and params unchanged since champion run {champion.get('run_id')}"


def _sibling(champion_dir: Path, part: str) -> Path:
    """A hidden sibling of the champion: `versions` (the models), `link` (a symlink being made), and the folders of
    releases before versioned champions, `incoming` (a copy being made) and `previous` (the old one moved aside)."""
    return champion_dir.with_name(f".{champion_dir.name}.{part}")


def recover_champion(champion_dir: str | Path) -> None:
    """Undo an interrupted promotion: restore a champion moved aside; drop partial copies, a half-made link and
    versions that the champion does not point to."""
    champion_dir = Path(champion_dir)
    versions, previous, incoming = (_sibling(champion_dir, part) for part in ("versions", "previous", "incoming"))
    if previous.exists():
        if champion_dir.exists():
            shutil.rmtree(previous)  # the swap finished; only the clean-up was interrupted
        else:
            log.warning("restoring the previous champion from %s (a promotion was interrupted)", previous)
            previous.rename(champion_dir)
    if incoming.exists():
        shutil.rmtree(incoming)
    _sibling(champion_dir, "link").unlink(missing_ok=True)
    current = champion_dir.resolve() if champion_dir.is_symlink() else None
    for version in sorted(versions.iterdir()) if versions.is_dir() else ():
        if version.resolve() != current:
            shutil.rmtree(version)


def sync_champion_record(champion_dir: str | Path, record_path: str | Path) -> None:
    """Make `record_path` a copy of the record inside `champion_dir` (the one promoted with the model)."""
    inside = Path(champion_dir) / CHAMPION_FILE
    if inside.exists() and read_champion(inside) != read_champion(record_path):
        log.warning("%s disagrees with the champion directory: re-syncing it", record_path)
        write_json(record_path, read_champion(inside))


def promote(
    export_dir: str | Path, champion_dir: str | Path, record: Mapping[str, Any], record_path: str | Path
) -> None:
    """Make the model in `export_dir` the champion, described by `record`; all or nothing.

    `champion_dir` is a symlink to a version folder beside it (`.<name>.versions/<UTC time>-<run id>`). The model is
    copied into a new version with the record inside, a new link made and renamed over `champion_dir` (one atomic
    step: the champion is never missing), and then the old version is deleted and `record_path` updated.
    `recover_champion` clears what an interruption leaves. A champion that is still a plain directory (from before
    versioned champions) is moved aside just before the link takes its place. A failure to copy or to switch
    removes the copy and raises `PromotionError` with a one-line message; the champion is then unchanged.
    """
    export_dir, champion_dir = Path(export_dir), Path(champion_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"no exported model at {export_dir}: the export stage did not run")
    recover_champion(champion_dir)
    versions = _sibling(champion_dir, "versions")
    version = versions / f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{_file_name(record.get('run_id', 'unknown'))}"
    try:
        versions.mkdir(parents=True, exist_ok=True)
        shutil.copytree(export_dir, version)
        write_json(version / CHAMPION_FILE, record)
    except OSError as error:  # shutil.Error (one entry per file that failed) is an OSError too
        shutil.rmtree(version, ignore_errors=True)
        raise PromotionError(_copy_failure(error, export_dir, version, champion_dir.parent)) from error
    try:
        switch_link(champion_dir, version)
    except OSError as error:
        _recover_quietly(champion_dir)  # drops the new version, puts a champion moved aside back
        raise PromotionError(
            f"promotion failed: making {champion_dir} point to {version} failed: {_cause(error)}; "
            "the champion is unchanged"
        ) from error
    _recover_quietly(champion_dir)  # deletes the old version
    write_json(record_path, record)
    log.info("promoted %s to %s", export_dir, champion_dir)


def switch_link(champion_dir: Path, version: Path) -> None:
    """Point `champion_dir` at `version` by renaming a new symlink over it (one atomic step; also what a serving
    replica switches its `current` version with)."""
    link = _sibling(champion_dir, "link")
    link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(version, champion_dir.parent), link)  # relative: the folder can move or be mounted
    if champion_dir.is_dir() and not champion_dir.is_symlink():
        # A symlink cannot replace a directory in one rename. Moved aside under the name the releases before used,
        # it is put back by recover_champion if this process dies before the next line.
        champion_dir.rename(_sibling(champion_dir, "previous"))
    os.replace(link, champion_dir)


def _recover_quietly(champion_dir: Path) -> None:
    try:
        recover_champion(champion_dir)
    except OSError as error:  # the next run's recover_champion tries again
        log.warning("could not clean up beside %s: %s", champion_dir, error)


def _file_name(text: Any) -> str:
    return re.sub(r"[^\w.-]", "_", str(text))


def _cause(error: OSError) -> str:
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list):
        failures = error.args[0]  # [(source, destination, reason), ...]
        cause = f"{failures[0][2]}" + (f" (and {len(failures) - 1} more file(s))" if len(failures) > 1 else "")
    else:
        cause = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    return " ".join(cause.split())


def _copy_failure(error: OSError, export_dir: Path, destination: Path, folder: Path) -> str:
    """One line: what failed, where, and the space the copy needs beside what is free in `folder` (after clean-up)."""
    needed = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    free = shutil.disk_usage(folder).free
    return (
        f"promotion failed: copying {export_dir} to {destination} failed: {_cause(error)}; "
        f"{_size(needed)} needed, {_size(free)} free in {folder}; the champion is unchanged"
    )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB ({n_bytes} bytes)"
