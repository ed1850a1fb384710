"""A tiny model trained and exported once per session, and helpers to start `florence-ops serve` on it."""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_params

SERVER_START_S = 120


@pytest.fixture(scope="session")
def served(prepared, tmp_path_factory) -> Path:
    """A workspace (a copy of `prepared`) whose `models/export` is what the export stage writes, with weights that
    answer: `models/export` (seed 0) and `models/other` (seed 1), and params.yaml for commands run there."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(prepared, root, symlinks=True, dirs_exist_ok=True)
    export_tiny(root)
    shutil.copytree(root / "models/export", root / "models/other")
    answering_weights(root / "models/export", seed=0)
    answering_weights(root / "models/other", seed=1)
    write_params(root)
    return root


METRICS = {"anls": 0.4321, "levenshtein_similarity": 0.5, "exact_match": 0.25, "n_questions": 16, "by_type": {}}


def export_tiny(root: Path) -> Path:
    """Run the export stage on the untrained tiny model (as if trained), with known metrics."""
    from florence_ops.stages.export import export

    params = tiny_params(root)
    shutil.copytree(root / "models/base", root / "models/train/model")
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports/metrics.json").write_text(json.dumps({**METRICS, "before": {}}))
    return export(params)


def answering_weights(model_dir: Path, seed: int) -> None:
    """Give the model in `model_dir` random weights whose answers depend on the page and the question.

    A tiny model trained for seconds answers "" to every question (its first token is </s>), so comparing answers
    would compare nothing. With weights drawn at std 0.2 and the <s> and </s> embeddings damped, answers are
    non-empty and change with the image and the question: 32 training questions get about 16 distinct answers.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.2)
        model.model.language_model.shared.weight[[0, 2]] *= 0.05  # <s>, </s>
    model.save_pretrained(model_dir)


def write_params(root: Path, **overrides) -> Path:
    """A params.yaml under `root` with the tiny params and `overrides` (dotted keys), for commands run there."""
    import dataclasses

    import yaml

    params = dataclasses.asdict(tiny_params(root, **overrides))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image_bytes: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image_bytes).decode()}"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """`florence-ops serve` in a subprocess, stopped by `stop`."""

    def __init__(self, model_dir: Path, params_file: Path, port: int, env: dict | None = None,
                 open_files: int | None = None):  # fmt: skip
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = params_file.parent / f"serve-{port}.log"
        command = ["florence-ops", "serve", "--params", str(params_file), "--model", str(model_dir)]
        command += ["--port", str(port)]
        token = (env or {}).get("FLORENCE_OPS_API_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.process = subprocess.Popen(
            command, cwd=params_file.parent, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)))
            if open_files else None,
        )  # fmt: skip
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                self.healthz()
                return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in {SERVER_START_S} s:\n{self.log.read_text()[-3000:]}")

    def healthz(self) -> dict:
        """GET /healthz (with the token, if any); raises HTTPError (an OSError) unless it answers 200."""
        request = urllib.request.Request(self.url + "/healthz", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def processes(self) -> list:
        """The server's processes still running (its process group: the main process and every child)."""
        import psutil

        self.process.poll()  # reap the main process if it has exited
        alive = (p for p in psutil.process_iter(["pid", "status"]) if p.info["status"] != psutil.STATUS_ZOMBIE)
        return [p for p in alive if _group_of(p.info["pid"]) == self.process.pid]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def raw_pages(root: Path, split: str) -> list[dict]:
    """The split's raw records with their original page bytes (before preprocess resized them) as `image.bytes`."""
    pages = {
        row["image_id"]: row["image"]["bytes"] for row in pq.read_table(root / "data/raw/pages.parquet").to_pylist()
    }
    rows = pq.read_table(root / f"data/raw/{split}.parquet").to_pylist()
    return [{**row, "image": {"bytes": pages[row["image_id"]]}} for row in rows]


def evaluation_answers(root: Path, model_dir: Path, split: str, processed: Path | None = None) -> dict[str, str]:
    """questionId -> the answer `florence-ops evaluate` gives (its own `predict`, on the processed pages)."""
    from accelerate import Accelerator

    from florence_ops.data.processed import ImageTable, read_questions
    from florence_ops.modeling import load_trained
    from florence_ops.stages.evaluate import COLUMNS, predict
    from florence_ops.vision.sources import PixelSource

    params = tiny_params(root)
    processed = processed or root / "data/processed"
    rows = read_questions(processed, split).select_columns(COLUMNS).to_list()
    loaded = load_trained(model_dir, params.paths.base_model, params.model)
    source = PixelSource(ImageTable(processed), loaded[1].image_processor)  # evaluation's path from pixels
    answers = predict(Accelerator(cpu=True), loaded, rows, source, params)
    return {row["questionId"]: text for row, text in zip(rows, answers)}


def ask(client, question: str, image: bytes, mime: str = "image/png"):
    """Ask `question` about `image` through the official `openai` client."""
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image, mime)}}]
    return client.chat.completions.create(model="florence-ops", messages=[{"role": "user", "content": content}])


def pages_answered_differently(root: Path) -> tuple[dict[str, str], dict[str, str], list[dict]]:
    """The evaluation answers of `models/export` and `models/other`, and up to four validation pages on which they
    differ (so that which model answered shows in the answer)."""
    old = evaluation_answers(root, root / "models/export", "validation")
    new = evaluation_answers(root, root / "models/other", "validation")
    pages = [r for r in raw_pages(root, "validation") if old[r["questionId"]] != new[r["questionId"]]][:4]
    assert pages, "the two models must answer differently for the switch to show"
    return old, new, pages


class LoopingClients:
    """`count` threads asking the server about `pages` in turn, through the official `openai` client, until the block
    ends; every reply (question id, answer, model version) and every failure is kept."""

    def __init__(self, url: str, pages: list[dict], count: int = 3):
        import threading

        self.pages, self.replies, self.failures, self.stop = pages, [], [], threading.Event()
        self.threads = [threading.Thread(target=self._ask, args=(k, url)) for k in range(count)]

    def _ask(self, offset: int, url: str) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        for i in range(10_000):
            if self.stop.is_set():
                return
            page = self.pages[(i + offset) % len(self.pages)]
            try:
                reply = ask(client, page["question"], page["image"]["bytes"])
                self.replies.append((page["questionId"], reply.choices[0].message.content, reply.system_fingerprint))
            except Exception as error:  # every failure is recorded and fails the test that reads it
                self.failures.append(repr(error))

    def __enter__(self) -> LoopingClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def wait_for_replies(self, count: int) -> None:
        """Until `count` replies came (or a request failed)."""
        while len(self.replies) < count and not self.failures:
            time.sleep(0.1)
