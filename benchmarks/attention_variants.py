"""The encoder's attention alone, forward and backward, as the training step runs it: what the padding mask, the
attention dropout and the SDPA backend each cost.

Shapes are Florence-2's encoder in the pipeline's training step: `--batch` sequences of 577 image tokens plus
`--text` question tokens, 12 heads of 64 (base) or 16 of 64 (`--heads 16`, large), bf16. The mask is the one
transformers builds from a right-padded 2-D padding mask (a boolean (B, 1, L, L) tensor); `padding_row` the same
mask as (B, 1, 1, L), which every query broadcasts (what the training step hands SDPA); `none` is the same batch with
no padding. Each variant is timed as the median of `--repeats` forward+backward passes after two warm-up passes.

    python benchmarks/attention_variants.py [--batch 512 --text 19 --heads 12] [--out reports/benchmarks]

Writes <out>/attention_variants_<device-slug>.json.
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
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip


def padding_mask(batch: int, length: int, text: int, device, row: bool = False) -> torch.Tensor:
    """A boolean (B, 1, L, L) key-padding mask, or with `row` the (B, 1, 1, L) one every query broadcasts: row b
    keeps its image tokens and its first 13..text text tokens."""
    real = IMAGE_TOKENS + 13 + torch.arange(batch, device=device) % (text - 12)
    keys = torch.arange(length, device=device)[None, :] < real[:, None]
    return keys[:, None, None, :] if row else keys[:, None, None, :].expand(batch, 1, length, length)


def time_pass(q, k, v, mask, dropout: float, backend, repeats: int) -> float | None:
    def once():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out.backward(grad)

    grad = torch.randn_like(q)
    context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
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
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    length = IMAGE_TOKENS + args.text
    shape = (args.batch, args.heads, length, 64)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flops = 4 * args.batch * args.heads * length * length * 64 * 3.5  # forward 2 matmuls, backward 2.5x
    results = []
    for mask_name in ("padding", "padding_row", "none"):
        row = mask_name == "padding_row"
        mask = None if mask_name == "none" else padding_mask(args.batch, length, args.text, device, row)
        for dropout in (0.1, 0.0):
            for name, backend in BACKENDS.items():
                seconds = time_pass(q, k, v, mask, dropout, backend, args.repeats)
                row = {"mask": mask_name, "dropout": dropout, "backend": name,
                       "ms": seconds and round(1000 * seconds, 2),
                       "tflops": seconds and round(flops / seconds / 1e12, 1)}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
    slug = torch.cuda.get_device_name().lower().replace(" ", "-")
    report = {"benchmark": "attention_variants", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"batch": args.batch, "heads": args.heads, "length": length, "head_dim": 64},
              "results": results}  # fmt: skip
    write_json(Path(args.out, f"attention_variants_{slug}.json"), report)
    return report


if __name__ == "__main__":
    main()
