"""What the Hugging Face hub clients raise when a model or dataset cannot be fetched, as one-line `UserError`s.

Offline (`HF_HUB_OFFLINE=1`) and not cached, the network down, no such model, dataset or revision, a private or gated
repository: each gets a message naming the setting to change. Other errors pass through unchanged.
"""

from __future__ import annotations

from huggingface_hub import is_offline_mode
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from florence_ops.errors import DataSourceError, UserError

# transformers re-raises these as OSError with the hub client's error as the cause: not cached and offline or
# unreachable (LocalEntryNotFoundError); no such model, revision or access, or another HTTP error (HfHubHTTPError);
# a name that is neither a directory nor a possible hub id, such as a mistyped local path (HFValidationError).
MODEL_FETCH_ERRORS = (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError)
OFFLINE_HINT = "set HF_HUB_OFFLINE=0 and check the connection"


def model_fetch_error(error: OSError, name: str, revision: str | None) -> UserError | None:
    """The one-line error for transformers' `error` loading hub model `name`; None when it is not a fetch failure."""
    cause = error.__cause__
    if not isinstance(cause, MODEL_FETCH_ERRORS):
        return None
    instead = "or set model.name to tiny or a local model directory"
    if isinstance(cause, HFValidationError):
        return UserError(f"model.name: {name} is neither a local directory nor a hub id (org/name); check the path")
    if isinstance(cause, RevisionNotFoundError):
        return UserError(f"model.revision: {revision} does not exist for {name} on the hub; set an existing commit")
    if isinstance(cause, RepositoryNotFoundError):  # gated and private repositories without a token included
        return UserError(
            f"model.name: {name} is neither a local directory nor a model on the Hugging Face hub (a private or gated "
            f"one needs `hf auth login`); check the name, {instead}"
        )
    if isinstance(cause, LocalEntryNotFoundError) and is_offline_mode():
        return UserError(
            f"model.name: {name} is not in the local hub cache and HF_HUB_OFFLINE=1; {OFFLINE_HINT}, {instead}"
        )
    return UserError(
        f"model.name: cannot fetch {name} from the Hugging Face hub and it is not cached ({_one_line(cause)}); "
        f"check the connection and the name, {instead}"
    )


def dataset_fetch_error(error: Exception, dataset: str) -> DataSourceError:
    """The one-line error for what `datasets.load_dataset` raised opening hub dataset `dataset`: ConnectionError when
    the hub cannot be reached (offline included), DatasetNotFoundError for a missing, private or gated dataset or
    revision."""
    instead = "or use data.source: local (your own documents) or synthetic"
    if isinstance(error, ConnectionError) and is_offline_mode():
        return DataSourceError(
            f"data.hf.dataset: {dataset} is streamed from the hub and HF_HUB_OFFLINE=1; {OFFLINE_HINT}, {instead}"
        )
    if isinstance(error, ConnectionError):
        return DataSourceError(
            f"data.hf.dataset: cannot reach {dataset} on the Hugging Face hub ({_one_line(error)}); "
            f"check the connection, {instead}"
        )
    return DataSourceError(
        f"data.hf: {_one_line(error)} Check data.hf.dataset and data.hf.revision (a private or gated dataset needs "
        f"`hf auth login`), {instead}"
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
