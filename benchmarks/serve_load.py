"""Serving load: throughput and latency of `florence-ops serve` under 1, 8 and 64 concurrent clients, against
answering one request at a time.

- **one_at_a_time**: in this process, each question answered alone (`Answerer.answer` on one row, batch 1), page
  decoding and resizing included, as a server without batching would answer;
- **engine_batched** (inside one_at_a_time): the same questions through `answer` in one batch of
  `serve.max_batch_size`, pages decoded beforehand: the model's ceiling, without HTTP, queues or page decoding;
- **server_c{1,8,64}**: `florence-ops serve` in a subprocess, `c` clients each sending its next request as soon as
  the last is answered (closed loop), over keep-alive HTTP, the page as a base64 PNG data URL.

Questions are DocVQA-shaped: synthetic pages (about 930x1340 pixels, 4 questions each) sent as PNG, resized by the
server to the model's input size. Any model directory in the Hugging Face layout works (`--model`); a random-weight
model answers with `max_new_tokens` tokens, the worst case. Needs torch, transformers, pillow, pyyaml, numpy, tqdm
and the server's packages (litserve, fastapi, starlette, uvicorn, pydantic); neither datasets nor openai.

    PYTHONPATH=. python benchmarks/serve_load.py --model models/export --questions 256

Writes reports/benchmarks/serve_<device-slug>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import gc
import http.client
import io
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
from florence_ops.config import load_params, to_dict  # noqa: E402
from florence_ops.data.synthetic import generate_split  # noqa: E402
from florence_ops.params_file import parse_value  # noqa: E402
from florence_ops.serving.answering import default_device, load_answerer  # noqa: E402
from florence_ops.serving.pages import model_page, page_id  # noqa: E402

START_TIMEOUT_S = 300
SERVE_KEYS = ("max_batch_size", "batch_timeout_s", "workers_per_device", "api_servers")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory in the Hugging Face layout")
    parser.add_argument("--questions", type=int, default=256, help="questions per server run (default 256)")
    parser.add_argument("--baseline-questions", type=int, default=64, help="questions answered one at a time")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="concurrency levels")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file (serve section)")
    parser.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="override a serve setting for this run, e.g. --set serve.max_batch_size=128")  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "reports/benchmarks"), help="folder of the JSON result")
    return parser.parse_args(argv)


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


def summary(latencies: list[float], seconds: float, **extra) -> dict:
    """Questions per second over the wall time, and latency percentiles in milliseconds."""
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "questions": len(latencies),
        "seconds": round(seconds, 3),
        "questions_per_s": round(len(latencies) / seconds, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * p95, 1),
        **extra,
    }


def one_at_a_time(model_dir: str, params, questions: list[dict], device: torch.device) -> dict:
    """Each question alone through the engine: decode and resize its page, then `answer` with batch 1."""
    answerer = load_answerer(model_dir, params, batch_size=1, device=device)

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
    result = summary(latencies, time.perf_counter() - start)
    result["model_shape"] = {
        "parameters": sum(p.numel() for p in answerer.model.parameters()),
        "image_size": list(answerer.input_size),
        "num_beams": answerer.decoding.num_beams,
        "max_new_tokens": answerer.decoding.max_new_tokens,
    }
    result["engine_batched"] = engine_batched(answerer, params, questions, device)
    answerer.model = None  # free the weights before the server loads its copy
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def engine_batched(answerer, params, questions: list[dict], device: torch.device) -> dict:
    """The model's ceiling: all questions through `answer` in batches of `serve.max_batch_size`, pages decoded and
    resized beforehand (no HTTP, no queues, no page decoding): what the server's workers could reach at most."""
    answerer.decoding = dataclasses.replace(answerer.decoding, batch_size=params.serve.max_batch_size)
    images = {page_id(item["png"]): model_page(item["png"], answerer.input_size, params.serve.max_image_pixels)
              for item in questions}  # fmt: skip
    rows = [{"question": item["question"], "image_id": page_id(item["png"])} for item in questions]
    answerer.answer(rows[: params.serve.max_batch_size], images)  # warm-up at the full batch size
    _sync(device)
    start = time.perf_counter()
    answerer.answer(rows, images)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"questions": len(rows), "batch_size": params.serve.max_batch_size, "seconds": round(seconds, 3),
            "questions_per_s": round(len(rows) / seconds, 2)}  # fmt: skip


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


