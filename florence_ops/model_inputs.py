"""From processed records to model inputs: prompts, labels, masks, length-aware batches.

A Florence-2 encoder input is the image's tokens followed by `<s> prompt question </s>`; the processor builds it by
writing one placeholder token per image token into the text. Here the text is tokenized alone and the image tokens
are concatenated as embeddings (`embed_inputs`), which is the same sequence without 577 placeholder ids per sample
and lets cached vision features stand in for pixels.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100


@dataclass
class TextBatch:
    """Tokenized questions (and answers, for training) of one batch, plus the image each question is about."""

    input_ids: torch.Tensor  # (B, T) <s> prompt question </s>, right-padded
    attention_mask: torch.Tensor  # (B, T)
    image_ids: list[str]
    labels: torch.Tensor | None = None  # (B, L) <s> answer </s>, padding set to IGNORE_INDEX
    decoder_attention_mask: torch.Tensor | None = None  # (B, L) 1 on real decoder inputs
    vision: torch.Tensor | None = None  # each distinct page's vision input (uint8 pixels or cached tower output)
    image_index: torch.Tensor | None = None  # (B,) row of `vision` that each question is about

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TextBatch:
        """The same batch with its tensors on `device`."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TextBatch:
        """The same batch in page-locked memory (the DataLoader calls this with `pin_memory=True`); tensors already
        on a device stay there."""
        return self._apply(lambda t: t.pin_memory() if t.device.type == "cpu" else t)

    def _apply(self, fn) -> TextBatch:
        names = ("input_ids", "attention_mask", "labels", "decoder_attention_mask", "vision", "image_index")
        tensors = {name: getattr(self, name) for name in names}
        moved = {name: None if t is None else fn(t) for name, t in tensors.items()}
        return TextBatch(image_ids=self.image_ids, **moved)


def build_prompt(prompt: str, question: str) -> str:
    """The encoder text for one question: the task prefix followed by the question, as the common recipe does."""
    return prompt + question.strip()


def encode_labels(tokenizer, answers: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer token ids with padding replaced by IGNORE_INDEX, and the decoder attention mask."""
    encoded = tokenizer(list(answers), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    mask = encoded["attention_mask"]
    labels = encoded["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    return labels, mask


class Collator:
    """Turns rows of a processed split into a `TextBatch`; answers become labels when `train` is true."""

    def __init__(self, tokenizer, prompt: str, max_question_tokens: int, max_answer_tokens: int, train: bool):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_question_tokens = max_question_tokens
        self.max_answer_tokens = max_answer_tokens
        self.train = train

    def __call__(self, rows: list[dict]) -> TextBatch:
        texts = [build_prompt(self.prompt, row["question"]) for row in rows]
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_question_tokens, return_tensors="pt"
        )
        batch = TextBatch(encoded["input_ids"], encoded["attention_mask"], [row["image_id"] for row in rows])
        if self.train:
            # The common recipe trains on the first accepted answer.
            batch.labels, batch.decoder_attention_mask = encode_labels(
                self.tokenizer, [row["answers"][0] for row in rows], self.max_answer_tokens
            )
        return batch


def embed_inputs(model, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Encoder input embeddings `[image tokens; text tokens]` and their attention mask (None without padding)."""
    text = model.get_input_embeddings()(input_ids)
    embeds = torch.cat([image_features.to(text.dtype), text], dim=1)
    if attention_mask is None:
        return embeds, None
    return embeds, torch.cat([attention_mask.new_ones(image_features.shape[:2]), attention_mask], dim=1)


def project_vision(model, vision_output: torch.Tensor) -> torch.Tensor:
    """Image token embeddings from the vision tower's output (the trainable projector)."""
    return model.model.multi_modal_projector(vision_output)


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of questions of similar length, the same for a given (seed, epoch) in every process.

    Indices are shuffled, cut into pools of `pool_batches` batches, sorted by length inside each pool, cut into
    batches, and the batches shuffled: padding shrinks while every epoch still sees a new order. `pool_batches=1`
    is plain shuffling. Large pools make batches of near-identical questions (one template each), which slows
    learning on small, templated data; the image tokens dominate sequence length anyway, so keep pools small there.

    With `micro_batches` > 1 each batch is yielded as that many consecutive micro-batches (gradient accumulation), so
    the questions of every optimizer step, and their order, do not depend on how the step is split.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, pool_batches: int = 50, micro_batches=1):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.micro_size = -(-batch_size // micro_batches)
        self.seed = seed
        self.pool = batch_size * max(pool_batches, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full * -(-self.batch_size // self.micro_size) + -(-rest // self.micro_size)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            for start in range(0, len(batch), self.micro_size):
                yield batch[start : start + self.micro_size]

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=lambda i: self.lengths[i])
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        rng.shuffle(batches)
        # The one short batch goes last: every optimizer step but the last then has `batch_size` questions.
        return [b for b in batches if len(b) == self.batch_size] + [b for b in batches if len(b) < self.batch_size]
