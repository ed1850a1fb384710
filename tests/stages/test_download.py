"""Contract of the download stage on the tiny synthetic default: the exact files of the raw data and the base model."""

from tests.stages.conftest import declared_outputs, files, under
from tests.stages.test_train import MODEL_FILES

RAW_FILES = {f"data/raw/{name}.parquet" for name in ("pages", "train", "validation", "test")}
DOWNLOAD_FILES = RAW_FILES | {f"models/base/{name}" for name in MODEL_FILES}


def test_download_writes_exactly_its_outputs(prepared):
    """`prepared` is a fresh workspace after download and preprocess: download's outputs hold exactly these files."""
    assert declared_outputs("download") == {"data/raw", "models/base"}
    assert under(set(files(prepared)), declared_outputs("download")) == DOWNLOAD_FILES
