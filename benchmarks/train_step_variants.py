"""The pipeline's training step under variants: what dropout, compilation and mask handling cost or save.

The model is Florence-2-base's shape built from the real checkpoint's config (`--reference`), so its dropouts are the
checkpoint's (0.1 on attention probabilities, activations and residuals; `gpu_train_step.py` builds BART with the
config defaults, which have no attention or activation dropout). Inputs are shaped like the synthetic pipeline's:
cached vision features already on the device (bf16, 1024x24x24), question batches padded to 17-19 tokens and answer
batches to 7-9 (the longest in a batch of 256 synthetic questions with the real tokenizer), so the shapes change from
step to step as they do in training. Each variant trains a fresh copy of the same model with the engine's own step
(`florence_ops.training.train_window`: bf16 autocast, fused AdamW, clipping at 1.0) for `--steps` steps; the rate is
the median step after the first 12, `first_s` the time the first 12 took beyond 12 median steps (compilation and
recompilation).

Variants (on CUDA every variant but the compiled and `_unfused` ones trains on the fused Triton kernels,
`train.fused_kernels`, as the pipeline does: the text encoder's elementwise passes and, but in the variants of
`OWN_CROSS_ATTENTION`, the decoder's cross-attention):
- eager: the pipeline's step as it is.
- eager_with_cache: the step until 2026-12-03, the decoder keeping a key/value cache.
- eager_no_dropout: every dropout probability set to 0 (what the dropouts cost; not a training setting).
- compile_forward: `model.forward = torch.compile(model.forward)`, what `train.compile: true` did until 2026-12-03.
- compile_objective: `DocVQAObjective(compile=True)`, what `train.compile: true` does: projector, model and loss as
  one graph compiled once for every batch shape (`florence_ops.training.CompiledLoss`).
- compile_layers: accelerate's `compile_regions` on the BART encoder and decoder layer lists (diagnostic: the
  compiled layers' state_dict keys gain `_orig_mod`, so a model trained so would not save under its own names).
- compile_inplace / compile_inplace_dynamic: `Module.compile()` (keys unchanged) on each BART layer, with automatic
  dynamic shapes / `dynamic=True`.
- *_nomask_unpadded: unpadded batches given to the model without masks (what a batch without padding needs), so
  transformers neither reads them on the host nor hands attention a mask.
- bf16_pure (and _unpadded, compile_objective_bf16_pure): `train.precision: bf16-pure`, the step run on a bf16 copy
  of the fp32 weights without autocast, so layer norms, residual stream and dropouts are in bf16 too.
- bf16_pure_unaligned (and bf16_pure_no_dropout, bf16_pure_no_dropout_unaligned): the encoder's sequence not padded
  to a multiple of `SEQUENCE_MULTIPLE` (the step until 2026-12-03), with and without dropout; without it the two
  differ only by rounding, the numerics check of the padding.
- compile_inplace_bf16_pure, compile_inplace_around_attention_bf16_pure, compile_objective_around_attention_bf16_pure:
  `bf16-pure` compiled by layers in place, the same with the attention modules left eager (SDPA keeps cuDNN's
  kernel), and the objective compiled whole around eager attention modules.
- eager_2d_mask, bf16_pure_2d_mask: the encoder's padding mask handed to the model in 2-D (the step until
  2026-12-04), so transformers expands it to (B, 1, T, T) for the encoder and (B, 1, L, T) for cross-attention and
  PyTorch turns each into a bias of that size; the step now hands SDPA (B, 1, 1, T) (`key_padding_mask`).
- bf16_pure_2d_decoder_mask: the decoder's padding mask handed to the model in 2-D (the step until 2026-12-04,
  evening): transformers reads it on the host before building (B, 1, L, L) from it, one wait a step for the encoder's
  kernels; the step now hands it (B, 1, L, L) (`causal_padding_mask`).
- bf16_pure_per_tensor_cast: `bf16-pure` casting its weights tensor by tensor on every step, as until 2026-12-04
  (about 930 copy kernels a step); the step now casts the trainable weights together and keeps the frozen ones'
  copies (`florence_ops.precision.ComputeCopies`).
- bf16_pure_cross_eager: `bf16-pure` with the decoder's cross-attention as transformers' eager attention (matrix
  products, softmax, dropout) and the rest SDPA (`cross_eager`); with `_no_dropout`,
  against `bf16_pure_no_dropout`, the numerics check (the two differ by rounding only).
- bf16_pure_unfused, bf16_pure_no_dropout_unfused: `bf16-pure` with the text encoder's elementwise passes as
  PyTorch's own kernels (`train.fused_kernels: false`, the step until 2026-12-04, night); without dropout, against
  `bf16_pure_no_dropout`, the numerics check of the kernels (the two differ by rounding only).
- bf16_pure_sdpa_cross, bf16_pure_no_dropout_sdpa_cross: `bf16-pure` with the text encoder on the fused kernels and
  the decoder's cross-attention SDPA's (cuDNN) rather than the cross-attention kernel; without dropout, against
  `bf16_pure_no_dropout`, the numerics check of that kernel.
- bf16_pure_transformers_projector: `bf16-pure` with the image tokens through transformers' projector module, as
  until kernels-v2 (`florence_ops.model_inputs.project_vision` computes the same sums without its batch-sized copies).
- bf16_pure_packed_qkv, bf16_pure_no_dropout_packed_qkv: `bf16-pure` with the text encoder's query, key and value
  projections as one matrix product, split as strided views for SDPA (`packed_qkv`; not in the library): whether
  cuDNN takes the views without copies, and what one GEMM each way gains; without dropout, against
  `bf16_pure_no_dropout`, the numerics check.
- no_decoder_syncs: the encoder run apart, the decoder given a ready 4-D cross-attention mask and no padding mask of
  its own (causal only; right padding cannot reach a real token), which removes transformers' host reads of the
  decoder's masks.

    PYTHONPATH=. python benchmarks/train_step_variants.py --reference ../shared/reference/florence-2-base-ft \\
        [--variants eager compile_inplace ...] [--batch 256] [--steps 30] [--out reports/benchmarks]

Writes <out>/train_variants_<device-slug>.json (with every step's loss: the numerics check of a variant against
eager); `--profile DIR` also writes each variant's kernel table. Run `eager` first: `no_decoder_syncs` and the
`nomask` variants replace the objective's loss for the rest of the process.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import get_scheduler  # noqa: E402
from transformers.models.bart.modeling_bart import shift_tokens_right  # noqa: E402

from benchmarks.gpu_train_step import DeviceFeatures  # noqa: E402
from florence_ops import training  # noqa: E402
from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.base_models import build_reference_model, build_reference_processor  # noqa: E402
from florence_ops.model_inputs import (  # noqa: E402
    IGNORE_INDEX,
    SEQUENCE_MULTIPLE,
    TextBatch,
    causal_padding_mask,
    embed_inputs,
    key_padding_mask,
    project_vision,
)
from florence_ops.modeling import freeze, train_mode, unwrap  # noqa: E402
from florence_ops.precision import ComputeCopies, compute_dtype, mixed_precision  # noqa: E402
from florence_ops.training import DocVQAObjective, make_optimizer, train_window  # noqa: E402

WARM_STEPS = 12
PRECISION = "auto"  # train.precision as params.yaml sets it; florence_ops.precision decides what it means here


def text_batch(i: int, size: int, pool: int, device, padded: bool = True) -> TextBatch:
    """Batch `i`: questions padded to 17-19 tokens and answers to 7-9, as the synthetic pipeline's batches are; with
    `padded` false every question and answer of the batch is that long (no padding, so no masks)."""
    gen = torch.Generator().manual_seed(i)
    q_max, a_max = 17 + i % 3, 7 + (i // 3) % 3
    q_len = torch.randint(13 if padded else q_max, q_max + 1, (size,), generator=gen)
    a_len = torch.randint(3 if padded else a_max, a_max + 1, (size,), generator=gen)
    q_len[0], a_len[0] = q_max, a_max
    ids, q_mask = torch.ones((size, q_max), dtype=torch.long), torch.zeros((size, q_max), dtype=torch.long)
    labels, a_mask = torch.full((size, a_max), IGNORE_INDEX), torch.zeros((size, a_max), dtype=torch.long)
    for row in range(size):
        n, m = int(q_len[row]), int(a_len[row])
        ids[row, :n], q_mask[row, :n] = torch.randint(4, 50000, (n,), generator=gen), 1
        labels[row, :m], a_mask[row, :m] = torch.randint(4, 50000, (m,), generator=gen), 1
    start = (i * 37) % (pool - size + 1)
    return TextBatch(ids, q_mask, [str(start + j) for j in range(size)], labels, a_mask).to(device)


# Variants whose cross-attention is their own (another attention, another mask, a cache) or SDPA's for comparison:
# they keep transformers' cross-attention even where the step would run the kernel.
OWN_CROSS_ATTENTION = ("sdpa_cross", "cross_eager", "2d_mask", "no_decoder_syncs", "with_cache")


def transformers_projector(model):
    """The image tokens through transformers' projector module (its position embedding repeated for every page, the
    tokens averaged over the one frame) rather than `project_vision`'s same sums."""
    training.project_vision = lambda base, vision: base.model.multi_modal_projector(vision)


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "activation_dropout", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def compile_forward(model):
    model.forward = torch.compile(model.forward)


