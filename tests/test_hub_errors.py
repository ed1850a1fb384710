"""One-line errors for hub fetch failures that the CLI tests cannot reach quickly: the network down while online.

The hub client retries a refused connection for minutes, so the errors are built here as transformers and datasets
raise them after those retries (checked by hand with HF_ENDPOINT at a closed port).
"""

from __future__ import annotations

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from florence_ops import hub_errors
from florence_ops.errors import DataSourceError, UserError


def _transformers_error(cause: Exception) -> OSError:
    try:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause
    except OSError as error:
        return error


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(hub_errors, "is_offline_mode", lambda: False)


def test_network_failure_online_for_a_model(online):
    cause = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
    error = hub_errors.model_fetch_error(_transformers_error(cause), "org/model", None)
    assert isinstance(error, UserError) and "\n" not in str(error)
    assert str(error).startswith("model.name: cannot fetch org/model from the Hugging Face hub and it is not cached")
    assert "check the connection and the name, or set model.name to tiny" in str(error)


def test_network_failure_online_for_a_dataset(online):
    error = hub_errors.dataset_fetch_error(
        ConnectionError("Couldn't reach 'org/data' on the Hub (ConnectError)"), "org/data"
    )
    assert isinstance(error, DataSourceError)
    assert str(error).startswith("data.hf.dataset: cannot reach org/data on the Hugging Face hub")
    assert "check the connection, or use data.source: local" in str(error)


def test_other_errors_are_not_hub_errors():
    assert (
        hub_errors.model_fetch_error(OSError("Permission denied: models/base/config.json"), "org/model", None) is None
    )
    assert hub_errors.model_fetch_error(_transformers_error(ValueError("bad config")), "org/model", None) is None
