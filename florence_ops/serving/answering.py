"""A loaded model directory that answers questions about page images, through `generation.answer` as evaluation does.

`predict` and every server worker hold one `Answerer`. Pages arrive already at the model's input size (see
`pages.py`), so the pixels are those preprocess would store, and the collator, prompt and decoding are those
evaluation used for this model (`model_dir.read_settings`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from florence_ops.config import Params
from florence_ops.data.validation import QUESTION_TOO_LONG, Problem
from florence_ops.errors import UserError
from florence_ops.generation import Decoding, answer
from florence_ops.model_inputs import Collator, build_prompt
from florence_ops.modeling import load_pretrained, load_processor
from florence_ops.serving.model_dir import AskSettings, read_settings, version_of
from florence_ops.vision.sources import PixelSource

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when available (answers in bf16 autocast there unless the model's precision is fp32), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def input_size(processor) -> tuple[int, int]:
    """The model's image input size (height, width), from its image processor (what preprocess resizes to)."""
    size = getattr(processor.image_processor, "size", None) or {}
    if "height" not in size or "width" not in size:
        raise UserError(f"the model's image processor has no height/width size ({size!r})")
    return int(size["height"]), int(size["width"])


@dataclass
class Answerer:
    """A model and processor on a device, with the collator and decoding evaluation used for it."""

    model_dir: Path
    model: torch.nn.Module
    processor: object
    collator: Collator
    decoding: Decoding
    device: torch.device
    settings: AskSettings
    version: str | None
    pool: ThreadPoolExecutor

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) that pages are resized to."""
        return input_size(self.processor)

    def answer(self, rows: Sequence[dict], images: Mapping[str, Image.Image] | PixelSource) -> list[str]:
        """Answers to `rows` (dicts with question and image_id), in order; `images[image_id]` is a model-size page,
        or `images` is a source of such pages (the server's `PageRows`).

        cuDNN is left out (convolutions and attention run on PyTorch's own kernels): it builds an execution plan for
        every new input shape, which on a GPU costs more than the answer itself when, as in serving, nearly every
        batch brings a new batch size or question length.
        """
        source = images if isinstance(images, PixelSource) else PixelSource(images, self.processor.image_processor)
        with without_cudnn():
            return answer(self.model, rows, self.collator, source, self.decoding, self.device)

    def prompt_tokens(self, questions: Sequence[str]) -> list[int]:
        """Encoder tokens of each question: the image's tokens plus the prompt and question as the collator cuts
        them."""
        if not questions:
            return []
        texts = [self.settings.prompt + question.strip() for question in questions]
        encoded = self.collator.tokenizer(texts, truncation=True, max_length=self.settings.max_question_tokens)
        image_tokens = int(getattr(self.processor, "num_image_tokens", 0) or 0)
        return [len(ids) + image_tokens for ids in encoded.input_ids]

    def answer_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each answer, without special tokens."""
        if not texts:
            return []
        return [len(ids) for ids in self.collator.tokenizer(list(texts), add_special_tokens=False).input_ids]

    def question_problem(self, question: str) -> Problem | None:
        """`question_too_long` when the collator would cut `question`, else None (see `question_problem`)."""
        return question_problem(self.collator.tokenizer, self.settings, question)


def question_problem(tokenizer, settings: AskSettings, question: str) -> Problem | None:
    """`question_too_long` when the prompt and question have more tokens than `settings.max_question_tokens`, else None.

    The collator cuts the encoder text to that many tokens, as training did: a longer question would be answered
    without its end, so it is refused instead. Counted as the collator counts: `<s>`, prompt, question, `</s>`.
    """
    tokens = len(tokenizer(build_prompt(settings.prompt, question)).input_ids)
    if tokens <= settings.max_question_tokens:
        return None
    return Problem(QUESTION_TOO_LONG, f"the prompt and question are {tokens} tokens, over the model's limit of "
                   f"{settings.max_question_tokens} ({settings.limit_setting}): shorten the question")  # fmt: skip


class QuestionLimit:
    """`question_problem` for the model now in `model_dir`, without loading the model: the server's HTTP processes
    check questions with it before any model work. Its tokenizer and settings are re-read after a swap."""

    def __init__(self, model_dir: Path, params: Params):
        self.model_dir, self.params = Path(model_dir), params
        self._loaded: tuple[str | None, object, AskSettings] | None = None  # version, tokenizer, settings

    def problem(self, question: str) -> Problem | None:
        """`question_too_long` when the model in `model_dir` would not see all of `question`, else None."""
        version = version_of(self.model_dir)
        if self._loaded is None or (version is not None and version != self._loaded[0]):
            try:
                self._loaded = (version, load_processor(self.model_dir, self.params.model).tokenizer,
                                read_settings(self.model_dir, self.params))  # fmt: skip
            except Exception as error:  # mid-promotion: keep checking with the model the workers still serve
                if self._loaded is None:
                    raise
                log.warning("question-token limit of the new model not read yet: %s", error)
        _, tokenizer, settings = self._loaded
        return question_problem(tokenizer, settings, question)


@contextlib.contextmanager
def without_cudnn():
    """Convolutions and scaled dot-product attention without cuDNN, for the duration of the block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.backends.cudnn.flags(enabled=False), sdpa_kernel(backends):
        yield


def load_answerer(
    model_dir: str | Path,
    params: Params,
    batch_size: int,
    device: torch.device | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> Answerer:
    """Load `model_dir` (any Hugging Face layout directory) for answering in batches of `batch_size`.

    `pool` decodes predict's page files; by default one thread per CPU core (threads start on first use).
    """
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    version = version_of(model_dir)
    settings = read_settings(model_dir, params)
    device = device or default_device()
    model, processor = load_pretrained(model_dir, params.model)
    model.to(device).eval()
    collator = Collator(processor.tokenizer, settings.prompt, settings.max_question_tokens, 0, train=False)
    decoding = Decoding(batch_size, settings.num_beams, settings.max_new_tokens, settings.precision)
    pool = pool or ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="pixels")
    log.info("loaded %s on %s (prompt, token limit and precision from %s; %d beam(s), %d new tokens, precision %s)",
             model_dir, device, settings.source, settings.num_beams, settings.max_new_tokens,
             settings.precision)  # fmt: skip
    return Answerer(model_dir, model, processor, collator, decoding, device, settings, version, pool)


def check_model_dir(model_dir: Path) -> None:
    """Raise UserError when `model_dir` is not a loadable model directory, saying what to do."""
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} holds no model (no config.json): run the pipeline (`dvc repro`) or pass --model")
    if (model_dir / "adapter_config.json").is_file():
        raise UserError(f"{model_dir} holds LoRA adapters, not a model: use the exported model (`florence-ops export`)")
