"""Serving `models/champion`: a promotion by `florence_ops.promotion.promote` during a stream of requests is picked up
without a restart, no request fails, and the answers switch to the new model's."""

from __future__ import annotations

import time

from florence_ops.promotion import promote
from tests.serving.conftest import LoopingClients, Server, free_port, pages_answered_differently, write_params

SWITCH_TIMEOUT_S = 90


def record(run_id: str, anls: float) -> dict:
    metrics = {"anls": anls, "levenshtein_similarity": 0.5, "exact_match": 0.1, "n_questions": 16}
    return {"run_id": run_id, "metrics": metrics}


def test_promotion_is_served_without_restart_or_failed_requests(served, tmp_path):
    champion, record_path = tmp_path / "models/champion", tmp_path / "reports/champion.json"
    promote(served / "models/export", champion, record("first", 0.3), record_path)
    old, new, pages = pages_answered_differently(served)
    params = write_params(tmp_path, **{"serve.reload_interval_s": 0.5})
    server = Server(champion, params, free_port())
    try:
        first_version = server.healthz()["version"]
        with LoopingClients(server.url, pages) as clients:
            clients.wait_for_replies(6)
            promote(served / "models/other", champion, record("second", 0.6), record_path)
            deadline = time.monotonic() + SWITCH_TIMEOUT_S
            while time.monotonic() < deadline and not clients.failures:
                after = [r for r in clients.replies if r[2] != first_version]
                if len({question for question, _, _ in after}) == len(pages) and len(after) >= 2 * len(pages):
                    break
                time.sleep(0.2)
        health = server.healthz()
    finally:
        server.stop()
    assert clients.failures == []
    replies = clients.replies
    versions = [version for _, _, version in replies]
    assert versions[0] == first_version and health["version"] != first_version
    assert set(versions) == {first_version, health["version"]}
    for question, answer, version in replies:
        assert answer == (old if version == first_version else new)[question]
    assert {q for q, _, v in replies if v == health["version"]} == {p["questionId"] for p in pages}
    assert health["metrics"]["anls"] == 0.6 and health["metrics_source"] == "champion.json"
