"""`florence-ops serve`: the HTTP side of the server, built on LitServe.

LitServe gives the batching of concurrent requests (`serve.max_batch_size`, `serve.batch_timeout_s`), workers per
device and across GPUs, the request queue and the bearer-token dependency; `worker.py` holds the
model. This module adds the OpenAI chat-completions endpoint as a LitServe spec, which validates each request and
prepares its page in the HTTP process (threads) before any model work, so a bad request gets its own 4xx and never
fails the batch it would have joined (the page then crosses to the worker through shared memory, `handoff.py`);
`GET /healthz`; and the page at `/`.

Routes: `POST /v1/chat/completions`, `GET /healthz`, `GET /` (page), plus LitServe's `/health`, `/info` and `/docs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import litserve as ls
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from litserve.server import RegularRequestHandler
from litserve.specs.base import LitSpec
from litserve.utils import WorkerSetupStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoProcessor

from florence_ops.config import Params
from florence_ops.data.images import InvalidImage
from florence_ops.processes import return_large_frees_to_the_system
from florence_ops.serving.answering import QuestionLimit, check_model_dir, input_size
from florence_ops.serving.handoff import PageHandoff
from florence_ops.serving.health import InFlightGuard, health
from florence_ops.serving.model_dir import version_of
from florence_ops.serving.openai_api import (
    AssistantMessage,
    BadRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    Usage,
    decode_data_url,
    question_and_image,
    refuse,
)
from florence_ops.serving.pages import model_page_pixels, page_id
from florence_ops.serving.protection import BodyLimits, DocsNeedToken, http_protocol, raise_open_files_limit
from florence_ops.serving.supervision import SupervisedServer, children_die_with_this_process
from florence_ops.serving.web_page import PAGE_HTML
from florence_ops.serving.worker import API_PATH, DocVQAAPI

if TYPE_CHECKING:  # the HTTP processes import this module: they need neither GTO nor DVC
    from florence_ops.serving.replica import Replica

log = logging.getLogger(__name__)
REMOTE_TIMEOUT_S = 10  # fetching an http(s) image, where serve.allow_remote_images is on
STATUS_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "body_too_large", 503: "unavailable", 504: "timeout"}  # fmt: skip


class ServerFailed(RuntimeError):
    """One of the server's processes died and brought the server down (its exit status is 1, for the supervisor)."""


