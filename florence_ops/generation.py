"""Batched answers: questions grouped by document, bf16 on CUDA, special tokens stripped.

The recipe answers one question at a time in fp32 with Florence-2's default `no_repeat_ngram_size=3`, which corrupts
answers that repeat an n-gram ("10 10 10"); here decoding settings are explicit and batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from florence_ops.model_inputs import Collator, TextBatch, embed_inputs, project_vision
from florence_ops.modeling import unwrap
from florence_ops.precision import autocast, autocast_dtype
from florence_ops.vision.sources import WithVision, tower_output


@dataclass
class Decoding:
    """Decoding settings of `answer`."""

    batch_size: int = 32
    num_beams: int = 1
    max_new_tokens: int = 20
    precision: str = "auto"  # `train.precision` (see `florence_ops.precision`): bf16 autocast on CUDA unless fp32


@torch.no_grad()
def answer(
    model,
    rows: Sequence[dict],
    collator: Collator,
    source,
    decoding: Decoding,
    device: torch.device,
    num_workers: int = 0,
) -> list[str]:
    """Answers to `rows` (dicts with question and image_id), in the order of `rows`.

    Up to `num_workers` DataLoader workers (`loader_workers`) tokenize and decode pages (or read cached features)
    ahead of the device.
    """
    model.eval()
    tokenizer = collator.tokenizer
    prompts = [collator.prompt + row["question"] for row in rows]
    lengths = [len(ids) for ids in tokenizer(prompts).input_ids] if prompts else []
    # A document's questions share a batch, so its image goes through the vision tower once (DocVQA asks about four
    # questions per page); question padding is small beside the 577 image tokens.
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["image_id"], lengths[i]))
    plan = [order[start : start + decoding.batch_size] for start in range(0, len(order), decoding.batch_size)]
    loader = DataLoader(
        list(rows),
        batch_sampler=plan,
        collate_fn=WithVision(collator, source),
        num_workers=loader_workers(num_workers, len(plan)),
        pin_memory=device.type == "cuda",
    )
    dtype = autocast_dtype(decoding.precision, device)
    answers: list[str] = [""] * len(rows)
    for chosen, batch in zip(plan, loader):
        with autocast(dtype, device):
            ids = generate_ids(model, batch.to(device), source, decoding, device)
        for i, text in zip(chosen, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers


def answer_across_processes(
    accelerator, model, rows: Sequence[dict], collator: Collator, source, decoding: Decoding, num_workers: int = 0
) -> list[str]:
    """`answer` with each process answering a contiguous share of `rows`; every process gets all answers, in order."""
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(list(rows)) as shard:
        mine = answer(unwrap(model), shard, collator, source, decoding, accelerator.device, num_workers)
    return gather_object(mine) if accelerator.num_processes > 1 else mine


def loader_workers(num_workers: int, batches: int) -> int:
    """The DataLoader workers worth starting for `batches` batches: none for a single batch (this process prepares
    it as fast as a worker would, without forking one), never more than there are batches."""
    return min(num_workers, batches) if batches > 1 else 0


def generate_ids(model, batch: TextBatch, source, decoding: Decoding, device: torch.device) -> torch.Tensor:
    """Generated token ids for one batch: the encoder runs once, then greedy or beam decoding."""
    features = project_vision(model, tower_output(model, source, batch, device))
    embeds, mask = embed_inputs(model, features, batch.input_ids, batch.attention_mask)
    encoder_outputs = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
    return model.generate(
        encoder_outputs=encoder_outputs,
        attention_mask=mask,
        max_new_tokens=decoding.max_new_tokens,
        num_beams=decoding.num_beams,
        do_sample=False,
        no_repeat_ngram_size=0,
        early_stopping=decoding.num_beams > 1,
    )
