"""The one precision rule, and the cache-key recipe it feeds (a change there would orphan every built cache)."""

import contextlib

import pytest
import torch

from florence_ops.precision import autocast, autocast_dtype, compute_dtype, mixed_precision
from florence_ops.vision.encoder import computed_with

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("precision", ["auto", "bf16", "bf16-pure"])
def test_bf16_on_cuda_unless_fp32_is_asked_for(precision):
    assert autocast_dtype(precision, CUDA) is torch.bfloat16
    assert autocast_dtype("fp32", CUDA) is None
    assert autocast_dtype(precision, CPU) is None


def test_accelerate_mixes_in_bf16_where_the_rule_says():
    assert [mixed_precision(p, CUDA) for p in ("auto", "bf16", "bf16-pure", "fp32")] == ["bf16", "bf16", "no", "no"]
    assert mixed_precision("auto", CPU) == "no"


def test_only_bf16_pure_casts_the_training_step_and_only_on_cuda():
    """bf16-pure's step runs on bf16 weights without autocast; answering and the vision cache still follow
    `autocast_dtype`, so a cache built under auto serves a bf16-pure run."""
    assert [compute_dtype(p, CUDA) for p in ("auto", "bf16", "bf16-pure", "fp32")] == [None, None, torch.bfloat16, None]
    assert compute_dtype("bf16-pure", CPU) is None
    dtype = autocast_dtype("bf16-pure", CUDA)
    assert computed_with(CUDA, dtype, True) == computed_with(CUDA, autocast_dtype("auto", CUDA), True)


def test_no_autocast_without_a_dtype():
    assert isinstance(autocast(None, CPU), contextlib.nullcontext)
    with autocast(torch.bfloat16, CPU):
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_cache_recipe_names_how_the_encoder_computes():
    assert computed_with(CUDA, autocast_dtype("auto", CUDA), True) == {
        "device": "cuda", "precision": "bf16 weights, fused kernels", "compile": "repeated blocks"
    }  # fmt: skip
    assert computed_with(CPU, autocast_dtype("auto", CPU), False) == {"device": "cpu", "precision": "fp32",
                                                                       "compile": False}  # fmt: skip
