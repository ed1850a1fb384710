"""Several machines rehearsed on one host: two `accelerate launch` launchers with `train.num_machines: 2` (one CPU
process each, gloo over 127.0.0.1, c10d rendezvous on a free port), each "machine" with its own workspace (its data,
its vision cache) and one shared checkpoint folder, as a cluster's shared file system gives."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from florence_ops.config import ConfigError, to_dict
from tests.conftest import REPO, TINY_OVERRIDES, tiny_params

# 48 questions in batches of 8: 6 steps an epoch; checkpoints at steps 4, 6 (epoch end), 8, 12, 16, 18.
OVERRIDES = {"epochs": 3, "train.checkpoint_every": 4, "train.eval_every_epoch": False}
MODEL = "models/train/model/model.safetensors"
EXIT_WITHIN_S = 120  # the surviving machine must give up this fast once its peer is gone (no hang)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _machines(prepared: Path, tmp_path: Path, port: int) -> list[Path]:
    """Two machine workspaces copied from `prepared`, with params.yaml for `train.num_machines: 2`."""
    roots = []
    for rank in range(2):
        root = tmp_path / f"machine{rank}"
        shutil.copytree(prepared, root)
        params = tiny_params(root, **OVERRIDES, **{
            "paths.checkpoints": str(tmp_path / "shared/checkpoints"), "train.num_machines": 2,
            "train.main_process_ip": "127.0.0.1", "train.main_process_port": port, "train.collective_timeout_s": 60,
        })  # fmt: skip
        (root / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
        roots.append(root)
    return roots


def _start(root: Path, rank: int, log: str = "train.log") -> subprocess.Popen:
    """`florence-ops train --machine-rank R` in `root`, in a process group of its own (a machine to kill whole)."""
    command = [
        sys.executable,
        "-m",
        "florence_ops.cli",
        "train",
        "--params",
        "params.yaml",
        "--machine-rank",
        str(rank),
    ]
    with open(root / log, "w") as output:
        return subprocess.Popen(command, cwd=root, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                _kill_machine(process)


@pytest.fixture(scope="module")
def one_machine_two_processes(prepared, tmp_path_factory) -> bytes:
    """The trained weights of one machine with two processes, the same global batch."""
    from florence_ops.stages.train import train

    root = tmp_path_factory.mktemp("one") / "ws"
    shutil.copytree(prepared, root)
    train(tiny_params(root, **OVERRIDES, **{"train.num_processes": 2}))
    return (root / MODEL).read_bytes()


PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])  # where the CLI is installed


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("florence-ops", path=PATH) is None,
                    reason="needs git and the CLI")  # fmt: skip
def test_two_machines_through_the_slurm_script_train_the_weights_of_one_machine_with_two_processes(
    tmp_path, one_machine_two_processes, monkeypatch
):
    """examples/slurm_train.sh on each "machine" as srun starts it there: machine 0 runs `dvc repro train` in a DVC
    workspace, machine 1 `florence-ops train --machine-rank 1` in a copy of it; the address comes from MASTER_ADDR."""
    from tests.test_resume import _dvc, _dvc_workspace

    monkeypatch.setenv("PATH", PATH)  # dvc's stages call `florence-ops`

    overrides = {
        **TINY_OVERRIDES,
        **OVERRIDES,
        "paths.checkpoints": str(tmp_path / "shared/checkpoints"),
        "train.num_machines": 2,
        "train.main_process_port": _free_port(),
        "train.collective_timeout_s": 60,
    }
    roots = [tmp_path / "machine0", tmp_path / "machine1"]
    roots[0].mkdir()
    _dvc_workspace(roots[0], overrides)
    _dvc(roots[0], "repro", "-q", "preprocess")
    shutil.copytree(roots[0], roots[1])
    env = {**os.environ, "FLORENCE_OPS_ON_NODE": "1", "MASTER_ADDR": "127.0.0.1", "DVC_NO_ANALYTICS": "1"}
    machines = []
    for rank, root in enumerate(roots):
        with open(root / "train.log", "w") as output:
            machines.append(subprocess.Popen([str(REPO / "examples/slurm_train.sh"), "train"], cwd=root,
                                             env={**env, "SLURM_NODEID": str(rank)}, stdout=output,
                                             stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    codes = _finish(machines)
    assert codes == [0, 0], [(root / "train.log").read_text()[-3000:] for root in roots]
    assert (roots[0] / MODEL).read_bytes() == one_machine_two_processes, "two machines trained other weights"
    assert json.loads((roots[0] / "models/train/summary.json").read_text())["steps"] == 18
    assert not (roots[1] / "models/train").exists(), "only machine rank 0 writes the stage's outputs"
    assert (roots[0] / "reports/train/metrics.json").exists() and not (roots[1] / "reports/train/metrics.json").exists()
    caches = [sorted((root / ".cache/vision_features").rglob("*.*")) for root in roots]
    assert len(caches[0]) == 2, "each machine holds its own vision cache"
    assert [p.read_bytes() for p in caches[0]] == [p.read_bytes() for p in caches[1]]


def _kill_machine(machine: subprocess.Popen) -> None:
    """SIGKILL every process of `machine`, as a lost machine: its launcher and torchrun's workers, which run in
    sessions of their own (killing the launcher's process group leaves them running)."""
    import psutil

    tree = psutil.Process(machine.pid)
    for process in [tree, *tree.children(recursive=True)]:
        process.kill()
    machine.wait()


def _kill_inside_second_epoch(shared: Path, machine: subprocess.Popen) -> dict:
    """Kill `machine` once a checkpoint from the middle of epoch 2 exists; its progress."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and machine.poll() is None:
        found = list(shared.glob("checkpoints/*/last/progress.json"))
        try:
            progress = json.loads(found[0].read_text()) if found else {}
        except (OSError, json.JSONDecodeError):  # being replaced right now
            progress = {}
        if progress.get("epoch") == 1 and progress.get("batches_done"):
            _kill_machine(machine)
            return progress
        time.sleep(0.005)
    raise AssertionError("training ended before a checkpoint inside the second epoch")


@pytest.mark.slow
def test_a_machine_killed_mid_epoch_stops_the_other_which_resumes_with_it(prepared, tmp_path,
                                                                           one_machine_two_processes):  # fmt: skip
    roots = _machines(prepared, tmp_path, _free_port())
    first, second = _start(roots[0], 0), _start(roots[1], 1)
    progress = _kill_inside_second_epoch(tmp_path / "shared", second)
    killed = time.monotonic()
    code = _finish([first], timeout=EXIT_WITHIN_S)[0]
    print(f"machine 0 exited {time.monotonic() - killed:.1f} s after machine 1 was killed at step {progress['step']}")
    lines = (roots[0] / "train.log").read_text().strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: `florence-ops train` failed on machine rank 0"), lines[-20:]
    assert not (roots[0] / "models/train/summary.json").exists()

    codes = _finish([_start(roots[0], 0, "rerun.log"), _start(roots[1], 1, "rerun.log")])
    logs = [(root / "rerun.log").read_text() for root in roots]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    # machine 0 logs the resume; the other machine's process resumed too, or the weights would differ
    assert f"resuming from {tmp_path / 'shared/checkpoints'}" in logs[0], logs[0][-3000:]
    assert f"epoch 1, step {progress['step']}" in logs[0]
    assert (roots[0] / MODEL).read_bytes() == one_machine_two_processes, "the resumed run ends with other weights"
    summary = json.loads((roots[0] / "models/train/summary.json").read_text())
    assert summary["steps"] == 18 and len(summary["history"]) == 3


def test_cache_built_by_two_processes_is_the_bytes_of_one(prepared, tmp_path):
    """Each of two gloo processes encodes a contiguous share of whole batches into the one features file: the cache
    folder holds the same files, the same SHA-256, as a one-process build."""
    from florence_ops.data.processed import ImageTable
    from florence_ops.modeling import load_pretrained
    from florence_ops.vision.stage_cache import open_or_build_cache

    # 18 pages in batches of 4: shards of 3 and 2 batches, the last one short
    params = tiny_params(prepared, **{"model.vision_batch_size": 4, "paths.vision_cache": str(tmp_path / "one")})
    model, processor = load_pretrained(params.paths.base_model, params.model)
    images = ImageTable(params.paths.processed)
    open_or_build_cache(params, model.model.vision_tower.eval(), processor.image_processor, images,
                        model.device, verify=False, build=True)  # fmt: skip
    params_file = tmp_path / "params.yaml"
    shared = to_dict(params)
    shared["paths"]["vision_cache"], shared["train"]["num_processes"] = str(tmp_path / "two"), 2
    params_file.write_text(yaml.safe_dump(shared))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(REPO / "tests/build_cache_together.py"),
        str(params_file),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vision pages encoded: 12 " in done.stderr and "vision pages encoded: 6 " in done.stderr, done.stderr

    def digests(root: Path) -> dict:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
                if p.is_file()}  # fmt: skip

    one, two = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert len(one) == 2 and one == two


def test_machine_rank_outside_the_machines_is_a_one_line_error(workspace):
    params = tiny_params(workspace, **{"train.num_machines": 2, "train.main_process_ip": "127.0.0.1"})
    (workspace / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    done = subprocess.run([sys.executable, "-m", "florence_ops.cli", "train", "--machine-rank", "2"], cwd=workspace,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: machine rank 2 is outside 0..1 (train.num_machines)"


def test_batch_size_divides_by_the_processes_of_all_machines(tmp_path):
    tiny_params(tmp_path, **{"batch_size": 8, "train.num_processes": 2, "train.num_machines": 2})
    with pytest.raises(ConfigError, match="train.num_processes \\* train.num_machines"):
        tiny_params(tmp_path, **{"batch_size": 8, "train.num_processes": 2, "train.num_machines": 3})
