"""`train.streaming`: each process reads only its own row groups of pages and the questions about them, and the
processes together train every question of the split."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest

from florence_ops.config import ConfigError
from florence_ops.data.processed import ImageTable, read_questions
from florence_ops.data.streaming import ParquetPages, ShardBatches, process_share
from florence_ops.stages.train import COLUMNS
from tests.conftest import tiny_params

STREAMING = {"train.streaming": True, "train.vision_cache": False}
DOCUMENTS = 72  # 72 + 4 + 2 pages in five row groups of 16: with two processes, one gets 40 pages and one 32


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """A prepared workspace with enough row groups of pages to share among processes."""
    from florence_ops.stages.download import download
    from florence_ops.stages.preprocess import preprocess

    root = tmp_path_factory.mktemp("streaming")
    params = tiny_params(root, **{"data.synthetic.train_documents": DOCUMENTS})
    download(params)
    preprocess(params)
    return root


def test_pages_read_by_row_group_are_the_image_tables_pages(prepared):
    table, pages = ImageTable(prepared / "data/processed"), ParquetPages(prepared / "data/processed")
    assert pages.ids == table.ids
    for image_id in table.ids:
        assert np.array_equal(np.asarray(pages[image_id]), np.asarray(table[image_id])), image_id


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_reads_only_its_row_groups_and_together_they_train_the_split(larger, world):
    processed, micro = larger / "data/processed", 4
    questions = read_questions(processed, "train").to_list()
    owner = {image_id: group % world for image_id, group in zip(ParquetPages(processed).ids,
                                                                 ParquetPages(processed).group)}  # fmt: skip
    trained: list[list[str]] = [[], []]  # question ids of two epochs, all processes together
    counts = set()
    for rank in range(world):
        pages = ParquetPages(processed)  # what the process opens
        share = process_share(processed, "train", pages, COLUMNS, rank, world, micro)
        assert {owner[row["image_id"]] for row in share.rows} == {rank}
        assert len(share.rows) == sum(owner[q["image_id"]] == rank for q in questions)
        counts.add(share.micro_batches)
        sampler = ShardBatches(share, micro, seed=1234, rank=rank)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for batch in sampler:
                assert len(batch) == micro
                for i in batch:
                    pages[share.rows[i]["image_id"]]  # as the DataLoader's worker reads a batch's pages
                    trained[epoch].append(share.rows[i]["questionId"])
        assert pages.groups_read and {g % world for g in pages.groups_read} == {rank}, pages.groups_read
    assert len(counts) == 1, f"processes train different numbers of micro-batches: {counts}"
    every = Counter(q["questionId"] for q in questions)
    per_process = Counter(owner[q["image_id"]] for q in questions)
    assert share.left_out == len(questions) - world * (min(per_process.values()) // micro) * micro
    for epoch in trained:
        assert not Counter(epoch) - every, "a question trained twice in one epoch, or one not of the split"
        assert len(epoch) == len(questions) - share.left_out
    assert share.left_out > 0 and set(trained[0]) != set(trained[1]), "each epoch leaves other questions out"


def test_a_resumed_epoch_continues_with_the_batches_it_had_not_trained(larger):
    processed = larger / "data/processed"
    share = process_share(processed, "train", ParquetPages(processed), COLUMNS, 0, 1, 8)
    sampler = ShardBatches(share, 8, seed=7, rank=0)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.set_epoch(3, skip=5)
    assert list(sampler) == whole[5:] and len(sampler) == len(whole) - 5


def test_too_few_row_groups_for_the_processes_is_one_clear_error(prepared):
    from florence_ops.errors import UserError

    processed = prepared / "data/processed"  # 18 pages: two row groups, the second without training pages
    with pytest.raises(UserError, match="train.streaming: process 1 of 2 gets 0 questions"):
        process_share(processed, "train", ParquetPages(processed), COLUMNS, 0, 2, 4)


def test_streaming_needs_the_tower_in_the_step(prepared):
    with pytest.raises(ConfigError, match="set train.vision_cache: false"):
        tiny_params(prepared, **{"train.streaming": True})


@pytest.mark.slow
def test_two_processes_stream_their_shares_and_train_every_step(larger, tmp_path):
    """The train stage with two gloo processes, each on its own share of unequal size: both train the same steps (a
    process with more would wait for its peer in an all-reduce until the collective timeout), and the model it
    writes is trained."""
    from safetensors.torch import load_file

    from florence_ops.stages.train import train

    root = tmp_path / "ws"
    shutil.copytree(larger, root)
    overrides = {**STREAMING, "data.synthetic.train_documents": DOCUMENTS, "train.num_processes": 2, "epochs": 2,
                 "train.eval_every_epoch": True, "train.collective_timeout_s": 60}  # fmt: skip
    summary = train(tiny_params(root, **overrides))
    share = process_share(root / "data/processed", "train", ParquetPages(root / "data/processed"), COLUMNS, 0, 2, 4)
    assert summary["steps"] == 2 * share.micro_batches
    written = json.loads((root / "models/train/summary.json").read_text())
    assert written["steps"] == summary["steps"] and not written["vision_cache"]
    trained = load_file(root / "models/train/model/model.safetensors")
    base = load_file(root / "models/base/model.safetensors")
    changed = [name for name in trained if name in base and not (trained[name] == base[name]).all()]
    assert any("projector" in name for name in changed), "the projector did not train"
