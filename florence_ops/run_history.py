"""The retraining flow's history: one JSON file per run, `reports/history/<UTC start>-<run id>.json`. No Prefect here.

A run writes its entry when it takes the pipeline lock, with status "running", and again when it ends. An entry still
"running" when the next run takes the lock belongs to a run that was killed: that next run rewrites it as "crashed".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from florence_ops.artifacts import HEADLINE_METRICS, write_json
from florence_ops.config import Paths

RUNNING = "running"  # an entry's status until its run ends; still there after a kill
CRASHED = "crashed"


def write_history(repo: Path, record: dict[str, Any]) -> Path:
    """Write `reports/history/<UTC start, to the microsecond>-<run id>.json`: names sort in start order."""
    reports = (record.get("params") or {}).get("paths", {}).get("reports", Paths().reports)
    stamp = datetime.fromisoformat(record["started_at"]).strftime("%Y%m%dT%H%M%S.%fZ")
    entry = {key: value for key, value in record.items() if key != "champion"}
    entry["champion_run_id"] = (record.get("champion") or {}).get("run_id")
    return write_json(repo / reports / "history" / f"{stamp}-{record['run_id']}.json", entry)


def record_crashed_runs(history_dir: Path, found_by: str, champion_run_id: str | None) -> list[Path]:
    """Rewrite as crashed the entries still "running" (call it holding the pipeline lock: their runs are dead).

    A crashed run's decision is "promoted" when the champion is its model (it was killed after the switch), else
    "rejected". Returns the rewritten files.
    """
    rewritten = []
    for path in sorted(history_dir.glob("*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # not written by a run (entries are written atomically): not ours to judge
        if entry.get("status") != RUNNING:
            continue
        promoted = champion_run_id is not None and entry.get("run_id") == champion_run_id
        reason = f"the run stopped before it finished (killed, or its machine went down); found by run {found_by}"
        entry.update(status=CRASHED, decision="promoted" if promoted else "rejected", reason=reason)
        rewritten.append(write_json(path, entry))
    return rewritten


def report_markdown(record: dict[str, Any]) -> str:
    """The run's decision and its champion comparison table, for the Prefect artifact."""
    lines = [f"# Retraining run `{record['run_id']}`: {record['decision']} ({record['status']})", ""]
    lines += [record["reason"] or "", ""]
    if record["error"]:
        lines += [f"**Error:** `{record['error']}`", ""]
    metrics, champion = record.get("metrics") or {}, (record.get("champion") or {}).get("metrics")
    if champion:
        lines.append(comparison_table(metrics, champion))
    elif metrics:  # no champion yet: the candidate was judged against the base model it started from
        lines.append(comparison_table(metrics, metrics.get("before"), against="base model"))
    return "\n".join(lines)


def _per_type(metrics: Mapping[str, Any]) -> dict[str, Any]:
    # `by_type` maps a question type to its figures ({"anls": x, "n_questions": n}) or, in older files, to ANLS.
    by_type = metrics.get("by_type") or {}
    return {name: v.get("anls") if isinstance(v, Mapping) else v for name, v in sorted(by_type.items())}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def comparison_table(
    candidate: Mapping[str, Any] | None, champion: Mapping[str, Any] | None, against: str = "champion"
) -> str:
    """A markdown table of the headline metrics and per-type ANLS: champion (or the `against` column's model),
    candidate and their difference."""
    candidate, champion = candidate or {}, champion or {}
    rows = [(name, champion.get(name), candidate.get(name)) for name in HEADLINE_METRICS]
    old_types, new_types = _per_type(champion), _per_type(candidate)
    rows += [(f"anls: {name}", old_types.get(name), new_types.get(name)) for name in sorted({*old_types, *new_types})]
    lines = [f"| metric | {against} | candidate | difference |", "| --- | ---: | ---: | ---: |"]
    for name, old, new in rows:
        both = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
        diff = f"{new - old:+.4f}" if both and name != "n_questions" else "–"
        lines.append(f"| {name} | {_cell(old)} | {_cell(new)} | {diff} |")
    return "\n".join(lines)
