"""The training objective is right where the common recipe is wrong: masked padding, real freezing, true loss."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from florence_ops.base_models import build_tiny_model, build_tiny_processor
from florence_ops.config import TinyModel
from florence_ops.model_inputs import (
    IGNORE_INDEX,
    Collator,
    causal_padding_mask,
    embed_inputs,
    key_padding_mask,
    project_vision,
)
from florence_ops.modeling import freeze, model_parts
from florence_ops.training import DocVQAObjective, answer_loss, make_optimizer
from florence_ops.vision.sources import PixelSource

CORPUS = ["<DocVQA>What is the total amount?", "Which company issued this document?", "ACME Corp", "$1,234.50"] * 5
ROWS = [
    {"question": "What is the total amount?", "answers": ["$1,234.50"], "image_id": "white"},
    {"question": "Which company?", "answers": ["ACME Corp"], "image_id": "grey"},
]


@pytest.fixture(scope="module")
def tiny():
    spec = TinyModel(image_size=64, vision_dims=[8, 16, 16, 32], vision_heads=[1, 2, 2, 4], d_model=32, heads=2,
                     ffn_dim=64, vocab_size=300)  # fmt: skip
    processor = build_tiny_processor(spec, CORPUS)
    images = {"white": Image.new("RGB", (64, 64), "white"), "grey": Image.new("RGB", (64, 64), (90, 90, 90))}
    return processor, images, spec


def _model(tiny, seed=0):
    processor, _, spec = tiny
    return build_tiny_model(spec, processor, seed)


def _inputs(model, tiny, rows):
    processor, images, _ = tiny
    batch = Collator(processor.tokenizer, "<DocVQA>", 32, 16, train=True)(rows)
    source = PixelSource(images, processor.image_processor)
    return batch, source


@pytest.fixture
def compiled_graphs(monkeypatch):
    """`torch.compile` traced by dynamo and AOTAutograd as in training but run without inductor's code generation,
    which takes minutes on two cores (the GPU benchmarks run inductor); yields dynamo's counters, cleared."""
    import functools

    import torch._dynamo.utils

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_labels_mask_padding_and_decoder_mask(tiny):
    batch, _ = _inputs(_model(tiny), tiny, ROWS)
    lengths = (batch.labels != IGNORE_INDEX).sum(1)
    assert lengths[0] != lengths[1], "answers of different length are needed to see padding"
    short = int(lengths.argmin())
    assert (batch.labels[short, lengths[short] :] == IGNORE_INDEX).all()
    assert torch.equal(batch.decoder_attention_mask.bool(), batch.labels != IGNORE_INDEX)
    pad_id = tiny[0].tokenizer.pad_token_id
    assert not (batch.labels == pad_id).any(), "no loss may be computed on padding tokens"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_tokens_are_transformers_projectors_both_ways(tiny, dtype):
    """`project_vision` computes transformers' `Florence2MultiModalProjector` sums in its order: the same tokens, and
    the same gradients for the tower's output and every projector weight, to the bit."""
    model = _model(tiny).to(dtype)
    vision = torch.randn(3, model.config.vision_config.embed_dim[-1], 5, 7, dtype=dtype, requires_grad=True)
    projector = model.model.multi_modal_projector
    tokens, reference = project_vision(model, vision), projector(vision)
    assert torch.equal(tokens, reference)
    grad = torch.randn_like(tokens)
    leaves = [vision, *projector.parameters()]
    for ours, theirs in zip(torch.autograd.grad(tokens, leaves, grad), torch.autograd.grad(reference, leaves, grad)):
        assert torch.equal(ours, theirs)


