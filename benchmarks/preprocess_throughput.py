"""CPU throughput and peak memory of the preprocess stage on generated page scans or synthetic pages.

`--source scans` (default) generates N distinct RGB JPEG "scans" (200 at 2000x2500: text-like blocks, scanner noise)
and writes them as a raw split; `--source synthetic` renders N synthetic pages (PNG, 600-1000 px wide) with the
download stage's own `materialize_raw` in `--workers` processes and reports its pages/s too. Then
`florence_ops.stages.preprocess.preprocess` runs in a child process; the script reports images/s, the CPU time per
image of the stage's main process and of its workers (robust on a shared machine, and what a projection to more cores
needs: with C cores the stage cannot beat C / (main + worker CPU) nor 1 / main CPU), the peak RSS of the main process
and of its largest worker, a single-core breakdown per image, and machine info.

    python benchmarks/preprocess_throughput.py [--source scans|synthetic] [--images 200] [--workers 0] [--size 768]

Writes reports/benchmarks/preprocess_cpu.json, or preprocess_synthetic_cpu.json for synthetic pages (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL
import psutil
import pyarrow
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.config import DataConfig, SyntheticData, load_params  # noqa: E402 - after the path fix
from florence_ops.data import images  # noqa: E402
from florence_ops.data.parallel import worker_count  # noqa: E402
from florence_ops.data.raw import PAGES_FILE, RawWriter  # noqa: E402
from florence_ops.data.sources import materialize_raw  # noqa: E402

log = logging.getLogger("preprocess_throughput")


def scan(index: int, width: int, height: int) -> bytes:
    """A distinct page scan: paragraphs of dark word boxes on off-white paper with sensor noise, as JPEG q90."""
    rng = np.random.default_rng(index)
    page = Image.new("L", (width, height), 245)
    draw = ImageDraw.Draw(page)
    y = 150
    while y < height - 150:
        x = 150
        while x < width - 250:
            word = int(rng.integers(30, 160))
            draw.rectangle((x, y, x + word, y + 22), fill=int(rng.integers(10, 60)))
            x += word + 18
        y += int(rng.choice([40, 40, 40, 90]))
    noise = rng.normal(0, 6, (height, width)).astype(np.float32)
    gray = np.clip(np.asarray(page, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    rgb = np.stack([gray, gray, np.clip(gray.astype(np.int16) - 4, 0, 255).astype(np.uint8)], axis=-1)  # paper tint
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_raw(raw_dir: Path, n: int, width: int, height: int) -> int:
    """Write n generated scans as raw/train.parquet (and an empty validation split); return total JPEG bytes."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    with RawWriter(raw_dir) as writer:
        writer.open_split("validation")
        for index in range(n):
            data = scan(index, width, height)
            total += len(data)
            writer.add("train", {"questionId": str(index), "question": "What is the total?", "question_types": ["form"],
                                 "image": {"bytes": data, "path": None}, "docId": index, "ucsf_document_id": str(index),
                                 "ucsf_document_page_no": "1", "answers": ["42"]})  # fmt: skip
    return total


def write_synthetic(raw_dir: Path, n: int, workers: int) -> dict[str, float]:
    """Render n synthetic pages (one of them in validation) as the download stage does; time it."""
    spec = SyntheticData(train_documents=n - 1, validation_documents=1, test_documents=0)
    with cpu_clock() as clock:
        materialize_raw(DataConfig(synthetic=spec, num_workers=workers), seed=1234, raw_dir=raw_dir)
    return {"input_bytes": (raw_dir / PAGES_FILE).stat().st_size, **clock.per_item(n)}


class cpu_clock(contextlib.AbstractContextManager):  # noqa: N801 - used as a context manager, like a function
    """Wall time and CPU time of this process and of its reaped children over a block."""

    def __enter__(self) -> cpu_clock:
        self._start = (time.perf_counter(), *_cpu_seconds())
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = (time.perf_counter(), *_cpu_seconds())
        self.wall, self.main_cpu, self.worker_cpu = (b - a for a, b in zip(self._start, end, strict=True))

    def per_item(self, n: int) -> dict[str, float]:
        """Seconds, items/s and CPU milliseconds per item (main process, workers)."""
        return {"seconds": self.wall, "per_second": n / self.wall,
                "main_cpu_ms": 1000 * self.main_cpu / n, "worker_cpu_ms": 1000 * self.worker_cpu / n}  # fmt: skip


def _cpu_seconds() -> tuple[float, float]:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def breakdown(raw_dir: Path, size: int, samples: int = 5) -> dict[str, float]:
    """Milliseconds per image of decode+orient+convert, resize and PNG encode, on one core."""
    import pyarrow.parquet as pq

    rows = pq.read_table(raw_dir / PAGES_FILE).slice(0, samples).column("image").to_pylist()
    times = {"decode_ms": 0.0, "resize_and_png_ms": 0.0}
    for row in rows:
        start = time.perf_counter()
        image = images.decode_image(row["bytes"], 10**9)
        middle = time.perf_counter()
        images.encode_model_image(image, (size, size))
        times["decode_ms"] += (middle - start) * 1000 / len(rows)
        times["resize_and_png_ms"] += (time.perf_counter() - middle) * 1000 / len(rows)
    return {key: round(value, 1) for key, value in times.items()}


