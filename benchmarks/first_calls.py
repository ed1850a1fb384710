"""What a fresh machine pays at the first call of a kernel: cuDNN's attention at the training step's shapes, and the
cache build's tower with and without `cudnn.benchmark`.

Each measurement runs in a new process. The attention runs three times over the same shapes: with an empty CUDA
JIT cache of its own (`CUDA_CACHE_PATH`, a fresh machine), again with that cache filled, and with the cache disabled
(`CUDA_CACHE_DISABLE=1`), which tells the driver's compiling apart from the other first-call work. Every shape is a
forward and backward of scaled dot-product attention, bf16, 12 heads of 64 (Florence-2-base), dropout 0.1, the
(B, 1, Lq, Lk) padding mask transformers builds; each is timed at its first call and again at its second.
The tower is Florence-2-base's (random weights, from `--reference`) as the cache build runs it: a bf16 copy with
`fuse_kernels`, eager, batch 256, four calls, `cudnn.benchmark` on, off, and on again.

    PYTHONPATH=. python benchmarks/first_calls.py --reference <Florence-2-base-ft files> [--out reports/benchmarks]

Writes <out>/first_calls_<device-slug>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, batch, query length, key length, causal): the encoder at lengths of each alignment (599 also after a smaller
# batch, 608 after 600), the decoder's self-attention at two answer lengths, its cross-attention at two
SHAPES = [
    ("encoder 512x596", 512, 596, 596, False),
    ("encoder 512x596 again", 512, 596, 596, False),
    ("encoder 512x597", 512, 597, 597, False),
    ("encoder 512x598", 512, 598, 598, False),
    ("encoder 64x599", 64, 599, 599, False),
    ("encoder 512x599", 512, 599, 599, False),
    ("encoder 512x600", 512, 600, 600, False),
    ("encoder 512x608", 512, 608, 608, False),
    ("decoder self 512x8", 512, 8, 8, True),
    ("decoder self 512x9", 512, 9, 9, True),
    ("cross 512 8x596", 512, 8, 596, False),
    ("cross 512 9x597", 512, 9, 597, False),
]


def seconds(fn) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def attention_calls() -> dict:
    """First and second forward+backward of each shape in `SHAPES`, seconds."""
    import torch
    import torch.nn.functional as F

    seconds(lambda: torch.ones(1, device="cuda"))
    timings = {}
    for name, batch, lq, lk, causal in SHAPES:
        q = torch.randn(batch, 12, lq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(batch, 12, lk, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        real = lk - 3 + torch.arange(batch, device="cuda") % 4  # each row's unpadded length
        mask = (torch.arange(lk, device="cuda")[None] < real[:, None])[:, None, None, :].expand(batch, 1, lq, lk)
        if causal:
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device="cuda").tril()

        def once(q=q, k=k, v=v, mask=mask):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1)
            out.backward(torch.ones_like(out))

        timings[name] = [round(seconds(once), 3), round(seconds(once), 4)]
    return timings


def tower_calls(reference: str, benchmark: bool) -> dict:
    """Four calls of the cache build's tower on 256 pages, `cudnn.benchmark` as given, seconds."""
    import torch

    from florence_ops.base_models import build_reference_model, build_reference_processor
    from florence_ops.vision.encoder import fuse_kernels

    processor = build_reference_processor(reference)
    tower = build_reference_model("base-shape", reference, processor, seed=0).model.vision_tower.eval()
    tower = fuse_kernels(tower.to("cuda", torch.bfloat16))
    pages = torch.randn(256, 3, 768, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=benchmark):
        calls = [round(seconds(lambda: tower(pages)), 3) for _ in range(4)]
    return {"cudnn_benchmark": benchmark, "calls_s": calls, "pages_per_s_last": round(256 / calls[-1], 1)}


def in_new_process(args: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference" / "florence-2-base-ft"))
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    parser.add_argument("--child", choices=["attention", "tower-on", "tower-off"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement in this process, printed for the parent
        if args.child == "attention":
            result = attention_calls()
        else:
            result = tower_calls(args.reference, args.child == "tower-on")
        print(json.dumps(result))
        return result

    import torch

    with tempfile.TemporaryDirectory() as jit_cache:
        runs = {"empty JIT cache": {"CUDA_CACHE_PATH": jit_cache}, "JIT cache filled": {"CUDA_CACHE_PATH": jit_cache},
                "JIT cache disabled": {"CUDA_CACHE_DISABLE": "1"}}  # fmt: skip
        attention = {label: in_new_process(["--child", "attention"], env) for label, env in runs.items()}
        for label, timings in attention.items():
            print(label, json.dumps(timings), flush=True)
        towers = [in_new_process(["--child", child, "--reference", args.reference], {"CUDA_CACHE_PATH": jit_cache})
                  for child in ("tower-on", "tower-off", "tower-on")]  # fmt: skip
    for tower in towers:
        print(json.dumps(tower), flush=True)
    slug = torch.cuda.get_device_name().lower().replace(" ", "-")
    report = {
        "benchmark": "first_calls",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "attention_first_and_second_call_s": attention,
        "attention_shape": "forward+backward, bf16, 12 heads of 64, dropout 0.1, boolean padding mask (B,1,Lq,Lk)",
        "tower_calls": towers,
        "tower": "Florence-2-base's vision tower, bf16 copy with fuse_kernels, eager, 256 pages of 768x768",
    }
    from florence_ops.artifacts import write_json

    write_json(Path(args.out, f"first_calls_{slug}.json"), report)
    return report


if __name__ == "__main__":
    main()
