"""Contract of the export stage: the exact files of the exported directory, which loads offline with the Auto classes
and answers as the trained model does, and whose model card's snippet runs."""

import json
import shutil

import torch
from huggingface_hub import ModelCard

from tests.conftest import tiny_params
from tests.stages.conftest import TRAINED, declared_outputs, files, written
from tests.stages.test_train import MODEL_FILES

EXPORT_FILES = {f"models/export/{name}" for name in MODEL_FILES | {"README.md", "florence_ops.json"}}


def test_export_writes_exactly_its_outputs(evaluated, tmp_path):
    from florence_ops.stages.export import export

    root = tmp_path / "ws"
    shutil.copytree(evaluated[0], root, symlinks=True)
    before = files(root)
    target = export(tiny_params(root, **TRAINED))
    assert target == root / "models/export" and declared_outputs("export") == {"models/export"}
    assert written(root, before) == EXPORT_FILES
    card = (target / "README.md").read_text()
    anls = json.loads((root / "reports/metrics.json").read_text())["anls"]
    assert f"| anls | {anls:.4f} |" in card
    # the front matter the hub reads: the base model, and ANLS as a model-index result
    data = ModelCard.load(target / "README.md").data
    assert data.base_model == "tiny" and data.license == "mit" and data.pipeline_tag == "image-text-to-text"
    result = next(result for result in data.eval_results if result.metric_type == "anls")
    assert result.metric_value == anls and result.dataset_split == "validation"
    assert result.task_type == "document-question-answering"


def test_exported_model_loads_offline_with_auto_classes(evaluated, tmp_path):
    """The exported directory, loaded as users load it, answers as the trained model and the evaluation did."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from florence_ops.data.processed import ImageTable, read_questions
    from florence_ops.modeling import load_trained
    from florence_ops.stages.export import export

    workspace = tmp_path / "ws"
    shutil.copytree(evaluated[0], workspace, symlinks=True)
    params = tiny_params(workspace, **TRAINED)
    target = export(params)
    model = AutoModelForImageTextToText.from_pretrained(target)
    processor = AutoProcessor.from_pretrained(target)
    assert model.generation_config.no_repeat_ngram_size == 0
    assert model.generation_config.max_new_tokens == params.train.max_answer_tokens  # what training teaches
    row = read_questions(workspace / "data/processed", "validation")[0]
    image = ImageTable(workspace / "data/processed")[row["image_id"]]
    inputs = processor(text=params.train.prompt + row["question"], images=image, return_tensors="pt")
    trained, _ = load_trained(workspace / "models/train/model", params.paths.base_model, params.model)
    with torch.no_grad():
        ids = model.generate(**inputs)
        expected = trained.generate(**inputs, generation_config=model.generation_config)
    assert ids.tolist() == expected.tolist()
    predictions = [json.loads(line) for line in (workspace / "reports/predictions.jsonl").read_text().splitlines()]
    evaluated_answer = {p["question_id"]: p["prediction"] for p in predictions}[row["questionId"]]
    assert processor.batch_decode(ids, skip_special_tokens=True)[0].strip() == evaluated_answer


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
