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


def _module() -> torch.nn.Module:
    """Two trainable layers, one frozen, one never used in `forward`, and a buffer."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.frozen, self.last = torch.nn.Linear(4, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
            self.unused = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)
            self.register_buffer("scale", torch.full((2,), 0.5))

        def forward(self, x):
            return self.last(self.frozen(self.first(x))) * self.scale

    torch.manual_seed(0)
    return Net()


def test_compute_copies_train_the_fp32_weights_as_casting_each_tensor_does():
    """The bf16-pure step's copies: the trainable weights cast together give the gradients that casting each one
    gives, a weight the step does not use gets none, and frozen weights and buffers are cast once and kept until they
    change."""
    from florence_ops.precision import ComputeCopies

    net, x = _module(), torch.randn(5, 4).to(torch.bfloat16)
    named = [*net.named_parameters(), *net.named_buffers()]
    each = {name: t.to(torch.bfloat16) for name, t in named}
    torch.func.functional_call(net, each, (x,)).float().pow(2).sum().backward()
    expected = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)

    copies = ComputeCopies(torch.bfloat16)
    together = copies(net)
    assert {name: t.dtype for name, t in together.items()} == {name: torch.bfloat16 for name, _ in named}
    torch.func.functional_call(net, together, (x,)).float().pow(2).sum().backward()
    got = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(expected) == ["first.bias", "first.weight", "last.bias", "last.weight"]
    for name, grad in got.items():
        assert grad.dtype is torch.float32 and torch.equal(grad, expected[name]), name

    again = copies(net)
    assert again["frozen.weight"] is together["frozen.weight"] and again["scale"] is together["scale"]
    assert again["first.weight"] is not together["first.weight"]  # trainable: cast anew, the optimizer changes them
    with torch.no_grad():
        net.frozen.weight.mul_(2)  # a frozen weight changed in place (a checkpoint loaded): its copy is made anew
    changed = copies(net)
    assert changed["frozen.weight"] is not together["frozen.weight"]
    assert torch.equal(changed["frozen.weight"], net.frozen.weight.to(torch.bfloat16))
