"""Serving load: sustained throughput and latency of `florence-ops serve` under closed-loop clients (1, 8 and 64 by
default), against the engine's batched ceiling and against answering one request at a time.

- **engine_batched**: in this process, the model alone: `Answerer.answer` on repeated batches of
  `serve.max_batch_size` questions (cycling over the question set), pages decoded and resized beforehand, for at
  least `--ceiling-s` (default a quarter of `--duration-s`) after a warm-up: what the server's workers could reach at
  most, without HTTP, queues or page decoding;
- **one_at_a_time** (skipped with `--skip-one-at-a-time`): each question answered alone (batch 1), page decoding and
  resizing included, as a server without batching would answer;
- **server_c{N}** for each N of `--clients`: `florence-ops serve` in a subprocess, N clients each sending its next
  request as soon as the last is answered (closed loop), over keep-alive HTTP, the page as a base64 PNG data URL,
  looping over the question set for `--warmup-s` (not counted) and then `--duration-s` (measured). Counted: the
  requests answered (200) within the measured window; throughput is their number over the window's length, latency
  their percentiles, `mean_batch_size` the mean of their `X-Batch-Size` header, `server_timing_ms` the mean and p95
  of each part of their `Server-Timing` header (prepare, queue, batch, pages, between), `cpu_busy` the share of the
  machine's cores busy over the window (all processes: server and clients). `failures` counts every request of the
  level that got another status or a connection error, warm-up and the end of the window included.

Questions are DocVQA-shaped: synthetic pages (about 930x1340 pixels, 4 questions each) sent as PNG, resized by the
server to the model's input size. Any model directory in the Hugging Face layout works (`--model`); a random-weight
model answers with `max_new_tokens` tokens, the worst case. Needs torch, transformers, pillow, pyyaml, numpy, tqdm
and the server's packages (litserve, fastapi, starlette, uvicorn, pydantic); neither datasets nor openai.

    PYTHONPATH=. python benchmarks/serve_load.py --model models/export --duration-s 60 --clients 1 8 64

Writes reports/benchmarks/serve_<device-slug>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import datetime
import gc
import http.client
import io
import itertools
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.base_models import build_reference_model, build_reference_processor  # noqa: E402
from florence_ops.config import load_params, to_dict  # noqa: E402
from florence_ops.data.synthetic import generate_split  # noqa: E402
from florence_ops.modeling import save_processor  # noqa: E402
from florence_ops.params_file import parse_value  # noqa: E402
from florence_ops.serving.answering import default_device, load_answerer  # noqa: E402
from florence_ops.serving.pages import model_page, page_id  # noqa: E402

START_TIMEOUT_S = 300
SERVE_KEYS = ("max_batch_size", "batch_timeout_s", "workers_per_device", "api_servers")
RECONNECT_PAUSE_S = 0.1  # after a connection error, so that a dead server is not hammered in a tight loop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="model directory in the Hugging Face layout")
    model.add_argument("--reference", metavar="DIR",
                       help="the real checkpoint's files (e.g. ../shared/reference/florence-2-base-ft): serve a model "
                            "of its shape with random weights (`--shape`), saved to a temporary folder")  # fmt: skip
    parser.add_argument("--shape", default="base-shape", choices=("base-shape", "large-shape"),
                        help="with --reference: Florence-2-base's shape or -large's")  # fmt: skip
    parser.add_argument("--questions", type=int, default=256, help="distinct questions the clients loop over")
    parser.add_argument("--duration-s", type=float, default=60.0, help="measured seconds per client level")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds before each measurement, not counted")
    parser.add_argument("--ceiling-s", type=float, help="seconds of the engine ceiling (default duration-s / 4)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="concurrency levels")
    parser.add_argument("--baseline-questions", type=int, default=64, help="questions answered one at a time")
    parser.add_argument("--skip-one-at-a-time", action="store_true", help="leave out the one-at-a-time baseline")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file (serve section)")
    parser.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="override a serve setting for this run, e.g. --set serve.max_batch_size=128")  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "reports/benchmarks"), help="folder of the JSON result")
    return parser.parse_args(argv)


def save_reference_model(reference: Path, shape: str, folder: Path) -> str:
    """A model of `shape` built from the real checkpoint's files, random weights (seed 0), saved with its processor
    to `folder`."""
    processor = build_reference_processor(reference)
    build_reference_model(shape, reference, processor, seed=0).save_pretrained(folder)
    save_processor(processor, folder)
    return str(folder)


def make_questions(n: int) -> list[dict]:
    """`n` questions about n/4 synthetic pages: question text, PNG bytes of the page and the request body."""
    questions = []
    for record in generate_split("validation", (n + 3) // 4, seed=1234, questions_per_document=4):
        buffer = io.BytesIO()
        record["image"].save(buffer, format="PNG")
        png = buffer.getvalue()
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        content = [{"type": "text", "text": record["question"]}, {"type": "image_url", "image_url": {"url": url}}]
        body = json.dumps({"model": "florence-ops", "messages": [{"role": "user", "content": content}]}).encode()
        questions.append({"question": record["question"], "png": png, "body": body})
    return questions[:n]


def nearest_rank(ordered: list[float], q: float) -> float | None:
    """The `q` quantile (nearest rank) of sorted values; None when there are none."""
    return ordered[round(q * (len(ordered) - 1))] if ordered else None


def summary(latencies: list[float], seconds: float, **extra) -> dict:
    """Questions per second over `seconds`, and latency percentiles (nearest rank) in milliseconds."""
    ordered = sorted(latencies)

    def percentile(q: float) -> float | None:
        value = nearest_rank(ordered, q)
        return None if value is None else round(1000 * value, 1)

    return {
        "questions": len(latencies),
        "seconds": round(seconds, 3),
        "questions_per_s": round(len(latencies) / seconds, 2),
        "p50_ms": percentile(0.5),
        "p95_ms": percentile(0.95),
        "p99_ms": percentile(0.99),
        **extra,
    }


def measure_engine(args: argparse.Namespace, params, questions: list[dict], device: torch.device) -> dict:
    """The engine's figures in this process: the model's shape, one at a time (unless skipped), the batched ceiling."""
    answerer = load_answerer(args.model, params, batch_size=1, device=device)
    result = {"model_shape": {
        "parameters": sum(p.numel() for p in answerer.model.parameters()),
        "image_size": list(answerer.input_size),
        "num_beams": answerer.decoding.num_beams,
        "max_new_tokens": answerer.decoding.max_new_tokens,
    }}  # fmt: skip
    if not args.skip_one_at_a_time:
        result["one_at_a_time"] = one_at_a_time(answerer, params, questions[: args.baseline_questions], device)
    ceiling_s = args.ceiling_s if args.ceiling_s is not None else args.duration_s / 4
    result["engine_batched"] = engine_batched(answerer, params, questions[: args.questions], device, args.warmup_s,
                                              ceiling_s)  # fmt: skip
    answerer.model = None  # free the weights before the server loads its copy
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def one_at_a_time(answerer, params, questions: list[dict], device: torch.device) -> dict:
    """Each question alone through the engine: decode and resize its page, then `answer` with batch 1."""

    def run(item: dict) -> str:
        image = model_page(item["png"], answerer.input_size, params.serve.max_image_pixels)
        image_id = page_id(item["png"])
        return answerer.answer([{"question": item["question"], "image_id": image_id}], {image_id: image})[0]

    for item in questions[:2]:  # warm-up: kernels, allocator
        run(item)
    latencies, start = [], time.perf_counter()
    for item in questions:
        begin = time.perf_counter()
        run(item)
        _sync(device)
        latencies.append(time.perf_counter() - begin)
    return summary(latencies, time.perf_counter() - start)


def engine_batched(answerer, params, questions: list[dict], device: torch.device, warmup_s: float,
                   ceiling_s: float) -> dict:  # fmt: skip
    """The model's ceiling: batches of `serve.max_batch_size` questions (cycling over `questions`) through `answer`
    for `warmup_s` (at least one batch, not counted) and then at least `ceiling_s`, pages decoded and resized
    beforehand (no HTTP, no queues, no page decoding): what the server's workers could reach at most."""
    size = params.serve.max_batch_size
    answerer.decoding = dataclasses.replace(answerer.decoding, batch_size=size)
    images = {page_id(item["png"]): model_page(item["png"], answerer.input_size, params.serve.max_image_pixels)
              for item in questions}  # fmt: skip
    rows = [{"question": item["question"], "image_id": page_id(item["png"])} for item in questions]
    batches = (
        [rows[(start + i) % len(rows)] for i in range(size)] for start in itertools.count(0, size)
    )  # every batch full, the question set repeated as often as needed

    def run_for(seconds: float) -> tuple[int, float]:
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            answerer.answer(next(batches), images)
            _sync(device)
            count += 1
        return count, time.perf_counter() - start

    run_for(warmup_s)
    count, seconds = run_for(ceiling_s)
    return {"questions": count * size, "batch_size": size, "batches": count, "warmup_s": warmup_s,
            "seconds": round(seconds, 3), "questions_per_s": round(count * size / seconds, 2)}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_server(args: argparse.Namespace, params_file: Path, port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "florence_ops.cli", "serve", "--params", str(params_file), "--model", args.model,
               "--port", str(port)]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keeps carried wheels' site
    env = {**os.environ, "PYTHONPATH": path, "FLORENCE_OPS_API_TOKEN": ""}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}; see {log_path}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(1)
    stop_server(process)
    raise RuntimeError(f"server not ready in {START_TIMEOUT_S} s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, from /proc/stat; None where there is none."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return sum(fields) - idle, sum(fields)


def timing_summary(timings: list[dict[str, float]]) -> dict:
    """Mean and p95 (nearest rank) of each part of the answers' Server-Timing headers, in milliseconds."""
    parts = {}
    for name in dict.fromkeys(name for timing in timings for name in timing):
        values = sorted(timing[name] for timing in timings if name in timing)
        parts[name] = {"mean": round(statistics.fmean(values), 1), "p95": nearest_rank(values, 0.95)}
    return parts


def parse_server_timing(header: str | None) -> dict[str, float]:
    """{name: milliseconds} of a `Server-Timing` header such as `prepare;dur=3.1, queue;dur=0.4`."""
    timing = {}
    for part in (header or "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            timing[name] = float(duration)
    return timing


def load(port: int, questions: list[dict], clients: int, warmup_s: float, duration_s: float) -> dict:
    """`clients` closed-loop clients loop over `questions` for `warmup_s` and then `duration_s`: the requests answered
    within the measured window (latency, the batch they joined, the server's timing) and every failure, whenever it
    happened."""
    answered, failures, lock, order = [], collections.Counter(), threading.Lock(), itertools.count()
    start = time.perf_counter()
    window_start, window_end = start + warmup_s, start + warmup_s + duration_s

    def client() -> None:
        connection = None
        while time.perf_counter() < window_end:
            with lock:
                body = questions[next(order) % len(questions)]["body"]
            connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            begin = time.perf_counter()
            try:
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                connection = None
                with lock:
                    failures[type(error).__name__] += 1
                time.sleep(RECONNECT_PAUSE_S)
                continue
            end = time.perf_counter()
            with lock:
                if response.status != 200:
                    failures[f"HTTP {response.status}"] += 1
                elif window_start <= end <= window_end:
                    answered.append((end - begin, int(response.getheader("X-Batch-Size", "0")),
                                     parse_server_timing(response.getheader("Server-Timing"))))  # fmt: skip
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(window_start - time.perf_counter(), 0))
    cpu_start = cpu_times()
    time.sleep(max(window_end - time.perf_counter(), 0))
    cpu_end = cpu_times()
    for thread in threads:
        thread.join()
    batches = [batch for _, batch, _ in answered]
    busy = None
    if cpu_start and cpu_end and cpu_end[1] > cpu_start[1]:
        busy = round((cpu_end[0] - cpu_start[0]) / (cpu_end[1] - cpu_start[1]), 3)
    return summary([latency for latency, _, _ in answered], duration_s, clients=clients, duration_s=duration_s,
                   warmup_s=warmup_s, failures=sum(failures.values()), failure_kinds=dict(failures),
                   mean_batch_size=round(statistics.fmean(batches), 1) if batches else 0,
                   server_timing_ms=timing_summary([timing for _, _, timing in answered]), cpu_busy=busy)  # fmt: skip


def device_slug(device: torch.device) -> tuple[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    if any(not key.startswith("serve.") for key in overrides):
        raise SystemExit("error: --set takes serve.* keys only")
    if args.duration_s <= 0 or args.warmup_s < 0 or min(args.clients) < 1 or args.questions < 1:
        raise SystemExit("error: --duration-s, --clients and --questions must be positive, --warmup-s not negative")
    params = load_params(args.params, {key: parse_value(value) for key, value in overrides.items()})
    if args.reference:
        folder = Path(tempfile.mkdtemp(prefix="serve-load-model-"))
        args.model = save_reference_model(Path(args.reference), args.shape, folder)
    params_file = Path(tempfile.mkdtemp(prefix="serve-load-")) / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(params)))
    device = default_device()
    slug, name = device_slug(device)
    questions = make_questions(max(args.questions, args.baseline_questions))
    report = {
        "device": name,
        "device_slug": slug,
        "model": f"{args.shape}, random weights" if args.reference else str(Path(args.model).resolve()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg()[0],
        "serve": {key: getattr(params.serve, key) for key in SERVE_KEYS},
        "questions": args.questions,
    }
    report.update(measure_engine(args, params, questions, device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = start_server(args, params_file, port, Path(tempfile.gettempdir()) / f"florence-ops-serve-{slug}.log")
    try:
        for clients in args.clients:
            report[f"server_c{clients}"] = load(port, questions[: args.questions], clients, args.warmup_s,
                                                args.duration_s)  # fmt: skip
    finally:
        stop_server(process)
    ceiling = report["engine_batched"]["questions_per_s"]
    for clients in args.clients:
        level = report[f"server_c{clients}"]
        level["fraction_of_ceiling"] = round(level["questions_per_s"] / ceiling, 3)
    if "one_at_a_time" in report:
        base = report["one_at_a_time"]["questions_per_s"]
        report["speedup_vs_one_at_a_time"] = {f"c{c}": round(report[f"server_c{c}"]["questions_per_s"] / base, 2)
                                              for c in args.clients}  # fmt: skip
    write_json(out / f"serve_{slug}.json", report)
    print_table(report, args.clients)
    return report


def print_table(report: dict, clients: list[int]) -> None:
    settings = ", ".join(f"{key} {value}" for key, value in report["serve"].items())
    engine = report["engine_batched"]
    print(f"\nserve_load on {report['device']} ({settings})")
    print(f"engine ceiling (batches of {engine['batch_size']}, pages decoded beforehand): "
          f"{engine['questions_per_s']} q/s over {engine['seconds']} s ({engine['questions']} questions)")  # fmt: skip
    print(f"{'run':<16}{'q/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'batch':>7}{'ceiling':>9}"
          f"{'x one':>7}{'failed':>8}")  # fmt: skip
    speedups = report.get("speedup_vs_one_at_a_time", {})
    rows = [("one_at_a_time", report["one_at_a_time"], 1, "", 1.0, 0)] if "one_at_a_time" in report else []
    for c in clients:
        row = report[f"server_c{c}"]
        rows.append((f"server_c{c}", row, row["mean_batch_size"], row["fraction_of_ceiling"], speedups.get(f"c{c}", ""),
                     row["failures"]))  # fmt: skip
    for name, row, batch, fraction, speedup, failed in rows:
        print(f"{name:<16}{row['questions_per_s']:>9}{row['p50_ms']!s:>9}{row['p95_ms']!s:>9}{row['p99_ms']!s:>9}"
              f"{batch:>7}{fraction:>9}{speedup:>7}{failed:>8}")  # fmt: skip
    print(f"server levels: {report[f'server_c{clients[0]}']['warmup_s']} s warm-up, then "
          f"{report[f'server_c{clients[0]}']['duration_s']} s measured each")  # fmt: skip
    for c in clients:
        row = report[f"server_c{c}"]
        timing = row["server_timing_ms"].items()
        parts = ", ".join(f"{name} {part['mean']} (p95 {part['p95']})" for name, part in timing)
        print(f"server_c{c} Server-Timing ms, mean (p95): {parts or 'none'}; cores busy {row['cpu_busy']}")


if __name__ == "__main__":
    main()