def run_stage(workdir: Path, workers: int) -> dict:
    """The child process: run preprocess over workdir and report its time, CPU time and peak memory."""
    from florence_ops.stages.preprocess import preprocess

    overrides = {f"paths.{key}": str(workdir / key) for key in ("raw", "processed", "base_model", "reports")}
    params = load_params(REPO / "params.yaml", {**overrides, "data.num_workers": workers})
    baseline = _status_mib("VmRSS")  # interpreter and imports, before any data
    sampler = PssSampler()
    sampler.start()
    with cpu_clock() as clock:
        summary = preprocess(params)
    sampler.stop.set()
    sampler.join()
    clock.main_cpu -= sampler.cpu_seconds
    return {
        **clock.per_item(summary["n_images"]),
        "n_ok": summary["n_ok"],
        "rss_after_imports_mib": baseline,
        "peak_rss_main_mib": _status_mib("VmHWM"),
        "peak_rss_largest_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "peak_pss_total_mib": sampler.peak_mib,
    }


def _status_mib(key: str) -> float:
    """A field of /proc/self/status in MiB (VmHWM is reset by exec, unlike ru_maxrss, which keeps the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PssSampler(threading.Thread):
    """Samples the proportional set size of this process plus its workers: shared pages are counted once.

    Reading smaps costs CPU time of this process: `cpu_seconds` is the sampler's own, to leave out of the stage's.
    """

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_mib, self.stop, self.cpu_seconds = interval, 0.0, threading.Event(), 0.0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(self.interval):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker that just exited
                    total += process.memory_full_info().pss
            self.peak_mib = max(self.peak_mib, total / 2**20)
            self.cpu_seconds = time.thread_time()


def machine() -> dict:
    """Where the numbers were taken."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": model or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(pages / 2**30, 1),
        "load_average_1m": os.getloadavg()[0],  # other work on the machine slows the run
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _child(*args: str) -> str:
    """Run this script with `args` in a fresh interpreter and return its standard output."""
    return subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout


def generate(workdir: Path, args: argparse.Namespace) -> dict:
    """The child process: write the raw pages and the base model's image size; report what was written."""
    if args.source == "synthetic":
        written = write_synthetic(workdir / "raw", args.images, args.workers)
    else:
        written = {"input_bytes": write_raw(workdir / "raw", args.images, args.width, args.height)}
    (workdir / "base_model").mkdir()
    config = {"size": {"height": args.size, "width": args.size}}
    (workdir / "base_model" / "preprocessor_config.json").write_text(json.dumps(config))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["scans", "synthetic"], default="scans")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=2000, help="scan width (scans only)")
    parser.add_argument("--height", type=int, default=2500, help="scan height (scans only)")
    parser.add_argument("--size", type=int, default=768, help="model input side (Florence-2 base/large: 768)")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: one per core)")
    parser.add_argument("--out", type=Path, help="default: reports/benchmarks/preprocess[_synthetic]_cpu.json")
    parser.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)  # child processes, each starting
    parser.add_argument("--stage-only", type=Path, help=argparse.SUPPRESS)  # small so memory peaks are their own
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.generate_only:
        print(json.dumps(generate(args.generate_only, args)))
        return
    if args.stage_only:
        print(json.dumps(run_stage(args.stage_only, args.workers)))
        return
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        options = [
            f"--{key}={getattr(args, key)}" for key in ("source", "images", "width", "height", "size", "workers")
        ]
        written = json.loads(_child("--generate-only", tmp, *options))
        log.info("generated %d %s pages: %s", args.images, args.source, written)
        stage = json.loads(_child("--stage-only", tmp, f"--workers={args.workers}"))
        per_image = breakdown(Path(tmp) / "raw", args.size)
    out = (
        args.out
        or REPO / "reports/benchmarks" / f"preprocess{'_synthetic' if args.source == 'synthetic' else ''}_cpu.json"
    )
    write_json(out, summarize(args, written, stage, per_image))


def summarize(args: argparse.Namespace, written: dict, stage: dict, per_image: dict) -> dict:
    """The JSON written: inputs, stage throughput, CPU per image, memory peaks, per-image breakdown, machine."""
    result = {
        "benchmark": "preprocess_throughput",
        "source": args.source,
        "images": args.images,
        "scan_size": [args.width, args.height] if args.source == "scans" else None,
        "model_size": [args.size, args.size],
        "mean_input_kib": round(written["input_bytes"] / args.images / 1024, 1),
        "workers": worker_count(args.workers),
        "seconds": round(stage["seconds"], 2),
        "images_per_second": round(stage["per_second"], 2),
        "main_cpu_ms_per_image": round(stage["main_cpu_ms"], 1),
        "worker_cpu_ms_per_image": round(stage["worker_cpu_ms"], 1),
        "rss_after_imports_mib": round(stage["rss_after_imports_mib"], 1),
        "peak_rss_main_mib": round(stage["peak_rss_main_mib"], 1),
        "peak_rss_largest_worker_mib": round(stage["peak_rss_largest_worker_mib"], 1),
        "peak_pss_total_mib": round(stage["peak_pss_total_mib"], 1),
        "single_core_per_image": per_image,
        "machine": machine(),
    }
    if args.source == "synthetic":
        result["download"] = {key: round(value, 2) for key, value in written.items() if key != "input_bytes"}
    log.info("%s", json.dumps(result))
    return result


if __name__ == "__main__":
    main()