def test_model_loss_equals_hand_computed_cross_entropy(tiny):
    """Teacher forcing with the decoder start token: the decoder reads [start, y0..y(n-2)] and predicts y0..y(n-1)."""
    model = _model(tiny).eval()
    batch, source = _inputs(model, tiny, ROWS)
    pixels = source.prepare(source.load(batch.image_ids), torch.device("cpu"))
    features = project_vision(model, model.model.vision_tower(pixels).last_hidden_state)
    embeds, mask = embed_inputs(model, features, batch.input_ids, batch.attention_mask)
    start = model.config.text_config.decoder_start_token_id
    pad = model.config.text_config.pad_token_id
    targets = batch.labels
    decoder_inputs = torch.cat([torch.full_like(targets[:, :1], start), targets[:, :-1]], dim=1)
    decoder_inputs = decoder_inputs.masked_fill(decoder_inputs == IGNORE_INDEX, pad)
    logits = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_inputs).logits
    by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    # transformers' own loss (labels shifted inside the model) must be the same number.
    model_loss = model(inputs_embeds=embeds, attention_mask=mask, labels=targets).loss
    torch.testing.assert_close(model_loss, by_hand, rtol=1e-5, atol=1e-6)
    # and so must the project's objective (token sum / token count).
    tokens = (targets != IGNORE_INDEX).sum()
    loss_sum = DocVQAObjective(model)(batch, source)
    torch.testing.assert_close(loss_sum / tokens, by_hand, rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_a_questions_loss(tiny):
    """With attention masks, a question's loss is the same alone or padded inside a batch with a longer one."""
    model = _model(tiny).eval()
    long_question = dict(ROWS[1], question="Which company issued this document and what is the total amount?")
    batch, source = _inputs(model, tiny, [ROWS[1], long_question])
    alone, _ = _inputs(model, tiny, [ROWS[1]])
    assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1], "the first question must be padded"
    objective = DocVQAObjective(model)
    with torch.no_grad():
        sum_alone = objective(alone, source)
        first = type(batch)(batch.input_ids[:1], batch.attention_mask[:1], batch.image_ids[:1], batch.labels[:1],
                            batch.decoder_attention_mask[:1])  # fmt: skip
        sum_padded = objective(first, source)
    # Absolute, and tight: on a random tiny model unmasked padding moves this sum by about 1.5e-4 (of 34), within a
    # relative 1e-5.
    torch.testing.assert_close(sum_padded, sum_alone, rtol=0, atol=1e-5)


