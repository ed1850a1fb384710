"""Load or build Florence-2 and its processor; freeze parts; wrap in LoRA.

The offline default is a toy-size model of the real architecture (`Florence2ForConditionalGeneration` built from a
config) with a byte-level BPE tokenizer trained on the training questions and answers and a PIL image processor, so
nothing is downloaded. Every other model name is a hub id or a local directory in the Hugging Face layout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BartConfig,
    BartTokenizerFast,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
)
from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

from florence_ops.config import ModelConfig, TinyModel
from florence_ops.hub import model_fetch_error

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
VISION_STRIDE = 32  # DaViT downsamples by 4 * 2 * 2 * 2


def build_tiny_processor(spec: TinyModel, corpus: Iterable[str]) -> Florence2Processor:
    """A Florence-2 processor whose tokenizer is a byte-level BPE trained on `corpus`."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = BartTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    grid = spec.image_size // VISION_STRIDE
    image_processor = CLIPImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=False,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        image_seq_length=grid * grid + 1,  # one token per grid cell plus the pooled one
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_model(spec: TinyModel, processor: Florence2Processor, seed: int) -> Florence2ForConditionalGeneration:
    """A randomly initialised Florence-2 of toy size whose vocabulary matches `processor`."""
    tokenizer = processor.tokenizer
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=spec.vision_dims,
        num_heads=spec.vision_heads,
        num_groups=spec.vision_heads,
        projection_dim=spec.d_model,
        window_size=4,
        drop_path_rate=0.0,
        max_position_embeddings=max(16, spec.image_size // VISION_STRIDE),
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=spec.d_model,
        encoder_layers=spec.layers,
        decoder_layers=spec.layers,
        encoder_attention_heads=spec.heads,
        decoder_attention_heads=spec.heads,
        encoder_ffn_dim=spec.ffn_dim,
        decoder_ffn_dim=spec.ffn_dim,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,
    )
    config = Florence2Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=tokenizer.image_token_id
    )
    torch.manual_seed(seed)
    return Florence2ForConditionalGeneration(config)


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
    kwargs = {"revision": revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(
            source, attn_implementation=cfg.attn_implementation, dtype=torch.float32, **kwargs
        )
    except OSError as error:  # only `model.name` is named in the message: other sources are the pipeline's own dirs
        problem = model_fetch_error(error, cfg.name, revision) if str(source) == cfg.name and not local else None
        if problem is None:
            raise
        raise problem from error
    return model, processor


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


def apply_lora(
    model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]
) -> torch.nn.Module:
    """Wrap the language model's matching linear layers in LoRA adapters; the vision tower is left alone."""
    from peft import LoraConfig, get_peft_model

    pattern = r".*language_model.*\.(" + "|".join(target_modules) + r")$"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    wrapped = get_peft_model(model, config)
    # The projector is new to the document task; it stays trainable beside the adapters unless frozen later.
    for param in unwrap(wrapped).model.multi_modal_projector.parameters():
        param.requires_grad_(True)
    return wrapped


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights and return the plain transformers model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def unwrap(model: torch.nn.Module) -> Florence2ForConditionalGeneration:
    """The transformers model inside DDP/compile/peft wrappers."""
    while not isinstance(model, Florence2ForConditionalGeneration):
        for attr in ("module", "_orig_mod", "base_model", "model"):
            if hasattr(model, attr):
                model = getattr(model, attr)
                break
        else:
            raise TypeError(f"not a Florence-2 model: {type(model).__name__}")
    return model