class ChatCompletionsSpec(LitSpec):
    """`POST /v1/chat/completions`: validate, prepare the page, queue it for a worker's batch, answer as OpenAI does."""

    def __init__(self, model_dir: Path, params: Params, pages: PageHandoff):
        super().__init__()
        self.api_path = API_PATH
        self.model_dir, self.params, self.pages = model_dir, params, pages
        self.model_name = model_dir.name
        self.questions = QuestionLimit(model_dir, params)
        self._size: tuple[str | None, tuple[int, int]] = (version_of(model_dir), model_size(model_dir, params))
        self._handler: RegularRequestHandler | None = None
        self._guard: InFlightGuard | None = None
        self.add_endpoint(API_PATH, self.chat_completions, ["POST"])

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        """Remember the API whose queue requests go to."""
        self.lit_api = lit_api

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_handler"] = state["_guard"] = None
        return state

    async def chat_completions(self, request: ChatCompletionRequest, response: Response) -> ChatCompletionResponse:
        """Answer the question of the request's user message about its page (headers: X-Batch-Size, the batch it was
        answered in; Server-Timing, where its time went)."""
        started = time.monotonic()
        row = await self._prepare(request)
        if self._handler is None:
            self._handler = RegularRequestHandler(self.lit_api, self._server)
            self._guard = InFlightGuard(self.pages.root, self._server.response_buffer,
                                        self.params.serve.request_timeout_s,
                                        self._server._get_request_queue(self.api_path))  # fmt: skip
            self._guard.start()
        queued = time.monotonic()
        try:
            result = await self._handler.handle_request(row, dict)
        finally:  # answered, failed, or abandoned by its client: the worker is done with the page or never reads it
            self.pages.discard(row["pixels"])
        response.headers["X-Batch-Size"] = str(result["batch_size"])
        response.headers["Server-Timing"] = server_timing(started, queued, result)
        usage = Usage(prompt_tokens=result["prompt_tokens"], completion_tokens=result["completion_tokens"],
                      total_tokens=result["prompt_tokens"] + result["completion_tokens"])  # fmt: skip
        choice = Choice(message=AssistantMessage(content=result["answer"]),
                        finish_reason="length" if result["truncated"] else "stop")  # fmt: skip
        return ChatCompletionResponse(model=self.model_name, system_fingerprint=result["version"], choices=[choice],
                                      usage=usage)  # fmt: skip

    async def _prepare(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """The row queued for the request: its question, page id and size, and its page handed to the workers."""
        question, url = question_and_image(request)
        refuse(await asyncio.to_thread(self.questions.problem, question), "messages")
        data = await self._image_bytes(url)
        size = await self._model_size()
        image_id = page_id(data)
        try:
            page = await asyncio.to_thread(self._hand_off, data, image_id, size)
        except InvalidImage as error:
            problem = error.problem
            raise BadRequest(f"{problem.reason}: {problem.detail}", problem.reason, "image_url") from None
        return {"question": question, "image_id": image_id, "pixels": page, "size": size}

    def _hand_off(self, data: bytes, image_id: str, size: tuple[int, int]) -> str | bytes:
        """Hand the page's pixels at `size` to the workers, decoded and resized here unless a request about the same
        page has done it already (InvalidImage when it is no image)."""
        height, width = size
        return self.pages.share(f"{image_id}-{height}x{width}",
                                lambda: model_page_pixels(data, size, self.params.serve.max_image_pixels))  # fmt: skip

    async def _image_bytes(self, url: str) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url)
        if not url.startswith(("http://", "https://")):
            raise BadRequest("image_url must be a data: URL or an http(s) URL", "invalid_image_url", "image_url")
        if not self.params.serve.allow_remote_images:
            raise BadRequest("remote image URLs are off (serve.allow_remote_images): send the page as a data: URL",
                             "remote_images_disabled", "image_url")  # fmt: skip
        return await asyncio.to_thread(fetch_image, url, self.params.serve.max_body_bytes)

    async def _model_size(self) -> tuple[int, int]:
        """The input size of the model on disk, re-read after a swap (a new model may take another size)."""
        version, size = self._size
        current = version_of(self.model_dir)
        if current is not None and current != version:
            try:
                self._size = (current, await asyncio.to_thread(model_size, self.model_dir, self.params))
            except Exception as error:  # mid-promotion: the workers still serve the old model
                log.warning("input size of the new model not read yet: %s", error)
        return self._size[1]


def server_timing(started: float, queued: float, result: dict[str, Any]) -> str:
    """The `Server-Timing` header of an answer (milliseconds; `time.monotonic()` instants, one clock for all of the
    server's processes): `prepare` (reading the request and handing its page over), `queue` (waiting for its batch
    to start), `batch` (the batch that answered it, on the worker), `pages` (the part of `batch` spent reading the
    batch's pages on the host) and `between` (the worker's time from the end of its previous batch to the start of
    this one: sending answers, taking requests, or nothing to do)."""
    parts = {"prepare": queued - started, "queue": max(result["batch_started"] - queued, 0),
             "batch": result["batch_s"], "pages": result["pages_s"], "between": result["between_s"]}  # fmt: skip
    return ", ".join(f"{name};dur={1000 * seconds:.1f}" for name, seconds in parts.items())


def model_size(model_dir: Path, params: Params) -> tuple[int, int]:
    """The input size (height, width) of the model in `model_dir`, from its processor."""
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=params.model.trust_remote_code)
    return input_size(processor)


def fetch_image(url: str, max_bytes: int) -> bytes:
    """The bytes at an http(s) URL, at most `max_bytes`; BadRequest when the fetch fails or the file is larger."""
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 - scheme checked
            data = response.read(max_bytes + 1)
    except (OSError, ValueError) as error:
        raise BadRequest(f"image_url could not be fetched: {error}", "image_fetch_failed", "image_url") from None
    if len(data) > max_bytes:
        raise BadRequest(f"image at image_url exceeds {max_bytes} bytes", "image_too_large", "image_url")
    return data


