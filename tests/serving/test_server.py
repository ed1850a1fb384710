"""`florence-ops serve` on the tiny model, one server for the module (with a bearer token): the `openai` client, the
answers `predict` and evaluation give, 32 concurrent requests, /healthz, bad input as 4xx JSON, and the page."""

from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from florence_ops.serving.handoff import PREFIX, SHARED_MEMORY
from tests.serving.conftest import (
    METRICS,
    Server,
    ask,
    data_url,
    evaluation_answers,
    free_port,
    png_bytes,
    raw_pages,
    write_params,
)

TOKEN = "test-token-4f2a"
MAX_PIXELS = 2_000_000
MAX_BODY = 3_000_000
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    params = write_params(root, **{"serve.max_image_pixels": MAX_PIXELS, "serve.max_body_bytes": MAX_BODY,
                                   "serve.max_batch_size": 16, "serve.batch_timeout_s": 0.05})  # fmt: skip
    running = Server(served / "models/export", params, free_port(), env={"FLORENCE_OPS_API_TOKEN": TOKEN})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def validation_answers(served) -> dict[str, str]:
    """questionId -> the answer evaluation gives on the validation split."""
    return evaluation_answers(served, served / "models/export", "validation")


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def post(server, body: bytes | dict, token: str | None = TOKEN) -> tuple[int, dict]:
    """POST to the chat endpoint; the status and the JSON body (errors included)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_openai_client_gets_the_evaluation_answer(served, client):
    records = raw_pages(served, "validation")[:3]
    expected = evaluation_answers(served, served / "models/export", "validation")
    for record in records:
        reply = ask(client, record["question"], record["image"]["bytes"])
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == expected[record["questionId"]]
        assert reply.usage.prompt_tokens > reply.usage.completion_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.model == "export" and reply.object == "chat.completion"


def test_32_concurrent_requests_are_all_answered_as_predict_answers(served, client):
    records = raw_pages(served, "train")[:32]
    expected = evaluation_answers(served, served / "models/export", "train")
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda r: ask(client, r["question"], r["image"]["bytes"]), records))
    answers = [reply.choices[0].message.content for reply in replies]
    assert answers == [expected[r["questionId"]] for r in records]
    assert len(set(answers)) > 5  # the answers depend on page and question: the comparison compares something


def test_server_timing_says_where_the_time_of_an_answer_went(served, client):
    record = raw_pages(served, "validation")[0]
    content = [{"type": "text", "text": record["question"]},
               {"type": "image_url", "image_url": {"url": data_url(record["image"]["bytes"])}}]  # fmt: skip
    begin = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model="florence-ops",
                                                           messages=[{"role": "user", "content": content}])  # fmt: skip
    latency_ms = 1000 * (time.perf_counter() - begin)
    timing = dict(part.strip().split(";dur=") for part in raw.headers["Server-Timing"].split(","))
    assert list(timing) == ["prepare", "queue", "batch", "pages", "between"]
    prepare, queue, batch, pages, between = (float(timing[name]) for name in timing)
    assert prepare > 0 and queue >= 0 and batch > 0 and prepare + queue + batch < latency_ms
    assert 0 < pages < batch  # reading the page is part of answering its batch
    assert between >= 0  # the worker's first batch, or the time since the batch of the fixture's earlier requests
    expected = evaluation_answers(served, served / "models/export", "validation")
    assert raw.parse().choices[0].message.content == expected[record["questionId"]]


def handoff_dirs(server: Server) -> list[Path]:
    """The directories a running server hands pages to its workers through (`serving/handoff.py`)."""
    pattern = f"{PREFIX}{server.process.pid}-*"
    return [path for base in (SHARED_MEMORY, Path(tempfile.gettempdir())) for path in base.glob(pattern)]


def test_pages_cross_in_shared_memory_and_none_is_left_behind(served, server, client):
    (directory,) = handoff_dirs(server)
    assert directory.parent == SHARED_MEMORY
    records = raw_pages(served, "train")[:16]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda r: ask(client, r["question"], r["image"]["bytes"]), records))
    pages_left = [path for path in directory.iterdir() if not path.name.startswith("worker-")]  # health.py's
    assert len(replies) == 16 and pages_left == []
    assert "request queue" not in server.log.read_text()  # no page fell back to the slower path


def test_sigterm_stops_the_server_and_frees_its_shared_memory(served, tmp_path):
    running = Server(served / "models/export", write_params(tmp_path), free_port())
    (directory,) = handoff_dirs(running)
    running.stop()  # SIGTERM to the process group, as `docker stop` and Kubernetes send
    assert running.process.returncode == 0, running.log.read_text()[-2000:]
    assert not directory.exists()
    log = running.log.read_text()
    assert "Traceback" not in log and "leaked" not in log, log[-3000:]


def test_a_temp_dir_too_long_for_sockets_does_not_stop_the_server(served, tmp_path, validation_answers):
    """LitServe's request queue listens on a socket under TMPDIR; a TMPDIR too long for one (job schedulers make such
    paths) used to end the server at start-up with a traceback. Every command now takes a short temp dir there, and
    says so."""
    from florence_ops.processes import SOCKET_PATH_MAX, SOCKET_SUFFIX

    long_dir = tmp_path / ("t" * (SOCKET_PATH_MAX - SOCKET_SUFFIX + 10 - len(str(tmp_path))))
    long_dir.mkdir()
    running = Server(served / "models/export", write_params(tmp_path), free_port(), env={"TMPDIR": str(long_dir)})
    try:
        client = OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        record = raw_pages(served, "validation")[0]
        reply = ask(client, record["question"], record["image"]["bytes"])
        assert reply.choices[0].message.content == validation_answers[record["questionId"]]
    finally:
        running.stop()
    log = running.log.read_text()
    assert f"TMPDIR {long_dir} is too long for local sockets" in log and "processes use /tmp" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_no_short_temp_dir_is_one_line_naming_tmpdir(tmp_path, monkeypatch):
    import florence_ops.processes as processes

    long_dir = tmp_path / ("t" * 100)
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    monkeypatch.setattr(processes, "SHORT_TEMP_DIRS", (str(tmp_path / "missing"),))
    with pytest.raises(OSError, match=rf"^the temp directory {long_dir} is \d+ characters, too long for local sockets "
                                      r"\(at most 71\), .*: set TMPDIR to a shorter one$"):  # fmt: skip
        processes.temp_dir_for_sockets()


def test_healthz_names_model_metrics_and_device(served, server):
    health = server.healthz()
    assert health["status"] == "ok" and health["model"] == str((served / "models/export").resolve())
    headline = ("anls", "levenshtein_similarity", "exact_match", "n_questions")
    assert health["metrics"] == {k: METRICS[k] for k in headline}
    assert health["metrics_source"] == "florence_ops.json" and health["device"] == ["cpu"]


def test_bearer_token_is_required(server):
    request = urllib.request.Request(server.url + "/healthz")
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(request, timeout=10)
    status, body = post(server, {"messages": []}, token=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = post(server, {"messages": []}, token="wrong")
    assert status == 401 and "bearer token" in body["error"]["message"]


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
def test_api_docs_need_the_token_too(server, path):
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(server.url + path, timeout=10)
    with urllib.request.urlopen(urllib.request.Request(server.url + path, headers=server.headers), timeout=10) as ok:
        assert ok.status == 200 and ok.read()


def _page_request(question: str, url: str) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def _large_png(width: int, height: int) -> bytes:
    from PIL import Image

    return png_bytes(Image.new("RGB", (width, height), "white"))


BAD_REQUESTS = {
    "not_an_image": (lambda: _page_request("What?", data_url(b"just some text", "image/png")), 400, "not_an_image"),
    "too_many_pixels": (lambda: _page_request("What?", data_url(_large_png(2000, 1100))), 400, "image_too_large"),
    "body_too_large": (lambda: _page_request("What?", data_url(b"\x89PNG" + bytes(MAX_BODY))), 413, "body_too_large"),
    "empty_question": (lambda: _page_request("   ", data_url(_large_png(50, 50))), 400, "question_empty"),
    "no_image": (lambda: {"messages": [{"role": "user", "content": "What is the total?"}]}, 400, "invalid_message"),
    "bad_role": (lambda: {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request"),
    "messages_not_a_list": (lambda: {"messages": "hello"}, 400, "invalid_request"),
    "bad_base64": (lambda: _page_request("What?", "data:image/png;base64,@@@"), 400, "invalid_image_url"),
    "remote_url": (lambda: _page_request("What?", "http://127.0.0.1:9/page.png"), 400, "remote_images_disabled"),
    "not_json": (lambda: b"{messages", 400, "invalid_json"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(served, server, client, validation_answers, case):
    make, status, code = BAD_REQUESTS[case]
    got, body = post(server, make())
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    record = raw_pages(served, "validation")[0]
    reply = ask(client, record["question"], record["image"]["bytes"])
    assert reply.choices[0].message.content == validation_answers[record["questionId"]]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_uploads_asks_and_shows_the_answer(served, server, tmp_path):
    from playwright.sync_api import sync_playwright

    record = raw_pages(served, "validation")[0]
    page_file = tmp_path / "page.png"
    page_file.write_bytes(record["image"]["bytes"])
    expected = evaluation_answers(served, served / "models/export", "validation")[record["questionId"]]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"],
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.set_input_files("#image", str(page_file))
            page.fill("#question", record["question"])
            page.fill("#token", TOKEN)
            page.click("#ask")
            page.wait_for_function("document.getElementById('answer').textContent.length > 0", timeout=60_000)
            assert page.text_content("#answer") == expected
            assert page.is_visible("#preview") and page.inner_text("#error") == ""
        finally:
            browser.close()


def test_image_over_the_pixel_limit_names_serve_max_image_pixels(server):
    """The server decodes under serve.max_image_pixels; its 400 names that setting, not preprocess's."""
    from tests.data.test_validation import png_header_only

    for image in (_large_png(2000, 1100), png_header_only(100_000, 100_000)):  # just over; a decompression bomb
        status, body = post(server, _page_request("What?", data_url(image)))
        assert (status, body["error"]["code"]) == (400, "image_too_large"), body
        assert f"serve.max_image_pixels={MAX_PIXELS}" in body["error"]["message"], body
        assert "data.max_image_pixels" not in body["error"]["message"]


