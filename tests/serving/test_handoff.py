"""Pages from the HTTP processes to the model workers through shared memory (`serving/handoff.py`): read back and
removed, shared by the requests about one page (prepared once, removed with the last of them), carried in the queue
when shared memory cannot take them, and a batch answered when one of its requests was abandoned (its page removed)
before the batch started."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from florence_ops.data.images import InvalidImage
from florence_ops.serving.handoff import SHARED_MEMORY, STALE_CLAIM_S, PageHandoff
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


def test_requests_about_one_page_prepare_it_once_and_the_last_removes_it():
    pages = PageHandoff.create()
    prepared, start = [], threading.Barrier(8)

    def prepare() -> bytes:
        prepared.append(1)
        time.sleep(0.3)  # decoding a page: the other requests arrive meanwhile
        return b"pixels"

    def request(_) -> str:
        start.wait()
        return pages.share("sha1-768x768", prepare)

    try:
        with ThreadPoolExecutor(8) as pool:
            links = list(pool.map(request, range(8)))
        assert len(prepared) == 1 and len(set(links)) == 8
        for link in links:
            out = bytearray(6)
            assert PageHandoff.read_into(link, out) and out == b"pixels"
        for link in links[:-1]:
            pages.discard(link)
        assert {path.name for path in pages.root.iterdir()} == {"sha1-768x768", os.path.basename(links[-1])}
        pages.discard(links[-1])
        assert list(pages.root.iterdir()) == []
        assert pages.share("sha1-768x768", prepare) and len(prepared) == 2  # asked again later: prepared again
    finally:
        pages.close()


def test_a_page_that_cannot_be_prepared_fails_each_request_about_it_and_leaves_nothing():
    pages = PageHandoff.create()
    start = threading.Barrier(4)

    def prepare() -> bytes:
        time.sleep(0.1)
        raise InvalidImage("image_corrupt", "truncated")

    def request(_) -> str:
        start.wait()
        return pages.share("bad-768x768", prepare)

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(request, i) for i in range(4)]
        for future in futures:
            with pytest.raises(InvalidImage):
                future.result()
        assert list(pages.root.iterdir()) == []
    finally:
        pages.close()


def test_a_claim_left_by_a_process_that_died_is_broken():
    pages = PageHandoff.create()
    try:
        claim = pages.root / "sha1-768x768.claim"
        claim.touch()
        os.utime(claim, (time.time() - STALE_CLAIM_S - 1,) * 2)
        links = []
        request = threading.Thread(target=lambda: links.append(pages.share("sha1-768x768", lambda: b"pixels")),
                                   daemon=True)  # fmt: skip
        request.start()
        request.join(timeout=5)  # waiting on the claim for good would hang here
        assert links, "the request still waits on the dead process's claim"
        out = bytearray(6)
        assert PageHandoff.read_into(links[0], out) and out == b"pixels" and not claim.exists()
    finally:
        pages.close()


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
