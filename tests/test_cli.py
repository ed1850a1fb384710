"""The `florence-ops` command on bad input: exit code 2 and one line starting with `error:`, never a traceback."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from florence_ops.params_file import read_yaml
from tests.conftest import REPO

SMALL_DATA = {"train_documents": 2, "validation_documents": 1, "test_documents": 0, "questions_per_document": 1}


def run_cli(workdir: Path, *args: str, hub: str | None = None) -> subprocess.CompletedProcess:
    """`florence-ops <args>` in `workdir` with an empty Hugging Face cache: offline, or online against `hub`."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_CACHE")}
    offline = "0" if hub else "1"
    env.update(HF_HOME=str(workdir / "hf-home"), HF_HUB_OFFLINE=offline, HF_DATASETS_OFFLINE=offline)
    env.update(TRANSFORMERS_OFFLINE=offline, **({"HF_ENDPOINT": hub} if hub else {}))
    command = [sys.executable, "-m", "florence_ops.cli", *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def write_params(workdir: Path, **sections) -> Path:
    """The repository's params.yaml with the given sections updated, small synthetic data, paths under `workdir`."""
    params = read_yaml(REPO / "params.yaml")
    params["data"]["synthetic"] = SMALL_DATA
    for section, values in sections.items():
        params[section].update(values)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def the_error_line(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed run, after checking exit code 2 and that no traceback was printed."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr
    return errors[0]


def test_yaml_syntax_error_in_params_names_the_file_and_line(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("epochs: 40 ", "epochs: [40 ", 1)
    (tmp_path / "params.yaml").write_text(text)
    line = the_error_line(run_cli(tmp_path, "train"))
    assert line.startswith("error: params.yaml: invalid YAML at line ")
    assert "(while parsing a flow sequence opened at line 4)" in line and "fix the YAML syntax" in line


def test_hub_model_while_offline_says_what_to_change(tmp_path):
    write_params(tmp_path, model={"name": "florence-community/Florence-2-base-ft"})
    line = the_error_line(run_cli(tmp_path, "download"))
    assert line.startswith("error: model.name: florence-community/Florence-2-base-ft is not in the local hub cache")
    assert "set HF_HUB_OFFLINE=0 and check the connection" in line and "model.name to tiny" in line
    assert not (tmp_path / "models" / "base").exists()
    assert not (tmp_path / "data" / "raw").exists()  # the model is resolved before any data is fetched


def test_hub_data_while_offline_says_what_to_change(tmp_path):
    write_params(tmp_path, data={"source": "hf"})
    line = the_error_line(run_cli(tmp_path, "download"))
    assert line.startswith("error: data.hf.dataset: HuggingFaceM4/DocumentVQA is streamed from the hub")
    assert "set HF_HUB_OFFLINE=0 and check the connection" in line and "data.source: local" in line
    assert not (tmp_path / "data" / "raw").exists()


class NoSuchRepository(http.server.BaseHTTPRequestHandler):
    """A local stand-in for the hub that knows no repository: 404 with the hub's RepoNotFound error code."""

    def do_HEAD(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def empty_hub():
    """The URL of a local hub on which no model or dataset exists (no request leaves the machine)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepository)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"name": "someone/no-such-model"}}, "error: model.name: someone/no-such-model is neither a local "),
        ({"data": {"source": "hf", "hf": {"dataset": "someone/no-such-data"}}}, "error: data.hf: Dataset 'someone/"),
    ],
)
def test_hub_id_that_does_not_exist_online_says_what_to_change(tmp_path, empty_hub, sections, expected):
    write_params(tmp_path, **sections)
    line = the_error_line(run_cli(tmp_path, "download", hub=empty_hub))
    assert line.startswith(expected) and "hf auth login" in line


def test_local_model_directory_that_does_not_exist_says_so(tmp_path):
    write_params(tmp_path, model={"name": "./models/my-florence"})
    line = the_error_line(run_cli(tmp_path, "download"))
    assert line.startswith("error: model.name: ./models/my-florence is neither a local directory nor a hub id")
    assert line.endswith("; check the path")
    assert not (tmp_path / "data" / "raw").exists()  # the model is resolved before any data is fetched


@pytest.mark.parametrize("command", ["train", "serve"])
def test_commands_load_the_registry_only_when_they_use_it(tmp_path, command):
    """GTO and DVC load for `florence-ops registry` and `serve --model registry:...` only: a stage's start-up, or a
    server of a model directory (on a GPU machine without them), does not pay for the model registry."""
    stub = "import florence_ops.serving.server as s; s.serve = lambda *a, **k: None"  # stop before a model loads
    args = [command, "--params", str(REPO / "params.yaml"), "--help" if command == "train" else f"--model={tmp_path}"]
    check = (
        f"import sys\n{stub}\nfrom florence_ops import cli\n"
        f"try:\n    cli.main({args!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted({'gto', 'dvc'} & {name.split('.')[0] for name in sys.modules}))"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
