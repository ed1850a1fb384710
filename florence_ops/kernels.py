"""Triton kernels for the text encoder's elementwise passes in training: GELU with the activation dropout after it,
and dropout, residual add and layer norm, each as one kernel forward and one backward (`train.fused_kernels`).

The second version, not yet measured on a GPU (benchmarks/README.md, "The text encoder's elementwise passes as Triton
kernels"): the first drew four elements' dropout from a Philox call and drew them again in backward, and its GELU
kernels were bound by instruction issue (about 60 instructions an element on sm_90, of which Philox took a third).
Here a Philox call draws eight elements, one 16-bit half of its four words each (element j of group g is kept when
half j of Philox(seed, g) is at least p * 2**16, rounded: p is rounded to 2**-16 and the kept elements scaled by the
complement of that), forward stores the flags as one bit an element (a 32nd of the bf16 activations), and backward
reads them instead of drawing again. The seed is drawn from the CUDA generator for each call (so `torch.manual_seed`
and gradient checkpointing's RNG replay hold).

Offsets are 32-bit: a batch whose activations reach 2**31 elements runs eager.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from transformers.models.bart import modeling_bart

GROUP = tl.constexpr(8)  # elements a Philox call draws for: a 16-bit half of one of its four words each
ELEMENTWISE_GROUPS = 128  # groups of eight an elementwise program handles: one a thread
ELEMENTWISE_WARPS = 4
NORM_WARPS = 4  # a row a program (forward), rows in turn (backward)
BACKWARD_PROGRAMS_PER_PROCESSOR = 4
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _draw(seed, groups, threshold):
    """One byte a group of `groups`: bit j set (element j kept) when the 16-bit half j of Philox(seed, group) is at
    least `threshold` (halves in order: low then high of each of its four words)."""
    r0, r1, r2, r3 = tl.randint4x(seed, groups)
    packed = ((r0 & 0xFFFF) >= threshold).to(tl.int32) | (((r0 >> 16) >= threshold).to(tl.int32) << 1)
    packed |= (((r1 & 0xFFFF) >= threshold).to(tl.int32) << 2) | (((r1 >> 16) >= threshold).to(tl.int32) << 3)
    packed |= (((r2 & 0xFFFF) >= threshold).to(tl.int32) << 4) | (((r2 >> 16) >= threshold).to(tl.int32) << 5)
    packed |= (((r3 & 0xFFFF) >= threshold).to(tl.int32) << 6) | (((r3 >> 16) >= threshold).to(tl.int32) << 7)
    return packed


@triton.jit
def _unpack(packed):
    """Keep flags [len(packed), 8] from `_draw`'s bytes."""
    return ((packed[:, None] >> tl.arange(0, GROUP)[None, :]) & 1) != 0


