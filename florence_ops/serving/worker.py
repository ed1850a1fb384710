"""The server's inference side: a LitServe API whose worker answers batches of questions with an `Answerer`.

LitServe runs `setup` once per worker (one or more per device) and then, for every batch it collects (see
`batching.GreedyLoop`): `decode_request` for each, `batch`, `predict`, `unbatch` and `encode_response`. Requests reach
the worker already validated, with the page at the model's input size as raw pixels in shared memory (see
`server.py`, `handoff.py`), so nothing here fails on one request's input.

Hot swap: a thread checks the model directory every `serve.reload_interval_s`; when a new model is in place (a
promotion switches a complete copy into place) it loads it beside the current one and swaps the reference between
batches. A batch in flight finishes on the model it started with; a load that races a further swap is retried on the
next check. A load that fails leaves the current model serving, is reported in `/healthz` (`last_failed_load`) and
is retried for the same version after a delay that doubles each time, up to `MAX_RETRY_S`.

Each worker dies with the server's main process and reports what it serves through `health.write_worker_status`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import numpy as np
import torch
import transformers
from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from florence_ops.config import Params
from florence_ops.data.images import resize_for_model
from florence_ops.processes import die_with_parent
from florence_ops.serving.answering import Answerer, load_answerer
from florence_ops.serving.batching import GreedyLoop
from florence_ops.serving.handoff import PageHandoff
from florence_ops.serving.health import write_worker_status
from florence_ops.serving.model_dir import model_metrics, registry_entry, version_of
from florence_ops.serving.openai_api import UNAUTHORIZED
from florence_ops.serving.pages import open_pixels
from florence_ops.vision.sources import PageRows

log = logging.getLogger(__name__)
API_PATH = "/v1/chat/completions"
MAX_RETRY_S = 300.0  # longest wait before loading a model that failed to load once more
bearer = HTTPBearer(auto_error=False)


def read_page(row: dict[str, Any], slot: torch.Tensor, size: tuple[int, int]) -> bool:
    """Read the page of `row` into `slot` (uint8, `size` x 3); False when it is gone. A page prepared for a model of
    another input size (just before a swap) is resized here."""
    if tuple(row["size"]) == tuple(size):
        return PageHandoff.read_into(row["pixels"], slot.numpy())
    pixels = bytearray(row["size"][0] * row["size"][1] * 3)
    if not PageHandoff.read_into(row["pixels"], pixels):
        return False
    image = resize_for_model(open_pixels(bytes(pixels), row["size"]), size)
    slot.copy_(torch.from_numpy(np.asarray(image)))
    return True


class DocVQAAPI(ls.LitAPI):
    """Answers page questions in batches; lifecycle: setup, decode_request, batch, predict, unbatch, encode_response."""

    def __init__(self, model_dir: Path, params: Params, token: str | None, spec: ls.specs.base.LitSpec,
                 runtime_dir: Path):  # fmt: skip
        cfg = params.serve
        super().__init__(max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout_s, spec=spec,
                         loop=GreedyLoop())  # fmt: skip
        self.model_dir, self.params, self.token = Path(model_dir), params, token
        self.runtime_dir, self.server_pid = Path(runtime_dir), os.getpid()
        self.answerer: Answerer | None = None
        self.last_failed_load: dict[str, Any] | None = None
        self._pages: torch.Tensor | None = None
        self._last_batch_ended: float | None = None  # time.monotonic() at the end of this worker's last predict

    def setup(self, device: str) -> None:
        """Load the model on `device` and start watching its directory for a newly promoted model."""
        die_with_parent(self.server_pid)
        if not logging.getLogger().handlers:  # a spawned worker: log swaps as the CLI process does
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        transformers.utils.logging.disable_progress_bar()  # a log line per load, and no lock left at SIGTERM
        self.worker_id = os.environ.get("LITSERVE_WORKER_ID", "0")
        self.torch_device = torch.device(device)  # LitServe sets `device` to the string afterwards
        self._report()  # alive, no model yet
        self._serve(self._load())
        if self.params.serve.reload_interval_s > 0:
            threading.Thread(target=self._watch, name="model-reload", daemon=True).start()

    def _load(self) -> Answerer:
        return load_answerer(self.model_dir, self.params, self.max_batch_size, self.torch_device)

    def _serve(self, answerer: Answerer) -> None:
        """Answer with `answerer` from the next batch on, and say so in this worker's status."""
        metrics, source = model_metrics(answerer.model_dir)  # a further swap is caught by the version check
        self.answerer, self.last_failed_load = answerer, None
        self._served = {"model": str(answerer.model_dir.resolve()), "version": answerer.version, "metrics": metrics,
                        "metrics_source": source, "loaded_at": _iso(time.time()),
                        "registry": registry_entry(answerer.model_dir)}  # fmt: skip
        self._report()

    def _report(self) -> None:
        """Write this worker's status for the HTTP processes: the model it serves and the last load that failed."""
        served = self._served if self.answerer is not None else {"model": str(self.model_dir), "version": None}
        write_worker_status(self.runtime_dir, self.worker_id, {**served, "last_failed_load": self.last_failed_load})

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The validated request (question, image_id, its page as handed off, and the page size) as a row."""
        return request

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch is the list of rows."""
        return list(inputs)

    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer a batch with the model in place when it starts: answer text, token counts and model version.

        Each distinct page is read from shared memory straight into a pinned buffer, by the answerer's threads (one
        per core), and crosses to the device in one copy. A request abandoned by its client before its batch started
        has no page any more; it is answered about a blank page, for nobody, so that the rest of the batch is
        answered. Each result carries the batch's size, start (`time.monotonic()`) and duration, the part of it spent
        reading pages, and the time since this worker's previous batch ended, for the response's headers."""
        started = time.monotonic()
        answerer = self.answerer
        size = answerer.input_size
        image_ids = list(dict.fromkeys(row["image_id"] for row in rows))  # a page asked about twice: read once
        pages = self._page_buffer(len(image_ids), size)

        def read(slot: torch.Tensor, image_id: str) -> None:
            if not any(read_page(row, slot, size) for row in rows if row["image_id"] == image_id):
                slot.zero_()

        list(answerer.pool.map(read, pages, image_ids))
        pages_s = time.monotonic() - started
        source = PageRows(pages.to(self.torch_device, non_blocking=True), image_ids,
                          answerer.processor.image_processor)  # fmt: skip
        answers = answerer.answer([{"question": r["question"], "image_id": r["image_id"]} for r in rows], source)
        prompt_tokens = answerer.prompt_tokens([row["question"] for row in rows])
        results = [
            {"answer": text, "prompt_tokens": prompt, "completion_tokens": completion, "version": answerer.version,
             "truncated": completion >= answerer.decoding.max_new_tokens}
            for text, prompt, completion in zip(answers, prompt_tokens, answerer.answer_tokens(answers))
        ]  # fmt: skip
        ended = time.monotonic()
        timing = {"batch_size": len(rows), "batch_started": started, "batch_s": ended - started, "pages_s": pages_s,
                  "between_s": started - self._last_batch_ended if self._last_batch_ended else 0.0}  # fmt: skip
        self._last_batch_ended = ended
        return [{**result, **timing} for result in results]

    def _page_buffer(self, count: int, size: tuple[int, int]) -> torch.Tensor:
        """`count` page slots (uint8, height x width x 3) of a buffer kept across batches, pinned for CUDA. The
        batch's copy to the device has finished before the next batch writes it: answering waits for the device."""
        shape = (max(count, self.max_batch_size), *size, 3)
        if self._pages is None or self._pages.shape[1:] != shape[1:] or self._pages.shape[0] < count:
            self._pages = torch.empty(shape, dtype=torch.uint8, pin_memory=self.torch_device.type == "cuda")
        return self._pages[:count]

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per request, in order."""
        return list(output)

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """The result as is; the HTTP side wraps it in the OpenAI response."""
        return output

    def authorize(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        """Require `Authorization: Bearer <token>` when a token is set (`serve.api_token_env`)."""
        if not self.token:
            return
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, UNAUTHORIZED)

    def _watch(self) -> None:
        """Swap in a new model whenever the directory's version changes (runs in a daemon thread)."""
        interval = self.params.serve.reload_interval_s
        while True:
            time.sleep(interval)
            version = version_of(self.model_dir)
            if version is None or version == self.answerer.version or not self._retry_due(version):
                continue  # unchanged, missing, or failed to load a moment ago
            try:
                fresh = self._load()
            except Exception as error:  # a broken model: keep serving the current one
                self._load_failed(version, error)
                continue
            if fresh.version != version_of(self.model_dir):
                continue  # replaced again while loading: load the newest on the next check
            previous = self.answerer
            self._serve(fresh)
            log.info("swapped in model version %s (was %s)", fresh.version, previous.version)
            del previous
            if self.torch_device.type == "cuda":
                torch.cuda.empty_cache()

    def _retry_due(self, version: str) -> bool:
        failed = self.last_failed_load
        return failed is None or failed["version"] != version or time.time() >= failed["retry_at"]

    def _load_failed(self, version: str, error: Exception) -> None:
        """Remember the failure (reported in /healthz) and when to try this version again."""
        failed = self.last_failed_load
        attempts = failed["attempts"] + 1 if failed and failed["version"] == version else 1
        delay = min(self.params.serve.reload_interval_s * 2**attempts, MAX_RETRY_S)
        now = time.time()
        self.last_failed_load = {"version": version, "error": " ".join(f"{type(error).__name__}: {error}".split()),
                                 "at": _iso(now), "attempts": attempts, "retry_at": now + delay}  # fmt: skip
        self._report()
        log.warning("new model in %s (version %s) not loaded (%s); serving version %s; next try in %.0f s",
                    self.model_dir, version, self.last_failed_load["error"], self.answerer.version, delay)  # fmt: skip


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