def compile_layers(model):
    from accelerate.utils import compile_regions

    torch._dynamo.config.recompile_limit = 64  # encoder and decoder layers share transformers' layer-call code
    lm = model.model.language_model
    lm.encoder.layers, lm.decoder.layers = compile_regions(lm.encoder.layers), compile_regions(lm.decoder.layers)


def compile_inplace(model, **kwargs):
    lm = model.model.language_model
    for layer in [*lm.encoder.layers, *lm.decoder.layers]:
        layer.compile(**kwargs)


def around_attention(model):
    """The attention modules left out of whatever compiles them (eager, so SDPA picks cuDNN's kernel as the eager
    step does)."""
    lm = model.model.language_model
    for layer in [*lm.encoder.layers, *lm.decoder.layers]:
        for attention in (layer.self_attn, getattr(layer, "encoder_attn", None)):
            if attention is not None:
                attention.forward = torch.compiler.disable(attention.forward, recursive=True)


def compile_every_layer(model):
    """`compile_inplace` with room for every layer's graph: the layers share `Module._call_impl`'s code, and past
    dynamo's default of 8 recompiles the rest would run eager."""
    torch._dynamo.config.recompile_limit = 64
    compile_inplace(model)


def compile_inplace_around_attention(model):
    """Each BART layer compiled in place around its attention: what compiling buys on the dropouts, residual adds,
    layer norms and GELU alone."""
    around_attention(model)
    compile_every_layer(model)