def build_server(model_dir: str | Path, params: Params, pages: PageHandoff) -> ls.LitServer:
    """A LitServer for `model_dir` configured by `params.serve`, with the OpenAI endpoint, /healthz and the page;
    request pages cross to the workers through `pages`."""
    model_dir, cfg = Path(model_dir), params.serve
    check_model_dir(model_dir)
    token = os.environ.get(cfg.api_token_env) or None
    api = DocVQAAPI(model_dir, params, token, ChatCompletionsSpec(model_dir, params, pages), pages.root)
    middlewares = [(BodyLimits, {"max_bytes": cfg.max_body_bytes, "timeout_s": cfg.body_timeout_s})]
    if token:
        middlewares.append((DocsNeedToken, {"token": token}))
    server = SupervisedServer(
        api,
        accelerator=cfg.accelerator,
        devices=cfg.devices if cfg.devices is not None else "auto",
        workers_per_device=cfg.workers_per_device,
        timeout=cfg.request_timeout_s,
        middlewares=middlewares,
        fast_queue=True,  # responses over ZeroMQ: LitServe's transport for hundreds of requests per second
    )
    api.loop.prefetch = len(server.devices) * cfg.workers_per_device == 1  # see GreedyLoop
    add_routes(server, api, pages.root)
    return server


def add_routes(server: ls.LitServer, api: DocVQAAPI, runtime_dir: Path) -> None:
    """`/healthz`, the page at `/` (in place of LitServe's plain-text index) and OpenAI-shaped errors."""
    app: FastAPI = server.app
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) != "/"]
    auth = server.setup_auth(api)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)

    @app.get("/healthz", dependencies=[Depends(auth)])
    async def healthz() -> JSONResponse:
        """200 while every model worker serves a model; 503 (with the reason) whenever the server cannot answer."""
        try:
            statuses = dict(server.workers_setup_status)
            stopping = server._shutdown_event.is_set()
        except (OSError, EOFError):  # the main process is gone: this process is about to be stopped too
            statuses, stopping = {}, True
        ready = bool(statuses) and all(status == WorkerSetupStatus.READY for status in statuses.values())
        code, body = health(runtime_dir, ready and not stopping, len(server.inference_workers))
        if stopping:
            code, body["status"] = 503, "stopping"
        body.update(device=[d if isinstance(d, str) else ",".join(d) for d in server.devices],
                    max_batch_size=api.max_batch_size, batch_timeout_s=api.batch_timeout)  # fmt: skip
        return JSONResponse(body, status_code=code)

    add_error_handlers(app)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON error body, with a one-line message and no traceback."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(BadRequest("the request body is not valid JSON", "invalid_json"))
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return error_response(BadRequest(message, "invalid_request", where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(error.status_code, "server_error" if error.status_code >= 500 else "invalid_request")
        response = error_response(BadRequest(str(error.detail), code, status=error.status_code))
        response.headers.update(getattr(error, "headers", None) or {})
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error on %s: %r", request.url.path, error)
        return error_response(BadRequest("internal server error", "server_error", status=500))


def error_response(error: BadRequest) -> JSONResponse:
    """The OpenAI error body of `error` with its status."""
    return JSONResponse(error.body().model_dump(), status_code=error.status)


def serve(model_dir: str | Path, params: Params, replica: Replica | None = None) -> None:
    """Run the server on `serve.host`:`serve.port` until interrupted (Ctrl+C, or SIGTERM as from Docker); with
    `replica`, `model_dir` is its link, switched whenever the registry assigns another version."""
    cfg = params.serve
    PageHandoff.remove_stale()
    pages = PageHandoff.create()
    try:
        server = build_server(model_dir, params, pages)
        if replica is not None:
            replica.follow(pages.root)
        raise_open_files_limit(cfg.max_connections * cfg.api_servers)
        children_die_with_this_process()
        return_large_frees_to_the_system()  # pages near serve.max_image_pixels are decoded in the HTTP processes
        log.info("serving %s on http://%s:%d (page at /, OpenAI API at %s)", model_dir, cfg.host, cfg.port, API_PATH)
        with terminate_as_interrupt():
            try:
                server.run(host=cfg.host, port=cfg.port, num_api_servers=cfg.api_servers, generate_client_file=False,
                           http=http_protocol(cfg.header_timeout_s, cfg.max_connections))  # fmt: skip
            except (EOFError, ConnectionError) as error:  # raised from the main thread's wait on the queue's manager
                server.failure = server.failure or f"the request queue's manager process died ({error!r})"
                log.error("%s: the server was shut down", server.failure)
    finally:
        pages.close()
    if server.failure:
        raise ServerFailed(f"the server stopped: {server.failure}")


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM handled as Ctrl+C for the duration of the block: LitServe then shuts down gracefully (it handles
    KeyboardInterrupt only), and what the server made is cleaned up."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
