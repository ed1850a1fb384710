"""Triton kernels for training (`train.fused_kernels`): the text encoder's elementwise passes (GELU with the
activation dropout after it; dropout, residual add and layer norm), and the decoder's cross-attention, each as one
kernel forward and one backward.

The elementwise kernels are their second version. The first drew four elements' dropout from a Philox call and drew
them again in backward, and its GELU kernels were bound by instruction issue (about 60 instructions an element on
sm_90, of which Philox took a third). Here a Philox call draws eight elements, one 16-bit half of its four words each
(element j of group g is kept when half j of Philox(seed, g) is at least p * 2**16, rounded: p is rounded to 2**-16
and the kept elements scaled by the complement of that), forward stores the flags as one bit an element (a 32nd of the
bf16 activations), and backward reads them instead of drawing again.

The cross-attention is a few answer tokens against the encoder's 600 positions: cuDNN's kernel took 3.08 ms a layer
forward and backward at batch 512 (`attention_variants_cross9_nvidia-h200.json`), four times what reading the keys and
values and writing their gradients takes, since it tiles queries by 64 and more. Here a program takes one (question,
head), its queries padded to 16, and walks its keys once each way (online softmax forward; backward from the saved
log-sum-exp, each program owning its keys' gradients).

On an H200 at batch 512 the step runs 8.7% faster than on PyTorch's kernels, with 6.9 GiB less memory; GELU and
dropout 3.83 ms forward and backward against 5.38, dropout, add and norm 1.46 against 2.65, cross-attention 1.12
against 2.51 (benchmarks/README.md, "kernels-v2 merged").

Every seed is drawn from the CUDA generator for each call (so `torch.manual_seed` and gradient checkpointing's RNG
replay hold). Element offsets are 32-bit: a batch whose activations (or attention probabilities) reach 2**31
elements runs transformers' forward.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from transformers.models.bart import modeling_bart

log = logging.getLogger(__name__)

GROUP_SIZE = 8  # elements a Philox call draws for (a 16-bit half of one of its four words each): one flag byte
GROUP = tl.constexpr(GROUP_SIZE)
ELEMENTWISE_GROUPS = 128  # groups of eight an elementwise program handles: one a thread
ELEMENTWISE_WARPS = 4
NORM_WARPS = 1  # a row a program (forward), rows in turn (backward); on an H200 1.46 ms a call (4 warps: 1.75)
BACKWARD_PROGRAMS_PER_PROCESSOR = 8
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
    expectation. p that rounds to 1 is refused (transformers' forward drops everything instead)."""
    threshold = round(p * 2**16)
    if not 0 <= threshold < 2**16:
        raise ValueError(f"dropout {p} rounds to {threshold} / 2**16: the kernels take [0, 1 - 2**-17)")
    return threshold, 2**16 / (2**16 - threshold)


def _drops_everything(p: float) -> bool:
    """Whether p rounds to 1 at the kernels' 2**-16 (`_threshold` refuses it)."""
    return round(p * 2**16) >= 2**16


