"""Tests of florence_ops.promotion: the gate, the data fingerprint, the skip rule and atomic champion promotion."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from florence_ops import promotion
from florence_ops.config import Params, load_params, to_dict
from florence_ops.promotion import MetricsError
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


def test_promote_installs_model_and_record_then_replaces_it(tmp_path):
    champion_dir, record_path = tmp_path / "models" / "champion", tmp_path / "reports" / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    assert (champion_dir / "model.safetensors").read_text() == "v1"
    assert promotion.read_champion(record_path) == promotion.read_champion(champion_dir / "champion.json")
    promotion.promote(make_export(tmp_path / "export2", "v2"), champion_dir, record("r2", 0.2), record_path)
    assert (champion_dir / "model.safetensors").read_text() == "v2"
    assert promotion.read_champion(record_path)["run_id"] == "r2"
    assert sorted(p.name for p in champion_dir.parent.iterdir()) == ["champion"]  # no staging left behind


def test_promote_without_export_leaves_champion_untouched(tmp_path):
    champion_dir, record_path = tmp_path / "champion", tmp_path / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    with pytest.raises(FileNotFoundError, match="export stage"):
        promotion.promote(tmp_path / "missing", champion_dir, record("r2", 0.2), record_path)
    assert (champion_dir / "model.safetensors").read_text() == "v1"
    assert promotion.read_champion(record_path)["run_id"] == "r1"


def test_recover_after_a_promotion_interrupted_mid_swap(tmp_path):
    champion_dir, record_path = tmp_path / "champion", tmp_path / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    # Killed after the old champion was renamed aside, with a half-copied new one beside it.
    champion_dir.rename(tmp_path / ".champion.previous")
    make_export(tmp_path / ".champion.incoming", "partial")
    promotion.recover_champion(champion_dir)
    assert (champion_dir / "model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["champion", "champion.json", "export1"]


def test_record_is_resynced_from_the_champion_directory(tmp_path):
    champion_dir, record_path = tmp_path / "champion", tmp_path / "champion.json"
    promotion.promote(make_export(tmp_path / "export1", "v1"), champion_dir, record("r1", 0.1), record_path)
    record_path.write_text(json.dumps(record("stale", 0.9)))  # killed between the swap and the copy of the record
    promotion.sync_champion_record(champion_dir, record_path)
    assert promotion.read_champion(record_path)["run_id"] == "r1"


def test_comparison_table_lists_headline_and_per_type_figures():
    candidate = {"anls": 0.6, "exact_match": 0.5, "n_questions": 10, "by_type": {"table": {"anls": 0.7}}}
    champion = {"anls": 0.5, "exact_match": 0.5, "n_questions": 10, "by_type": {"form": {"anls": 0.2}}}
    table = promotion.comparison_table(candidate, champion).splitlines()
    assert table[0] == "| metric | champion | candidate | difference |"
    assert "| anls | 0.5000 | 0.6000 | +0.1000 |" in table
    assert "| levenshtein_similarity | – | – | – |" in table
    assert "| n_questions | 10 | 10 | – |" in table
    assert "| anls: table | – | 0.7000 | – |" in table and "| anls: form | 0.2000 | – | – |" in table
    assert "| anls | – | 0.6000 | – |" in promotion.comparison_table(candidate, None)


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
