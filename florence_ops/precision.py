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