def two_d_decoder_mask(model):
    """The decoder's padding mask handed to the model in 2-D, as the step did until 2026-12-04 (evening): transformers
    reads it on the host (is anything padded?) before it builds the (B, 1, L, L) mask (reset by `run`)."""
    training.causal_padding_mask = lambda model, mask: mask


def two_d_mask(model):
    """The encoder's padding mask handed to the model in 2-D, as the step did until 2026-12-04: transformers expands
    it to (B, 1, T, T) and (B, 1, L, T), PyTorch to a bias of that size (reset by `run`)."""
    training.key_padding_mask = lambda model, mask: mask


CROSS_EAGER = "sdpa_cross_eager"


def cross_eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: SDPA, except where there are over 8 keys a query (the decoder's
    cross-attention over the page): `eager_attention_forward`, the boolean mask made additive."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.bart.modeling_bart import eager_attention_forward

    if key.shape[2] <= 8 * query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        blocked = torch.finfo(query.dtype).min
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill_(~attention_mask, blocked)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)


def cross_eager(model):
    """The text model's attention through `cross_eager_attention` (the mask handed over as for SDPA; reset by
    `run`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CROSS_EAGER, cross_eager_attention)
    AttentionMaskInterface.register(CROSS_EAGER, sdpa_mask)
    model.config.text_config._attn_implementation = CROSS_EAGER
    training.key_padding_mask = lambda model, mask: mask[:, None, None, :].bool()


def packed_qkv(model):
    """The text encoder's query, key and value projections as one matrix product over their weights concatenated on
    every call, the three split as views (strided) for SDPA: one GEMM each way where there were three, and in backward
    a concatenation of the three gradients where autograd summed three input gradients."""
    for layer in unwrap(model).model.language_model.encoder.layers:
        layer.self_attn.forward = _packed_attention(layer.self_attn)


def _packed_attention(attention):
    def forward(hidden_states, attention_mask=None, **kwargs):
        batch, length, width = hidden_states.shape
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        weight, bias = torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections])
        qkv = F.linear(hidden_states, weight, bias).view(batch, length, 3, -1, attention.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        dropout = attention.dropout if attention.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attention_mask, dropout, scale=attention.scaling)
        return attention.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None

    return forward


class PerTensorCopies:
    """The weights cast tensor by tensor on every call, as `bf16-pure` did until 2026-12-04."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module) -> dict[str, torch.Tensor]:
        tensors = [*module.named_parameters(), *module.named_buffers()]
        return {name: t.to(self.dtype) for name, t in tensors if t.is_floating_point()}