def test_encoder_sequence_padded_to_a_multiple_keeps_the_loss(tiny):
    """The masked positions the CUDA step adds to reach a multiple of the sequence length change no answer's loss."""
    model = _model(tiny).eval()
    batch, source = _inputs(model, tiny, ROWS)
    pixels = source.prepare(source.load(batch.image_ids), torch.device("cpu"))
    features = project_vision(model, model.model.vision_tower(pixels).last_hidden_state)
    losses = []
    for multiple in (1, 64):
        embeds, mask = embed_inputs(model, features, batch.input_ids, batch.attention_mask, multiple)
        assert embeds.shape[1] == mask.shape[1] and embeds.shape[1] % multiple == 0
        losses.append(model(inputs_embeds=embeds, attention_mask=mask, labels=batch.labels).loss)
    assert mask.shape[1] > features.shape[1] + batch.input_ids.shape[1], "the batch must have been padded"
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_key_padding_mask_masks_what_transformers_masks(tiny):
    """The (B, 1, 1, T) mask the training step hands SDPA gives the encoder states and logits of transformers' own
    masking from the 2-D mask; without any mask the padding reaches them."""
    model = _model(tiny).eval()
    long_question = dict(ROWS[1], question="Which company issued this document and what is the total amount?")
    batch, source = _inputs(model, tiny, [ROWS[1], long_question])
    pixels = source.prepare(source.load(batch.image_ids), torch.device("cpu"))
    with torch.no_grad():
        features = project_vision(model, model.model.vision_tower(pixels).last_hidden_state)
        embeds, mask = embed_inputs(model, features, batch.input_ids, batch.attention_mask)
        outputs = {form: model(inputs_embeds=embeds, attention_mask=m, labels=batch.labels)
                   for form, m in [("2-D", mask), ("4-D", key_padding_mask(model, mask)), ("none", None)]}  # fmt: skip
    assert key_padding_mask(model, mask).shape == (2, 1, 1, mask.shape[1])
    real = mask.bool()
    assert not real.all(), "the first question must be padded"
    for name in ("encoder_last_hidden_state", "logits"):
        two_d, four_d, unmasked = (getattr(outputs[form], name) for form in ("2-D", "4-D", "none"))
        if name == "encoder_last_hidden_state":
            two_d, four_d, unmasked = two_d[real], four_d[real], unmasked[real]
        torch.testing.assert_close(four_d, two_d, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(unmasked, two_d, rtol=1e-5, atol=1e-4), f"{name}: the padding must matter"


def test_causal_padding_mask_masks_what_transformers_masks(tiny):
    """The (B, 1, L, L) decoder mask the training step hands SDPA gives the logits of transformers' own masking from
    the 2-D mask at every position, padded ones too; causal masking alone lets the padded positions see padding."""
    model = _model(tiny).eval()
    batch, source = _inputs(model, tiny, ROWS)
    mask = batch.decoder_attention_mask
    assert not mask.bool().all(), "one answer must be padded"
    text = model.config.text_config
    decoder_ids = torch.where(batch.labels == IGNORE_INDEX, text.pad_token_id, batch.labels)
    decoder_ids = torch.cat([torch.full_like(decoder_ids[:, :1], text.decoder_start_token_id), decoder_ids[:, :-1]], 1)
    pixels = source.prepare(source.load(batch.image_ids), torch.device("cpu"))
    with torch.no_grad():
        features = project_vision(model, model.model.vision_tower(pixels).last_hidden_state)
        embeds, encoder_mask = embed_inputs(model, features, batch.input_ids, batch.attention_mask)
        forms = {"2-D": mask, "4-D": causal_padding_mask(model, mask), "causal": None}
        inputs = dict(inputs_embeds=embeds, attention_mask=encoder_mask, decoder_input_ids=decoder_ids, use_cache=False)
        logits = {form: model(**inputs, decoder_attention_mask=m).logits for form, m in forms.items()}
    assert causal_padding_mask(model, mask).shape == (2, 1, mask.shape[1], mask.shape[1])
    torch.testing.assert_close(logits["4-D"], logits["2-D"], rtol=1e-5, atol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(logits["causal"][real], logits["2-D"][real], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits["causal"][~real], logits["2-D"][~real], rtol=1e-5, atol=1e-4)


def test_the_training_step_leaves_transformers_no_mask_to_read_on_the_host(tiny, monkeypatch):
    """transformers reads a 2-D mask's values on the host before it builds SDPA's mask (whether anything is padded),
    which on a GPU waits for every kernel queued so far; the training step's loss hands it none to read."""
    import transformers.masking_utils as masking_utils

    reads = []
    read = masking_utils._ignore_causal_mask_sdpa
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: reads.append(a) or read(*a, **k))
    model = _model(tiny).eval()
    batch, source = _inputs(model, tiny, ROWS)
    pixels = source.prepare(source.load(batch.image_ids), torch.device("cpu"))
    vision = model.model.vision_tower(pixels).last_hidden_state
    loss = answer_loss(model, vision, batch.input_ids, batch.attention_mask, batch.labels,
                       batch.decoder_attention_mask)  # fmt: skip
    assert loss.item() > 0
    assert reads == []


def test_bf16_pure_step_computes_in_bf16_and_trains_the_fp32_weights(tiny):
    """`train.precision: bf16-pure` (on a GPU): layer norms, and so the residual stream, compute in bf16 (autocast keeps
    them in fp32); the gradients reach the fp32 weights, the optimizer updates those, and the objective saves under
    the same names as the autocast one."""
    model = _model(tiny)
    freeze(model, ["vision_tower"])
    model.eval()  # no dropout: the two steps see the same network
    batch, source = _inputs(model, tiny, ROWS)
    text = model.model.language_model
    computed = []
    for norm in (text.encoder.layers[0].final_layer_norm, text.decoder.layers[-1].final_layer_norm):
        norm.register_forward_hook(lambda module, args, output: computed.append(output.dtype))
    autocast_like, pure = DocVQAObjective(model), DocVQAObjective(model, compute_dtype=torch.bfloat16)
    reference = autocast_like(batch, source)
    reference.backward()
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    computed.clear()

    loss = pure(batch, source)
    loss.backward()
    assert computed == [torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys() and {g.dtype for g in grads.values()} == {torch.float32}
    flat, flat_reference = (torch.cat([g.flatten() for g in d.values()]) for d in (grads, reference_grads))
    assert F.cosine_similarity(flat, flat_reference, dim=0) > 0.99
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    make_optimizer(pure, lr=1e-2, weight_decay=0.0, device=torch.device("cpu")).step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert pure.state_dict().keys() == autocast_like.state_dict().keys()


@pytest.mark.parametrize("parts", [["vision_tower"], ["vision_tower", "projector"], ["text_encoder"], []])
def test_freeze_keeps_frozen_weights_and_counts_them(tiny, parts):
    model = _model(tiny)
    trainable, total = freeze(model, parts)
    frozen = [p for part in parts for p in model_parts(model)[part]]
    assert total - trainable == sum(p.numel() for p in frozen)
    assert all(not p.requires_grad for p in frozen)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objective = DocVQAObjective(model)
    optimizer = make_optimizer(objective, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable
    batch, source = _inputs(model, tiny, ROWS)
    loss_sum = objective(batch, source)
    loss_sum.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    frozen_names = {name for name, p in model.named_parameters() if any(p is f for f in frozen)}
    assert not changed & frozen_names
    assert changed, "trainable weights must move"
    if "vision_tower" not in parts:
        assert any(name.startswith("model.vision_tower") for name in changed)


def test_is_trainable_attribute_freezes_nothing(tiny):
    """The popular recipe's `param.is_trainable = False` is a no-op: this is why freezing uses requires_grad."""
    model = _model(tiny)
    for param in model.model.vision_tower.parameters():
        param.is_trainable = False
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())


@pytest.mark.parametrize("parts, tower_training", [(["vision_tower"], False), ([], True)])
def test_train_mode_keeps_a_frozen_tower_in_eval_mode(tiny, parts, tower_training):
    from florence_ops.modeling import train_mode

    model = _model(tiny)
    freeze(model, parts)
    train_mode(DocVQAObjective(model))
    assert model.training and model.model.language_model.training
    assert model.model.vision_tower.training is tower_training


def test_pixels_normalised_on_the_device_equal_the_image_processor(tiny):
    """Pages travel as uint8 and are normalised where the model runs, with the image processor's exact arithmetic."""
    processor, _, _ = tiny
    gen = torch.Generator().manual_seed(0)
    pages = {f"p{i}": Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=gen, dtype=torch.uint8).numpy())
             for i in range(3)}  # fmt: skip
    source = PixelSource(pages, processor.image_processor)
    ours = source.prepare(source.load(list(pages)), torch.device("cpu"))
    theirs = processor.image_processor(list(pages.values()), do_resize=False, return_tensors="pt")["pixel_values"]
    assert ours.is_contiguous() and torch.equal(ours, theirs)


