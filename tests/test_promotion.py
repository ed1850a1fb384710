"""Tests of florence_ops.promotion: the gate, the data fingerprint, the skip rule and atomic champion promotion."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from florence_ops import promotion
from florence_ops.config import Params, load_params, to_dict
from florence_ops.promotion import MetricsError
from florence_ops.serving.model_dir import version_of
from tests.conftest import disk_full_after

ROOT = Path(__file__).resolve().parents[1]


def champion_of(anls: float, **extra) -> dict:
    return {"run_id": "old", "metrics": {"anls": anls, "exact_match": 0.1}, **extra}


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promote"),
    [
        (0.60, 0.50, 0.0, True),  # better
        (0.40, 0.50, 0.0, False),  # worse
        (0.50, 0.50, 0.0, False),  # equal: it must beat the champion, not tie
        (0.55, 0.50, 0.1, False),  # better, but not by more than the margin
        (0.61, 0.50, 0.1, True),
    ],
)
def test_judge_compares_on_metric_with_margin(candidate, champion, margin, promote):
    verdict = promotion.judge({"anls": candidate}, champion_of(champion), "anls", margin)
    assert verdict.promote is promote
    assert verdict.champion == champion
    assert verdict.delta == pytest.approx(candidate - champion)
    assert ("beats" if promote else "does not beat") in verdict.reason


@pytest.mark.parametrize(
    ("candidate", "before", "margin", "promote"),
    [
        (0.0, 0.0, 0.0, False),  # learnt nothing (the lr=1e-4, epochs=6 run): never the first champion
        (0.26, 0.0, 0.0, True),
        (0.05, 0.0, 0.1, False),  # better than the base model, but not by more than the margin
        (0.20, 0.30, 0.0, False),  # fine-tuning made it worse
    ],
)
def test_first_champion_must_beat_the_base_model(candidate, before, margin, promote):
    verdict = promotion.judge({"anls": candidate, "before": {"anls": before}}, None, "anls", margin)
    assert verdict.promote is promote
    assert (verdict.champion, verdict.baseline, verdict.against) == (None, before, "base model")
    assert verdict.as_dict()["delta"] == pytest.approx(candidate - before)
    assert f"base model {before:.4f}" in verdict.reason


def test_first_champion_without_a_base_model_score_is_an_error():
    with pytest.raises(MetricsError, match="candidate metrics 'before': 'anls' must be a number"):
        promotion.judge({"anls": 0.5}, None, "anls", 0.0)


def test_judge_uses_the_configured_metric():
    verdict = promotion.judge({"anls": 0.9, "exact_match": 0.05}, champion_of(0.1), "exact_match", 0.0)
    assert not verdict.promote


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ("[0.5]", "must hold a JSON object"),
        ('{"exact_match": 0.4}', "'anls' must be a number, got None"),
        ('{"anls": null}', "'anls' must be a number"),  # evaluate writes null when no question was scored
        ('{"anls": "0.5"}', "'anls' must be a number"),
        ('{"anls": NaN}', "'anls' must be a number"),
    ],
)
def test_missing_or_malformed_metrics_raise_a_clear_error(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MetricsError, match=message) as error:
        promotion.read_metrics(path, "anls")
    assert str(path) in str(error.value)


def test_read_metrics_returns_the_whole_file(tmp_path):
    metrics = {"anls": 0.5, "by_type": {"table": {"anls": 0.4, "n_questions": 3}}, "before": {"anls": 0.1}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert promotion.read_metrics(tmp_path / "metrics.json", "anls") == metrics


def test_read_champion(tmp_path):
    path = tmp_path / "champion.json"
    assert promotion.read_champion(path) is None
    path.write_text('{"run_id": "x"}')
    with pytest.raises(MetricsError, match="no 'metrics'"):
        promotion.read_champion(path)
    path.write_text("{")
    with pytest.raises(MetricsError, match="not valid JSON"):
        promotion.read_champion(path)


def test_champion_without_the_metric_is_an_error():
    with pytest.raises(MetricsError, match="champion metrics: 'levenshtein_similarity'"):
        promotion.judge({"levenshtein_similarity": 0.5}, champion_of(0.5), "levenshtein_similarity", 0.0)


def params_with(overrides: dict | None = None) -> Params:
    """The repository's params.yaml with the synthetic source (whatever it defaults to) and `overrides`."""
    return load_params(ROOT / "params.yaml", {"data.source": "synthetic", **(overrides or {})})


