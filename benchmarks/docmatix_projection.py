"""Project one epoch of Docmatix-size training (9.5M questions on 2.4M pages) on 1, 8 and 16 H200s from the rates
measured on one H200, for Florence-2-base and -large shapes: with the vision-feature cache, and with the frozen tower
run inside the step (`train.vision_cache: false`) on the whole split or streamed by row groups (`train.streaming`).

Nothing is measured here: the inputs are one-GPU rates (base: `reports/benchmarks/pipeline_nvidia-h200.run7.json` and
`vision_in_step_nvidia-h200.json`; large: the large-shape run on one H200 that benchmarks/README.md reports), and the
assumptions are written into the JSON.

The tower in the step costs a cached step plus, per question, the pages its micro-batch encodes, at the cache build's
rate (the same compiled bf16 tower): `1 / rate = 1 / cached rate + pages per question / cache pages/s`. How many pages
a micro-batch encodes depends on the data, not only on the GPU: on the whole split of Docmatix a shuffled batch of 512
questions asks about ~512 distinct pages of 2.4M (1 page per question), while a streamed micro-batch is drawn from a
window of 256 pages (~1,000 questions) and asks about ~240 (calls of 64 pages: 0.5 a question), as in the measured
run. The formula is checked against the measured base rates (`model_check` in the JSON).

    python benchmarks/docmatix_projection.py [--out reports/benchmarks]

Writes <out>/docmatix_projection.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCMATIX = {"questions": 9_500_000, "pages": 2_400_000, "epochs": 1}
GPUS = (1, 8, 16)
GPUS_PER_NODE = 8  # an H200 node; 16 GPUs are two nodes
SCALING = 0.9  # throughput per GPU when several train together, relative to one alone (assumed, not measured)
# Bytes per page of cached features: the tower's last hidden state, 24 x 24 tokens of the last stage's width, bf16.
FEATURE_WIDTH = {"base": 1024, "large": 2048}
LARGE = {"vision_cache_pages_per_s": 257.5, "train_samples_per_s": 383.0,
         "source": "large-shape run on one H200 (benchmarks/README.md)"}  # fmt: skip
MICRO_BATCH, PAGES_PER_CALL = 512, 64  # one H200's micro-batch (README "One GPU"); tower calls in the step
WINDOW_PAGES = 16 * 16  # florence_ops.data.streaming.WINDOW row groups of 16 pages


def pages_per_question(pages: int, questions: int, micro_batch: int = MICRO_BATCH) -> float:
    """Pages the tower encodes per question when a micro-batch is `micro_batch` questions drawn at random from
    `questions` about `pages` pages (distinct pages, padded to whole calls of `PAGES_PER_CALL`)."""
    per_page = questions / pages
    distinct = pages * (1 - (1 - min(1.0, micro_batch / questions)) ** per_page)
    return math.ceil(distinct / PAGES_PER_CALL) * PAGES_PER_CALL / micro_batch


STREAMED_PAGES_PER_QUESTION = pages_per_question(WINDOW_PAGES, 4 * WINDOW_PAGES)  # a window's ~4 questions a page


def in_step_rate(train_rate: float, cache_rate: float, pages_per_q: float) -> float:
    """Samples/s with the tower in the step: a cached step plus `pages_per_q` pages through the tower per question."""
    return 1 / (1 / train_rate + pages_per_q / cache_rate)


def one_gpu_rates(pipeline: Path, in_step: Path) -> dict:
    """The measured one-H200 rates of each shape, and base's tower-in-the-step rates that `vision_in_step.py`
    measured (`in_step`), with the formula's figures for the same run beside them."""
    base = json.loads(pipeline.read_text())["rates"]
    rates = {
        "base": {"vision_cache_pages_per_s": base["vision_cache_pages_per_s"],
                 "train_samples_per_s": base["train_samples_per_s"], "source": str(pipeline.relative_to(REPO))},
        "large": dict(LARGE),
    }  # fmt: skip
    if in_step.exists():
        run = json.loads(in_step.read_text())
        pages, questions = run["scale"]["pages"], run["scale"]["data.synthetic.train_documents"] * 4
        cached, cache_rate = run["train_cached"]["samples_per_s"], base["vision_cache_pages_per_s"]
        rates["base"]["measured_in_step"] = {
            "source": str(in_step.relative_to(REPO)), "pages": pages, "questions": questions,
            "train_cached": cached,
            "tower_in_step": run["train_tower_in_step"]["samples_per_s"],
            "streaming": run["train_streaming"]["samples_per_s"],
            "model_check": {
                "tower_in_step": round(in_step_rate(cached, cache_rate, pages_per_question(pages, questions)), 1),
                "streaming": round(in_step_rate(cached, cache_rate, STREAMED_PAGES_PER_QUESTION), 1),
            },
        }  # fmt: skip
    return rates


