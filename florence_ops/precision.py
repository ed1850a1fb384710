"""The precision rule, written once: bf16 on CUDA when precision is auto, bf16 or bf16-pure; fp32 everywhere else.

fp16 gives NaN losses with Florence-2, so bf16 is the only reduced precision. Training (the accelerator's mixed
precision, `mixed_precision`), answering (autocast around generation, in evaluation, predict and serve alike) and the
vision-feature cache (the encoder's bf16 copy of the tower, and the cache key that records it) take the decision from
`autocast_dtype` and pass it down; the benchmarks ask the same functions. `bf16-pure` trains differently: no
autocast, the whole step in bf16 (`compute_dtype`), weights and optimizer kept in fp32.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced dtype to compute in on `device` for `precision` (`train.precision`'s values): bf16 on CUDA unless
    fp32 is asked for; None (plain fp32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and precision in ("auto", "bf16", "bf16-pure") else None


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the training step casts the weights to (`DocVQAObjective`): bf16 for `bf16-pure` on CUDA, None (the
    weights' own fp32, with autocast where `mixed_precision` turns it on) otherwise."""
    return autocast_dtype(precision, device) if precision == "bf16-pure" else None


def mixed_precision(precision: str, device: torch.device) -> str:
    """accelerate's `mixed_precision` for `precision` on `device`: "bf16" where `autocast_dtype` gives bf16, except for
    `bf16-pure`, whose step computes in bf16 without autocast; else "no"."""
    return "bf16" if autocast_dtype(precision, device) is not None and precision != "bf16-pure" else "no"


def describe(dtype: torch.dtype | None) -> str:
    """How a benchmark labels what `autocast_dtype` decided."""
    return "bf16 autocast" if dtype is not None else "fp32"


def autocast(dtype: torch.dtype | None, device: torch.device):
    """A context that autocasts to `dtype` on `device`, or does nothing when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class ComputeCopies:
    """A module's floating-point weights and buffers in `dtype`, by name, for `torch.func.functional_call` (the
    `bf16-pure` step): trainable weights are cast together on every call, so their gradients flow back to the fp32
    weights; frozen weights and buffers are cast once and kept until they change (a frozen vision tower, LoRA's
    base weights).

    Casting tensor by tensor took two kernels per trainable weight and one per frozen one on every step (about 930
    for Florence-2-base with its tower frozen: benchmarks/README.md); together it is a few concatenations and casts.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._kept: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}  # name: ((data_ptr, version), copy)

    def __call__(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        tensors = [(name, t) for name, t in [*module.named_parameters(), *module.named_buffers()]
                   if t.is_floating_point()]  # fmt: skip
        trainable = [(name, t) for name, t in tensors if t.requires_grad]
        copies = dict(zip([name for name, _ in trainable], cast_together(self.dtype, [t for _, t in trainable])))
        for name, t in tensors:
            if name not in copies:
                copies[name] = self._kept_copy(name, t)
        return copies

    def _kept_copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        state = (tensor.data_ptr(), tensor._version)
        kept = self._kept.get(name)
        if kept is None or kept[0] != state:
            kept = self._kept[name] = (state, tensor.detach().to(self.dtype))
        return kept[1]


def cast_together(dtype: torch.dtype, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`[t.to(dtype) for t in tensors]` (differentiable) as one concatenation and one cast per source dtype, forward
    and backward, instead of one kernel per tensor each way."""
    return list(_CastTogether.apply(dtype, *tensors)) if tensors else []


class _CastTogether(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.set_materialize_grads(False)  # an output the loss does not reach: None, not zeros (its weight gets none)
        return _regroup(tensors, lambda t: t.to(dtype))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, grad in enumerate(grads):
            if grad is not None:  # an unused weight keeps no gradient
                by_dtype.setdefault(ctx.dtypes[i], []).append(i)
        result: list[torch.Tensor | None] = [None] * len(grads)
        for dtype, indices in by_dtype.items():
            for i, grad in zip(indices, _regroup([grads[i] for i in indices], lambda t, d=dtype: t.to(d))):
                result[i] = grad
        return None, *result


def _regroup(tensors, convert) -> tuple[torch.Tensor, ...]:
    """`convert` applied to the tensors of each dtype concatenated flat, split back into views of their shapes."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    for indices in groups.values():
        flat = convert(torch.cat([tensors[i].reshape(-1) for i in indices]))
        for i, piece in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            out[i] = piece.view(tensors[i].shape)
    return tuple(out)
