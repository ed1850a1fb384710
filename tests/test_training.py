"""Gradient accumulation gives the global per-token mean of the whole step; a non-finite loss stops training at once."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from florence_ops.base_models import build_tiny_model, build_tiny_processor
from florence_ops.config import TinyModel, to_dict
from florence_ops.model_inputs import Collator
from florence_ops.vision.sources import PixelSource
from tests.conftest import tiny_params

CORPUS = ["<DocVQA>What is the total amount?", "Which company issued this document?", "ACME Corp", "$1,234.50"] * 5
QUESTIONS = [("What is the total amount?", "$1,234.50"), ("Which company?", "ACME Corp"), ("Who signed?", "no"),
             ("What is the invoice number?", "INV-0042 of 2024")]  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    spec = TinyModel(image_size=64, vision_dims=[8, 16, 16, 32], vision_heads=[1, 2, 2, 4], d_model=32, heads=2,
                     ffn_dim=64, vocab_size=300)  # fmt: skip
    processor = build_tiny_processor(spec, CORPUS)
    images = {f"p{i}": Image.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * i)) for i in range(6)}
    rows = [{"question": q, "answers": [a], "image_id": f"p{i % 6}"} for i, (q, a) in enumerate(QUESTIONS * 3)]
    return spec, processor, PixelSource(images, processor.image_processor), rows


def _gradients(setup, window: list[list[int]]) -> dict[str, torch.Tensor]:
    """A fresh model's gradients after the backward of one optimizer step over `window` (micro-batches of rows)."""
    from accelerate import Accelerator

    from florence_ops.training import DocVQAObjective, accumulate_gradients

    spec, processor, source, rows = setup
    collator = Collator(processor.tokenizer, "<DocVQA>", 32, 16, train=True)
    objective = DocVQAObjective(build_tiny_model(spec, processor, seed=3).train())
    accelerator = Accelerator(cpu=True)
    accumulate_gradients(accelerator, objective, [collator([rows[i] for i in batch]) for batch in window], source)
    return {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}


def test_accumulated_gradient_is_the_global_per_token_mean(setup):
    whole = _gradients(setup, [list(range(8))])
    # micro-batches of unequal answer-token counts: a mean of per-micro-batch means would weight them wrongly
    split = _gradients(setup, [[0, 1, 2], [3, 4, 5, 6, 7]])
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_accumulation_steps_change_nothing_but_float_order(prepared, tmp_path):
    """batch 20 as one batch or as two micro-batches of 10: the same training, also for the epoch's last step, which
    has 8 questions (48 = 2 * 20 + 8), one micro-batch of its window."""
    from florence_ops.stages.train import train

    weights = []
    for accum in (1, 2):
        root = tmp_path / f"accum{accum}"
        shutil.copytree(prepared, root)
        params = tiny_params(root, batch_size=20, **{"train.grad_accum_steps": accum, "train.eval_every_epoch": False})
        train(params)
        weights.append(load_file(root / "models/train/model/model.safetensors"))
    one, two = weights
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [1, 1000])
def test_non_finite_loss_stops_training_with_one_line_and_keeps_the_last_checkpoint(
    prepared, tmp_path, checkpoint_every
):
    """A learning rate so large that the first step sends the weights to ~1e30: step 2's loss is not finite.

    Losses are read one step late (the device runs ahead); the error still names step 2, and with checkpoints far
    apart nothing is saved at all."""
    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    params = tiny_params(root, lr=1e30, **{"train.checkpoint_every": checkpoint_every, "train.max_grad_norm": 0.0,
                                           "train.warmup_ratio": 0.0})  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    done = subprocess.run([sys.executable, "-m", "florence_ops.cli", "train", "--params", "params.yaml"], cwd=root,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training loss is "), done.stderr[-2000:]
    assert "at epoch 1, step 2" in errors[0] and "Traceback" not in done.stderr
    saved = [json.loads(path.read_text())["step"] for path in (root / "checkpoints").glob("*/last/progress.json")]
    assert saved == ([1] if checkpoint_every == 1 else []), "only the checkpoint before the loss turned non-finite"
    assert not (root / "models/train/summary.json").exists()