def test_compiled_tower_gives_the_eager_output_and_leaves_the_model_as_it_was(tiny, compiled_graphs):
    """The cache build compiles a copy of the frozen tower by regions (static shapes, a short last batch padded to the
    first batch's size): the blocks of each stage that has several, the rest eager; the model's own tower, which is
    saved with the model, keeps its modules and weights. (The GPU benchmark compares inductor's output with fp32's,
    benchmarks/gpu_vision_tower.py.)"""
    import copy

    from torch._dynamo.eval_frame import OptimizedModule

    from florence_ops.vision.encoder import compile_regions, tower_encoder

    processor, images, _ = tiny
    tiny_tower = _model(tiny).model.vision_tower
    config = copy.deepcopy(tiny_tower.config)
    config.depths = [1, 3, 1, 1]  # as Florence-2's 1, 1, 9, 1: one stage repeats its block
    torch.manual_seed(0)
    tower = type(tiny_tower)(config).eval()
    regions = compile_regions(copy.deepcopy(tower))
    compiled = [name for name, module in regions.named_modules() if isinstance(module, OptimizedModule)]
    assert compiled == ["blocks.1.0", "blocks.1.1", "blocks.1.2"]
    modules = {name: type(module) for name, module in tower.named_modules()}
    weights = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
    source = PixelSource(images, processor.image_processor)
    pages = source.load(["white", "grey"])
    eager = tower_encoder(tower, source, torch.device("cpu"), None)(pages)
    encode = tower_encoder(tower, source, torch.device("cpu"), None, compile=True)
    torch.testing.assert_close(encode(pages), eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encode(pages[:1]), eager[:1], rtol=1e-4, atol=1e-5)  # padded to 2, then cut
    assert compiled_graphs["stats"]["unique_graphs"] > 0  # the regions were compiled, not run eagerly
    assert {name: type(module) for name, module in tower.named_modules()} == modules
    assert tower.state_dict().keys() == weights.keys()
    assert all(torch.equal(tower.state_dict()[name], tensor) for name, tensor in weights.items())