@triton.jit
def _gelu_dropout_forward(x_ptr, out_ptr, mask_ptr, seed_ptr, n, threshold, scale, GROUPS: tl.constexpr):
    groups = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    offsets = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    packed = _draw(tl.load(seed_ptr), groups, threshold)
    tl.store(mask_ptr + groups, packed.to(tl.uint8), mask=groups * GROUP < n)
    gelu = 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))
    tl.store(out_ptr + offsets, tl.where(_unpack(packed), gelu * scale, 0.0).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gelu_dropout_backward(grad_ptr, x_ptr, mask_ptr, dx_ptr, n, scale, GROUPS: tl.constexpr):
    groups = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    offsets = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    slope = 0.5 * (1.0 + tl.math.erf(x * SQRT_HALF)) + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    packed = tl.load(mask_ptr + groups, mask=groups * GROUP < n, other=0).to(tl.int32)
    dx = tl.where(_unpack(packed), grad * scale, 0.0) * slope
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dropout_add_norm_forward(x_ptr, residual_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr, mask_ptr, mean_ptr,
                              rstd_ptr, seed_ptr, N, threshold, scale, eps, GROUPS: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    local = tl.arange(0, GROUPS)
    columns = local[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    inside = columns < N
    start = row * N
    x = tl.load(x_ptr + start + columns, mask=inside, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + start + columns, mask=inside, other=0.0).to(tl.float32)
    packed = _draw(tl.load(seed_ptr), row * (N // GROUP) + local, threshold)
    tl.store(mask_ptr + row * (N // GROUP) + local, packed.to(tl.uint8), mask=local < N // GROUP)
    # Rounded as eager rounds: the dropout's output in x's dtype, the sum in the sum's.
    dropped = tl.where(_unpack(packed), x * scale, 0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    total = (residual + dropped).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + start + columns, total, mask=inside)
    total = total.to(tl.float32)
    mean = tl.sum(tl.sum(total, 1), 0) / N
    centred = tl.where(inside, total - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(centred * centred, 1), 0) / N + eps)
    weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + columns, mask=inside, other=0.0).to(tl.float32)
    out = centred * rstd * weight + bias
    tl.store(out_ptr + start + columns, out.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _dropout_add_norm_backward(grad_ptr, sum_ptr, weight_ptr, mask_ptr, mean_ptr, rstd_ptr, dresidual_ptr, dx_ptr,
                               dweight_ptr, dbias_ptr, M, N, scale, GROUPS: tl.constexpr):  # fmt: skip
    """Rows pid, pid + programs, ...; each program's share of the weight and bias gradients to its own row of
    dweight and dbias, summed by the caller."""
    pid = tl.program_id(0)
    local = tl.arange(0, GROUPS)
    columns = local[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    inside = columns < N
    weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
    dweight = tl.zeros([GROUPS, GROUP], dtype=tl.float32)
    dbias = tl.zeros([GROUPS, GROUP], dtype=tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        start = row * N
        grad = tl.load(grad_ptr + start + columns, mask=inside, other=0.0).to(tl.float32)
        total = tl.load(sum_ptr + start + columns, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normed = tl.where(inside, (total - tl.load(mean_ptr + row)) * rstd, 0.0)
        scaled = grad * weight
        mean_scaled = tl.sum(tl.sum(scaled, 1), 0) / N
        mean_projection = tl.sum(tl.sum(scaled * normed, 1), 0) / N
        dsum = (scaled - normed * mean_projection - mean_scaled) * rstd
        tl.store(dresidual_ptr + start + columns, dsum.to(dresidual_ptr.dtype.element_ty), mask=inside)
        packed = tl.load(mask_ptr + row * (N // GROUP) + local, mask=local < N // GROUP, other=0).to(tl.int32)
        dx = tl.where(_unpack(packed), dsum * scale, 0.0)
        tl.store(dx_ptr + start + columns, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        dweight += grad * normed
        dbias += grad
    tl.store(dweight_ptr + pid * N + columns, dweight, mask=inside)
    tl.store(dbias_ptr + pid * N + columns, dbias, mask=inside)


def _seed(device: torch.device) -> torch.Tensor:
    return torch.randint(2**62, (1,), device=device, dtype=torch.int64)


def _threshold(p: float) -> tuple[int, float]:
    """The 16-bit draw below which an element is dropped (p rounded to 2**-16), and the scale that keeps the
    expectation."""
    threshold = round(p * 2**16)
    return threshold, 2**16 / (2**16 - threshold)


class _GeluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        x = x.contiguous()
        threshold, ctx.scale = _threshold(p)
        out = torch.empty_like(x)
        mask = torch.empty(triton.cdiv(x.numel(), 8), device=x.device, dtype=torch.uint8)
        grid = (triton.cdiv(x.numel(), 8 * ELEMENTWISE_GROUPS),)
        _gelu_dropout_forward[grid](x, out, mask, _seed(x.device), x.numel(), threshold, ctx.scale,
                                    GROUPS=ELEMENTWISE_GROUPS, num_warps=ELEMENTWISE_WARPS)  # fmt: skip
        ctx.save_for_backward(x, mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mask = ctx.saved_tensors
        dx = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), 8 * ELEMENTWISE_GROUPS),)
        _gelu_dropout_backward[grid](grad.contiguous(), x, mask, dx, x.numel(), ctx.scale,
                                     GROUPS=ELEMENTWISE_GROUPS, num_warps=ELEMENTWISE_WARPS)  # fmt: skip
        return dx, None


def gelu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """`dropout(gelu(x), p)` (exact GELU, training mode) in one pass each way."""
    return _GeluDropout.apply(x, p)


class _DropoutAddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, p: float, eps: float) -> torch.Tensor:
        shape, n = x.shape, x.shape[-1]
        x, residual = x.contiguous().view(-1, n), residual.contiguous().view(-1, n)
        threshold, ctx.scale = _threshold(p)
        total = torch.empty_like(residual, dtype=torch.promote_types(x.dtype, residual.dtype))
        out = torch.empty_like(total)
        mask = torch.empty(x.numel() // 8, device=x.device, dtype=torch.uint8)
        mean = torch.empty(len(x), device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _dropout_add_norm_forward[(len(x),)](x, residual, weight, bias, total, out, mask, mean, rstd, _seed(x.device),
                                             n, threshold, ctx.scale, eps, GROUPS=triton.next_power_of_2(n // 8),
                                             num_warps=NORM_WARPS)  # fmt: skip
        ctx.save_for_backward(total, weight, mask, mean, rstd)
        ctx.dtypes, ctx.shape = (x.dtype, residual.dtype), shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total, weight, mask, mean, rstd = ctx.saved_tensors
        m, n = total.shape
        grad = grad.contiguous().view(m, n)
        dx = torch.empty(m, n, device=grad.device, dtype=ctx.dtypes[0])
        dresidual = torch.empty(m, n, device=grad.device, dtype=ctx.dtypes[1])
        programs = min(m, BACKWARD_PROGRAMS_PER_PROCESSOR * _processors(grad.device))
        dweight = torch.empty(programs, n, device=grad.device, dtype=torch.float32)
        dbias = torch.empty_like(dweight)
        _dropout_add_norm_backward[(programs,)](grad, total, weight, mask, mean, rstd, dresidual, dx, dweight, dbias,
                                                m, n, ctx.scale, GROUPS=triton.next_power_of_2(n // 8),
                                                num_warps=NORM_WARPS)  # fmt: skip
        wanted = ctx.needs_input_grad
        dweight = dweight.sum(0).to(weight.dtype) if wanted[2] else None
        dbias = dbias.sum(0).to(weight.dtype) if wanted[3] else None
        return dx.view(ctx.shape), dresidual.view(ctx.shape), dweight, dbias, None, None


def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm, p: float) -> torch.Tensor:
    """`norm(residual + dropout(x, p))` (training mode) in one pass each way; the last dimension a multiple of 8."""
    return _DropoutAddNorm.apply(x, residual, norm.weight, norm.bias, p, norm.eps)


class BartEncoderLayer(modeling_bart.BartEncoderLayer):
    """transformers' BART encoder layer (Florence-2's text encoder), training on the kernels above: the same weights
    and the same name, which accelerate's FSDP wrapping and transformers' device maps look layers up by
    (`_no_split_modules`); transformers wraps this forward in gradient checkpointing as it wraps the layer's own.
    Evaluation, dropout of 1 and batches beyond 32-bit offsets take transformers' forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        wide = hidden_states.shape[:-1].numel() * self.fc1.out_features
        if not self.training or wide >= 2**31 or max(self.dropout, self.activation_dropout) >= 1:
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = dropout_add_layer_norm(hidden_states, residual, self.self_attn_layer_norm, self.dropout)
        residual = hidden_states
        hidden_states = self.fc2(gelu_dropout(self.fc1(hidden_states), self.activation_dropout))
        return dropout_add_layer_norm(hidden_states, residual, self.final_layer_norm, self.dropout)


def fuse_text_encoder(model: torch.nn.Module) -> int:
    """Turn the BART encoder layers in `model` that the kernels fit (exact GELU, a width that is a multiple of 8) into
    the `BartEncoderLayer` above, in place; how many were turned."""
    fused = 0
    for module in model.modules():
        if (type(module) is modeling_bart.BartEncoderLayer and module.embed_dim % 8 == 0
                and module.self_attn.config.activation_function == "gelu"):  # fmt: skip
            module.__class__ = BartEncoderLayer
            fused += 1
    return fused
