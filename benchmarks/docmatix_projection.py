"""Project one epoch of Docmatix-size training (9.5M questions on 2.4M pages) on 1, 8 and 16 H200s from the rates
measured on one H200, for Florence-2-base and -large shapes, with the vision-feature cache and with the frozen tower
run inside the step (`train.vision_cache: false`).

Nothing is measured here: the inputs are one-GPU rates (base: `reports/benchmarks/pipeline_nvidia-h200.json`; large:
the large-shape run on one H200 that benchmarks/README.md reports), and the assumptions are written into the JSON.

    python benchmarks/docmatix_projection.py [--out reports/benchmarks]

Writes <out>/docmatix_projection.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
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


def one_gpu_rates(pipeline: Path, in_step: Path) -> dict:
    """The measured one-H200 rates of each shape; base's tower-in-the-step rate too once `vision_in_step.py` has
    measured it (`in_step`)."""
    base = json.loads(pipeline.read_text())["rates"]
    rates = {
        "base": {"vision_cache_pages_per_s": base["vision_cache_pages_per_s"],
                 "train_samples_per_s": base["train_samples_per_s"], "source": str(pipeline.relative_to(REPO))},
        "large": dict(LARGE),
    }  # fmt: skip
    if in_step.exists():
        measured = json.loads(in_step.read_text())["train_tower_in_step"]["samples_per_s"]
        rates["base"].update(tower_in_step_samples_per_s=measured, tower_in_step_source=str(in_step.relative_to(REPO)))
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
    # In the step, each question's page is encoded when it is trained on (shuffled batches rarely share a page):
    # unless measured, per question a cached step plus one page through the tower, at the measured rates.
    in_step_rate = rates.get("tower_in_step_samples_per_s") or 1 / (1 / train_rate + 1 / cache_rate)
    in_step_s = DOCMATIX["questions"] * DOCMATIX["epochs"] / aggregate(in_step_rate, gpus)
    cache_bytes = DOCMATIX["pages"] * FEATURE_WIDTH[shape] * 24 * 24 * 2
    return {
        "gpus": gpus, "nodes": nodes, "gpus_per_node": per_node,
        "cached": {"cache_build_hours": round(cache_s / 3600, 2), "train_hours": round(train_s / 3600, 2),
                   "total_hours": round((cache_s + train_s) / 3600, 2),
                   "cache_tib_per_node": round(cache_bytes / 2**40, 2)},
        "tower_in_step": {"samples_per_s_per_gpu": round(in_step_rate, 1),
                          "measured": "tower_in_step_samples_per_s" in rates,
                          "train_hours": round(in_step_s / 3600, 2), "cache_tib_per_node": 0.0},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports/benchmarks")
    parser.add_argument("--pipeline", type=Path, default=REPO / "reports/benchmarks/pipeline_nvidia-h200.json")
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
            "tower_in_step": "base: measured by benchmarks/vision_in_step.py when its JSON is there (measured: true), "
            "else, and for large, estimated from the two one-GPU rates (a cached step plus one page through the "
            "tower per question)",
            "excluded": "download, preprocess, validation, checkpoints, start-up and compile time",
            "cache_bytes_per_page": "24 x 24 tokens x the last stage's width (base 1024, large 2048) x 2 (bf16)",
        },
        "projection": {shape: [project(rates[shape], shape, gpus) for gpus in GPUS] for shape in ("base", "large")},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "docmatix_projection.json").write_text(json.dumps(result, indent=2) + "\n")
    print("shape  GPUs  cache h  train h  total h  cache TiB/node  tower-in-step h")
    for shape, rows in result["projection"].items():
        for row in rows:
            cached, hours = row["cached"], row["tower_in_step"]["train_hours"]
            print(f"{shape:6} {row['gpus']:4} {cached['cache_build_hours']:8} {cached['train_hours']:8} "
                  f"{cached['total_hours']:8} {cached['cache_tib_per_node']:15} {hours:16}")  # fmt: skip


if __name__ == "__main__":
    main()
