"""The fused Triton kernels alone, forward and backward: PyTorch's own kernels against `florence_ops.kernels`
(`train.fused_kernels`), at the pipeline's shapes.

Each op runs on `--tokens` tokens (the training step's batch of 512 questions x 596 encoder positions by default) of
`--width` (768 for Florence-2-base, 1024 large) and `--ffn` (3072, 4096) in bf16, dropout 0.1 as in the checkpoint:
`gelu_dropout` is the feed-forward's GELU and activation dropout (`dropout(gelu(h))`), `dropout_add_layer_norm` a
residual branch's dropout, the residual add and the layer norm after it, `cross_attention` the decoder's attention of
`--queries` answer tokens over `--keys` encoder positions (`--batch` questions). Every kernel configuration in
`--sweep` (warps for the norm kernels, backward programs a processor; key blocks and warps for the cross-attention) is
timed too; the rate is the median of `--repeats` passes after two warm-up passes, by CUDA events. The bytes each op
must move at least (inputs and outputs once, no mask) over its forward and backward time give `tb_per_s`.

    python benchmarks/fused_kernels.py [--tokens 305152 --width 768 --ffn 3072] [--out reports/benchmarks]

Writes <out>/fused_kernels_<device-slug>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from florence_ops import kernels  # noqa: E402
from florence_ops.artifacts import write_json  # noqa: E402

P = 0.1


def timed(step, repeats: int) -> float:
    """Median milliseconds of `step()` after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_backward(op, inputs: list[torch.Tensor], grad: torch.Tensor):
    def step():
        out = op(*inputs)
        torch.autograd.backward(out, grad)
        for t in inputs:
            t.grad = None

    return step


def measure(name: str, op, inputs, grad, bytes_moved: float, repeats: int, **config) -> dict:
    with torch.no_grad():
        forward = timed(lambda: op(*inputs), repeats)
    both = timed(forward_backward(op, inputs, grad), repeats)
    row = {"op": name, **config, "forward_ms": round(forward, 3), "backward_ms": round(both - forward, 3),
           "total_ms": round(both, 3), "tb_per_s": round(bytes_moved / both / 1e9, 2)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def cross_attention(args, device, dtype) -> list[dict]:
    """The decoder's cross-attention, `--queries` answer tokens against `--keys` encoder positions (the last 20 of a
    quarter of the questions padding), heads of 64: PyTorch's SDPA (cuDNN) with the key-padding mask as the training
    step hands it, against the kernel, over its key blocks and warps with `--sweep`."""
    heads = args.width // 64
    q = torch.randn(args.batch, args.queries, heads, 64, device=device, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(args.batch, args.keys, heads, 64, device=device, dtype=dtype).transpose(1, 2) for _ in "kv")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    mask = torch.ones(args.batch, 1, 1, args.keys, device=device, dtype=torch.bool)
    mask[: args.batch // 4, ..., -20:] = False
    bias = kernels.key_bias(mask, args.batch, args.keys, device)
    grad = torch.randn_like(q)
    element = q.element_size()
    # forward: q, k, v in, the output out; backward: q, k, v, the output and its gradient in, three gradients out
    moved = (6 * q.numel() + 6 * k.numel()) * element  # k's numel is v's too
    results = [measure("cross_attention", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, mask, P), inputs,
                       grad, moved, args.repeats, kernels="pytorch")]  # fmt: skip
    configs = [(kernels.KEY_BLOCK, kernels.CROSS_WARPS)]
    if args.sweep:
        configs += [(keys, w) for keys in (32, 64, 128) for w in (2, 4, 8) if (keys, w) != configs[0]]
    default = configs[0]
    for keys, warps in configs:
        kernels.KEY_BLOCK, kernels.CROSS_WARPS = keys, warps
        results.append(measure("cross_attention", lambda a, b, c: kernels.cross_attention(a, b, c, bias, P, 0.125),
                               inputs, grad, moved, args.repeats, kernels="fused", key_block=keys,
                               warps=warps))  # fmt: skip
    kernels.KEY_BLOCK, kernels.CROSS_WARPS = default
    return results


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512 * 596)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=512, help="cross-attention: questions")
    parser.add_argument("--queries", type=int, default=9, help="cross-attention: answer tokens")
    parser.add_argument("--keys", type=int, default=600, help="cross-attention: encoder positions (padded to 8)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time other warps and backward programs")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)

    def tensor(width: int) -> torch.Tensor:
        return torch.randn(args.tokens, width, device=device, dtype=dtype, requires_grad=True)

    results = []
    h = tensor(args.ffn)
    wide = h.numel() * h.element_size()
    results.append(measure("gelu_dropout", lambda x: F.dropout(F.gelu(x), P), [h], torch.randn_like(h),
                           2 * wide + 3 * wide, args.repeats, kernels="pytorch"))  # fmt: skip
    results.append(measure("gelu_dropout", lambda x: kernels.gelu_dropout(x, P), [h], torch.randn_like(h),
                           2 * wide + 3 * wide, args.repeats, kernels="fused"))  # fmt: skip
    del h

    norm = torch.nn.LayerNorm(args.width, device=device, dtype=dtype)
    x, residual = tensor(args.width), tensor(args.width)
    narrow = x.numel() * x.element_size()
    grad = torch.randn_like(x)
    # forward: x and residual in, the sum and the output out; backward: the gradient and the sum in, two gradients out
    moved = 4 * narrow + 4 * narrow
    results.append(measure("dropout_add_layer_norm", lambda a, b: norm(b + F.dropout(a, P)), [x, residual], grad,
                           moved, args.repeats, kernels="pytorch"))  # fmt: skip
    configs = [(kernels.NORM_WARPS, kernels.BACKWARD_PROGRAMS_PER_PROCESSOR)]
    if args.sweep:
        configs += [(w, b) for w in (1, 2, 4, 8) for b in (2, 4, 8) if (w, b) != configs[0]]
    default = configs[0]
    for warps, programs in configs:
        kernels.NORM_WARPS, kernels.BACKWARD_PROGRAMS_PER_PROCESSOR = warps, programs
        results.append(measure("dropout_add_layer_norm", lambda a, b: kernels.dropout_add_layer_norm(a, b, norm, P),
                               [x, residual], grad, moved, args.repeats, kernels="fused", norm_warps=warps,
                               backward_programs_per_processor=programs))  # fmt: skip
    kernels.NORM_WARPS, kernels.BACKWARD_PROGRAMS_PER_PROCESSOR = default

    del x, residual, grad
    results += cross_attention(args, device, dtype)

    slug = torch.cuda.get_device_name().lower().replace(" ", "-")
    report = {"benchmark": "fused_kernels", "device": slug, "torch": torch.__version__, "tokens": args.tokens,
              "width": args.width, "ffn": args.ffn, "batch": args.batch, "queries": args.queries, "keys": args.keys,
              "dropout": P, "results": results}  # fmt: skip
    write_json(Path(args.out, f"fused_kernels_{slug}.json"), report)
    return results


if __name__ == "__main__":
    main()
