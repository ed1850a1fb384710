"""On a CUDA machine: FSDP training validates with the full parameters and saves the model it validated.

Run with `python -m pytest -m gpu tests/test_gpu.py` on a GPU machine (one GPU is enough: FSDP is launched through
accelerate with one process). On a machine without CUDA, FSDP is refused with a one-line error (last test).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_params

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_validates_and_saves_the_model_it_validated(workspace, lora):
    from florence_ops.data.processed import ImageTable, read_questions
    from florence_ops.generation import Decoding, answer
    from florence_ops.metrics import anls
    from florence_ops.model_inputs import Collator
    from florence_ops.modeling import load_trained
    from florence_ops.stages.evaluate import evaluate
    from florence_ops.stages.export import export
    from florence_ops.stages.train import train
    from florence_ops.vision.sources import PixelSource

    overrides = {"train.distributed": "fsdp", "train.lora.enabled": lora, "train.vision_cache": False, "epochs": 3}
    params = tiny_params(workspace, lr=1e-2 if lora else 1e-3, **overrides)
    train(params)
    summary = json.loads((workspace / "models/train/summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert all("val_anls" in h for h in summary["history"])

    model, processor = load_trained(workspace / "models/train/model", workspace / "models/base", params.model)
    base = load_file(workspace / "models/base/model.safetensors")
    projector = "model.multi_modal_projector.image_projection.weight"
    assert not torch.equal(model.state_dict()[projector].cpu(), base[projector]), "training must reach the saved model"
    rows = read_questions(workspace / "data/processed", "validation").to_list()[: params.train.max_eval_questions]
    collator = Collator(processor.tokenizer, params.train.prompt, params.train.max_question_tokens, 0, train=False)
    source = PixelSource(ImageTable(workspace / "data/processed"), processor.image_processor)
    decoding = Decoding(params.evaluate.batch_size, 1, params.train.max_answer_tokens)
    device = torch.device("cuda")
    predictions = answer(model.to(device), rows, collator, source, decoding, device)
    score = sum(anls(p, row["answers"]) for p, row in zip(predictions, rows)) / len(rows)
    # the saved model is the one validation chose: re-scoring it gives its recorded score (one answer of slack for
    # bf16 rounding between the sharded and the reloaded model)
    assert score == pytest.approx(summary["best_val_anls"], abs=1 / len(rows) + 1e-9)

    assert evaluate(params)["n_questions"] == 16
    assert (export(params) / "model.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fsdp_without_cuda_is_refused_in_one_line(workspace):
    from florence_ops.errors import UserError
    from florence_ops.stages.train import train

    with pytest.raises(UserError, match="train.distributed: fsdp needs CUDA GPUs"):
        train(tiny_params(workspace, **{"train.distributed": "fsdp"}))
