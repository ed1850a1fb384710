"""The whole pipeline at scale on one GPU: the real `dvc repro`, one stage at a time, with the GPU profile.

Copies the repository's tracked files to a scratch workspace, writes params.yaml with the GPU profile (below) and the
chosen scale, then runs `dvc repro --single-item <stage>` for download, preprocess, train, evaluate and export,
timing each. Rates come from the stages' own logs (rendering, preprocessing, the vision-cache build), DVCLive
(training samples/s, the median over all steps) and the stage walls (evaluation: questions answered, before and after
passes counted, per second of the evaluate stage's wall time). The projection to DocVQA's size adds the measured
per-stage fixed costs to the work at the measured rates; its formula is in the JSON.

    PYTHONPATH=. python benchmarks/pipeline_gpu.py --reference ../shared/reference/florence-2-base-ft \\
        [--train-documents 2500 --validation-documents 1286 --epochs 2] [--out reports/benchmarks]

Writes <out>/pipeline_<device-slug>.json and prints a table; `--profile large` runs Florence-2-large's shape with its
settings (`PROFILES`) and writes <out>/pipeline_large_<device-slug>.json. Needs dvc (and the project's dependencies)
importable.
"""

from __future__ import annotations

import argparse
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

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.params_file import apply_overrides, parse_value, read_yaml  # noqa: E402

STAGES = ("download", "preprocess", "train", "evaluate", "export")
# What a user with one GPU sets in params.yaml (README: "One GPU"); the scale keys come from the command line.
GPU_PROFILE = {
    "model.name": "base-shape",  # or a hub checkpoint, e.g. florence-community/Florence-2-base-ft
    "model.vision_batch_size": 256,
    "model.vision_compile": False,  # the cache is built off the critical path, where the eager tower keeps up
    "batch_size": 512,  # an H200 (141 GB); 256 on 80 GB GPUs (README: "One GPU")
    "lr": 1e-4,
    "train.num_workers": 12,
    "train.max_eval_questions": 512,
    "train.checkpoint_every": 1000,
    "train.precision": "bf16-pure",  # the step on a bf16 copy of the fp32 weights: 14% faster than autocast
    "evaluate.batch_size": 512,
    "evaluate.num_workers": 8,
    "data.num_workers": 0,
    "data.encode_pages": True,  # the vision cache built by preprocess, on the GPU while its workers normalise pages
}
# Florence-2-large's shape on the same GPU (README: "One GPU"): its tower's 2048-channel features take 2.4 MB a page
# in GPU memory (27 GiB for DocVQA's 11,480 pages), and batch 128 peaks at 58-66 GiB with them.
PROFILES = {
    "base": GPU_PROFILE,
    "large": {
        **GPU_PROFILE,
        "model.name": "large-shape",
        "batch_size": 128,
        "model.vision_batch_size": 128,
        "evaluate.batch_size": 256,
        "model.vision_compile": True,  # as large 5 measured it: the cache built by the train stage, compiled
        "data.encode_pages": False,
    },  # fmt: skip
}
DOCVQA = {"train_pages": 10194, "validation_pages": 1286, "train_questions": 39463, "validation_questions": 5349,
          "epochs": 7}  # fmt: skip
PATTERNS = {
    "synthetic": r"rendered (\d+) synthetic pages in ([\d.]+) s",
    "preprocess": r"with \d+ workers in ([\d.]+) s \(([\d.]+) pages/s\)",
    "vision_cache": r"vision cache built: (\d+) images in ([\d.]+) s \(first batch of (\d+), compile and warm-up: "
    r"([\d.]+) s; then ([\d.]+) pages/s, ([\d.]+) s of it waiting for pages and ([\d.]+) s for the writer"
    r"(?:, the device busy ([\d.]+) s of it)?; closing ([\d.]+) s\)",
    "normalised": r"normalised (\d+) pages in ([\d.]+) s",
    "cache_ready": r"vision cache build ready ([\d.]+) s after the first page .*?"
    r"(?:, (\d+) pages handed over by then)?$",
    "cache_wait": r"waited ([\d.]+) s for the vision cache",
    "cache_opened": r"vision cache of (\d+) pages opened and verified in ([\d.]+) s",
    "validation": r"validation ANLS [\d.]+ \(best [\d.]+\) on (\d+) questions in ([\d.]+) s",
    "stage": r"stage (\w+) finished in ([\d.]+) s",
    "save": r"(?:checkpoint of step \d+|model) saved (?:to \S+ )?in ([\d.]+) s",
}


