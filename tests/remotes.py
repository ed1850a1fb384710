"""Remotes for tests: an S3 server (`moto_server`, as its users start it) on a free local port, with one bucket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import pool_machines


@pytest.fixture
def s3_endpoint(tmp_path_factory, monkeypatch) -> Iterator[str]:
    """The URL of a fresh S3 server holding the bucket `pool_machines.BUCKET`, its credentials in the environment
    (AWS_ACCESS_KEY_ID, ...) as DVC reads them; the server stops at the end of the test."""
    root: Path = tmp_path_factory.mktemp("s3")
    with pool_machines.s3_server(root) as (endpoint, _server):
        for name, value in pool_machines.S3_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        yield endpoint