@pytest.fixture
def params() -> Params:
    return params_with()


def test_synthetic_fingerprint_follows_generator_params_and_seed(params):
    first = promotion.data_fingerprint(params)
    assert first == promotion.data_fingerprint(params) and first["pinned"]
    assert promotion.data_fingerprint(params_with({"seed": 1}))["digest"] != first["digest"]
    smaller = params_with({"data.synthetic.train_documents": 3})
    assert promotion.data_fingerprint(smaller)["digest"] != first["digest"]
    unrelated = params_with({"lr": 0.5, "data.hf.max_samples": 9})
    assert promotion.data_fingerprint(unrelated)["digest"] == first["digest"]


def test_hf_fingerprint_is_unpinned_without_revision(params):
    hub = params_with({"data.source": "hf"})
    fingerprint = promotion.data_fingerprint(hub)
    assert not fingerprint["pinned"] and fingerprint["inputs"]["dataset"] == params.data.hf.dataset
    pinned = promotion.data_fingerprint(params_with({"data.source": "hf", "data.hf.revision": "a1"}))
    assert pinned["pinned"] and pinned["digest"] != fingerprint["digest"]
    capped = params_with({"data.source": "hf", "data.hf.revision": "a1", "data.hf.max_samples": 5})
    assert promotion.data_fingerprint(capped)["digest"] != pinned["digest"]


def test_local_fingerprint_follows_annotations_and_image_files(tmp_path):
    folder = tmp_path / "docs"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations.jsonl").write_text('{"question": "q"}\n')
    image = folder / "images" / "a.png"
    image.write_bytes(b"1234")
    local = params_with({"data.source": "local", "data.local.path": "docs"})
    first = promotion.data_fingerprint(local, tmp_path)
    assert first == promotion.data_fingerprint(local, tmp_path)
    assert first["inputs"]["n_files"] == 1 and first["inputs"]["path"] == "docs"  # relative: same in every clone
    (folder / "annotations.jsonl").write_text('{"question": "other"}\n')
    second = promotion.data_fingerprint(local, tmp_path)
    assert second["digest"] != first["digest"]
    os.utime(image, ns=(1, 1))
    assert promotion.data_fingerprint(local, tmp_path)["digest"] != second["digest"]


def test_skip_only_when_data_and_model_params_match_the_champion(params):
    fingerprint = promotion.data_fingerprint(params)
    recorded = json.loads(json.dumps(to_dict(params)))
    champion = champion_of(0.5, data_fingerprint=fingerprint, params=recorded)
    assert promotion.skip_reason(None, fingerprint, params) is None
    assert "unchanged" in promotion.skip_reason(champion, fingerprint, params)
    margin_changed = params_with({"promotion.margin": 0.2, "schedule.cron": "0 0 * * *"})
    assert promotion.skip_reason(champion, fingerprint, margin_changed) is not None  # cannot change the model
    serving_changed = params_with({"serve.port": 9000, "predict.batch_size": 4})
    assert promotion.skip_reason(champion, fingerprint, serving_changed) is not None  # nor can serving settings
    lr_changed = params_with({"lr": 0.5})
    assert promotion.skip_reason(champion, fingerprint, lr_changed) is None
    new_data = {**fingerprint, "digest": "other"}
    assert promotion.skip_reason(champion, new_data, params) is None
    assert promotion.skip_reason(champion, {**fingerprint, "pinned": False}, params) is None