def workspace(root: Path, reference: Path, overrides: dict) -> Path:
    """A scratch copy of the repository's tracked files, its own git repository, with `overrides` in params.yaml."""
    if root.exists():
        shutil.rmtree(root)
    files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and not _ignored(p)]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(reference, root / "reference")
    params = read_yaml(root / "params.yaml")  # YAML 1.2 floats, as the stages read them
    apply_overrides(params, {**overrides, "model.reference_files": "reference"})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    (bin_dir / "florence-ops").write_text(f'#!/bin/sh\nexec {sys.executable} -m florence_ops.cli "$@"\n')
    (bin_dir / "florence-ops").chmod(0o755)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark"]):
        subprocess.run(command, cwd=root, check=True, env={**os.environ, **GIT_IDENTITY})
    return root


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "bench",
                "GIT_COMMITTER_EMAIL": "b@x"}  # fmt: skip


def _ignored(path: Path) -> bool:
    parts = path.relative_to(REPO).parts
    skipped = {".git", ".whl", ".reference", ".devrun", ".cache", "checkpoints", "data", "models", ".ruff_cache"}
    return parts[0] in skipped or "__pycache__" in parts or parts[0].endswith(".egg-info")


def run_stage(root: Path, stage: str, log_dir: Path, force: bool = False, log_name: str | None = None
              ) -> tuple[float, str]:  # fmt: skip
    """`dvc repro --single-item <stage>` (with `--force`: even if unchanged): its wall seconds and its output."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PATH": f"{root / '.bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path}
    start = time.perf_counter()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    (log_dir / f"{log_name or stage}.log").write_text(output)
    if done.returncode:
        raise RuntimeError(f"dvc repro {stage} failed ({done.returncode}):\n{output[-3000:]}")
    return seconds, output


def stage_times(seconds: float, output: str) -> dict:
    """A stage's wall seconds under `dvc repro` and the seconds its own process logged."""
    found = re.search(PATTERNS["stage"], output)
    return {"seconds": round(seconds, 1), "stage_process_seconds": float(found.group(2)) if found else None}


def size_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30 if path.exists() else 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference" / "florence-2-base-ft"))
    parser.add_argument("--train-documents", type=int, default=2500)
    parser.add_argument("--validation-documents", type=int, default=1286)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/florence-ops-pipeline")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    parser.add_argument("--profile", choices=list(PROFILES), default="base", help="base or large shape's settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a profile value")
    parser.add_argument("--warm", action="store_true", help="then run the train stage again on this machine, its "
                        "vision cache and checkpoints removed: what new data costs once torch's compile caches are "
                        "warm")  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    scale = {"data.synthetic.train_documents": args.train_documents,
             "data.synthetic.validation_documents": args.validation_documents,
             "data.synthetic.test_documents": 0, "epochs": args.epochs}  # fmt: skip
    extra = {key: parse_value(value) for key, _, value in (pair.partition("=") for pair in args.set)}
    profile = PROFILES[args.profile]
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    compile_cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    compile_cache_before = any((compile_cache / "fxgraph").glob("*"))  # compiled graphs (importing makes the folder)
    root = workspace(Path(args.workdir), Path(args.reference), {**profile, **scale, **extra})
    log_dir = Path(args.out) / "pipeline_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stages, outputs = {}, {}
    for stage in STAGES:
        seconds, outputs[stage] = run_stage(root, stage, log_dir)
        stages[stage] = stage_times(seconds, outputs[stage])
        print(f"{stage}: {seconds:.1f} s", flush=True)
    args.overrides = extra
    report = summarise(root, stages, outputs, args, torch)
    report["compile_cache_existed_at_start"] = compile_cache_before
    slug = report["device"].lower().replace(" ", "-")
    name = "pipeline" if args.profile == "base" else f"pipeline_{args.profile}"
    path = Path(args.out, f"{name}_{slug}.json")
    write_json(path, report)
    print_table(report)
    if args.warm:
        report["warm"] = warm_train(root, stages, outputs, args, torch, log_dir)
        write_json(path, report)
        print("warm:", report["warm"])
    return report