def load(port: int, questions: list[dict], clients: int) -> dict:
    """`clients` closed-loop clients answer all `questions`; latency per request and the batches they joined."""
    latencies, batches, errors, lock = [], [], [], threading.Lock()
    pending = iter(range(len(questions)))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            begin = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", questions[index]["body"],
                               {"Content-Type": "application/json"})  # fmt: skip
            response = connection.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - begin
            with lock:
                if response.status != 200:
                    errors.append(f"{response.status}: {body[:200]!r}")
                    continue
                latencies.append(elapsed)
                batches.append(int(response.getheader("X-Batch-Size", "0")))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return summary(latencies, seconds, clients=clients, errors=len(errors),
                   mean_batch_size=round(statistics.fmean(batches), 1) if batches else 0)  # fmt: skip


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
        raise SystemExit("--set takes serve.* keys only")
    params = load_params(args.params, {key: parse_value(value) for key, value in overrides.items()})
    params_file = Path(tempfile.mkdtemp(prefix="serve-load-")) / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(params)))
    device = default_device()
    slug, name = device_slug(device)
    questions = make_questions(max(args.questions, args.baseline_questions))
    report = {
        "device": name,
        "device_slug": slug,
        "model": str(Path(args.model).resolve()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg()[0],
        "serve": {key: getattr(params.serve, key) for key in SERVE_KEYS},
    }
    report["one_at_a_time"] = one_at_a_time(args.model, params, questions[: args.baseline_questions], device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = start_server(args, params_file, port, Path(tempfile.gettempdir()) / f"florence-ops-serve-{slug}.log")
    try:
        load(port, questions[: max(args.clients)], max(args.clients))  # warm-up at the highest concurrency
        for clients in args.clients:
            report[f"server_c{clients}"] = load(port, questions[: args.questions], clients)
    finally:
        stop_server(process)
    base = report["one_at_a_time"]["questions_per_s"]
    report["speedup_vs_one_at_a_time"] = {f"c{c}": round(report[f"server_c{c}"]["questions_per_s"] / base, 2)
                                          for c in args.clients}  # fmt: skip
    write_json(out / f"serve_{slug}.json", report)
    print_table(report, args.clients)
    return report


def print_table(report: dict, clients: list[int]) -> None:
    settings = ", ".join(f"{key} {value}" for key, value in report["serve"].items())
    print(f"\nserve_load on {report['device']} ({settings})")
    print(f"{'run':<16}{'q/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'batch':>8}{'x one-at-a-time':>18}{'errors':>8}")
    engine = report["one_at_a_time"]["engine_batched"]
    print(f"engine ceiling (batches of {engine['batch_size']}, pages decoded beforehand): "
          f"{engine['questions_per_s']} q/s")  # fmt: skip
    rows = [("one_at_a_time", report["one_at_a_time"], 1, 1.0, 0)]
    for c in clients:
        row = report[f"server_c{c}"]
        rows.append(
            (f"server_c{c}", row, row["mean_batch_size"], report["speedup_vs_one_at_a_time"][f"c{c}"], row["errors"])
        )
    for name, row, batch, speedup, errors in rows:
        print(
            f"{name:<16}{row['questions_per_s']:>10}{row['p50_ms']:>10}{row['p95_ms']:>10}{batch:>8}{speedup:>18}{errors:>8}"
        )


if __name__ == "__main__":
    main()
