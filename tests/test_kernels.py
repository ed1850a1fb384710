"""The fused Triton kernels compute what PyTorch's own kernels compute, dropping the same elements both ways; the text
encoder trains on them as on transformers' layer. On a machine without CUDA they run in Triton's interpreter."""

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils.dataclasses import get_module_class_from_name
from PIL import Image
from transformers.models.bart.modeling_bart import BartAttention, BartEncoderLayer

from florence_ops import kernels  # without CUDA, in Triton's interpreter (conftest.py)
from florence_ops.base_models import build_tiny_model, build_tiny_processor
from florence_ops.config import TinyModel
from florence_ops.model_inputs import Collator
from florence_ops.modeling import checkpoint_activations
from florence_ops.training import DocVQAObjective
from florence_ops.vision.sources import PixelSource

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 0.1
# Triton's interpreter multiplies a bf16 dot's operands as their 16-bit integer patterns (it keeps bf16 as uint16).
ON_GPU_ONLY = functools.partial(pytest.param, marks=pytest.mark.skipif(DEVICE == "cpu", reason="bf16 dots need a GPU"))
SCALE = 2**16 / (2**16 - round(P * 2**16))  # the kernels drop with p rounded to 2**-16 and scale by its complement


@pytest.fixture
def pinned_seed(monkeypatch):
    """Every call draws from the same seed, so that two calls drop the same elements."""
    monkeypatch.setattr(kernels, "_seed", lambda device: torch.tensor([20261204], device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_dropout_drops_a_tenth_scales_the_rest_and_backward_drops_the_same(dtype):
    x = torch.randn(7, 33, 97, device=DEVICE, dtype=dtype, requires_grad=True)  # 22,407: the last byte of flags partly
    out = kernels.gelu_dropout(x, P)
    kept = out != 0
    assert 0.09 < 1 - kept.float().mean().item() < 0.11
    assert not torch.equal(kept, kernels.gelu_dropout(x, P) != 0), "each call draws its own elements"
    wide = torch.rand(64, 1024, device=DEVICE, dtype=dtype) + 1  # GELU > 0: zero only where dropped
    _assert_drawn_independently(kernels.gelu_dropout(wide, P) == 0, lags=range(1, 17))
    reference = x.detach().float().requires_grad_()
    eager = F.gelu(reference) * kept * SCALE
    _assert_close(out, eager, "out")
    grad = torch.randn_like(out)
    out.backward(grad)
    eager.backward(grad.float())
    _assert_close(x.grad, reference.grad, "x")


@pytest.mark.parametrize("width", [96, 48])  # 48: the rows' 6 groups of eight fill a tile of 8 only partly
@pytest.mark.parametrize(
    ("dtype", "residual_dtype"), [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)]
)  # the last: under autocast
def test_dropout_add_layer_norm_is_eager_norm_of_the_sum_both_ways(pinned_seed, dtype, residual_dtype, width):
    """Under autocast the branch is bf16, the residual stream and the norm fp32 (eager's sum promotes), and so are the
    output and the residual's gradient; the branch's gradient is bf16."""
    rows = (3, 17)
    norm = torch.nn.LayerNorm(width, device=DEVICE, dtype=residual_dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_()
    # The elements this seed drops: with x all ones and no residual, they normalise below the row's mean (a row that
    # keeps all normalises to zeros).
    ones = torch.ones(*rows, width, device=DEVICE, dtype=dtype)
    kept = kernels.dropout_add_layer_norm(ones, torch.zeros_like(ones), torch.nn.LayerNorm(width).to(ones), P) >= 0
    assert 0.07 < 1 - kept.float().mean().item() < 0.13
    _assert_drawn_independently(~kept, lags=[*range(1, 17), width], bound=0.015)  # width: the next row

    x = torch.randn(*rows, width, device=DEVICE, dtype=dtype, requires_grad=True)
    residual = torch.randn(*rows, width, device=DEVICE, dtype=residual_dtype, requires_grad=True)
    out = kernels.dropout_add_layer_norm(x, residual, norm, P)
    assert (out.dtype, residual.dtype) == (residual_dtype, residual_dtype)
    eager_norm = torch.nn.LayerNorm(width, device=DEVICE)  # in fp32 from the same values: the reference
    eager_norm.load_state_dict(norm.state_dict())
    eager_x, eager_residual = (t.detach().float().requires_grad_() for t in (x, residual))
    eager = eager_norm(eager_residual + eager_x * kept * SCALE)
    _assert_close(out, eager, "out", dtype)
    grad = torch.randn_like(out)
    out.backward(grad)
    eager.backward(grad.float())
    assert (x.grad.dtype, residual.grad.dtype) == (dtype, residual_dtype)
    _assert_close(x.grad, eager_x.grad, "x", dtype)
    _assert_close(residual.grad, eager_residual.grad, "residual", dtype)
    _assert_close(norm.weight.grad, eager_norm.weight.grad, "weight", dtype)
    _assert_close(norm.bias.grad, eager_norm.bias.grad, "bias", dtype)


def _cross_inputs(dtype, batch=3, heads=2, queries=5, keys=70, dim=16):
    """Queries, keys and values as the projections lay them out ((batch, length, heads, dim), seen as (batch, heads,
    length, dim)), and a key-padding mask: question 0 has 60 real keys, question 2 has 67."""
    q, k, v = (torch.randn(batch, n, heads, dim, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
               for n in (queries, keys, keys))  # fmt: skip
    mask = torch.ones(batch, 1, 1, keys, device=DEVICE, dtype=torch.bool)
    mask[0, ..., 60:] = mask[2, ..., 67:] = False
    return q, k, v, mask


def _eager_attention(q, k, v, mask, kept=None):
    """softmax(q k^T / sqrt(dim), masked) with the kept probabilities scaled by 1 / (1 - P), times v, in fp32."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    probs = torch.softmax((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf")), -1)
    if kept is not None:
        probs = probs * kept / (1 - P)
    return probs @ v, (q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, ON_GPU_ONLY(torch.bfloat16)])
@pytest.mark.parametrize("additive", [False, True])  # the mask as a bool or as transformers' additive float mask
def test_cross_attention_is_eager_attention_both_ways(dtype, additive):
    """Without dropout: queries that fill a block of 16 only partly, keys that fill the last block of 64 only partly,
    padded keys; the gradients land in the projections' layout."""
    q, k, v, mask = _cross_inputs(dtype)
    given = (
        torch.zeros(mask.shape, device=DEVICE).masked_fill_(~mask, torch.finfo(torch.float32).min) if additive else mask
    )
    out = kernels.cross_attention(q, k, v, kernels.key_bias(given, 3, 70, DEVICE), 0.0, 16**-0.5)
    eager, leaves = _eager_attention(q, k, v, mask)
    _assert_close(out, eager, "out", dtype)
    grad = torch.randn_like(out)
    out.backward(grad)
    eager.backward(grad.float())
    for name, actual, leaf in zip("qkv", (q, k, v), leaves):
        _assert_close(actual.grad, leaf.grad, f"d{name}", dtype)


def test_cross_attention_drops_a_tenth_of_the_probabilities_and_backward_the_same(pinned_seed):
    """With the seed pinned every call drops the same probabilities; zero queries (even attention) and one-hot
    values read them back: out[i, j] = kept / (1 - P) / real keys. The real call then matches eager attention with
    those elements dropped, forward and backward. 96 keys: two key blocks, each drawing its own elements."""
    batch, heads, queries, keys, dim = 4, 2, 16, 96, 128  # heads of 128: a one-hot value for each of the 96 keys
    zero = torch.zeros(batch, heads, queries, dim, device=DEVICE)
    one_hot = torch.eye(keys, dim, device=DEVICE).expand(batch, heads, keys, dim)
    mask = torch.ones(batch, 1, 1, keys, device=DEVICE, dtype=torch.bool)
    mask[1, ..., 70:] = False
    bias = kernels.key_bias(mask, batch, keys, DEVICE)
    read = kernels.cross_attention(zero, torch.randn_like(one_hot), one_hot, bias, P, dim**-0.5)[..., :keys]
    kept = (read * mask.sum(-1, keepdim=True) * (1 - P)).round() == 1
    real = mask.expand_as(kept)
    assert 0.08 < 1 - kept[real].float().mean().item() < 0.12
    _assert_drawn_independently(~kept[real], lags=[*range(1, 17), 64, keys], bound=0.006)  # 64: the next key block

    q, k, v, _ = _cross_inputs(torch.float32, batch, heads, queries, keys, dim)
    out = kernels.cross_attention(q, k, v, bias, P, dim**-0.5)
    eager, leaves = _eager_attention(q, k, v, mask, kept)
    _assert_close(out, eager, "out")
    grad = torch.randn_like(out)
    out.backward(grad)
    eager.backward(grad)
    for name, actual, leaf in zip("qkv", (q, k, v), leaves):
        _assert_close(actual.grad, leaf.grad, f"d{name}")


def test_the_cross_attention_takes_key_padding_masks_only():
    """Masks as the decoder hands them (bool or additive, (B, 1, 1, L) or expanded over the queries) become one bias
    row a question; a mask materialised for every query (transformers' eager attention builds those) or of integers
    is left to transformers. A question whose keys are all masked gets zeros, as SDPA gives, and no gradient."""
    rows = torch.tensor([[True, True, False], [False, False, False]], device=DEVICE)
    expected = torch.tensor([[0.0, 0.0, float("-inf")], [float("-inf")] * 3], device=DEVICE)
    additive = torch.zeros(2, 3, device=DEVICE).masked_fill(~rows, torch.finfo(torch.float32).min)
    for mask in (rows[:, None, None, :], rows[:, None, None, :].expand(2, 1, 5, 3)):
        torch.testing.assert_close(kernels.key_bias(mask, 2, 3, DEVICE), expected)
    torch.testing.assert_close(kernels.key_bias(additive[:, None, None, :], 2, 3, DEVICE), additive)
    assert torch.equal(kernels.key_bias(None, 2, 3, DEVICE), torch.zeros(2, 3, device=DEVICE))
    assert kernels.key_bias(rows[:, None, None, :].expand(2, 1, 5, 3).contiguous(), 2, 3, DEVICE) is None
    assert kernels.key_bias(rows[:, None, None, :].long(), 2, 3, DEVICE) is None

    q, k, v, mask = _cross_inputs(torch.float32)
    mask[1] = False
    out = kernels.cross_attention(q, k, v, kernels.key_bias(mask, 3, 70, DEVICE), 0.0, 16**-0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.backward(torch.randn_like(out))
    assert all(torch.equal(t.grad[1], torch.zeros_like(t.grad[1])) for t in (q, k, v))
    eager, _ = _eager_attention(q[[0, 2]], k[[0, 2]], v[[0, 2]], mask[[0, 2]])
    _assert_close(out[[0, 2]], eager, "the other questions")


def test_the_kernels_refuse_what_they_cannot_compute():
    """Rows that are not a multiple of 8 wide (the norm kernels' groups) and dropout that rounds to 1 at 2**-16 get a
    one-line error, not wrong numbers; the encoder layer gives those to transformers' forward."""
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.dropout_add_layer_norm(torch.ones(2, 12), torch.ones(2, 12), torch.nn.LayerNorm(12), P)
    with pytest.raises(ValueError, match="rounds to 65536"):
        kernels.gelu_dropout(torch.ones(2, 8), 1 - 2**-18)


def _assert_drawn_independently(dropped: torch.Tensor, lags, bound: float = 0.003) -> None:
    """Elements `lag` apart (within a Philox call's group, across groups, across rows) are dropped together as often as
    independent draws are, P**2 (1%), not as often as one draw shared (10%): within `bound` (7 standard errors or
    more)."""
    flat = dropped.flatten().float()
    together = {lag: (flat[lag:] * flat[:-lag]).mean().item() for lag in lags}
    assert all(abs(rate - P**2) < bound for rate in together.values()), f"dropped together: {together}"


def _assert_close(
    actual: torch.Tensor, reference: torch.Tensor, name: str, rounded_to: torch.dtype | None = None
) -> None:
    """Within about a unit of the last place of `rounded_to` (default: `actual`'s dtype; bf16 keeps 8 bits), relative
    and at the reference's scale."""
    bits = 8 if (rounded_to or actual.dtype) == torch.bfloat16 else 20
    scale = reference.abs().max().item()
    torch.testing.assert_close(actual.float(), reference, rtol=2 ** (1 - bits), atol=scale * 2**-bits,
                               msg=lambda m: f"{name}: {m}")  # fmt: skip


CORPUS = ["<DocVQA>What is the total amount?", "Which company issued this document?", "ACME Corp", "$1,234.50"] * 5
ROWS = [
    {"question": "What is the total amount?", "answers": ["$1,234.50"], "image_id": "white"},
    {"question": "Which company issued this document, and when?", "answers": ["ACME Corp"], "image_id": "grey"},
]


def _florence(encoder_dropout: float, d_model: int = 32, rows: list[dict] = ROWS, cross_attention_dropout: float = 0.0):
    """The tiny Florence-2 in training mode, every dropout off but the text encoder's residual and activation ones (and
    the decoder's cross-attention's), and a batch of `rows` (one row where the test needs only dropout's draws:
    Triton's interpreter draws slowly)."""
    spec = TinyModel(image_size=64, vision_dims=[8, 16, 16, 32], vision_heads=[1, 2, 2, 4], d_model=d_model, heads=2,
                     ffn_dim=64, vocab_size=300)  # fmt: skip
    processor = build_tiny_processor(spec, CORPUS)
    model = build_tiny_model(spec, processor, 0).to(DEVICE).train()
    for module in model.modules():
        for name in ("dropout", "activation_dropout", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in model.model.language_model.encoder.layers:
        layer.dropout = layer.activation_dropout = encoder_dropout
    for layer in model.model.language_model.decoder.layers:
        layer.encoder_attn.dropout = cross_attention_dropout
    images = {"white": Image.new("RGB", (64, 64), "white"), "grey": Image.new("RGB", (64, 64), (90, 90, 90))}
    batch = Collator(processor.tokenizer, "<DocVQA>", 32, 16, train=True)(rows).to(DEVICE)
    return model, batch, PixelSource(images, processor.image_processor)


def test_the_text_encoder_trains_on_the_kernels_as_on_transformers_layers():
    """Without the encoder's dropouts the fused objective's loss and every gradient are transformers' (what the kernels
    change is only where dropout draws its elements); with them the step drops the kernels' elements, and evaluation
    is transformers' own. The layers keep their class's name, which FSDP's wrapping looks layers up by."""
    eager, batch, source = _florence(encoder_dropout=0.0)
    fused, _, _ = _florence(encoder_dropout=0.0)
    objective = DocVQAObjective(fused, fused_kernels=True)
    assert issubclass(get_module_class_from_name(fused, "BartEncoderLayer"), BartEncoderLayer)
    decoder = fused.model.language_model.decoder.layers
    assert {type(layer.encoder_attn) for layer in decoder} == {kernels.BartAttention}
    assert {type(layer.self_attn) for layer in decoder} == {BartAttention}
    torch.manual_seed(0)
    loss = objective(batch, source)
    torch.manual_seed(0)
    eager_loss = DocVQAObjective(eager)(batch, source)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    eager_loss.backward()
    gradients = dict(eager.named_parameters())
    for name, param in fused.named_parameters():
        if param.grad is not None or gradients[name].grad is not None:
            torch.testing.assert_close(param.grad, gradients[name].grad, rtol=1e-4, atol=1e-5, msg=name)

    # The encoder's dropouts and the cross-attention's, each alone, are the kernels': every step drops other elements,
    # and with the kernels' seed pinned, every step drops the same.
    for encoder_dropout, cross_attention_dropout in ((P, 0.0), (0.0, P)):
        dropping, batch, source = _florence(
            encoder_dropout, rows=ROWS[:1], cross_attention_dropout=cross_attention_dropout
        )
        objective = DocVQAObjective(dropping, fused_kernels=True)

        def gradient(model=dropping, step=objective, batch=batch, source=source) -> torch.Tensor:
            model.zero_grad()
            step(batch, source).backward()
            return model.model.language_model.encoder.layers[0].fc1.weight.grad.clone()

        assert not torch.equal(gradient(), gradient()), f"every step drops other elements: {cross_attention_dropout=}"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "_seed", lambda device: torch.tensor([20261204], device=device))
            assert torch.equal(gradient(), gradient())
        with torch.no_grad():
            assert (
                objective.eval()(batch, source).item() == DocVQAObjective(_florence(P)[0]).eval()(batch, source).item()
            )


@pytest.mark.parametrize(("dropout", "activation_dropout"), [(0.0, 0.5), (0.5, 0.0)])
def test_each_dropout_of_the_layer_drops_where_transformers_drops(dropout, activation_dropout):
    """The residual dropout (`dropout`, on the attention's and the feed-forward's outputs) and the activation dropout
    (after GELU) are the layer's own: with one of them off, what it guards is exact. fc1 reads what the first norm gave
    (transformers' own with the residual dropout off), and fc2 reads GELU of fc1's output (with the activation dropout
    off)."""
    models = []
    for fused in (False, True):
        model, batch, source = _florence(encoder_dropout=0.0, rows=ROWS[:1])
        for layer in model.model.language_model.encoder.layers:
            layer.dropout, layer.activation_dropout = dropout, activation_dropout
        layer = model.model.language_model.encoder.layers[0]
        inputs = {}
        for name in ("fc1", "fc2"):
            getattr(layer, name).register_forward_pre_hook(
                lambda _, args, name=name, inputs=inputs: inputs.setdefault(name, args[0])
            )
        torch.manual_seed(0)
        DocVQAObjective(model, fused_kernels=fused)(batch, source)
        assert type(layer) is (kernels.BartEncoderLayer if fused else BartEncoderLayer)
        models.append((layer, inputs))
    (_, eager), (layer, fused) = models
    if dropout == 0:
        torch.testing.assert_close(fused["fc1"], eager["fc1"], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(fused["fc2"], F.gelu(layer.fc1(fused["fc1"])), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_the_kernels_dropout():
    """A checkpointed layer runs its forward again in backward: the kernels draw the same elements then (their seed
    comes from the generator whose state checkpointing replays), so the gradients are those of the plain step."""
    gradients, draws = [], []
    for checkpointing in (False, True):
        model, batch, source = _florence(encoder_dropout=P, rows=ROWS[:1], cross_attention_dropout=P)
        if checkpointing:
            checkpoint_activations(model)
        objective = DocVQAObjective(model, fused_kernels=True)
        seeds = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                kernels,
                "_seed",
                lambda device, draw=kernels._seed, seeds=seeds: seeds.append(draw(device)) or seeds[-1],
            )
            torch.manual_seed(0)
            objective(batch, source).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        draws.append(len(seeds))
    assert draws[1] == 2 * draws[0] > 0, f"checkpointing recomputes every fused layer once: {draws} seeds drawn"
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_an_encoder_whose_width_the_kernels_do_not_fit_keeps_transformers_layers():
    """The kernels take rows in groups of eight and heads 16 to 128 wide, a power of two: a width of 36 (two heads of
    18) trains on transformers' layers."""
    model, batch, source = _florence(encoder_dropout=P, d_model=36, cross_attention_dropout=P)
    assert (kernels.fuse_text_encoder(model), kernels.fuse_cross_attention(model)) == (0, 0)
    assert {type(layer) for layer in model.model.language_model.encoder.layers} == {BartEncoderLayer}
    assert {type(layer.encoder_attn) for layer in model.model.language_model.decoder.layers} == {BartAttention}
    DocVQAObjective(model, fused_kernels=True)(batch, source).backward()


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from florence_ops import kernels

b, f = "*bf16", "*fp32"
signatures = {
    "_gelu_dropout_forward": dict(x_ptr=b, out_ptr=b, mask_ptr="*u8", seed_ptr="*i64", n="i32", threshold="i32",
                                  scale="fp32"),
    "_gelu_dropout_backward": dict(grad_ptr=b, x_ptr=b, mask_ptr="*u8", dx_ptr=b, n="i32", scale="fp32"),
    "_dropout_add_norm_forward": dict(x_ptr=b, residual_ptr=b, weight_ptr=b, bias_ptr=b, sum_ptr=b, out_ptr=b,
                                      mask_ptr="*u8", mean_ptr=f, rstd_ptr=f, seed_ptr="*i64", N="i32",
                                      threshold="i32", scale="fp32", eps="fp32"),
    "_dropout_add_norm_backward": dict(grad_ptr=b, sum_ptr=b, weight_ptr=b, mask_ptr="*u8", mean_ptr=f, rstd_ptr=f,
                                       dresidual_ptr=b, dx_ptr=b, dweight_ptr=f, dbias_ptr=f, M="i32", N="i32",
                                       scale="fp32"),
}
for name, signature in signatures.items():
    groups = kernels.ELEMENTWISE_GROUPS if "gelu" in name else 128  # the norm kernels' groups for a width of 1024
    source = ASTSource(getattr(kernels, name), {**signature, "GROUPS": "constexpr"}, {"GROUPS": groups})
    triton.compile(source, target=GPUTarget("cuda", 90, 32))
    print(name)

for name in ("_cross_attention_forward", "_cross_attention_backward"):
    kernel = getattr(kernels, name)
    pointers = {"bias_ptr": f, "lse_ptr": f, "seed_ptr": "*i64"}
    signature = {param.name: pointers.get(param.name, b) if param.name.endswith("_ptr") else
                 "fp32" if param.name in ("softmax_scale", "p", "drop_scale") else "i32"
                 for param in kernel.params if not param.is_constexpr}  # fmt: skip
    # As a launch specialises them: the pointers 16-byte aligned, the strides multiples of 16.
    aligned = {(i,): [["tt.divisibility", 16]] for i, (arg, kind) in enumerate(signature.items())
               if kind != "fp32" and arg not in ("H", "T", "L")}  # fmt: skip
    constants = dict(ROWS=16, KEYS=kernels.KEY_BLOCK, D=64, DROPOUT=True, PRECISION="tf32")
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants, aligned)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernels.CROSS_WARPS})
    print(name)
"""


def test_the_kernels_compile_for_the_h200_as_a_gpu_compiles_them():
    """Triton's interpreter runs code that a GPU's compiler refuses (a kernel reading a module-level float that is not
    a `tl.constexpr`, say); compiling every kernel for sm_90 (the H200) needs no GPU, only Triton's own ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["_gelu_dropout_forward", "_gelu_dropout_backward", "_dropout_add_norm_forward",
                                   "_dropout_add_norm_backward", "_cross_attention_forward",
                                   "_cross_attention_backward"]  # fmt: skip
