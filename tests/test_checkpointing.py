"""`CheckpointStore`: one `last` checkpoint per run, replaced atomically, found again after an interrupted rename, with
DVCLive's folder as it was when the checkpoint was saved."""

import json
from pathlib import Path

from florence_ops.checkpointing import LIVE, CheckpointStore


class FakeAccelerator:
    """The part of `accelerate.Accelerator` the store uses: one process whose state is a file naming its step."""

    is_main_process = is_local_main_process = True

    def __init__(self, state: str = ""):
        self.state, self.loaded = state, None

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_text(self.state)

    def load_state(self, folder: str) -> None:
        self.loaded = (Path(folder) / "model.safetensors").read_text()


def files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_no_checkpoint_until_one_is_saved(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", "abc")
    assert store.latest() is None
    (store.folder / ".tmp-4").mkdir(parents=True)  # a save killed before its rename
    assert store.latest() is None


def test_save_replaces_last_and_leaves_nothing_else(tmp_path):
    live = tmp_path / "live"
    (live / "plots").mkdir(parents=True)
    (live / "plots/loss.tsv").write_text("step\tloss\n0\t6.5\n")
    store = CheckpointStore(tmp_path / "checkpoints", "abc", live)
    store.save(FakeAccelerator("step 2"), {"step": 2})
    (live / "plots/loss.tsv").write_text("step\tloss\n0\t6.5\n1\t6.1\n")
    last = store.save(FakeAccelerator("step 4"), {"step": 4, "epoch": 1})

    assert last == store.latest() == tmp_path / "checkpoints/abc/last"
    assert files(store.folder) == {"last/model.safetensors", "last/progress.json", f"last/{LIVE}/plots/loss.tsv"}
    assert store.progress(last) == {"step": 4, "epoch": 1}
    assert (last / LIVE / "plots/loss.tsv").read_text().endswith("1\t6.1\n")
    accelerator = FakeAccelerator()
    assert store.load(accelerator, last) == {"step": 4, "epoch": 1} and accelerator.loaded == "step 4"


def test_a_rename_interrupted_halfway_falls_back_to_the_previous_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", "abc")
    store.save(FakeAccelerator("step 2"), {"step": 2})
    store.last.rename(store.previous)  # killed between moving `last` aside and renaming the new one into place
    assert store.latest() == store.previous
    store.last.mkdir()  # a `last` without progress.json is not complete
    assert store.latest() == store.previous
    assert store.progress(store.latest()) == {"step": 2}


def test_restore_live_puts_back_dvclive_as_the_checkpoint_saw_it(tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    (live / "metrics.json").write_text('{"step": 2}')
    store = CheckpointStore(tmp_path / "checkpoints", "abc", live)
    last = store.save(FakeAccelerator(), {"step": 2})
    (live / "metrics.json").write_text('{"step": 3}')  # logged after the checkpoint, then the run was killed
    (live / "extra.tsv").write_text("late\n")

    store.restore_live(last)
    assert files(live) == {"metrics.json"} and json.loads((live / "metrics.json").read_text()) == {"step": 2}


def test_runs_keep_apart_and_clear_deletes_only_its_own(tmp_path):
    root = tmp_path / "checkpoints"
    mine, other = CheckpointStore(root, "run-a"), CheckpointStore(root, "run-b")
    mine.save(FakeAccelerator(), {"step": 1})
    assert other.latest() is None
    other.save(FakeAccelerator(), {"step": 7})
    mine.clear()
    assert mine.latest() is None and not mine.folder.exists()
    assert other.progress(other.latest()) == {"step": 7}


def _prepared_state():
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return accelerator, (model, optimizer, scheduler)


def test_a_background_save_returns_before_its_write_and_writes_what_save_state_writes(tmp_path):
    """The checkpoint written off the training path holds the state as it was when the save was asked for, in the
    same files and with the same contents as accelerate's `save_state` then, even though training changed the
    weights and stepped the optimizer while the write waited for the disk."""
    import threading

    import torch
    from safetensors.torch import load_file

    from florence_ops.checkpointing import BackgroundWrites

    accelerator, state = _prepared_state()
    in_place = CheckpointStore(tmp_path / "in-place", "run").save(accelerator, {"step": 1})
    writes, disk_free = BackgroundWrites(), threading.Event()
    writes.queue(disk_free.wait)  # an earlier save still being written
    store = CheckpointStore(tmp_path / "background", "run", writes=writes)
    try:
        assert store.save(accelerator, {"step": 1}, state) == store.last
        assert not store.last.exists(), "the save waited for its write"
        model, optimizer, _ = state
        model(torch.ones(3, 4)).sum().backward()  # training goes on
        optimizer.step()
    finally:
        disk_free.set()
    store.wait()

    assert files(store.last) == files(in_place)
    for name in ("model.safetensors",):
        written, expected = load_file(store.last / name), load_file(in_place / name)
        assert all(torch.equal(written[k], expected[k]) for k in expected) and written.keys() == expected.keys()
    written, expected = (torch.load(f / "optimizer.bin", weights_only=False) for f in (store.last, in_place))
    assert written["param_groups"] == expected["param_groups"]
    for index, values in expected["state"].items():
        assert all(torch.equal(written["state"][index][k], v) for k, v in values.items())
    assert torch.load(store.last / "scheduler.bin", weights_only=False) == torch.load(in_place / "scheduler.bin",
                                                                                      weights_only=False)  # fmt: skip
    rng = [torch.load(f / "random_states_0.pkl", weights_only=False) for f in (store.last, in_place)]
    assert torch.equal(rng[0]["torch_manual_seed"], rng[1]["torch_manual_seed"]) and rng[0]["step"] == rng[1]["step"]


def test_a_failed_background_write_fails_the_run_at_the_next_wait_or_save(tmp_path):
    import pytest
    import torch

    from florence_ops.checkpointing import BackgroundWrites

    writes = BackgroundWrites()
    writes.queue(lambda: (tmp_path / "missing" / "model.safetensors").write_text("x"))
    with pytest.raises(FileNotFoundError):
        writes.wait()

    writes.queue(lambda: (tmp_path / "missing" / "optimizer.bin").write_text("x"), ("weights",))
    writes.copy("weights", {"w": torch.ones(2)})  # the next save: its copy waits for that write to end
    with pytest.raises(FileNotFoundError):  # and its queueing reports the failure, not a save a checkpoint later
        writes.queue(lambda: None)


def test_a_save_into_host_buffers_still_being_written_waits_for_that_write(tmp_path):
    """Each kind of save copies into the same host buffers every time; the next copy waits until the write that
    reads them is on disk, so that write holds the values of its own save, not the next one's."""
    import threading

    import torch
    from safetensors.torch import load_file, save_file

    from florence_ops.checkpointing import BackgroundWrites

    writes, disk_free = BackgroundWrites(), threading.Event()
    first, _ = writes.copy("weights", {"w": torch.ones(4)})
    writes.queue(lambda: (disk_free.wait(), save_file(first, tmp_path / "first.safetensors")), ("weights",))
    threading.Timer(0.3, disk_free.set).start()  # the disk frees up while the next save is being copied
    second, waited = writes.copy("weights", {"w": torch.full((4,), 2.0)})
    writes.wait()

    assert torch.equal(load_file(tmp_path / "first.safetensors")["w"], torch.ones(4))
    assert torch.equal(second["w"], torch.full((4,), 2.0)) and waited > 0.1
    assert second["w"].data_ptr() == first["w"].data_ptr(), "the second save allocated new host memory"


def test_the_best_model_written_in_the_background_leaves_the_training_tokenizer_alone(tmp_path):
    """The training loop batches with the processor's tokenizer while the best model is being written. Saving the
    processor resets a fast tokenizer's padding state, so saving it on the writer's thread broke batches being
    collated then: a `dvc repro` of the default pipeline failed at an epoch's end with `ValueError: Unable to create
    tensor`. Every batch collated while best models are written comes out whole, and each saved model directory
    holds the processor, loadable."""
    from accelerate import Accelerator
    from transformers import AutoProcessor

    from florence_ops.base_models import build_tiny_model, build_tiny_processor
    from florence_ops.checkpointing import BackgroundWrites
    from florence_ops.config import TinyModel
    from florence_ops.model_inputs import Collator
    from florence_ops.stages.train import save_trained
    from florence_ops.training import DocVQAObjective

    spec = TinyModel(image_size=64, vision_dims=[8, 16, 16, 32], vision_heads=[1, 2, 2, 4], d_model=32, heads=2,
                     ffn_dim=64, vocab_size=300)  # fmt: skip
    processor = build_tiny_processor(spec, ["<DocVQA>What is the total amount?", "ACME Corp", "$1,234.50"] * 5)
    accelerator = Accelerator(cpu=True)
    objective = accelerator.prepare(DocVQAObjective(build_tiny_model(spec, processor, 0)))
    collate = Collator(processor.tokenizer, "<DocVQA>", 32, 16, train=True)
    rows = [{"question": "What?", "answers": ["A"], "image_id": "p"},
            {"question": "What is the total amount?", "answers": ["$1,234.50 ACME Corp"], "image_id": "p"}]  # fmt: skip
    writes, target = BackgroundWrites(), tmp_path / "best"
    for _ in range(20):
        save_trained(accelerator, objective, processor, target, writes)
        for _ in range(40):  # the next steps' batches, collated while the write runs
            batch = collate(rows)
            assert batch.input_ids.shape[0] == 2
    writes.wait()

    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    saved = AutoProcessor.from_pretrained(target)
    assert saved.tokenizer("What?").input_ids == processor.tokenizer("What?").input_ids
