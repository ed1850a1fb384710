"""Tests of the retraining flow and its deployment, on Prefect's test harness with an isolated PREFECT_HOME.

The fast tests replace the task that runs `dvc` with a fake that writes what the pipeline would (metrics and an
exported model), or fails like a broken stage. The slow test runs the real pipeline in a temporary git+DVC repository.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

# Before Prefect is imported: it reads PREFECT_HOME and its telemetry switches at import time.
_PREFECT_HOME = tempfile.mkdtemp(prefix="florence-ops-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ.update(
    PREFECT_HOME=_PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1"
)

import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import TINY_OVERRIDES, disk_full_after  # noqa: E402
from prefect import task  # noqa: E402
from prefect.artifacts import Artifact  # noqa: E402
from prefect.settings import temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from florence_ops.config import load_params  # noqa: E402
from florence_ops.dvc_runs import PipelineFailed  # noqa: E402
from florence_ops.params_file import read_yaml  # noqa: E402
from florence_ops.promotion import read_champion  # noqa: E402
from flows import retrain as retrain_module  # noqa: E402
from flows.deploy import retrain_deployment  # noqa: E402
from flows.retrain import PipelineBusy, pipeline_lock, retrain  # noqa: E402
from tests.test_promotion import refuse_renames_onto  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def harness():
    """One Prefect test server (temporary SQLite database) for the whole session: it takes seconds to start.

    Flow-run heartbeats are off: their thread sleeps in one-second steps, which each flow run would wait out.
    """
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({"flows.heartbeat_frequency": None}):
        yield


def write_params(repo: Path, source: str = "synthetic", revision: str | None = None) -> None:
    """The project's params.yaml in `repo`, with the data source (and hub revision) given and the offline tiny model."""
    params = read_yaml(ROOT / "params.yaml")
    params["data"]["source"], params["data"]["hf"]["revision"], params["model"]["name"] = source, revision, "tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A working directory holding params.yaml (the fake pipeline needs nothing else)."""
    write_params(tmp_path)
    return tmp_path


def fake_dvc(anls: float = 0.5, fail: str | None = None, calls: list | None = None, before: float = 0.0):
    """A stand-in for the `run_dvc` task: writes metrics.json and models/export as the pipeline would, or fails."""

    @task(name="fake dvc")
    def run(args: list[str], repo: Path) -> None:
        if calls is not None:
            calls.append(args)
        if args[:2] == ["exp", "run"]:  # like DVC, write the overrides into params.yaml
            with open(repo / "params.yaml", "a", encoding="utf-8") as params_file:
                params_file.write("# overridden by dvc exp run\n")
        if fail:
            raise PipelineFailed(f"`dvc {' '.join(args)}` exited with 1: ERROR: failed to reproduce '{fail}'")
        params = load_params(repo / "params.yaml")
        by_type = {"table": {"anls": anls, "n_questions": 2}, "form": {"anls": anls / 2, "n_questions": 2}}
        metrics = {"anls": anls, "levenshtein_similarity": anls, "exact_match": anls / 2, "n_questions": 4}
        reports, export = repo / params.paths.reports, repo / params.paths.export
        reports.mkdir(parents=True, exist_ok=True)
        (reports / "metrics.json").write_text(json.dumps({**metrics, "by_type": by_type, "before": {"anls": before}}))
        shutil.rmtree(export, ignore_errors=True)
        export.mkdir(parents=True)
        (export / "model.safetensors").write_text(f"weights with anls {anls}")

    return run


def history(repo: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((repo / "reports" / "history").glob("*.json"))]


def champion_weights(repo: Path) -> str:
    return (repo / "models" / "champion" / "model.safetensors").read_text()


