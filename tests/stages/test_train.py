"""Contract tests of the train, evaluate and export stages on a handful of records with a tiny model."""

import json
import math

import pytest
import torch

from tests.conftest import tiny_params


def test_train_evaluate_export_write_their_files(workspace):
    from florence_ops.stages.evaluate import evaluate
    from florence_ops.stages.export import export
    from florence_ops.stages.train import train

    params = tiny_params(workspace)
    summary = train(params)
    assert summary["steps"] == params.epochs * math.ceil(48 / params.batch_size)
    model_dir = workspace / "models/train/model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "processor_config.json").is_file()
    record = json.loads((workspace / "models/train/summary.json").read_text())
    assert record["trainable_parameters"] < record["total_parameters"]
    assert [h["epoch"] for h in record["history"]] == list(range(1, params.epochs + 1))
    assert not (workspace / "checkpoints").exists() or not any((workspace / "checkpoints").iterdir())
    live = workspace / "reports/train"
    assert (live / "metrics.json").is_file() and (live / "plots/metrics/train/loss.tsv").is_file()

    metrics = evaluate(params)
    on_disk = json.loads((workspace / "reports/metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("anls", "levenshtein_similarity", "exact_match", "n_questions"):
        assert key in on_disk and key in on_disk["before"]
    assert on_disk["n_questions"] == 16 and on_disk["by_type"]
    rows = [json.loads(line) for line in (workspace / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"question_id", "answers", "prediction", "anls", "question_types"} <= set(rows[0])
    assert (workspace / "reports/report.html").read_text().startswith("<!DOCTYPE html>")
    assert (workspace / "reports/anls_by_type/after.json").is_file()

    target = export(params)
    assert (target / "model.safetensors").is_file() and (target / "README.md").is_file()
    assert "anls" in (target / "README.md").read_text()


def test_exported_model_loads_offline_with_auto_classes(workspace):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from florence_ops.data.processed import ImageTable, read_questions
    from florence_ops.stages.export import export
    from florence_ops.stages.train import train

    params = tiny_params(workspace, epochs=1)
    train(params)
    (workspace / "reports").mkdir(exist_ok=True)
    (workspace / "reports/metrics.json").write_text(json.dumps({"anls": 0.5, "before": {}, "by_type": {}}))
    target = export(params)
    model = AutoModelForImageTextToText.from_pretrained(target)
    processor = AutoProcessor.from_pretrained(target)
    assert model.generation_config.no_repeat_ngram_size == 0
    assert model.generation_config.max_new_tokens == params.train.max_answer_tokens  # what training teaches
    row = read_questions(workspace / "data/processed", "validation")[0]
    image = ImageTable(workspace / "data/processed")[row["image_id"]]
    inputs = processor(text=params.train.prompt + row["question"], images=image, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5)
    assert isinstance(processor.batch_decode(ids, skip_special_tokens=True)[0], str)


@pytest.mark.parametrize("freeze, workers", [(["vision_tower"], 2), (["vision_tower"], 0), ([], 0)])
def test_vision_cache_used_only_with_frozen_tower(workspace, freeze, workers):
    from florence_ops.stages.train import train

    overrides = {"train.freeze": freeze, "train.eval_every_epoch": False, "train.num_workers": workers}
    params = tiny_params(workspace, epochs=1, **overrides)
    train(params)
    record = json.loads((workspace / "models/train/summary.json").read_text())
    assert record["vision_cache"] is bool(freeze)
    assert any((workspace / ".cache/vision_features").glob("*/features.npy")) is bool(freeze)


def test_model_card_snippet_runs_on_the_exported_model(workspace, tmp_path, monkeypatch):
    """The card's code, copied as users copy it, answers with `post_process_generation` the Florence-2 way."""
    import re
    import shutil

    from florence_ops.data.processed import ImageTable, read_questions
    from florence_ops.stages.export import export

    params = tiny_params(workspace)
    shutil.copytree(workspace / "models/base", workspace / "models/train/model")  # export does not care if trained
    (workspace / "reports").mkdir(exist_ok=True)
    (workspace / "reports/metrics.json").write_text(json.dumps({"anls": 0.5, "before": {}, "by_type": {}}))
    target = export(params)
    row = read_questions(workspace / "data/processed", "validation")[0]
    ImageTable(workspace / "data/processed")[row["image_id"]].save(tmp_path / "page.png")
    card = (target / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/this/dir", str(target))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "model card", "exec"), namespace)  # noqa: S102 - the card is ours
    expected = namespace["processor"].batch_decode(namespace["generated"], skip_special_tokens=True)[0].strip()
    assert isinstance(namespace["answer"], str) and namespace["answer"] == expected
