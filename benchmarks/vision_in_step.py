"""One GPU at Florence-2-base's shape: the vision cache's build rate with one process, and training samples/s with the
cache against the frozen tower run inside the step (`train.vision_cache: false`, for features larger than a disk),
reading the split whole and streaming it by row groups (`train.streaming: true`, for data larger than a disk).

Runs the real stages (`florence-ops download`, `preprocess`, then `train` three times) in a scratch copy of the
repository with the one-GPU profile of `pipeline_gpu.py` (`model.name: base-shape`, built from the reference files:
random weights, timing only), on synthetic pages; the in-step runs call the tower on 64 pages at a time. Rates come
from the stages' own logs (the cache build's pages/s after its first batch) and DVCLive (the median of
train/samples_per_s over all steps, each run's compile included in its first steps only).

    PYTHONPATH=. python benchmarks/vision_in_step.py --reference ../shared/reference/florence-2-base-ft \\
        [--train-documents 3800 --epochs 1] [--out reports/benchmarks]
    PYTHONPATH=. python benchmarks/vision_in_step.py --tiny --device cpu --train-documents 16 --epochs 1   # smoke test

Writes <out>/vision_in_step_<device-slug>.json and prints the rates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline_gpu import GPU_PROFILE, PATTERNS, _versions, workspace  # noqa: E402

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.config import apply_overrides, read_yaml  # noqa: E402

TINY = {"model.name": "tiny", "model.vision_compile": False, "model.vision_batch_size": 8, "batch_size": 16,
        "train.num_workers": 0, "evaluate.num_workers": 0}  # fmt: skip
METRICS = "reports/train/plots/metrics/train"
IN_STEP = {"train.vision_cache": False, "model.vision_batch_size": 64}  # README "Data larger than a disk"


def stage(root: Path, name: str, env: dict) -> tuple[float, str]:
    """`florence-ops <name>` in `root`: its wall seconds and its output."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "florence_ops.cli", name], cwd=root, env=env, capture_output=True,
                          text=True)  # fmt: skip
    output = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"florence-ops {name} failed ({done.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - start, output


def train_rates(root: Path) -> dict:
    """Samples/s (median over steps) and peak GPU memory of the last train run, from DVCLive's files."""
    rows = (root / METRICS / "samples_per_s.tsv").read_text().splitlines()[1:]
    rates = [float(line.split("\t")[1]) for line in rows]
    peak = root / METRICS / "peak_gpu_mem_gib.tsv"
    peaks = [float(line.split("\t")[1]) for line in peak.read_text().splitlines()[1:]] if peak.exists() else []
    return {"samples_per_s": round(statistics.median(rates), 1), "steps": len(rates),
            "peak_gpu_mem_gib": round(max(peaks), 1) if peaks else None}  # fmt: skip


def set_params(root: Path, overrides: dict) -> None:
    params = read_yaml(root / "params.yaml")
    apply_overrides(params, overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference" / "florence-2-base-ft"))
    parser.add_argument("--train-documents", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the toy model (smoke test)")
    parser.add_argument("--workdir", default="/tmp/florence-ops-vision-in-step")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.workdir, os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    scale = {"data.synthetic.train_documents": args.train_documents, "data.synthetic.validation_documents": 8,
             "data.synthetic.test_documents": 0, "epochs": args.epochs, "train.eval_every_epoch": False,
             "train.checkpoint_every": 100_000}  # fmt: skip
    root = workspace(Path(args.workdir), Path(args.reference), {**GPU_PROFILE, **scale, **(TINY if args.tiny else {})})
    walls = {name: round(stage(root, name, env)[0], 1) for name in ("download", "preprocess")}
    walls["train_cached"], output = stage(root, "train", env)
    found = re.search(PATTERNS["vision_cache"], output)
    if found is None:
        raise RuntimeError(f"no vision cache build in the train stage's output:\n{output[-3000:]}")
    pages, _, _, warm_s, pages_per_s = map(float, found.groups()[:5])
    cached = train_rates(root)
    for folder in ("models/train", "reports/train", "checkpoints"):
        shutil.rmtree(root / folder, ignore_errors=True)
    set_params(root, IN_STEP if not args.tiny else {"train.vision_cache": False})
    walls["train_tower_in_step"], _ = stage(root, "train", env)
    in_step = train_rates(root)
    for folder in ("models/train", "reports/train", "checkpoints"):
        shutil.rmtree(root / folder, ignore_errors=True)
    set_params(root, {"train.streaming": True})
    walls["train_streaming"], _ = stage(root, "train", env)
    streamed = train_rates(root)
    device = _device_name(args.device, env)
    report = {
        "benchmark": "vision_in_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "model": "tiny" if args.tiny else "base-shape",
        "versions": _versions(),
        "scale": {**scale, "pages": int(pages)},
        "params": json.loads(json.dumps(read_yaml(root / "params.yaml")["train"])),
        "vision_cache_build": {"processes": 1, "pages_per_s": pages_per_s, "warmup_seconds": warm_s},
        "train_cached": cached,
        "train_tower_in_step": in_step,
        "train_streaming": streamed,
        "tower_in_step_over_cached": round(in_step["samples_per_s"] / cached["samples_per_s"], 3),
        "streaming_over_cached": round(streamed["samples_per_s"] / cached["samples_per_s"], 3),
        "stage_walls_seconds": {k: round(v, 1) for k, v in walls.items()},
    }
    slug = device.lower().replace(" ", "-")
    write_json(Path(args.out, f"vision_in_step_{slug}.json"), report)
    shown = ("device", "vision_cache_build", "train_cached", "train_tower_in_step", "train_streaming",
             "tower_in_step_over_cached", "streaming_over_cached")  # fmt: skip
    print(json.dumps({k: report[k] for k in shown}, indent=1))
    return report


def _device_name(device: str, env: dict) -> str:
    if device == "cpu":
        return "cpu"
    probe = "import torch; print(torch.cuda.get_device_name(0))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


if __name__ == "__main__":
    main()
