"""The locally built base models: the same bytes on every machine, and the real Florence-2 shapes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from florence_ops.base_models import (
    build_reference_model,
    build_reference_processor,
    build_tiny_model,
    build_tiny_processor,
)
from florence_ops.config import TinyModel
from tests.conftest import REPO

CORPUS = ["<DocVQA>What is the total amount?", "Which company issued this document?", "ACME Corp", "$1,234.50"] * 5
# Recorded from the NumPy PCG64 float64 draw (default TinyModel, seed 1234, CORPUS above); independent of the CPU.
TINY_WEIGHTS_SHA256 = "546dd50efb57ea8cd72fc97aafec241a6a68f3315a96d4e048863638e161219c"
TINY_TOKENIZER_SHA256 = "900cacf7bf5ab8d2f0606f3803d03530b7f433b8483cbee1140e8ff47ab0ff06"
REFERENCE = REPO.parent / "shared" / "reference" / "florence-2-base-ft"
DIGEST_SCRIPT = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from tests.test_base_models import tiny_digests
print(*tiny_digests())
"""


def tiny_digests() -> tuple[str, str]:
    """SHA-256 of the default tiny model's state dict (names and float32 bytes, sorted) and of its tokenizer."""
    processor = build_tiny_processor(TinyModel(), CORPUS)
    model = build_tiny_model(TinyModel(), processor, seed=1234)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    tokenizer = hashlib.sha256(processor.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    return digest.hexdigest(), tokenizer


def test_tiny_base_model_equals_the_platform_independent_draw():
    assert tiny_digests() == (TINY_WEIGHTS_SHA256, TINY_TOKENIZER_SHA256)


def test_tiny_base_model_does_not_depend_on_the_cpu_kernels():
    """torch picks CPU kernels by instruction set; forcing the plain ones must not change a single weight."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, str(REPO)], env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert tuple(done.stdout.split()) == (TINY_WEIGHTS_SHA256, TINY_TOKENIZER_SHA256)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/reference beside the repository")
def test_base_shape_is_florence_2_base():
    config = json.loads((REFERENCE / "config.json").read_text())
    processor = build_reference_processor(REFERENCE)
    assert len(processor.tokenizer) == config["vocab_size"] + 1  # 51,289 tokens plus <image>
    inputs = processor(text="<DocVQA>What is the total?", images=Image.new("RGB", (1700, 2200), "white"),
                       return_tensors="pt")  # fmt: skip
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 768, 768)
    image_tokens = int((inputs["input_ids"] == processor.tokenizer.image_token_id).sum())
    assert image_tokens == json.loads((REFERENCE / "preprocessor_config.json").read_text())["image_seq_length"] == 577

    model = build_reference_model("base-shape", REFERENCE, processor, seed=0)
    vision, text = config["vision_config"], config["text_config"]
    tower = model.model.vision_tower
    assert [len(stage) for stage in tower.blocks] == vision["depths"] == [1, 1, 9, 1]
    assert [conv.conv.out_channels for conv in tower.convs] == vision["dim_embed"]
    assert model.config.vision_config.window_size == vision["window_size"] == 12
    language = model.model.language_model
    assert (language.config.d_model, len(language.encoder.layers), len(language.decoder.layers)) == (768, 6, 6)
    assert language.config.encoder_ffn_dim == text["encoder_ffn_dim"] and language.config.encoder_attention_heads == 12
    assert model.config.text_config.vocab_size == 51328  # 51,290 padded to a multiple of 64, as the native checkpoint
    assert sum(p.numel() for p in tower.parameters()) == davit_parameters(vision) == 90_368_000
    projector = vision["dim_embed"][-1] * vision["projection_dim"] + 2 * vision["projection_dim"]
    projector += vision["image_pos_embed"]["max_pos_embeddings"] * vision["dim_embed"][-1]  # row and column halves
    expected = davit_parameters(vision) + projector + bart_parameters(text, vocab=51328)
    assert sum(p.numel() for p in model.parameters()) == expected == 231_443_968  # Florence-2-base: 0.23B
    with torch.no_grad():
        out = model(**inputs, decoder_input_ids=torch.tensor([[2, 0]]))
    assert out.logits.shape == (1, 2, 51328) and torch.isfinite(out.logits).all()


def davit_parameters(vision: dict) -> int:
    """DaViT's parameter count from the original config: patch-embedding convolutions, then per block a spatial and a
    channel sub-block, each two depthwise 3x3 convolutions, two norms, qkv and output projections and a 4x MLP."""
    total, previous = 0, 3
    for dim, depth, kernel, prenorm in zip(vision["dim_embed"], vision["depths"], vision["patch_size"],
                                           vision["patch_prenorm"]):  # fmt: skip
        total += previous * dim * kernel * kernel + dim + 2 * (previous if prenorm else dim)
        total += depth * 2 * (12 * dim * dim + 33 * dim)
        previous = dim
    return total


def bart_parameters(text: dict, vocab: int) -> int:
    """BART's parameter count: shared embedding (tied output), learned positions (+2 offset), encoder and decoder
    layers (attention 4 d^2 + 4 d each, FFN, norms), the embedding norms."""
    d, ffn = text["d_model"], text["encoder_ffn_dim"]
    attention, mlp, norm = 4 * d * d + 4 * d, 2 * d * ffn + ffn + d, 2 * d
    encoder = text["encoder_layers"] * (attention + mlp + 2 * norm)
    decoder = text["decoder_layers"] * (2 * attention + mlp + 3 * norm)
    return vocab * d + 2 * (text["max_position_embeddings"] + 2) * d + encoder + decoder + 2 * norm


def test_reference_files_missing_is_a_config_error(tmp_path: Path):
    from florence_ops.errors import ConfigError

    with pytest.raises(ConfigError, match="model.reference_files"):
        build_reference_processor(tmp_path)
