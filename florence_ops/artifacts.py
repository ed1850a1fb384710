"""The pipeline's artifacts: their names, and how each is written so that a crash never leaves half of one.

Every file is written to a temporary sibling and renamed over its target (`write_text_atomic`); every directory is
built in a temporary sibling and renamed into place (`publish_directory`, `move_directory`). A stage that fails or is
killed therefore leaves the previous output whole and never a half-written one for DVC to hash. Every metrics and
report JSON file is written by `write_json`, in one style: see its docstring.

The champion (a symlink switched by `promotion`) and the training checkpoints (`checkpointing`, written by every
process) keep their own protocols, built from these writers where they fit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Names of the files and folders the stages write, relative to the `paths` folders of params.yaml.
METRICS_FILE = "metrics.json"  # evaluate: paths.reports/metrics.json, the headline figures (a DVC metric)
PREDICTIONS_FILE = "predictions.jsonl"  # evaluate: one row per question, see PREDICTION_COLUMNS
REPORT_HTML_FILE = "report.html"  # evaluate: the self-contained HTML report
TYPE_PLOTS_DIR = "anls_by_type"  # evaluate: DVC plot data of ANLS by question type, one file per model
DATA_QUALITY_FILE = "data_quality.json"  # preprocess: paths.reports/data_quality.json (a DVC metric)
TRAINED_MODEL_DIR = "model"  # train: paths.train/model, the fine-tuned model in the Hugging Face layout
SUMMARY_FILE = "summary.json"  # train: paths.train/summary.json, the run's summary
SETTINGS_FILE = "florence_ops.json"  # export: prompt, question-token limit and metrics, inside the model directory
CHAMPION_FILE = "champion.json"  # promotion: the champion's record, inside the champion directory and paths.reports
REGISTRY_REFERENCE = "registry:"  # `florence-ops serve --model registry:florence-docvqa#prod`
REGISTRY_FILE = "registry.json"  # registry: name, version, stage, commit and metrics, inside a fetched version

# The scores of each answer, and the headline figures of a model: those scores averaged, and how many questions.
SCORE_NAMES = ("anls", "levenshtein_similarity", "exact_match")
HEADLINE_METRICS = (*SCORE_NAMES, "n_questions")
# The columns of predictions.jsonl as evaluate writes them; each row then has its SCORE_NAMES, and the base model's
# answer and ANLS under BEFORE_COLUMNS.
PREDICTION_COLUMNS = ("question_id", "question", "answers", "prediction", "question_types", "image_id")
BEFORE_COLUMNS = ("prediction_before", "anls_before")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8, fsynced) to `path` via a temporary sibling and `os.replace`; create parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600 files; artifacts are meant to be read by others
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def json_text(obj: Any) -> str:
    """`obj` in the style of every metrics and report file: sorted keys, 2-space indent, UTF-8 characters as they
    are, a trailing newline; NaN and infinities are refused (ValueError): they are not JSON, and DVC rejects them."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` to `path` as `json_text` does, atomically (see `write_text_atomic`); return the path.

    Sorted keys and one value a line keep `git diff` of a metrics file to the figures that changed, whatever order
    the code built them in; `dvc metrics show` and `dvc metrics diff` read any JSON, so nothing else is lost.
    """
    return write_text_atomic(path, json_text(obj))


def _sibling(target: Path, part: str) -> Path:
    return target.with_name(f".{target.name}.{part}")


@contextmanager
def publish_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty sibling directory to fill; when the block succeeds, it replaces `target` (see `_replace`).

    When the block raises, `target` is left as it was and the sibling is removed. What a killed run left beside
    `target` is removed first. The sibling is on the same file system, so publishing is a rename, not a copy.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    for leftover in (staging, _sibling(target, "old")):
        _remove(leftover)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, target)


def move_directory(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move the directory `source` to `target`, replacing it: a rename, or a copy first across file systems."""
    with publish_directory(target) as staging:
        staging.rmdir()
        shutil.move(source, staging)


def _replace(staging: Path, target: Path) -> None:
    """Rename `staging` over `target`. A directory cannot be renamed over a non-empty one, so the old one is renamed
    aside first and deleted last: a crash in between leaves it whole beside `target`, never half deleted."""
    old = _sibling(target, "old")
    if os.path.lexists(target):
        os.replace(target, old)
    os.replace(staging, target)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
