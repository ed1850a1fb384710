"""The one precision rule, and the cache-key recipe it feeds (a change there would orphan every built cache)."""

import contextlib

import pytest
import torch

from florence_ops.precision import autocast, autocast_dtype, mixed_precision
from florence_ops.vision.encoder import computed_with

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_bf16_on_cuda_unless_fp32_is_asked_for(precision):
    assert autocast_dtype(precision, CUDA) is torch.bfloat16
    assert autocast_dtype("fp32", CUDA) is None
    assert autocast_dtype(precision, CPU) is None


def test_accelerate_mixes_in_bf16_where_the_rule_says():
    assert [mixed_precision(p, CUDA) for p in ("auto", "bf16", "fp32")] == ["bf16", "bf16", "no"]
    assert mixed_precision("auto", CPU) == "no"


def test_no_autocast_without_a_dtype():
    assert isinstance(autocast(None, CPU), contextlib.nullcontext)
    with autocast(torch.bfloat16, CPU):
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_cache_recipe_names_how_the_encoder_computes():
    assert computed_with(CUDA, autocast_dtype("auto", CUDA), True) == {
        "device": "cuda", "precision": "bf16 weights, fused kernels", "compile": "regional"
    }  # fmt: skip
    assert computed_with(CPU, autocast_dtype("auto", CPU), False) == {"device": "cpu", "precision": "fp32",
                                                                       "compile": False}  # fmt: skip