def test_tower_with_fused_kernels_gives_the_towers_output(tiny):
    """The cache build's bf16 copy runs channel attention as plain matmuls and fc1 + GELU as one matmul; in fp32 on
    the CPU (where the GELU epilogue is exact) the output is the tower's own."""
    import copy

    from florence_ops.vision.encoder import GeluMatmulMLP, fuse_kernels

    processor, images, _ = tiny
    tower = _model(tiny).model.vision_tower.eval()
    source = PixelSource(images, processor.image_processor)
    pixels = source.prepare(source.load(["white", "grey"]), torch.device("cpu"))
    fused = fuse_kernels(copy.deepcopy(tower))
    assert sum(isinstance(module, GeluMatmulMLP) for module in fused.modules()) == 2 * sum(tower.config.depths)
    with torch.no_grad():
        torch.testing.assert_close(fused(pixels).last_hidden_state, tower(pixels).last_hidden_state)
    assert tower.config._attn_implementation != "eager"  # the model's own tower is untouched


def test_compiled_objective_gives_the_eager_loss_and_gradients_for_every_batch_shape(tiny, compiled_graphs):
    """`train.compile` compiles the objective after the page lookup once, with dynamic shapes: batches of other
    sizes and lengths get the eager loss and gradients without compiling again. (The GPU benchmark compares
    inductor's loss curve with eager's, benchmarks/train_step_variants.py.)"""
    eager, compiled = _model(tiny).train(), _model(tiny).train()
    objectives = DocVQAObjective(eager), DocVQAObjective(compiled, compile=True)
    long_question = dict(ROWS[1], question="Which company issued this document and what is the total amount?")
    long_answer = dict(ROWS[0], answers=["ACME Corp $1,234.50 ACME Corp"])
    batches = [ROWS, [long_question, ROWS[0], ROWS[1]], [long_answer, long_question]]  # other sizes and lengths
    for rows in batches:
        batch, source = _inputs(eager, tiny, rows)
        losses = []
        for objective in objectives:
            objective.zero_grad()
            torch.manual_seed(0)  # the same dropout masks
            losses.append(objective(batch, source))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert compiled_graphs["stats"]["unique_graphs"] == 1