def test_question_over_the_token_limit_gets_400_naming_the_limit(served, server, client, validation_answers):
    """A question the model would see cut (more tokens than it was trained on) is refused before any model work."""
    limit = json.loads((served / "models/export/florence_ops.json").read_text())["max_question_tokens"]
    status, body = post(server, _page_request("What is the " + "total " * limit + "?", data_url(_large_png(50, 50))))
    assert status == 400, body
    assert (body["error"]["code"], body["error"]["param"]) == ("question_too_long", "messages")
    message = body["error"]["message"]
    assert message.startswith("question_too_long: the prompt and question are ")
    assert message.endswith(f"over the model's limit of {limit} (max_question_tokens in the model directory's "
                            "florence_ops.json): shorten the question")  # fmt: skip
    record = raw_pages(served, "validation")[0]
    reply = ask(client, record["question"], record["image"]["bytes"])
    assert reply.choices[0].message.content == validation_answers[record["questionId"]]


@pytest.mark.parametrize(("workers_per_device", "prefetch"), [(1, True), (2, False)])
def test_the_worker_takes_requests_ahead_only_when_it_is_the_servers_only_one(served, tmp_path, workers_per_device,
                                                                               prefetch):  # fmt: skip
    from florence_ops.serving.handoff import PageHandoff
    from florence_ops.serving.server import build_server
    from tests.conftest import tiny_params

    params = tiny_params(tmp_path, **{"serve.workers_per_device": workers_per_device, "serve.accelerator": "cpu"})
    server = build_server(served / "models/export", params, PageHandoff(tmp_path))
    (api,) = server.litapi_connector.lit_apis
    assert api.loop.prefetch is prefetch  # with several, a busy worker would take requests a free one could answer
