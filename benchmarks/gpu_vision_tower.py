"""Vision-tower throughput on the GPU: Florence-2-base's DaViT (depths 1,1,9,1, 90.4M parameters, 768x768 pages)
as the vision-feature cache build and the pixel paths run it (`florence_ops.vision.encoder.tower_encoder`).

Variants: eager or with the repeated blocks compiled (static shapes), under bf16 autocast or as a bf16 copy of the tower
(what the cache build runs), at the batch sizes given; `--compile cache-build` runs the bf16 copy eager, with its
repeated blocks compiled and with every patch embedding and block compiled (what `model.vision_compile` did until
2026-12-03). Every variant starts from uint8 pages on the GPU (normalised inside, as in the pipeline). Correctness:
each variant's output on fresh random pages is compared with the fp32 eager tower (relative error ||out - ref|| /
||ref||, and the largest difference over the output's range). Timing: CUDA events around each call after warm-up
(compilation included in the warm-up and reported separately), median of `--repeats`.

    PYTHONPATH=. python benchmarks/gpu_vision_tower.py [--batches 128 256] [--out reports/benchmarks]

Writes <out>/vision_tower_<device-slug>.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.base_models import build_reference_model, build_reference_processor  # noqa: E402
from florence_ops.precision import autocast_dtype  # noqa: E402
from florence_ops.vision import encoder  # noqa: E402
from florence_ops.vision.encoder import tower_encoder  # noqa: E402
from florence_ops.vision.sources import PixelSource  # noqa: E402


def compile_all(tower: torch.nn.Module) -> torch.nn.Module:
    """Every patch embedding and every block compiled (eight graphs): what `model.vision_compile` did until
    2026-12-03. The single blocks join the repeated ones `encoder.compile_regions` compiles."""
    from accelerate.utils import compile_regions as compile_list

    tower = encoder.compile_regions(tower)
    tower.convs = compile_list(tower.convs, dynamic=False)
    tower.blocks = torch.nn.ModuleList(compile_list(s, dynamic=False) if len(s) == 1 else s for s in tower.blocks)
    return tower


# the variants' compilation: False eager, "repeated" what model.vision_compile compiles, "all" every region
COMPILE = {False: encoder.compile_regions, "repeated": encoder.compile_regions, "all": compile_all}
NAMES = {False: "eager", "repeated": "repeated", "all": "compiled"}  # as in vision_tower_*.cache-build.json


TOWER_GFLOP = 369.0  # one 768x768 page through Florence-2-base's tower (torch.utils.flop_counter, issue figure)


class DevicePages(PixelSource):
    """uint8 pages already on the device: `load` indexes them, `prepare` normalises as the pipeline does."""

    def __init__(self, pages: torch.Tensor, image_processor):
        super().__init__({}, image_processor)
        self.pages = pages

    def load(self, image_ids):
        return self.pages[: len(image_ids)]


def time_calls(encode, pages: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median milliseconds of `repeats` later calls); host clock synchronised on the CPU."""
    cuda = pages.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    encode(pages)
    sync()
    first = time.perf_counter() - t0
    for _ in range(2 if cuda else 0):
        encode(pages)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            encode(pages)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            encode(pages)
            times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times)


def print_kernels(encode, pages: torch.Tensor, rows: int = 15) -> None:
    """The kernels that take the most CUDA time in two calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            encode(pages)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference" / "florence-2-base-ft"))
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", choices=["both", "no", "yes", "cache-build"], default="both")
    parser.add_argument("--check-pages", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the last variant")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    processor = build_reference_processor(args.reference)
    cpu_tower = build_reference_model("base-shape", args.reference, processor, seed=0).model.vision_tower.eval()
    image_processor = processor.image_processor
    gen = torch.Generator().manual_seed(0)

    check_pages = torch.randint(0, 256, (args.check_pages, 768, 768, 3), generator=gen, dtype=torch.uint8).to(device)
    reference_tower = copy.deepcopy(cpu_tower).to(device)
    check_source = DevicePages(check_pages, image_processor)
    with torch.no_grad():
        reference = reference_tower(check_source.prepare(check_pages, device)).last_hidden_state.float()
    del reference_tower

    results = []
    if args.compile == "cache-build":  # the cache build's bf16 copy: eager, the repeated blocks compiled, all compiled
        variants = [(False, True), ("repeated", True), ("all", True)]
    else:
        compiles = {"both": (False, "repeated"), "no": (False,), "yes": ("repeated",)}[args.compile]
        variants = [(compiled, cast) for compiled in compiles for cast in (False, True)]
    for compiled, cast in variants:
        tower = copy.deepcopy(cpu_tower).to(device)
        with mock.patch.object(encoder, "compile_regions", COMPILE[compiled]):  # tower_encoder compiles when built
            encode = tower_encoder(tower, check_source, device, autocast_dtype("auto", device), bool(compiled), cast)
        name = f"{NAMES[compiled]}_{'bf16_weights' if cast else 'autocast'}"
        out = encode(check_pages).float()
        error = ((out - reference).norm() / reference.norm()).item()
        spread = ((out - reference).abs().max() / (reference.max() - reference.min())).item()
        for batch in args.batches:
            pages = torch.randint(0, 256, (batch, 768, 768, 3), generator=gen, dtype=torch.uint8).to(device)
            first, median_ms = time_calls(encode, pages, args.repeats)
            rate = batch / (median_ms / 1e3)
            results.append({
                "variant": name, "batch": batch, "pages_per_s": round(rate, 1),
                "call_ms_median": round(median_ms, 2), "first_call_s": round(first, 2),
                "tflops": round(rate * TOWER_GFLOP / 1e3, 1),
                "relative_error_vs_fp32": round(error, 5), "max_diff_over_range": round(spread, 5),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            })  # fmt: skip
            print(results[-1], flush=True)
            if args.profile and pages.is_cuda and (compiled, cast) == variants[-1] and batch == args.batches[-1]:
                print_kernels(encode, pages)
            del pages
        del tower, encode
        torch.compiler.reset()  # the next variant compiles its own graphs (the code objects are shared)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    slug = name.lower().replace(" ", "-")
    report = {
        "benchmark": "vision_tower",
        "device": name,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "model": "Florence-2-base vision tower (DaViT depths 1,1,9,1, 90.4M parameters), random weights, 768x768",
        "conditions": "uint8 pages on the GPU, normalised in the call; CUDA-event timing, median",
        "results": results,
    }
    write_json(Path(args.out, f"vision_tower_{slug}.json"), report)
    print(f"{'variant':<26}{'batch':>6}{'pages/s':>10}{'first s':>9}{'rel err':>10}")
    for r in results:
        print(f"{r['variant']:<26}{r['batch']:>6}{r['pages_per_s']:>10.1f}{r['first_call_s']:>9.1f}"
              f"{r['relative_error_vs_fp32']:>10.5f}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
