"""The encoder's attention alone, forward and backward, as the training step runs it: what the padding mask, the
attention dropout and the SDPA backend each cost.

Shapes are Florence-2's encoder in the pipeline's training step: `--batch` sequences of 577 image tokens plus
`--text` question tokens, 12 heads of 64 (base) or 16 of 64 (`--heads 16`, large), bf16. The mask is the one
transformers builds from a right-padded 2-D padding mask (a boolean (B, 1, L, L) tensor); `padding_row` the same
mask as (B, 1, 1, L), which every query broadcasts (what the training step hands SDPA); `key_bias` the same padding
with no mask: queries and keys gain a head column (1 in the query, 0 or -10,000 in the key: an exact key-padding
bias, heads of 64 + 8 for queries and keys), the concatenations timed with the kernel; `packed` the same padding
with no mask either: only each sequence's real tokens, one sequence after another, handed to SDPA as nested tensors
of the jagged layout (what the kernels' variable-length entry points take; the packing itself not timed, a packed
encoder does it once, not per layer); `none` is the same batch with no padding. `--queries N` times cross-attention
instead: N queries (the decoder's answer tokens) against those keys. Backend `matmuls` is attention as two batched
matrix products around a softmax and dropout in bf16 (transformers' eager attention), the rest are SDPA's. Each
variant is timed as the median of `--repeats` forward+backward passes after two warm-up passes.

    python benchmarks/attention_variants.py [--batch 512 --text 19 --heads 12] [--queries 9] [--masks ...]
        [--backends ...] [--out reports/benchmarks]

Writes <out>/attention_variants_<device-slug>.json (`--queries N`: attention_variants_crossN_<device-slug>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from florence_ops.artifacts import write_json  # noqa: E402

IMAGE_TOKENS = 577
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH, "matmuls": "matmuls"}  # fmt: skip


def padding_mask(batch: int, length: int, text: int, device, row: bool = False, queries=None) -> torch.Tensor:
    """A boolean (B, 1, L, L) key-padding mask, or with `row` the (B, 1, 1, L) one every query broadcasts: row b
    keeps its image tokens and its first 13..text text tokens."""
    real = IMAGE_TOKENS + 13 + torch.arange(batch, device=device) % (text - 12)
    keys = torch.arange(length, device=device)[None, :] < real[:, None]
    return keys[:, None, None, :] if row else keys[:, None, None, :].expand(batch, 1, queries or length, length)


def key_bias_columns(q, k, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k with 8 more head columns whose product is 0 for the keys `keep` (B, L) marks and -10,000 for the
    others: the padding mask as a bias inside the product, so the kernel runs without a mask."""
    batch, heads, length, _ = q.shape
    query_columns = torch.zeros(8, dtype=q.dtype, device=q.device)
    query_columns[0] = 1
    key_columns = torch.zeros(batch, 1, length, 8, dtype=k.dtype, device=k.device)
    key_columns[..., 0] = torch.where(keep, 0.0, -10_000.0)[:, None, :]
    q = torch.cat([q, query_columns.expand(batch, heads, length, 8)], dim=-1)
    k = torch.cat([k, key_columns.expand(batch, heads, length, 8)], dim=-1)
    return q, k


def matmul_attention(q, k, v, mask, dropout: float) -> torch.Tensor:
    """Attention as transformers' eager implementation computes it: scores, additive mask, softmax, dropout, product."""
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.dropout(scores.softmax(dim=-1), p=dropout)
    return torch.matmul(weights, v)


def packed(tensors, keep: torch.Tensor) -> list[torch.Tensor]:
    """Each of `tensors` (B, H, L, D) as a jagged nested tensor (B, H, j, D) of each row's real tokens (`keep`,
    (B, L)), all with the same offsets."""
    lengths = keep.sum(1)
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    out = []
    for t in tensors:
        values = t.detach().transpose(1, 2)[keep].requires_grad_()  # (N, H, D): real tokens, one row after another
        nested = torch.nested.nested_tensor_from_jagged(values, offsets, max_seqlen=int(lengths.max()))
        out.append(nested.transpose(1, 2))
    return out


def time_pass(q, k, v, mask, dropout: float, backend, repeats: int, keep=None, packing=None) -> float | None:
    def once():
        if packing is not None:
            out = F.scaled_dot_product_attention(*packing, dropout_p=dropout)
            out.transpose(1, 2).values().backward(grad.transpose(1, 2)[packing_keep])
            return
        if backend == "matmuls":
            out = matmul_attention(q, k, v, mask, dropout)
        elif keep is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            out = F.scaled_dot_product_attention(*key_bias_columns(q, k, keep), v, dropout_p=dropout, scale=0.125)
        out.backward(grad)

    grad = torch.randn_like(q)
    packing_keep = keep
    context = sdpa_kernel([backend]) if isinstance(backend, SDPBackend) else contextlib.nullcontext()
    try:
        with context:
            for _ in range(2):
                once()
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                once()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    except RuntimeError as error:  # the backend does not take this combination
        print(f"  not run: {str(error).splitlines()[0][:120]}", flush=True)
        return None
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--text", type=int, default=19)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--queries", type=int, help="cross-attention: this many queries against the keys")
    parser.add_argument("--masks", nargs="+", default=["padding", "padding_row", "key_bias", "none"],
                        choices=["padding", "padding_row", "key_bias", "packed", "none"])  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    length = IMAGE_TOKENS + args.text
    shape = (args.batch, args.heads, length, 64)
    k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    queries = args.queries or length
    q = torch.randn(args.batch, args.heads, queries, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    flops = 4 * args.batch * args.heads * queries * length * 64 * 3.5  # forward 2 matmuls, backward 2.5x
    results = []
    if args.queries and ("key_bias" in args.masks or "packed" in args.masks):
        parser.error("key_bias and packed are for the encoder's self-attention")
    keep = padding_mask(args.batch, length, args.text, device, row=True)[:, 0, 0, :]
    difference = None
    if "key_bias" in args.masks:
        with torch.no_grad():  # the bias columns give what the mask gives
            masked = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
            biased = F.scaled_dot_product_attention(*key_bias_columns(q, k, keep), v, scale=0.125)
            difference = (masked.float() - biased.float()).abs().max().item()
        print(json.dumps({"key_bias_largest_difference": difference}), flush=True)
    for mask_name in args.masks:
        row = mask_name == "padding_row"
        mask = (
            None
            if mask_name in ("none", "key_bias", "packed")
            else padding_mask(args.batch, length, args.text, device, row, args.queries)
        )
        for dropout in (0.1, 0.0):
            for name, backend in BACKENDS.items():
                if name not in args.backends:
                    continue
                if mask_name == "packed" and name in ("matmuls", "default"):
                    continue
                bias = keep if mask_name in ("key_bias", "packed") else None
                packing = packed((q, k, v), keep) if mask_name == "packed" else None
                seconds = time_pass(q, k, v, mask, dropout, backend, args.repeats, bias, packing)
                row = {"mask": mask_name, "dropout": dropout, "backend": name,
                       "ms": seconds and round(1000 * seconds, 2),
                       "tflops": seconds and round(flops / seconds / 1e12, 1)}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
    slug = torch.cuda.get_device_name().lower().replace(" ", "-")
    report = {"benchmark": "attention_variants", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"batch": args.batch, "heads": args.heads, "length": length, "queries": queries,
                        "head_dim": 64},
              "key_bias_largest_difference": difference, "results": results}  # fmt: skip
    kind = f"_cross{queries}" if args.queries else ""
    write_json(Path(args.out, f"attention_variants{kind}_{slug}.json"), report)
    return report


if __name__ == "__main__":
    main()
