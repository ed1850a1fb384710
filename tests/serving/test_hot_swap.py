"""Serving `models/champion`: a promotion by `florence_ops.promotion.promote` during a stream of requests is picked up
without a restart, no request fails, and the answers switch to the new model's."""

from __future__ import annotations

import threading
import time

from openai import OpenAI

from florence_ops.promotion import promote
from tests.serving.conftest import Server, ask, evaluation_answers, free_port, raw_pages, write_params

SWITCH_TIMEOUT_S = 90


def record(run_id: str, anls: float) -> dict:
    metrics = {"anls": anls, "levenshtein_similarity": 0.5, "exact_match": 0.1, "n_questions": 16}
    return {"run_id": run_id, "metrics": metrics}


def test_promotion_is_served_without_restart_or_failed_requests(served, tmp_path):
    champion, record_path = tmp_path / "models/champion", tmp_path / "reports/champion.json"
    promote(served / "models/export", champion, record("first", 0.3), record_path)
    old = evaluation_answers(served, served / "models/export", "validation")
    new = evaluation_answers(served, served / "models/other", "validation")
    pages = [r for r in raw_pages(served, "validation") if old[r["questionId"]] != new[r["questionId"]]][:4]
    assert pages, "the two models must answer differently for the switch to show"
    params = write_params(tmp_path, **{"serve.reload_interval_s": 0.5})
    server = Server(champion, params, free_port())
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    replies, failures, stop = [], [], threading.Event()

    def stream(offset: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            page = pages[(i + offset) % len(pages)]
            try:
                reply = ask(client, page["question"], page["image"]["bytes"])
                replies.append((page["questionId"], reply.choices[0].message.content, reply.system_fingerprint))
            except Exception as error:  # every failure is recorded and fails the test below
                failures.append(repr(error))

    clients = [threading.Thread(target=stream, args=(k,)) for k in range(3)]
    try:
        first_version = server.healthz()["version"]
        for thread in clients:
            thread.start()
        while len(replies) < 6 and not failures:
            time.sleep(0.1)
        promote(served / "models/other", champion, record("second", 0.6), record_path)
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while time.monotonic() < deadline and not failures:
            after = [r for r in replies if r[2] != first_version]
            if len({question for question, _, _ in after}) == len(pages) and len(after) >= 2 * len(pages):
                break
            time.sleep(0.2)
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
        health = server.healthz()
    finally:
        stop.set()
        server.stop()
    assert failures == []
    versions = [version for _, _, version in replies]
    assert versions[0] == first_version and health["version"] != first_version
    assert set(versions) == {first_version, health["version"]}
    for question, answer, version in replies:
        assert answer == (old if version == first_version else new)[question]
    assert {q for q, _, v in replies if v == health["version"]} == {p["questionId"] for p in pages}
    assert health["metrics"]["anls"] == 0.6 and health["metrics_source"] == "champion.json"
