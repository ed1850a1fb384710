"""LoRA end to end, as a user turns it on: the train stage finishes, the trained projector is saved with the adapters,
and export writes plain merged weights that answer exactly as the unmerged adapters did."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from florence_ops.config import to_dict
from tests.conftest import tiny_params

pytestmark = pytest.mark.slow
PROJECTOR = "model.multi_modal_projector.image_projection.weight"


def _train_stage(root, params) -> subprocess.CompletedProcess:
    """`florence-ops train` in a subprocess, with a deadline: a hang fails the test instead of stalling CI."""
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(params)))
    command = [sys.executable, "-m", "florence_ops.cli", "train", "--params", str(params_file)]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)


def test_lora_trains_evaluates_and_exports_merged_weights(workspace):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from florence_ops.data.processed import ImageTable, read_questions
    from florence_ops.generation import Decoding, answer
    from florence_ops.model_inputs import Collator
    from florence_ops.stages.evaluate import evaluate
    from florence_ops.stages.export import export
    from florence_ops.vision.sources import PixelSource

    params = tiny_params(workspace, **{"train.lora.enabled": True, "lr": 1e-2})
    done = _train_stage(workspace, params)
    assert done.returncode == 0, done.stderr[-2000:]

    adapters = workspace / "models/train/model"
    assert (adapters / "adapter_config.json").is_file()
    saved = load_file(adapters / "adapter_model.safetensors")
    trained_projector = next(v for k, v in saved.items() if k.endswith("multi_modal_projector.image_projection.weight"))
    base_projector = load_file(workspace / "models/base/model.safetensors")[PROJECTOR]
    assert not torch.equal(trained_projector, base_projector), "the projector must train beside the adapters"

    metrics = evaluate(params)
    assert metrics["n_questions"] == 16
    target = export(params)
    assert not list(target.glob("adapter_*")), "export must write plain merged weights"
    exported = load_file(target / "model.safetensors")
    assert torch.equal(exported[PROJECTOR], trained_projector), "the trained projector must reach the export"
    assert not any("lora" in name for name in exported)

    merged = AutoModelForImageTextToText.from_pretrained(target)
    processor = AutoProcessor.from_pretrained(target)
    base = AutoModelForImageTextToText.from_pretrained(workspace / "models/base")
    unmerged = PeftModel.from_pretrained(base, adapters)
    rows = read_questions(workspace / "data/processed", "validation").to_list()
    source = PixelSource(ImageTable(workspace / "data/processed"), processor.image_processor)
    collator = Collator(processor.tokenizer, params.train.prompt, params.train.max_question_tokens, 0, train=False)
    decoding = Decoding(8, 1, params.evaluate.max_new_tokens)
    cpu = torch.device("cpu")
    expected = answer(unmerged.get_base_model(), rows, collator, source, decoding, cpu)
    assert answer(merged, rows, collator, source, decoding, cpu) == expected

    # evaluation scored the same merged model (through the train stage's vision-feature cache)
    from florence_ops.stages.evaluate import vision_source

    images = ImageTable(workspace / "data/processed")
    cached = vision_source(params, (base, processor), (merged, processor), images, rows, cpu)
    assert cached.cached
    predictions = [json.loads(line)["prediction"] for line in (workspace / "reports/predictions.jsonl").open()]
    assert predictions == answer(merged, rows, collator, cached, decoding, cpu)