def warm_train(root: Path, stages: dict, outputs: dict, args, torch, log_dir: Path) -> dict:
    """The stages that build the vision cache again (`dvc repro --force`: train, and preprocess when it builds the
    cache), the cache and checkpoints removed first, so that the cache is rebuilt as new data would: torch's compile
    caches (inductor's FX graphs, AOTAutograd; on by default, under the machine's temporary directory) are now warm,
    as are the OS's file cache, Triton's cache and the workspace's bytecode. The projection's other terms are the
    first run's."""
    paths = read_yaml(root / "params.yaml")["paths"]
    shutil.rmtree(root / paths["vision_cache"], ignore_errors=True)
    shutil.rmtree(root / paths["checkpoints"], ignore_errors=True)
    again_stages = ("preprocess", "train") if re.search(PATTERNS["vision_cache"], outputs["preprocess"]) else ("train",)
    warm_stages, warm_outputs = dict(stages), dict(outputs)
    for stage in again_stages:
        seconds, warm_outputs[stage] = run_stage(root, stage, log_dir, force=True, log_name=f"{stage}_warm")
        warm_stages[stage] = stage_times(seconds, warm_outputs[stage])
    again = summarise(root, warm_stages, warm_outputs, args, torch)
    return {
        "what": f"{' and '.join(again_stages)} run again on the same machine with the vision cache and checkpoints "
        "removed (new data on a machine that has compiled once); projection: this run's terms of those stages, the "
        "first run's others",
        "stages": {stage: warm_stages[stage] for stage in again_stages},
        "vision_cache_warmup_seconds": again["rates"]["vision_cache_warmup_seconds"],
        "train_samples_per_s": again["rates"]["train_samples_per_s"],
        "docvqa_7_epochs_seconds": again["projection"]["docvqa_7_epochs_seconds"],
        "terms_seconds": again["projection"]["terms_seconds"],
    }


def saves_per_epoch(train_log: str) -> list[float]:
    """The seconds that each epoch's saves (best model, checkpoint) held training, from the train log: an epoch's
    saves end with its checkpoint."""
    epochs, seconds = [], 0.0
    for save in re.finditer(PATTERNS["save"], train_log):
        seconds += float(save.group(1))
        if save.group(0).startswith("checkpoint"):
            epochs.append(seconds)
            seconds = 0.0
    return epochs


def once_then_each(per_epoch: list[float], epochs: int) -> float:
    """An epoch-end cost over `epochs` epochs from the measured ones: the first epoch's (which pays one-time costs:
    pinned buffers for the saves, the first generation's start-up) once, the mean of the later ones for the rest."""
    later = per_epoch[1:] or per_epoch
    return per_epoch[0] + (epochs - 1) * statistics.mean(later) if per_epoch else 0.0