def test_promote_then_skip_then_reject(harness, repo, monkeypatch):
    calls: list = []
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.5, calls=calls))
    first = retrain(repo_dir=str(repo))
    assert (first["status"], first["decision"]) == ("completed", "promoted")
    assert calls == [["repro"]]
    assert champion_weights(repo) == "weights with anls 0.5"
    champion = read_champion(repo / "reports" / "champion.json")
    assert champion["run_id"] == first["run_id"] and champion["metrics"]["anls"] == 0.5
    assert champion["data_fingerprint"]["source"] == first["params"]["data"]["source"]
    assert set(champion["git"]) == {"revision", "dirty"}
    assert champion == read_champion(repo / "models" / "champion" / "champion.json")

    second = retrain(repo_dir=str(repo))  # same data and params
    assert second["decision"] == "skipped" and len(calls) == 1

    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.4))
    third = retrain(force=True, repo_dir=str(repo))
    assert (third["status"], third["decision"]) == ("completed", "rejected")
    assert champion_weights(repo) == "weights with anls 0.5"

    runs = history(repo)
    assert [(r["decision"], r["status"]) for r in runs] == [
        ("promoted", "completed"),
        ("skipped", "completed"),
        ("rejected", "completed"),
    ]
    rejected = runs[2]
    assert rejected["comparison"]["candidate"] == 0.4 and rejected["comparison"]["champion"] == 0.5
    assert rejected["metrics"]["by_type"]["table"]["anls"] == 0.4 and rejected["champion_run_id"] == first["run_id"]
    assert rejected["params"]["promotion"]["metric"] == "anls" and rejected["data_fingerprint"]["digest"]
    artifact = Artifact.get(retrain_module.ARTIFACT_KEY)  # the latest run's table
    assert "rejected" in artifact.data and "| anls | 0.5000 | 0.4000 | -0.1000 |" in artifact.data
    names = sorted(p.name for p in (repo / "reports" / "history").iterdir())
    assert names[2] == f"{datetime.fromisoformat(third['started_at']):%Y%m%dT%H%M%S.%fZ}-{third['run_id']}.json"


def test_failed_train_stage_keeps_the_champion_and_is_recorded(harness, repo, monkeypatch):
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.5))
    retrain(repo_dir=str(repo))
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.9, fail="train"))
    with pytest.raises(PipelineFailed, match="failed to reproduce 'train'"):
        retrain(force=True, repo_dir=str(repo))
    assert champion_weights(repo) == "weights with anls 0.5"
    assert read_champion(repo / "reports" / "champion.json")["metrics"]["anls"] == 0.5
    failed = history(repo)[-1]
    assert (failed["status"], failed["decision"]) == ("failed", "rejected")
    assert failed["error"].startswith("PipelineFailed: `dvc repro` exited with 1") and failed["metrics"] is None


def test_first_run_must_beat_the_base_model(harness, repo, monkeypatch):
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.0, before=0.0))  # trained, but learnt nothing
    first = retrain(repo_dir=str(repo))
    assert (first["status"], first["decision"]) == ("completed", "rejected")
    assert first["reason"] == "candidate anls 0.0000 does not beat base model 0.0000 by more than 0"
    assert not (repo / "models" / "champion").exists() and not (repo / "reports" / "champion.json").exists()
    assert "| metric | base model | candidate | difference |" in Artifact.get(retrain_module.ARTIFACT_KEY).data
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.3, before=0.0))
    assert retrain(force=True, repo_dir=str(repo))["decision"] == "promoted"
    assert champion_weights(repo) == "weights with anls 0.3"


