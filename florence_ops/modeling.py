"""Load Florence-2 and its processor; freeze parts; wrap in LoRA; find the model inside its wrappers.

Models are hub ids or local directories in the Hugging Face layout; the locally built base models (the offline toy
default and the real shapes with random weights) come from `florence_ops.base_models`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Florence2ForConditionalGeneration,
    Florence2Processor,
)
from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

from florence_ops.config import LoraSettings, ModelConfig
from florence_ops.hub_errors import model_fetch_error

log = logging.getLogger(__name__)
MAX_WRAPPERS = 8  # DDP/FSDP, compile, the training objective, peft: never more than a few deep


def load_pretrained(
    source: str | Path, cfg: ModelConfig, revision: str | None = None
) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """Load a model and processor from a hub id (at `revision`) or a local Hugging Face directory.

    When `source` is `cfg.name` and that hub model cannot be fetched (offline and not cached, no network, no such
    model or revision), `UserError` says in one line which setting to change.
    """
    local = Path(source).is_dir()
    if not local and revision is None:
        log.warning("model %s has no pinned revision: runs are not reproducible (set model.revision)", source)
    with _fetch_errors(source, cfg, revision):
        processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=cfg.trust_remote_code)
    return load_model(source, cfg, revision), processor


def load_model(source: str | Path, cfg: ModelConfig, revision: str | None = None) -> Florence2ForConditionalGeneration:
    """The model alone, as `load_pretrained` loads it, for callers that already hold its processor: loading a
    processor costs about as much as loading the model's weights (transformers renders it as text on every load)."""
    with _fetch_errors(source, cfg, revision):
        return AutoModelForImageTextToText.from_pretrained(
            source, attn_implementation=cfg.attn_implementation, dtype=torch.float32, revision=revision,
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip


@contextlib.contextmanager
def _fetch_errors(source: str | Path, cfg: ModelConfig, revision: str | None):
    try:
        yield
    except OSError as error:  # only `model.name` is named in the message: other sources are the pipeline's own dirs
        local = Path(source).is_dir()
        problem = model_fetch_error(error, cfg.name, revision) if str(source) == cfg.name and not local else None
        if problem is None:
            raise
        raise problem from error


def save_processor(processor: Florence2Processor, folder: str | Path) -> None:
    """Save the processor without the truncation/padding state that batching leaves on a fast tokenizer, and with a
    post-processor entry for every Florence-2 task, so that `post_process_generation` works on the saved processor.

    Calling the tokenizer with `truncation=True, max_length=N` sets that state on its backend, and `save_pretrained`
    writes it into tokenizer.json, where it would silently truncate the processor's 577 image tokens on reload.
    """
    backend = getattr(processor.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    if isinstance(processor, Florence2Processor):
        _complete_post_processor(processor)
    processor.save_pretrained(folder)


def _complete_post_processor(processor: Florence2Processor) -> None:
    # A processor built from tokenizer and image processor files (the tiny one, or the original checkpoint's files)
    # has no post-processor config, and `post_process_generation` then rejects every task, `<DocVQA>` included (it is
    # parsed as "pure_text"). Entries the processor already has, such as a converted checkpoint's, are kept.
    config = {kind: {} for kind in processor.tasks_answer_post_processing_type.values()}
    config.update(processor.post_processor_config or {})
    processor.post_processor_config = config
    processor.post_processor = Florence2PostProcessor(config=config, tokenizer=processor.tokenizer)


def model_parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters of each freezable part. The shared token embedding belongs to no part: the decoder needs it."""
    inner = unwrap(model).model
    encoder = inner.language_model.encoder
    shared = {id(p) for p in inner.language_model.shared.parameters()}
    return {
        "vision_tower": list(inner.vision_tower.parameters()),
        "projector": list(inner.multi_modal_projector.parameters()),
        "text_encoder": [p for p in encoder.parameters() if id(p) not in shared],
    }


def train_mode(model: torch.nn.Module) -> None:
    """Training mode, except a frozen vision tower, which stays in eval mode: without stochastic depth its output is
    the one that evaluation and the vision cache see."""
    model.train()
    tower = unwrap(model).model.vision_tower
    if not any(p.requires_grad for p in tower.parameters()):
        tower.eval()


def freeze(model: torch.nn.Module, parts: Iterable[str]) -> tuple[int, int]:
    """Set requires_grad=False on the named parts; return (trainable, total) parameter counts."""
    groups = model_parts(model)
    for part in parts:
        for param in groups[part]:
            param.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def apply_lora(model: torch.nn.Module, lora: LoraSettings, freeze_parts: Iterable[str]) -> torch.nn.Module:
    """Wrap the language model's matching linear layers in LoRA adapters; the vision tower stays frozen.

    The projector is new to the document task, so unless `projector` is frozen it trains fully beside the adapters as
    a peft `modules_to_save` module: saved with the adapters and restored (and merged) with them. A frozen text encoder
    gets no adapters.
    """
    from peft import LoraConfig, get_peft_model

    frozen = set(freeze_parts)
    stacks = "decoder" if "text_encoder" in frozen else "encoder|decoder"
    pattern = rf".*language_model\.({stacks})\.layers\.\d+\..*\.({'|'.join(lora.target_modules)})$"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=pattern,
        modules_to_save=None if "projector" in frozen else ["multi_modal_projector"],
    )
    return get_peft_model(model, config)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters (and the trained `modules_to_save` copies) into the base model; return the plain model."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def load_processor(source: str | Path, cfg: ModelConfig) -> Florence2Processor:
    """The processor saved in a model directory (also in a LoRA adapter directory, which holds no full model)."""
    return AutoProcessor.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)


def load_trained(folder: str | Path, base_model: str | Path, cfg: ModelConfig):
    """A saved model and its processor; LoRA adapters (and the projector trained beside them) are merged into the
    base model at `base_model` first."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base = load_model(base_model, cfg)
        return merge_lora(PeftModel.from_pretrained(base, folder)), load_processor(folder, cfg)
    return load_pretrained(folder, cfg)


class ModelWrapper(torch.nn.Module):
    """A module that holds the model being trained as `.model` (the training objective)."""

    model: torch.nn.Module


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Turn on transformers' activation (gradient) checkpointing in the model inside `model`'s wrappers: its
    `activation_checkpointing_enable` where transformers has it (5.24 on; the old name warns there)."""
    model = unwrap(model)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()


def unwrap(model: torch.nn.Module) -> Florence2ForConditionalGeneration:
    """The transformers model inside the wrappers this project uses: DDP and FSDP (`.module`), `torch.compile`
    (`._orig_mod`), peft (its base model) and the training objective (`.model`). Anything else raises TypeError."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    for _ in range(MAX_WRAPPERS):
        if isinstance(model, Florence2ForConditionalGeneration):
            return model
        if isinstance(model, ModelWrapper):
            inner = model.model
        elif isinstance(model, PeftModel):
            inner = model.get_base_model()
        else:
            inner = extract_model_from_parallel(model, keep_torch_compile=False)
        if inner is model:
            break
        model = inner
    raise TypeError(f"not a Florence-2 model or a wrapper of one: {type(model).__name__}")
