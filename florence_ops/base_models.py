"""Base models built locally with random weights: the toy-size default and Florence-2's real shapes.

Nothing here downloads. The weights are drawn with NumPy's PCG64 generator in float64 and cast to float32, in a fixed
order of parameter names, so the same seed gives the same bytes on every machine: torch's own CPU initialisers pick
vectorised code paths by instruction set (AVX2, AVX-512), which made `models/base` hash differently from machine to
machine. The distributions are the ones transformers uses for Florence-2 (normal(0, 0.02) for linear, convolution and
embedding weights; zero biases and padding rows; unit norms).

- `tiny`: the offline default, a toy-size Florence-2 whose byte-level BPE tokenizer is trained on the training text.
- `base-shape` / `large-shape`: exactly Florence-2-base's (0.23B) or -large's (0.77B) architecture, with the real
  checkpoint's tokenizer (51,289 tokens plus `<image>`) and image processor (768x768, 577 image tokens), read from
  `model.reference_files` (the checkpoint's config, tokenizer and preprocessor files, no weights).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    BartTokenizerFast,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
)

from florence_ops.config import TinyModel
from florence_ops.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
VISION_STRIDE = 32  # DaViT downsamples by 4 * 2 * 2 * 2
INIT_STD = 0.02  # transformers' initializer_range / init_std for Florence-2 and BART
EMBEDDING_MULTIPLE = 64  # the native checkpoints pad the vocabulary to a multiple of 64
SHAPES = ("base-shape", "large-shape")
# Florence-2-large's published configuration: DaViT widths 256-2048, BART-large (d_model 1024, 12+12 layers).
LARGE = {
    "vision": {"embed_dim": [256, 512, 1024, 2048], "num_heads": [8, 16, 32, 64], "num_groups": [8, 16, 32, 64],
               "projection_dim": 1024},
    "text": {"d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
             "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096},
}  # fmt: skip


@contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """Train tokenizers on one thread, so merges never depend on how work was split among threads."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


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
    with _single_threaded_tokenizers():
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
    return _random_model(config, seed)


def build_reference_processor(reference_files: str | Path) -> Florence2Processor:
    """The real checkpoint's processor from its files: BART tokenizer plus `<image>`, CLIP image processor."""
    folder = _reference_folder(reference_files)
    tokenizer = BartTokenizerFast.from_pretrained(folder, extra_special_tokens={"image_token": "<image>"})
    config = json.loads((folder / "preprocessor_config.json").read_text())
    size = config["size"]
    image_processor = CLIPImageProcessorPil(
        size={"height": size["height"], "width": size["width"]},
        do_center_crop=False,
        resample=config.get("resample", 3),
        image_mean=config["image_mean"],
        image_std=config["image_std"],
        image_seq_length=config["image_seq_length"],
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_reference_model(
    shape: str, reference_files: str | Path, processor: Florence2Processor, seed: int
) -> Florence2ForConditionalGeneration:
    """Florence-2-base's (or, for `large-shape`, -large's) architecture with random weights."""
    original = json.loads((_reference_folder(reference_files) / "config.json").read_text())
    vision = dict(original["vision_config"])
    vision_config = Florence2VisionConfig(
        embed_dim=vision["dim_embed"],
        num_heads=vision["num_heads"],
        num_groups=vision["num_groups"],
        depths=vision["depths"],
        window_size=vision["window_size"],
        projection_dim=vision["projection_dim"],
        patch_size=vision["patch_size"],
        patch_stride=vision["patch_stride"],
        patch_padding=vision["patch_padding"],
        patch_prenorm=vision["patch_prenorm"],
        drop_path_rate=vision["drop_path_rate"],
        max_position_embeddings=vision["image_pos_embed"]["max_pos_embeddings"],
        max_temporal_embeddings=vision["visual_temporal_embedding"]["max_temporal_embeddings"],
    )
    text_config = BartConfig(**original["text_config"])
    if shape == "large-shape":
        vision_config.update(LARGE["vision"])
        text_config.update(LARGE["text"])
    tokenizer = processor.tokenizer
    vocab = math.ceil(len(tokenizer) / EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
    text_config.vocab_size = vocab
    config = Florence2Config(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.image_token_id,
    )
    return _random_model(config, seed)


def _reference_folder(reference_files: str | Path) -> Path:
    folder = Path(reference_files)
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise ConfigError(
            f"model.reference_files: {folder} lacks config.json/tokenizer.json of a Florence-2 checkpoint "
            "(point it at a folder with the checkpoint's config, tokenizer and preprocessor files)"
        )
    return folder


def _random_model(config: Florence2Config, seed: int) -> Florence2ForConditionalGeneration:
    """Build the model on the meta device and fill every parameter and buffer from `portable_init`."""
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    model.to_empty(device="cpu")
    portable_init(model, seed)
    model.tie_weights()
    return model.eval()


def portable_init(model: torch.nn.Module, seed: int) -> None:
    """Initialise `model` in place from NumPy's PCG64 in float64: the same bytes on every CPU.

    Parameters are visited in sorted name order, one stream of normal draws, so adding a machine, a thread or a
    library build never reorders them. Tied parameters are drawn once.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    owners = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{name}" if module_name else name] = module
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            values = _initial_values(owners[name], name.rsplit(".", 1)[-1], tuple(param.shape), rng)
            param.copy_(torch.from_numpy(values.astype(np.float32)))
        for name, buffer in model.named_buffers():
            if name.endswith("pos_idx_to_embed"):
                buffer.copy_(torch.from_numpy(_sinusoids(*buffer.shape).astype(np.float32)))
            else:
                raise TypeError(f"no portable initialisation for buffer {name}")


def _initial_values(module: torch.nn.Module, kind: str, shape: tuple[int, ...], rng: np.random.Generator):
    norm = isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm) or "Norm" in type(module).__name__
    if norm:
        return np.ones(shape) if kind == "weight" else np.zeros(shape)
    if kind == "bias":
        return np.zeros(shape)
    values = rng.standard_normal(shape) * INIT_STD
    padding = getattr(module, "padding_idx", None)
    if isinstance(module, torch.nn.Embedding) and padding is not None:
        values[padding] = 0.0
    return values


def _sinusoids(positions: int, dim: int) -> np.ndarray:
    """Florence-2's cosine temporal embedding table, computed in float64."""
    half = dim // 2
    frequencies = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000) / half))
    angles = np.arange(positions, dtype=np.float64)[:, None] * frequencies[None, :]
    table = np.empty((positions, dim))
    table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles)
    return table