def make_export(path: Path, weights: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(weights)
    (path / "config.json").write_text("{}")
    return path


def record(run_id: str, anls: float) -> dict:
    return {"run_id": run_id, "metrics": {"anls": anls}}


def versions(champion_dir: Path) -> list[str]:
    """The version folders beside the champion, checking that the champion is a link to one of them."""
    folder = champion_dir.with_name(".champion.versions")
    assert champion_dir.is_symlink() and champion_dir.resolve().parent == folder.resolve()
    assert sorted(p.name for p in champion_dir.parent.iterdir()) == [".champion.versions", "champion"]  # no staging
    return sorted(p.name for p in folder.iterdir())


def test_promote_installs_model_and_record_then_replaces_it(tmp_path):
    champion_dir, record_path = tmp_path / "models" / "champion", tmp_path / "reports" / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    assert (champion_dir / "model.safetensors").read_text() == "v1"
    assert promotion.read_champion(record_path) == promotion.read_champion(champion_dir / "champion.json")
    promotion.promote(make_export(tmp_path / "export2", "v2"), champion_dir, record("r2", 0.2), record_path)
    assert (champion_dir / "model.safetensors").read_text() == "v2"
    assert promotion.read_champion(record_path)["run_id"] == "r2"
    assert versions(champion_dir) == [champion_dir.resolve().name]  # the old version is gone
    assert os.readlink(champion_dir).startswith(".champion.versions/")  # relative: the folder can move


def test_promote_without_export_leaves_champion_untouched(tmp_path):
    champion_dir, record_path = tmp_path / "champion", tmp_path / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    with pytest.raises(FileNotFoundError, match="export stage"):
        promotion.promote(tmp_path / "missing", champion_dir, record("r2", 0.2), record_path)
    assert (champion_dir / "model.safetensors").read_text() == "v1"
    assert promotion.read_champion(record_path)["run_id"] == "r1"


def test_recover_a_plain_directory_champion_interrupted_mid_swap(tmp_path):
    # Left by a release before versioned champions: killed after the old champion (a plain directory) was renamed
    # aside, with a half-copied new one beside it.
    make_export(tmp_path / ".champion.previous", "v1")
    make_export(tmp_path / ".champion.incoming", "partial")
    promotion.recover_champion(tmp_path / "champion")
    assert (tmp_path / "champion" / "model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["champion"]


def test_record_is_resynced_from_the_champion_directory(tmp_path):
    champion_dir, record_path = tmp_path / "champion", tmp_path / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    record_path.write_text(json.dumps(record("stale", 0.9)))  # killed between the swap and the copy of the record
    promotion.sync_champion_record(champion_dir, record_path)
    assert promotion.read_champion(record_path)["run_id"] == "r1"


def test_promotion_that_runs_out_of_space_leaves_no_partial_copy(tmp_path, monkeypatch):
    champion_dir, record_path = tmp_path / "champion", tmp_path / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    monkeypatch.setattr(shutil, "copyfile", disk_full_after(2))
    with pytest.raises(promotion.PromotionError) as failure:
        promotion.promote(make_export(tmp_path / "export2", "v2" * 1000), champion_dir, record("r2", 0.2), record_path)
    message = str(failure.value)
    assert "\n" not in message and "No space left on device" in message and str(tmp_path) in message
    assert re.search(r"\(2002 bytes\) needed, .* MiB \(\d+ bytes\) free in ", message)  # model.safetensors + config
    assert (champion_dir / "model.safetensors").read_text() == "v1"
    assert promotion.read_champion(record_path)["run_id"] == "r1"
    assert not (tmp_path / ".champion.incoming").exists()


class Killed(BaseException):
    """The process dying at this point: nothing may catch it."""


def kill_at_step(n: int, monkeypatch) -> list[str]:
    """Make the n-th file-system change (rename, link, delete, copy) kill the process; returns the steps seen."""
    steps: list[str] = []
    for module, name in [(os, "rename"), (os, "replace"), (os, "symlink"), (os, "unlink"), (shutil, "rmtree"),
                         (shutil, "copytree")]:  # fmt: skip
        real = getattr(module, name)

        def step(*args, _real=real, _name=name, **kwargs):
            steps.append(_name)
            if len(steps) == n:
                raise Killed(f"killed at step {n}, {_name}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, step)
    return steps


def test_champion_is_never_missing_when_a_promotion_is_killed_at_any_step(tmp_path, monkeypatch):
    champion_dir, record_path = tmp_path / "models" / "champion", tmp_path / "champion.json"
    export1, export2 = make_export(tmp_path / "export1", "v1"), make_export(tmp_path / "export2", "v2")
    for n in itertools.count(1):
        shutil.rmtree(champion_dir.parent, ignore_errors=True)
        promotion.promote(export1, champion_dir, record("r1", 0.1), record_path)
        with monkeypatch.context() as patch:
            steps = kill_at_step(n, patch)
            with contextlib.suppress(Killed):
                promotion.promote(export2, champion_dir, record("r2", 0.2), record_path)
        killed = f"killed at step {n} ({steps[n - 1]})" if len(steps) >= n else "not killed"
        # Right after the kill, before any recovery: a complete champion, model and record together.
        assert champion_dir.is_dir(), f"no champion after the promotion was {killed}"
        weights = (champion_dir / "model.safetensors").read_text()
        assert promotion.read_champion(champion_dir / "champion.json")["run_id"] == {"v1": "r1", "v2": "r2"}[weights]
        promotion.recover_champion(champion_dir)  # what the next run does first
        promotion.sync_champion_record(champion_dir, record_path)
        assert (champion_dir / "model.safetensors").read_text() == weights, killed
        assert promotion.read_champion(record_path)["run_id"] == {"v1": "r1", "v2": "r2"}[weights], killed
        assert {p.name for p in champion_dir.parent.iterdir()} <= {"champion", ".champion.versions"}, killed
        assert len(list(champion_dir.parent.rglob("model.safetensors"))) == 1, killed  # no copy left behind
        if len(steps) < n:
            break
    assert n > 6 and weights == "v2" and len(versions(champion_dir)) == 1


def test_a_plain_directory_champion_becomes_a_link_and_a_kill_midway_keeps_it(tmp_path, monkeypatch):
    champion_dir, record_path = tmp_path / "models" / "champion", tmp_path / "champion.json"
    make_export(champion_dir, "v1")  # promoted by a release before versioned champions
    (champion_dir / "champion.json").write_text(json.dumps(record("r1", 0.1)))
    export2 = make_export(tmp_path / "export2", "v2")
    with monkeypatch.context() as patch:
        real_replace = os.replace

        def killed_before_the_link(src, dst):
            if Path(dst) == champion_dir:
                raise Killed
            real_replace(src, dst)

        patch.setattr(os, "replace", killed_before_the_link)
        with pytest.raises(Killed):
            promotion.promote(export2, champion_dir, record("r2", 0.2), record_path)
    promotion.recover_champion(champion_dir)
    assert (champion_dir / "model.safetensors").read_text() == "v1" and not champion_dir.is_symlink()
    promotion.promote(export2, champion_dir, record("r2", 0.2), record_path)
    assert (champion_dir / "model.safetensors").read_text() == "v2" and len(versions(champion_dir)) == 1


def refuse_renames_onto(target: Path, monkeypatch) -> None:
    """Make renames onto `target` fail as in a read-only folder; other renames go through."""
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def refusing(src, dst, *args, _real=real, **kwargs):
            if Path(dst) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, refusing)


def test_promotion_whose_switch_fails_raises_one_line_and_keeps_the_champion(tmp_path, monkeypatch):
    champion_dir, record_path = tmp_path / "models" / "champion", tmp_path / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    refuse_renames_onto(champion_dir, monkeypatch)
    with pytest.raises(promotion.PromotionError) as failure:
        promotion.promote(make_export(tmp_path / "export2", "v2"), champion_dir, record("r2", 0.2), record_path)
    message = str(failure.value)
    assert message.startswith("promotion failed: ") and "\n" not in message and "Permission denied" in message
    assert message.endswith("; the champion is unchanged")
    assert (champion_dir / "model.safetensors").read_text() == "v1"
    assert promotion.read_champion(record_path)["run_id"] == "r1"
    assert len(versions(champion_dir)) == 1  # no copy left behind


def test_a_promotion_changes_the_version_the_server_sees(tmp_path):
    champion_dir, record_path = tmp_path / "models" / "champion", tmp_path / "champion.json"
    export = make_export(tmp_path / "export", "v1")
    promotion.promote(export, champion_dir, record("r1", 0.1), record_path)
    first = version_of(champion_dir)
    promotion.promote(export, champion_dir, record("r1", 0.1), record_path)  # the same files again
    assert first is not None and version_of(champion_dir) not in (None, first)
