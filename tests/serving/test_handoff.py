"""Pages from the HTTP processes to the model workers through shared memory (`serving/handoff.py`): read back and
removed, carried in the queue when shared memory cannot take them, and a batch answered when one of its requests
was abandoned (its page removed) before the batch started."""

from __future__ import annotations

import logging

from florence_ops.serving.handoff import SHARED_MEMORY, PageHandoff
from florence_ops.serving.pages import model_page_pixels
from florence_ops.serving.server import ChatCompletionsSpec
from florence_ops.serving.worker import DocVQAAPI
from tests.conftest import tiny_params
from tests.serving.conftest import evaluation_answers, raw_pages


def test_a_page_is_read_back_from_shared_memory_and_removed():
    pages = PageHandoff.create()
    try:
        page = pages.put(b"pixels")
        assert isinstance(page, str) and page.startswith(str(SHARED_MEMORY))
        out = bytearray(6)
        assert PageHandoff.read_into(page, out) and out == b"pixels"
        pages.discard(page)
        assert not PageHandoff.read_into(page, out) and list(pages.root.iterdir()) == []
    finally:
        pages.close()
    assert not pages.root.exists()


def test_pages_travel_in_the_queue_when_shared_memory_cannot_take_them(tmp_path, caplog):
    pages = PageHandoff(tmp_path / "removed")  # writes fail there as they do on a full /dev/shm
    with caplog.at_level(logging.WARNING, "florence_ops.serving.handoff"):
        assert pages.put(b"first") == b"first" and pages.put(b"second") == b"second"
    out = bytearray(5)
    assert PageHandoff.read_into(b"first", out) and out == b"first"
    assert len(caplog.records) == 1 and "request queue" in caplog.text  # said once, not per request


def test_a_batch_with_an_abandoned_request_answers_the_others(served, tmp_path):
    params = tiny_params(served, **{"serve.reload_interval_s": 0})
    model_dir = served / "models/export"
    pages = PageHandoff(tmp_path)
    api = DocVQAAPI(model_dir, params, None, ChatCompletionsSpec(model_dir, params, pages), pages.root)
    api.setup("cpu")
    size = api.answerer.input_size
    records = raw_pages(served, "validation")
    first = records[0]
    other = next(r for r in records if r["image_id"] != first["image_id"])

    def row(record: dict) -> dict:
        pixels = model_page_pixels(record["image"]["bytes"], size, params.serve.max_image_pixels)
        return {"question": record["question"], "image_id": record["image_id"], "pixels": pages.put(pixels),
                "size": size}  # fmt: skip

    rows = [row(first), row({**first, "question": "What is the date?"}), row(other)]
    pages.discard(rows[1]["pixels"])  # the same page, asked again by a client that went away
    pages.discard(rows[2]["pixels"])  # the only request about its page, abandoned
    results = api.predict(rows)
    expected = evaluation_answers(served, model_dir, "validation")
    assert len(results) == 3 and results[0]["answer"] == expected[first["questionId"]]
    assert all(isinstance(result["answer"], str) for result in results)