def test_promotion_out_of_space_keeps_the_champion_and_reports_one_line(harness, repo, monkeypatch, capsys):
    monkeypatch.setattr(retrain_module, "PROJECT_ROOT", repo)
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.5))
    retrain(repo_dir=str(repo))
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.9))
    monkeypatch.setattr(shutil, "copyfile", disk_full_after(4))  # the disk fills up 4 bytes into the model copy
    assert retrain_module.main(["--force"]) == 1
    assert champion_weights(repo) == "weights with anls 0.5"
    assert read_champion(repo / "reports" / "champion.json")["metrics"]["anls"] == 0.5
    assert only_the_champion_copy(repo)
    needed_and_free = (
        r"0\.0 MiB \(21 bytes\) needed, [\d.]+ MiB \(\d+ bytes\) free in \S+/models; the champion is unchanged$"
    )
    failed = history(repo)[-1]
    assert (failed["status"], failed["decision"]) == ("failed", "promotion_failed")  # the gate had passed
    assert failed["error"].startswith("PromotionError: promotion failed: copying ") and "\n" not in failed["error"]
    assert "No space left on device" in failed["error"] and re.search(needed_and_free, failed["error"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("retrain failed: promotion failed: ") and re.search(needed_and_free, error)


def only_the_champion_copy(repo: Path) -> bool:
    """Whether models/ holds the export and the champion, a link to its one version, and nothing half-made."""
    models = repo / "models"
    listing = sorted(p.name for p in models.iterdir())
    return listing == [".champion.versions", "champion", "export"] and [
        p.name for p in (models / ".champion.versions").iterdir()
    ] == [(models / "champion").resolve().name]


def test_promotion_whose_switch_fails_is_recorded_and_reported_in_one_line(harness, repo, monkeypatch, capsys):
    monkeypatch.setattr(retrain_module, "PROJECT_ROOT", repo)
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.5))
    retrain(repo_dir=str(repo))
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.9))
    refuse_renames_onto(repo / "models" / "champion", monkeypatch)  # as in a read-only models/ folder
    assert retrain_module.main(["--force"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"retrain failed: promotion failed: .*Permission denied.*; the champion is unchanged", error)
    assert champion_weights(repo) == "weights with anls 0.5" and only_the_champion_copy(repo)
    failed = history(repo)[-1]
    assert (failed["status"], failed["decision"]) == ("failed", "promotion_failed")
    assert failed["comparison"]["promote"] and failed["comparison"]["candidate"] == 0.9
    assert failed["error"].startswith("PromotionError: promotion failed: ")


def test_overrides_apply_to_one_run_and_params_yaml_is_restored(harness, repo, monkeypatch):
    calls: list = []
    committed = (repo / "params.yaml").read_bytes()
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(0.5, calls=calls))
    record = retrain(overrides={"epochs": 1, "lr": "1e-06", "train.freeze": []}, repo_dir=str(repo))
    assert calls[-1] == ["exp", "run", "--set-param=epochs=1", "--set-param=lr=1e-06", "--set-param=train.freeze=[]"]
    assert record["params"]["lr"] == 1e-6  # a float, as DVC writes it, not the string YAML 1.1 would make of it
    assert record["params"]["epochs"] == 1 and record["params"]["train"]["freeze"] == []
    assert read_champion(repo / "reports" / "champion.json")["overrides"]["lr"] == "1e-06"
    assert (repo / "params.yaml").read_bytes() == committed
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(fail="train"))
    with pytest.raises(PipelineFailed):
        retrain(overrides={"epochs": "2"}, repo_dir=str(repo))
    assert (repo / "params.yaml").read_bytes() == committed and not (repo / retrain_module.PARAMS_BACKUP).exists()


def test_second_run_is_refused_while_the_lock_is_held(harness, repo, monkeypatch):
    calls: list = []
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(calls=calls))
    busy = r"another retraining run holds the pipeline \(pid \d+, run the-first-run\)"
    with pipeline_lock(repo / retrain_module.LOCK_FILE, "the-first-run"), pytest.raises(PipelineBusy, match=busy):
        retrain(repo_dir=str(repo))
    assert calls == [] and not (repo / "models").exists()
    refused = history(repo)[-1]
    assert refused["status"] == "failed" and "PipelineBusy" in refused["error"]