class _GeluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        x = x.contiguous()
        threshold, ctx.scale = _threshold(p)
        out = torch.empty_like(x)
        mask = torch.empty(triton.cdiv(x.numel(), GROUP_SIZE), device=x.device, dtype=torch.uint8)
        grid = (triton.cdiv(x.numel(), GROUP_SIZE * ELEMENTWISE_GROUPS),)
        _gelu_dropout_forward[grid](x, out, mask, _seed(x.device), x.numel(), threshold, ctx.scale,
                                    GROUPS=ELEMENTWISE_GROUPS, num_warps=ELEMENTWISE_WARPS)  # fmt: skip
        ctx.save_for_backward(x, mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mask = ctx.saved_tensors
        dx = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), GROUP_SIZE * ELEMENTWISE_GROUPS),)
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
        if n % GROUP_SIZE:
            raise ValueError(
                f"dropout_add_layer_norm: rows of {n}; the kernels take rows of a multiple of {GROUP_SIZE}"
            )
        x, residual = x.contiguous().view(-1, n), residual.contiguous().view(-1, n)
        threshold, ctx.scale = _threshold(p)
        total = torch.empty_like(residual, dtype=torch.promote_types(x.dtype, residual.dtype))
        out = torch.empty_like(total)
        mask = torch.empty(x.numel() // GROUP_SIZE, device=x.device, dtype=torch.uint8)
        mean = torch.empty(len(x), device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _dropout_add_norm_forward[(len(x),)](x, residual, weight, bias, total, out, mask, mean, rstd, _seed(x.device),
                                             n, threshold, ctx.scale, eps, **_row_launch(n))  # fmt: skip
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
                                                m, n, ctx.scale, **_row_launch(n))  # fmt: skip
        wanted = ctx.needs_input_grad
        dweight = dweight.sum(0).to(weight.dtype) if wanted[2] else None
        dbias = dbias.sum(0).to(weight.dtype) if wanted[3] else None
        return dx.view(ctx.shape), dresidual.view(ctx.shape), dweight, dbias, None, None


def _row_launch(n: int) -> dict:
    """The norm kernels' tile (a row's groups, a power of two) and warps for rows of `n`."""
    return {"GROUPS": triton.next_power_of_2(n // GROUP_SIZE), "num_warps": NORM_WARPS}


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
        wide = hidden_states.shape[:-1].numel() * max(self.fc1.out_features, self.embed_dim)
        if not self.training or wide >= 2**31 or _drops_everything(max(self.dropout, self.activation_dropout)):
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = dropout_add_layer_norm(hidden_states, residual, self.self_attn_layer_norm, self.dropout)
        residual = hidden_states
        hidden_states = self.fc2(gelu_dropout(self.fc1(hidden_states), self.activation_dropout))
        return dropout_add_layer_norm(hidden_states, residual, self.final_layer_norm, self.dropout)


# The decoder's cross-attention: a few answer tokens (9 in the pipeline, up to 64 here) against the encoder's 600.
# Attention kernels tile queries by 64 or more, so most of their work is on padding; here a program takes one
# (question, head) and walks its keys, so the keys and values are read once each way and nothing is computed twice.
QUERY_ROWS_MAX = 64
KEY_BLOCK = 64  # keys a loop step takes
CROSS_WARPS = 4


@triton.jit
def _rows(ptr, batch_stride, head_stride, row_stride, b, h, rows, D: tl.constexpr):
    """Pointers to rows `rows` of one (question, head)'s (rows, D) slice. The question's offset in 64 bits: a batch's
    keys and values pass 2**31 elements long before its attention's draws do."""
    return ptr + b.to(tl.int64) * batch_stride + h * head_stride + rows[:, None] * row_stride + tl.arange(0, D)[None, :]


@triton.jit
def _tile(ptr, batch_stride, head_stride, row_stride, b, h, rows, live, D: tl.constexpr):
    """Rows `rows` (those `live`) of one (question, head)'s (rows, D) slice; zeros elsewhere."""
    return tl.load(_rows(ptr, batch_stride, head_stride, row_stride, b, h, rows, D), mask=live[:, None], other=0.0)


@triton.jit
def _put(ptr, batch_stride, head_stride, row_stride, b, h, rows, live, value, D: tl.constexpr):
    tl.store(_rows(ptr, batch_stride, head_stride, row_stride, b, h, rows, D), value.to(ptr.dtype.element_ty),
             mask=live[:, None])  # fmt: skip


@triton.jit
def _key_block(q, k_ptr, kb, kh, kl, bias_ptr, b, h, start, L, softmax_scale, KEYS: tl.constexpr, D: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """Keys start..start+KEYS of one (question, head): their indices, which are real, the keys, and the scaled scores
    of the queries `q` against them plus the key bias."""
    keys = start + tl.arange(0, KEYS)
    inside = keys < L
    k = _tile(k_ptr, kb, kh, kl, b, h, keys, inside, D)
    bias = tl.load(bias_ptr + b * L + keys, mask=inside, other=float("-inf"))
    return keys, inside, k, tl.dot(q, tl.trans(k), input_precision=PRECISION) * softmax_scale + bias[None, :]


@triton.jit
def _attention_kept(seed, bh, T, L, rows, keys, p):
    """Which probabilities of rows x keys the attention dropout keeps: element (b, h, i, j) when Philox(seed,
    ((b H + h) T + i) L + j), as a uniform float, is at least p."""
    return tl.rand(seed, (bh * T + rows[:, None]) * L + keys[None, :]) >= p


@triton.jit
def _cross_attention_forward(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr, seed_ptr, qb, qh, qt, kb, kh, kl, vb,
                             vh, vl, ob, oh, ot, H, T, L, softmax_scale, p, drop_scale, ROWS: tl.constexpr,
                             KEYS: tl.constexpr, D: tl.constexpr, DROPOUT: tl.constexpr,
                             PRECISION: tl.constexpr):  # fmt: skip
    """One (question, head) a program: its T queries against its L keys, online softmax over blocks of KEYS keys, the
    attention dropout on the probabilities. Writes the output and each row's log-sum-exp."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = tl.arange(0, ROWS)
    live = rows < T
    q = _tile(q_ptr, qb, qh, qt, b, h, rows, live, D)
    highest = tl.full([ROWS], -1.0e30, tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    seed = tl.load(seed_ptr)
    for start in range(0, L, KEYS):
        keys, inside, k, scores = _key_block(q, k_ptr, kb, kh, kl, bias_ptr, b, h, start, L, softmax_scale, KEYS, D,
                                             PRECISION)  # fmt: skip
        new_highest = tl.maximum(highest, tl.max(scores, 1))
        rescale = tl.exp(highest - new_highest)
        probs = tl.exp(scores - new_highest[:, None])
        total = total * rescale + tl.sum(probs, 1)
        if DROPOUT:
            probs = tl.where(_attention_kept(seed, bh, T, L, rows, keys, p), probs * drop_scale, 0.0)
        v = _tile(v_ptr, vb, vh, vl, b, h, keys, inside, D)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        highest = new_highest
    # A row whose keys are all masked: zeros (as SDPA gives), and a log-sum-exp of +inf (no gradient in backward).
    attended = total > 0
    _put(out_ptr, ob, oh, ot, b, h, rows, live, acc / tl.where(attended, total, 1.0)[:, None], D)
    tl.store(
        lse_ptr + bh * T + rows,
        tl.where(attended, highest + tl.log(tl.where(attended, total, 1.0)), float("inf")),
        mask=live,
    )


@triton.jit
def _cross_attention_backward(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr, seed_ptr, dq_ptr, dk_ptr,
                              dv_ptr, qb, qh, qt, kb, kh, kl, vb, vh, vl, ob, oh, ot, gb, gh, gt, dqb, dqh, dqt, dkb,
                              dkh, dkl, dvb, dvh, dvl, H, T, L,
                              softmax_scale, p, drop_scale, ROWS: tl.constexpr, KEYS: tl.constexpr, D: tl.constexpr,
                              DROPOUT: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """The forward's program again: the probabilities from the saved log-sum-exp, the same dropout draws. Each program
    owns its keys' gradients (no atomics) and sums its queries' over the key blocks."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = tl.arange(0, ROWS)
    live = rows < T
    q = _tile(q_ptr, qb, qh, qt, b, h, rows, live, D)
    dout = _tile(dout_ptr, gb, gh, gt, b, h, rows, live, D)
    out = _tile(out_ptr, ob, oh, ot, b, h, rows, live, D)
    # The gradient through each row's softmax normaliser: rowsum(dO * O), O with its dropout.
    delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), 1)
    lse = tl.load(lse_ptr + bh * T + rows, mask=live, other=0.0)
    dq = tl.zeros([ROWS, D], tl.float32)
    seed = tl.load(seed_ptr)
    for start in range(0, L, KEYS):
        keys, inside, k, scores = _key_block(q, k_ptr, kb, kh, kl, bias_ptr, b, h, start, L, softmax_scale, KEYS, D,
                                             PRECISION)  # fmt: skip
        v = _tile(v_ptr, vb, vh, vl, b, h, keys, inside, D)
        probs = tl.where(live[:, None], tl.exp(scores - lse[:, None]), 0.0)
        dprobs = tl.dot(dout, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            kept = _attention_kept(seed, bh, T, L, rows, keys, p)
            dropped = tl.where(kept, probs * drop_scale, 0.0)
            dprobs = tl.where(kept, dprobs * drop_scale, 0.0)
        else:
            dropped = probs
        dv = tl.dot(tl.trans(dropped.to(dout.dtype)), dout, input_precision=PRECISION)
        dscores = (probs * (dprobs - delta[:, None])).to(q.dtype)
        dk = tl.dot(tl.trans(dscores), q, input_precision=PRECISION) * softmax_scale
        dq += tl.dot(dscores, k, input_precision=PRECISION) * softmax_scale
        _put(dk_ptr, dkb, dkh, dkl, b, h, keys, inside, dk, D)
        _put(dv_ptr, dvb, dvh, dvl, b, h, keys, inside, dv, D)
    _put(dq_ptr, dqb, dqh, dqt, b, h, rows, live, dq, D)


def _heads_last(batch: int, length: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """An empty (batch, heads, length, dim) tensor laid out as (batch, length, heads, dim), as the projections lay out
    queries, keys and values: the reshape back to (batch, length, width) is a view."""
    return like.new_empty(batch, length, heads, dim).transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, p: float, softmax_scale: float) -> torch.Tensor:
        (batch, heads, queries, dim), keys = q.shape, k.shape[2]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = _heads_last(batch, queries, heads, dim, q)
        lse = torch.empty(batch, heads, queries, device=q.device, dtype=torch.float32)
        seed = _seed(q.device)
        ctx.launch = dict(ROWS=max(16, triton.next_power_of_2(queries)), KEYS=KEY_BLOCK, D=dim, DROPOUT=p > 0,
                          PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=CROSS_WARPS)  # fmt: skip
        ctx.sizes = (heads, queries, keys, softmax_scale, p, 1 / (1 - p))
        _cross_attention_forward[(batch * heads,)](q, k, v, bias, out, lse, seed, *_strides(q), *_strides(k),
                                                    *_strides(v), *_strides(out), *ctx.sizes, **ctx.launch)  # fmt: skip
        ctx.save_for_backward(q, k, v, bias, out, lse, seed)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, bias, out, lse, seed = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        (batch, heads, queries, dim), keys = q.shape, k.shape[2]
        # In the projections' layout, so that their backward reads them as they are.
        dq = _heads_last(batch, queries, heads, dim, q)
        dk, dv = _heads_last(batch, keys, heads, dim, k), _heads_last(batch, keys, heads, dim, v)
        _cross_attention_backward[(batch * heads,)](q, k, v, bias, out, dout, lse, seed, dq, dk, dv, *_strides(q),
                                                     *_strides(k), *_strides(v), *_strides(out), *_strides(dout),
                                                     *_strides(dq), *_strides(dk), *_strides(dv), *ctx.sizes,
                                                     **ctx.launch)  # fmt: skip
        return dq, dk, dv, None, None, None


def key_bias(mask: torch.Tensor | None, batch: int, keys: int, device: torch.device) -> torch.Tensor | None:
    """The additive bias (batch, keys) in fp32 of a key-padding mask as the decoder hands its cross-attention (bool,
    True where attended, or additive floats; (batch, 1, 1, keys), or expanded over the queries), None when the mask is
    of another form (materialised per query: transformers' eager attention builds those)."""
    if mask is None:
        return torch.zeros(batch, keys, device=device)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != keys or (mask.shape[2] != 1 and mask.stride(2)):
        return None
    rows = mask[:, 0, 0, :].expand(batch, keys)
    if rows.dtype == torch.bool:
        return torch.zeros(batch, keys, device=mask.device).masked_fill_(~rows, float("-inf"))
    return rows.float().contiguous() if rows.is_floating_point() else None


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p: float,
                    softmax_scale: float) -> torch.Tensor:  # fmt: skip
    """Attention of queries (batch, heads, T, dim) over keys and values (batch, heads, L, dim), training mode: softmax
    of the scaled products plus `bias` (batch, L), dropout p on the probabilities; the output (batch, heads, T, dim),
    laid out as (batch, T, heads, dim). T up to 64, dim 16 to 128 a power of two."""
    return _CrossAttention.apply(q, k, v, bias, p, softmax_scale)


class BartAttention(modeling_bart.BartAttention):
    """transformers' BART attention as the decoder's cross-attention (`encoder_attn`), training on the kernel above:
    the same weights and name. Evaluation, generation's cache, self-attention, attention weights asked for, and
    shapes or masks the kernel does not take run transformers' forward."""

    def forward(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 names it cache
        weights = kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False)
        usable = (self.training and key_value_states is not None and cache is None and not args and not weights
                  and hidden_states.dim() == 3 and hidden_states.shape[1] <= QUERY_ROWS_MAX and self.dropout < 1
                  and hidden_states.shape[:2].numel() * self.num_heads * key_value_states.shape[1] < 2**31)  # fmt: skip
        if not usable:
            return super().forward(hidden_states, key_value_states, *args, **kwargs)
        (batch, queries, width), keys = hidden_states.shape, key_value_states.shape[1]
        mask = kwargs.get("attention_mask")
        bias = key_bias(mask, batch, keys, hidden_states.device)
        if bias is None:
            _declined(mask.dim(), mask.dtype)
            return super().forward(hidden_states, key_value_states, *args, **kwargs)
        q = self.q_proj(hidden_states).view(batch, queries, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(key_value_states).view(batch, keys, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(key_value_states).view(batch, keys, -1, self.head_dim).transpose(1, 2)
        out = cross_attention(q, k, v, bias, self.dropout, self.scaling)
        return self.out_proj(out.transpose(1, 2).reshape(batch, queries, width)), None


@functools.cache
def _declined(dims: int, dtype: torch.dtype) -> None:
    """Say once for each kind of mask that the kernel left the step to transformers' attention (eager attention
    materialises the mask for every query, for one)."""
    log.info("cross-attention: a %d-D %s mask the kernel does not take (not a key-padding mask); transformers' "
             "attention runs", dims, dtype)  # fmt: skip


def fuse_cross_attention(model: torch.nn.Module) -> int:
    """Turn the BART decoder layers' cross-attentions in `model` whose heads the kernel takes (16 to 128 wide, a power
    of two) into the `BartAttention` above, in place; how many were turned."""
    fused = 0
    for name, module in model.named_modules():
        head = getattr(module, "head_dim", 0)
        if (type(module) is modeling_bart.BartAttention and name.endswith("encoder_attn")
                and head in (16, 32, 64, 128)):  # fmt: skip
            module.__class__ = BartAttention
            fused += 1
    return fused


def fuse_text_encoder(model: torch.nn.Module) -> int:
    """Turn the BART encoder layers in `model` that the kernels fit (exact GELU, a width that is a multiple of 8) into
    the `BartEncoderLayer` above, in place; how many were turned."""
    fused = 0
    for module in model.modules():
        if (type(module) is modeling_bart.BartEncoderLayer and module.embed_dim % GROUP_SIZE == 0
                and module.self_attn.config.activation_function == "gelu"):  # fmt: skip
            module.__class__ = BartEncoderLayer
            fused += 1
    return fused