def per_tensor_cast(model):
    """(reset by `run`)"""
    training.ComputeCopies = PerTensorCopies


def no_decoder_syncs(model):
    def loss(model, vision, input_ids, attention_mask, labels, decoder_attention_mask):
        base = unwrap(model)
        embeds, mask = embed_inputs(base, project_vision(base, vision), input_ids, attention_mask)
        text = base.config.text_config
        decoder_ids = shift_tokens_right(labels, text.pad_token_id, text.decoder_start_token_id)
        encoded = base.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        cross = mask.bool()[:, None, None, :].expand(len(mask), 1, decoder_ids.shape[1], mask.shape[1]).contiguous()
        logits = model(
            encoder_outputs=encoded, attention_mask=cross, decoder_input_ids=decoder_ids, use_cache=False
        ).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")  # fmt: skip

    training.answer_loss = loss


def with_cache(model):
    """The step as it was until 2026-12-03: the decoder keeping a key/value cache it never reads (use_cache as the
    config has it, true)."""
    forward = model.forward
    model.forward = lambda *args, **kwargs: forward(*args, **{**kwargs, "use_cache": True})


def bf16_weights(model):
    model.to(torch.bfloat16)


def unaligned(model):
    """The encoder's sequence left at its length, as the step ran before `SEQUENCE_MULTIPLE` (reset by `run`)."""
    training.SEQUENCE_MULTIPLE = 1


def without_masks(model):
    """Unpadded batches given to the model without masks (a batch without padding needs none), so transformers
    neither reads them on the host nor hands SDPA a mask."""
    original = training.answer_loss

    def loss(model, vision, input_ids, attention_mask, labels, decoder_attention_mask):
        return original(model, vision, input_ids, None, labels, None)

    training.answer_loss = loss


VARIANTS = {
    "eager": lambda model: None,
    "eager_with_cache": with_cache,
    "eager_unpadded": lambda model: None,
    "bf16_weights": bf16_weights,
    "compile_layers_unpadded": compile_layers,
    "compile_inplace_unpadded": compile_inplace,
    "eager_no_dropout": no_dropout,
    "compile_forward": compile_forward,
    "compile_layers": compile_layers,
    "compile_inplace": compile_inplace,
    "compile_inplace_dynamic": lambda model: compile_inplace(model, dynamic=True),
    "no_decoder_syncs": no_decoder_syncs,
    "compile_inplace_nomask_unpadded": lambda model: (without_masks(model), compile_inplace(model)),
    "compile_inplace_nomask_no_dropout_unpadded": lambda model: (
        without_masks(model),
        no_dropout(model),
        compile_inplace(model),
    ),
    "compile_objective": lambda model: None,  # DocVQAObjective(compile=True): what `train.compile: true` does
    "compile_objective_unpadded": lambda model: None,
    "compile_objective_nomask_unpadded": without_masks,
    "bf16_pure": lambda model: None,  # train.precision: bf16-pure (the step on a bf16 copy of the fp32 weights)
    "bf16_pure_unpadded": lambda model: None,
    "compile_objective_bf16_pure": lambda model: None,
    "bf16_pure_unaligned": unaligned,
    "bf16_pure_no_dropout": no_dropout,
    "bf16_pure_no_dropout_unaligned": lambda model: (no_dropout(model), unaligned(model)),
    "compile_inplace_bf16_pure": compile_every_layer,
    "compile_inplace_around_attention_bf16_pure": compile_inplace_around_attention,
    "compile_objective_around_attention_bf16_pure": around_attention,
    "eager_2d_mask": two_d_mask,
    "bf16_pure_2d_mask": two_d_mask,
    "bf16_pure_2d_decoder_mask": two_d_decoder_mask,
    "bf16_pure_per_tensor_cast": per_tensor_cast,
    "bf16_pure_cross_eager": cross_eager,
    "bf16_pure_cross_eager_no_dropout": lambda model: (no_dropout(model), cross_eager(model)),
    "bf16_pure_unfused": lambda model: None,
    "bf16_pure_sdpa_cross": lambda model: None,
    "bf16_pure_transformers_projector": transformers_projector,
    "bf16_pure_packed_qkv": packed_qkv,
    "bf16_pure_no_dropout_packed_qkv": lambda model: (no_dropout(model), packed_qkv(model)),
    "bf16_pure_no_dropout_sdpa_cross": no_dropout,
    "bf16_pure_no_dropout_unfused": no_dropout,
}


