"""Batched answering (`florence_ops.generation.answer`) as validation and evaluate run it."""

import os

import pytest

from tests.conftest import tiny_params

pytestmark = pytest.mark.slow


class PidSource:
    """A vision source that writes down the process each batch's pages are loaded in."""

    def __init__(self, source, log):
        self.source, self.log = source, log
        self.cached, self.gives_tower_output = source.cached, source.gives_tower_output

    def load(self, image_ids):
        with open(self.log, "a") as stream:
            stream.write(f"{os.getpid()}\n")
        return self.source.load(image_ids)

    def prepare(self, loaded, device):
        return self.source.prepare(loaded, device)


def test_one_batch_of_answers_is_prepared_here_without_forking_loader_workers(prepared, tmp_path):
    """Validation asks 512 questions in one batch of 512 with `train.num_workers` (12 on a GPU) loader workers:
    forking them cost more than the batch (an epoch's validation after the first: 0.6-0.8 s with them, 0.2 s without,
    on an H200). Several batches still load in workers; the answers are the same either way."""
    import torch

    from florence_ops.data.processed import ImageTable, read_questions
    from florence_ops.generation import Decoding, answer, loader_workers
    from florence_ops.model_inputs import Collator
    from florence_ops.modeling import load_pretrained
    from florence_ops.vision.sources import PixelSource

    assert [loader_workers(12, batches) for batches in (0, 1, 2, 20)] == [0, 0, 2, 12]
    params = tiny_params(prepared)
    model, processor = load_pretrained(params.paths.base_model, params.model)
    rows = read_questions(prepared / "data/processed", "validation").to_list()[:6]
    cfg = params.train
    collator = Collator(processor.tokenizer, cfg.prompt, cfg.max_question_tokens, cfg.max_answer_tokens, train=False)
    pixels = PixelSource(ImageTable(prepared / "data/processed"), processor.image_processor)
    cpu = torch.device("cpu")

    def answers(batch_size: int, workers: int, log: str) -> list[str]:
        source = PidSource(pixels, tmp_path / log)
        return answer(model, rows, collator, source, Decoding(batch_size, max_new_tokens=4), cpu, num_workers=workers)

    assert answers(8, 4, "one") == answers(8, 0, "one-here")
    assert (tmp_path / "one").read_text().split() == [str(os.getpid())]
    assert answers(2, 2, "three") == answers(2, 0, "three-here")
    loaded_in = (tmp_path / "three").read_text().split()
    assert len(loaded_in) == 3 and str(os.getpid()) not in loaded_in, "several batches still load in workers"