def summarise(root: Path, stages: dict, outputs: dict, args, torch) -> dict:
    """Rates, sizes and the DocVQA projection from the stage logs, DVCLive and the stage walls."""
    pages, synthetic_s = map(float, re.search(PATTERNS["synthetic"], outputs["download"]).groups())
    pre_s, pre_rate = map(float, re.search(PATTERNS["preprocess"], outputs["preprocess"]).groups())
    in_preprocess = re.search(PATTERNS["vision_cache"], outputs["preprocess"])  # data.encode_pages
    cache = in_preprocess or re.search(PATTERNS["vision_cache"], outputs["train"])
    cache_pages, cache_s, warm_pages, warm_s, cache_rate, wait_pages, wait_writer = map(float, cache.groups()[:7])
    device_busy, closing_s = cache.group(8) and float(cache.group(8)), float(cache.group(9))
    if cache_pages == warm_pages:  # one batch only: no steady rate to tell apart
        cache_rate = cache_pages / cache_s
    gpu_rate = (cache_pages - warm_pages) / device_busy if device_busy else cache_rate  # the device's own rate
    validations = [tuple(map(float, m)) for m in re.findall(PATTERNS["validation"], outputs["train"])]
    tsv = (root / "reports/train/plots/metrics/train/samples_per_s.tsv").read_text().splitlines()[1:]
    step_rates = [float(line.split("\t")[1]) for line in tsv]
    samples_per_s = statistics.median(step_rates)
    params = read_yaml(root / "params.yaml")  # the profile with the command line's --set overrides
    batch, eval_questions = int(params["batch_size"]), params["train"]["max_eval_questions"]
    peak = root / "reports/train/plots/metrics/train/peak_gpu_mem_gib.tsv"
    peak_gib = max(float(line.split("\t")[1]) for line in peak.read_text().splitlines()[1:]) if peak.exists() else None
    metrics = json.loads((root / "reports/metrics.json").read_text())
    answered = 2 * metrics["n_questions"]
    evaluate_rate = answered / stages["evaluate"]["seconds"]
    validation_rate = sum(q for q, _ in validations) / max(sum(s for _, s in validations), 0.05)  # logged to 0.1 s
    summary = json.loads((root / "models/train/summary.json").read_text())
    train_questions = json.loads((root / "reports/data_quality.json").read_text())["n_ok_by_split"]["train"]
    steps_s = train_questions * args.epochs / samples_per_s
    saves = saves_per_epoch(outputs["train"])
    saves_s = sum(saves)
    d = DOCVQA
    pages_all = d["train_pages"] + d["validation_pages"]
    if in_preprocess:  # preprocess encoded the pages as its workers normalised them; train opened the cache
        normalised, normalise_s = map(float, re.search(PATTERNS["normalised"], outputs["preprocess"]).groups())
        waited = float(re.search(PATTERNS["cache_wait"], outputs["preprocess"]).group(1))
        opened_s = float(re.search(PATTERNS["cache_opened"], outputs["train"]).group(2))
        batch_pages = int(params["model"]["vision_batch_size"])
        found = re.search(PATTERNS["cache_ready"], outputs["preprocess"], re.MULTILINE)
        ready, before_ready = float(found.group(1)), int(found.group(2) or normalised)  # the tower loading, in a thread
        gpu_s = ready + warm_s + (pages_all - warm_pages) / gpu_rate
        if before_ready < normalised:  # loading the tower (imports: the GIL) slows the workers' feed once, not a page
            normalise_all = ready + (pages_all - before_ready) * (normalise_s - ready) / (normalised - before_ready)
        else:
            normalise_all = pages_all * normalise_s / normalised
        overlapped = max(normalise_all + batch_pages / gpu_rate, gpu_s)
        preprocess_s = (overlapped + closing_s * pages_all / cache_pages + pre_s - normalise_s - waited
                        + stages["preprocess"]["seconds"] - pre_s)  # fmt: skip
        cache_term, train_cache_s = opened_s * pages_all / cache_pages, opened_s
    else:
        preprocess_s = pages_all / pre_rate + stages["preprocess"]["seconds"] - pre_s
        cache_term = warm_s + pages_all / cache_rate + closing_s * pages_all / cache_pages
        train_cache_s = cache_s
    train_fixed = stages["train"]["seconds"] - train_cache_s - steps_s - sum(s for _, s in validations) - saves_s
    terms = {
        "preprocess": preprocess_s,
        "vision_cache": cache_term,
        "train_steps": d["train_questions"] * d["epochs"] / samples_per_s,
        "validation": once_then_each(
            [seconds * eval_questions / questions for questions, seconds in validations],
            d["epochs"],
        ),
        "train_saves": once_then_each(saves, d["epochs"]),
        "train_fixed": train_fixed,
        "evaluate": 2 * d["validation_questions"] / evaluate_rate,
    }
    earlier = {  # the formula until 2026-12-03: every epoch's end as the measured epochs' mean
        "validation": d["epochs"] * eval_questions / validation_rate,
        "train_saves": d["epochs"] * saves_s / args.epochs,
    }
    return {
        "benchmark": "pipeline",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_cores": os.cpu_count(),
        "versions": _versions(),
        "python_bytecode": _bytecode(torch),
        "scale": {
            "train_pages": args.train_documents,
            "validation_pages": args.validation_documents,
            "questions_per_page": 4,
            "epochs": args.epochs,
            "synthetic_pages": int(pages),
            "vision_cache_pages": int(cache_pages),
            "evaluated_questions": metrics["n_questions"],
        },
        "profile": args.profile,
        "params": {**PROFILES[args.profile], "model.reference_files": "the real checkpoint's files", **args.overrides},
        "stages": stages,
        "rates": {
            "synthetic_pages_per_s": round(pages / synthetic_s, 1),
            "preprocess_pages_per_s": round(pre_rate, 1),
            "vision_cache_pages_per_s": round(cache_rate, 1),
            "vision_cache_warmup_seconds": round(warm_s, 1),
            "vision_cache_pages_per_s_including_warmup": round(cache_pages / cache_s, 1),
            "vision_cache_seconds_waiting_for_pages": wait_pages,
            "vision_cache_seconds_waiting_for_writer": wait_writer,
            "vision_cache_closing_seconds": closing_s,
            "vision_cache_gpu_pages_per_s": round(gpu_rate, 1),
            "vision_cache_built_in": "preprocess" if in_preprocess else "train",
            "train_samples_per_s": round(samples_per_s, 1),
            "train_first_step_seconds": round(batch / step_rates[0], 2),
            "train_peak_gpu_memory_gib": peak_gib and round(peak_gib, 1),
            "validation_questions_per_s": round(validation_rate, 1),
            "evaluate_questions_per_s": round(evaluate_rate, 1),
        },
        "rate_definitions": {
            "synthetic_pages_per_s": "pages / seconds of rendering and writing data/raw (download stage log)",
            "preprocess_pages_per_s": "distinct pages / seconds of the preprocess stage's work (its log)",
            "vision_cache_pages_per_s": "pages after the first batch / seconds after it (the first batch compiles)",
            "vision_cache_gpu_pages_per_s": "pages after the first batch / the device's time encoding them (CUDA "
            "events; waiting for pages overlaps it)",
            "train_samples_per_s": "median over all optimizer steps of DVCLive train/samples_per_s",
            "train_first_step_seconds": "batch_size / the first step's DVCLive train/samples_per_s (on a fresh machine "
            "it includes the driver compiling cuDNN's attention kernels: benchmarks/first_calls.py)",
            "train_peak_gpu_memory_gib": "largest DVCLive train/peak_gpu_mem_gib (torch.cuda.max_memory_allocated)",
            "evaluate_questions_per_s": "2 x questions (before and after passes) / evaluate stage wall (dvc repro)",
        },
        "sizes_gib": {
            name: round(size_gib(root / path), 2)
            for name, path in (
                ("data/raw", "data/raw"),
                ("data/processed", "data/processed"),
                ("models/base", "models/base"),
                ("models/train", "models/train"),
                ("models/export", "models/export"),
                ("vision_cache", ".cache/vision_features"),
                ("dvc_cache", ".dvc/cache"),
            )
        },  # fmt: skip
        "dvc_overhead_seconds": {
            s: round(v["seconds"] - (v["stage_process_seconds"] or 0), 1) for s, v in stages.items()
        },  # fmt: skip
        "metrics": {"anls": metrics["anls"], "anls_before": metrics["before"]["anls"], "train": summary["history"]},
        "projection": {
            "docvqa": DOCVQA,
            "docvqa_7_epochs_seconds": round(sum(terms.values()), 1),
            "terms_seconds": {k: round(v, 1) for k, v in terms.items()},
            "formula": "preprocess = pages / preprocess rate + its fixed cost; vision_cache = warm-up + pages / cache "
            "rate + closing (hashes, index) scaled by pages; with the cache built by preprocess (data.encode_pages), "
            "preprocess = max(normalising + one batch / GPU rate, the build's start (tower loaded) + warm-up + "
            "pages / GPU rate) + closing "
            "scaled by pages + its other work and fixed cost, and vision_cache = train's opening and verifying the "
            "cache, scaled by pages; normalising = the seconds until the build's start (the tower's loading slows "
            "the workers' feed then) + the other pages at the rate after it; train_steps = train questions x 7 / "
            "train rate; "
            "validation and train_saves (best model, checkpoint) = the first epoch's, validation scaled to "
            "max_eval_questions, + 6 x the later epochs' mean (the first pays one-time costs: pinned buffers, the "
            "first generation's start-up; until 2026-12-03 both were 7 x the epochs' mean: earlier_formula_seconds); "
            "train_fixed = measured train wall - cache (build or opening) - steps - validation - saves (start-up, "
            "DVC); evaluate = 2 "
            "x validation questions / evaluate rate (stage wall rate: start-up included)",
            "earlier_formula_seconds": round(sum({**terms, **earlier}.values()), 1),
            "recipe_seconds": 1.9 * 3600,
            "speedup_vs_recipe": round(1.9 * 3600 / sum(terms.values()), 1),
        },
    }


def _versions() -> dict:
    import importlib

    versions = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "dvc"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - a version string is informational
            versions[name] = None
    return versions


def _bytecode(torch) -> dict:
    """Whether Python finds torch's modules compiled (a pip install compiles them; without, every stage's process
    compiles what it imports again) and may write what it compiles."""
    import importlib.util

    return {
        "torch_modules_compiled": Path(importlib.util.cache_from_source(torch.__file__)).exists(),
        "dont_write_bytecode": bool(sys.flags.dont_write_bytecode),
    }


def print_table(report: dict) -> None:
    for stage, row in report["stages"].items():
        print(f"{stage:<12}{row['seconds']:>8.1f} s   (stage process {row['stage_process_seconds']} s)")
    for name, value in report["rates"].items():
        print(f"{name:<44}{value!s:>10}")
    projection = report["projection"]
    print(f"projection, DocVQA 7 epochs: {projection['docvqa_7_epochs_seconds']} s "
          f"({projection['speedup_vs_recipe']}x faster than the recipe's 1.9 h)")  # fmt: skip
    print("terms (s):", projection["terms_seconds"])


if __name__ == "__main__":
    main()