def run(name: str, base, batches: dict[bool, list[TextBatch]], source, steps: int, device, profile=None) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # variants differ in mixed precision, fixed per state
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    batches = batches[not name.endswith("_unpadded")]
    model = copy.deepcopy(base).to(device)
    freeze(model, ["vision_tower"])
    training.SEQUENCE_MULTIPLE = SEQUENCE_MULTIPLE
    training.key_padding_mask = key_padding_mask
    training.causal_padding_mask = causal_padding_mask
    training.ComputeCopies = ComputeCopies
    training.project_vision = project_vision
    VARIANTS[name](model)
    precision = "bf16-pure" if "bf16_pure" in name else PRECISION
    accelerator = Accelerator(mixed_precision=mixed_precision(precision, device), cpu=device.type == "cpu")
    fused = device.type == "cuda" and "unfused" not in name and "compile" not in name  # as `fit` decides
    objective = DocVQAObjective(model, name.startswith("compile_objective"), compute_dtype(precision, device), fused)
    if any(tag in name for tag in OWN_CROSS_ATTENTION):  # the encoder on the kernels, the cross-attention as it was
        for module in model.modules():
            if type(module).__module__ == "florence_ops.kernels" and type(module).__name__ == "BartAttention":
                module.__class__ = type(module).__mro__[1]
    train_mode(objective)
    optimizer = make_optimizer(objective, 1e-4, 0.01, device)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=5, num_training_steps=1000)
    times, losses = [], []
    torch.manual_seed(0)
    for i in range(steps):
        _sync(device)
        start = time.perf_counter()
        loss = train_window(accelerator, objective, optimizer, scheduler, [batches[i % len(batches)]], source, 1.0)
        loss = loss.value()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(round(loss, 4))
    warm = min(WARM_STEPS, len(times) // 2)
    step = statistics.median(times[warm:])
    if profile is not None:
        _profile(
            name,
            lambda i: train_window(
                accelerator, objective, optimizer, scheduler, [batches[i % len(batches)]], source, 1.0
            ).value(),
            profile,
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"variant": name, "batch": len(batches[0].image_ids), "step_ms": round(1000 * step, 1),
            "samples_per_s": round(len(batches[0].image_ids) / step, 1),
            "first_s": round(sum(times[:warm]) - warm * step, 1), "first_steps_s": [round(t, 2) for t in times[:6]],
            "loss": round(loss, 4), "losses": losses, "peak_gib": peak and round(peak, 1)}  # fmt: skip


def _profile(name: str, step, folder: Path, steps: int = 3) -> None:
    """Kernel time of `steps` more steps under torch.profiler, the top ops by self device time, to folder/<name>.txt."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)
    folder.mkdir(parents=True, exist_ok=True)
    header = f"{name}: {steps} steps, {1000 * wall:.1f} ms/step under the profiler"
    Path(folder, f"{name}.txt").write_text(f"{header}\n{table}")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference" / "florence-2-base-ft"))
    parser.add_argument("--variants", nargs="+", default=["eager", "eager_no_dropout", "compile_inplace"],
                        choices=list(VARIANTS))  # fmt: skip
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shape", default="base-shape", choices=["base-shape", "large-shape"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    parser.add_argument("--profile", help="also profile 3 steps of each variant, tables to this folder")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    processor = build_reference_processor(args.reference)
    base = build_reference_model(args.shape, args.reference, processor, 1234)
    pool = max(512, 2 * args.batch)
    channels = base.config.vision_config.embed_dim[-1]  # the tower's output: 1024 (base) or 2048 (large)
    features = torch.randn(pool, channels, 24, 24, generator=torch.Generator().manual_seed(0))
    source = DeviceFeatures(features.to(device, torch.bfloat16))
    batches = {padded: [text_batch(i, args.batch, pool, device, padded) for i in range(12)] for padded in (True, False)}
    results = []
    for name in args.variants:
        profile = Path(args.profile) if args.profile else None
        results.append(run(name, base, batches, source, args.steps, device, profile))
        print(json.dumps(results[-1]), flush=True)
    slug = (torch.cuda.get_device_name() if device.type == "cuda" else "cpu").lower().replace(" ", "-")
    report = {"benchmark": "train_step_variants", "device": slug, "shape": args.shape, "torch": torch.__version__,
              "results": results}  # fmt: skip
    suffix = "" if args.shape == "base-shape" else "_large"
    write_json(Path(args.out, f"train_variants{suffix}_{slug}.json"), report)
    return results


if __name__ == "__main__":
    main()