def test_cli_exits_non_zero_with_one_line(harness, repo, monkeypatch, capsys):
    monkeypatch.setattr(retrain_module, "PROJECT_ROOT", repo)
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(fail="train"))
    assert retrain_module.main(["--set", "epochs=1"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("retrain failed: `dvc exp run --set-param=epochs=1` exited with 1")
    with pytest.raises(SystemExit):
        retrain_module.main(["--set", "epochs"])


def test_invalid_override_fails_before_any_work(harness, repo, monkeypatch):
    calls: list = []
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(calls=calls))
    with pytest.raises(ValueError, match="epochs: expected int"):
        retrain(overrides={"epochs": "many"}, repo_dir=str(repo))
    assert calls == []


def test_network_download_is_its_own_task_with_retries(harness, repo, monkeypatch):
    calls: list = []
    write_params(repo, source="hf", revision="abc123")
    monkeypatch.setattr(retrain_module, "run_dvc", fake_dvc(calls=calls))
    retrain(repo_dir=str(repo))
    assert calls == [["repro", "download"], ["repro"]]
    task = retrain_module.run_dvc.with_options(retries=retrain_module.DOWNLOAD_RETRIES)
    assert task.retries == 3 and retrain_module.run_dvc.retries == 0


def test_deployment_follows_params_schedule_and_runs_one_at_a_time():
    params = load_params(ROOT / "params.yaml")
    deployment = retrain_deployment(params)
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == (params.schedule.cron, params.schedule.timezone)
    assert deployment.concurrency_limit == 1
    declared = read_yaml(ROOT / "prefect.yaml")["deployments"][0]
    assert declared["name"] == deployment.name and declared["entrypoint"] == "flows/retrain.py:retrain"
    assert declared["schedules"][0]["cron"] == params.schedule.cron
    assert declared["schedules"][0]["timezone"] == params.schedule.timezone
    # on a pool: a clean clone for every run, one at a time through the flow's global concurrency slot
    assert declared["parameters"] == {"remotes": True}
    [step] = read_yaml(ROOT / "prefect.yaml")["pull"]
    assert step["prefect.deployments.steps.git_clone"]["repository"] == "{{ $FLORENCE_OPS_GIT_URL }}"


def run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pipeline_repo(tmp_path: Path) -> Path:
    """A git + DVC repository holding the project's pipeline files, as a fresh clone would."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("florence_ops", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text(".florence-ops.*\n")
    run(["git", "init", "-q"], repo)
    run(["git", "add", "."], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "dvc init"], repo)
    return repo


@pytest.mark.slow
def test_real_pipeline_gates_promotes_then_a_failing_run_keeps_the_champion(harness, pipeline_repo):
    if shutil.which("florence-ops") is None:
        pytest.fail("the florence-ops command is not installed (pip install -e .)")
    committed = (pipeline_repo / "params.yaml").read_bytes()
    # A few steps of the tiny model learn nothing: ANLS 0, as the base model scores. The gate rejects it.
    learnt_nothing = retrain(overrides=TINY_OVERRIDES, repo_dir=str(pipeline_repo))
    assert (learnt_nothing["status"], learnt_nothing["decision"]) == ("completed", "rejected")
    assert learnt_nothing["comparison"]["against"] == "base model"
    assert learnt_nothing["metrics"]["anls"] <= learnt_nothing["metrics"]["before"]["anls"]
    assert not (pipeline_repo / "models" / "champion").exists()
    # A negative margin admits it, to exercise promotion (promotion params rerun no stage).
    record = retrain(overrides={**TINY_OVERRIDES, "promotion.margin": -1.0}, repo_dir=str(pipeline_repo))
    assert (record["status"], record["decision"]) == ("completed", "promoted")
    champion = read_champion(pipeline_repo / "reports" / "champion.json")
    assert champion["metrics"]["n_questions"] == record["metrics"]["n_questions"] > 0
    assert champion["git"]["revision"] and champion["params"]["epochs"] == TINY_OVERRIDES["epochs"]
    assert (pipeline_repo / "models" / "champion" / "config.json").exists()
    assert (pipeline_repo / "params.yaml").read_bytes() == committed
    before = sorted(p.name for p in (pipeline_repo / "models" / "champion").iterdir())
    assert retrain(overrides=TINY_OVERRIDES, repo_dir=str(pipeline_repo))["decision"] == "skipped"

    # Valid params (the flow checks them first) that make the train stage itself fail: LoRA on no module.
    lora_on_nothing = {"train.lora.enabled": True, "train.lora.target_modules": ["no_such_module"]}
    with pytest.raises(PipelineFailed, match="failed to reproduce 'train'"):
        retrain(overrides={**TINY_OVERRIDES, **lora_on_nothing}, force=True, repo_dir=str(pipeline_repo))
    assert sorted(p.name for p in (pipeline_repo / "models" / "champion").iterdir()) == before
    assert read_champion(pipeline_repo / "reports" / "champion.json") == champion
    runs = history(pipeline_repo)
    assert [(r["decision"], r["status"]) for r in runs] == [
        ("rejected", "completed"),
        ("promoted", "completed"),
        ("skipped", "completed"),
        ("rejected", "failed"),
    ]
    assert (pipeline_repo / "params.yaml").read_bytes() == committed