def aggregate(rate: float, gpus: int) -> float:
    """Throughput of `gpus` GPUs at `rate` each, `SCALING` per GPU once there are several."""
    return rate * gpus * (SCALING if gpus > 1 else 1.0)


def project(rates: dict, shape: str, gpus: int) -> dict:
    """Hours of one epoch on `gpus` GPUs, with the cache and with the tower in the step."""
    nodes = -(-gpus // GPUS_PER_NODE)
    per_node = gpus // nodes
    cache_rate, train_rate = rates["vision_cache_pages_per_s"], rates["train_samples_per_s"]
    # Each node builds its own whole copy with its own GPUs (its processes read any page).
    cache_s = DOCMATIX["pages"] / aggregate(cache_rate, per_node)
    train_s = DOCMATIX["questions"] * DOCMATIX["epochs"] / aggregate(train_rate, gpus)
    paths = {}
    for name, pages_per_q in (
        ("tower_in_step", pages_per_question(DOCMATIX["pages"], DOCMATIX["questions"])),
        ("streaming", STREAMED_PAGES_PER_QUESTION),
    ):
        rate = in_step_rate(train_rate, cache_rate, pages_per_q)
        hours = DOCMATIX["questions"] * DOCMATIX["epochs"] / aggregate(rate, gpus) / 3600
        paths[name] = {"pages_per_question": round(pages_per_q, 3), "samples_per_s_per_gpu": round(rate, 1),
                       "train_hours": round(hours, 2), "cache_tib_per_node": 0.0}  # fmt: skip
    cache_bytes = DOCMATIX["pages"] * FEATURE_WIDTH[shape] * 24 * 24 * 2
    return {
        "gpus": gpus, "nodes": nodes, "gpus_per_node": per_node,
        "cached": {"cache_build_hours": round(cache_s / 3600, 2), "train_hours": round(train_s / 3600, 2),
                   "total_hours": round((cache_s + train_s) / 3600, 2),
                   "cache_tib_per_node": round(cache_bytes / 2**40, 2)},
        **paths,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports/benchmarks")
    parser.add_argument("--pipeline", type=Path, default=REPO / "reports/benchmarks/pipeline_nvidia-h200.run7.json")
    parser.add_argument("--in-step", type=Path, default=REPO / "reports/benchmarks/vision_in_step_nvidia-h200.json")
    args = parser.parse_args()
    rates = one_gpu_rates(args.pipeline.resolve(), args.in_step.resolve())
    result = {
        "workload": DOCMATIX,
        "one_gpu_rates": rates,
        "assumptions": {
            "scaling_per_gpu": SCALING,
            "scaling_note": "throughput of N GPUs = N x one GPU's x 0.9 for N > 1: assumed, not measured",
            "gpus_per_node": GPUS_PER_NODE,
            "cache": "every node builds a whole copy of the cache with its own GPUs, on its own disk",
            "tower_in_step": "1 / rate = 1 / cached rate + pages per question / cache build rate (module doc); "
            "whole split: 1 page per question at Docmatix's size; streaming: windows of 256 pages, as measured",
            "excluded": "download, preprocess, validation, checkpoints, start-up and compile time",
            "cache_bytes_per_page": "24 x 24 tokens x the last stage's width (base 1024, large 2048) x 2 (bf16)",
        },
        "projection": {shape: [project(rates[shape], shape, gpus) for gpus in GPUS] for shape in ("base", "large")},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "docmatix_projection.json").write_text(json.dumps(result, indent=2) + "\n")
    print("shape  GPUs  cache h  train h  total h  cache TiB/node  in-step h  streaming h")
    for shape, rows in result["projection"].items():
        for row in rows:
            cached = row["cached"]
            print(f"{shape:6} {row['gpus']:4} {cached['cache_build_hours']:8} {cached['train_hours']:8} "
                  f"{cached['total_hours']:8} {cached['cache_tib_per_node']:15} "
                  f"{row['tower_in_step']['train_hours']:10} {row['streaming']['train_hours']:12}")  # fmt: skip


if __name__ == "__main__":
    main()
