"""The training loop: setup, train (evaluate/checkpoint, accumulate, clip, step, log), save, clean up.

One loop serves one CPU, one GPU and several GPUs: accelerate prepares the model, optimizer, data and scheduler,
and batches are split across processes (`split_batches`). An optimizer step is one global batch of `batch_size`
questions, fed as `train.grad_accum_steps` micro-batches; its loss is the sum over the answer tokens of all those
micro-batches on all processes divided by their token count, so the gradient is the global per-token mean whatever
the number of processes or micro-batches (a short last batch included).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.models.florence2.modeling_florence2 import shift_tokens_right

from florence_ops.config import Params
from florence_ops.data.parallel import batched
from florence_ops.generation import Decoding, answer_across_processes
from florence_ops.launch import writes_outputs
from florence_ops.model_inputs import (
    IGNORE_INDEX,
    SEQUENCE_MULTIPLE,
    Collator,
    LengthGroupedBatches,
    TextBatch,
    causal_padding_mask,
    embed_inputs,
    key_padding_mask,
    project_vision,
)
from florence_ops.modeling import ModelWrapper, train_mode, unwrap
from florence_ops.precision import ComputeCopies, compute_dtype, mixed_precision
from florence_ops.step_log import StepLog, StepLoss
from florence_ops.vision.sources import WithVision, tower_output

log = logging.getLogger(__name__)


class DocVQAObjective(ModelWrapper):
    """Florence-2 plus its training loss as one module, so DDP and FSDP see every trainable parameter in `forward`.

    With `compile`, everything after the page lookup (projector, encoder, decoder, loss) runs as one compiled graph
    (`CompiledLoss`). With `compute_dtype` (bf16 for `train.precision: bf16-pure`) the step runs on copies of the
    weights in that dtype, so every activation is in it too (autocast keeps layer norms, and so the residual stream,
    in fp32); the gradients flow back through the copies into the fp32 weights, which the optimizer updates as usual.
    With `fused_kernels` the text encoder's layers train on `florence_ops.kernels` (CUDA only: Triton).
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False, compute_dtype: torch.dtype | None = None,
                 fused_kernels: bool = False):  # fmt: skip
        super().__init__()
        self.model = model
        if fused_kernels and not compile:
            from florence_ops.kernels import fuse_cross_attention, fuse_text_encoder  # Triton: only where CUDA is

            base = unwrap(model)
            log.info("fused Triton kernels: %d text encoder layers, %d decoder cross-attentions",
                     fuse_text_encoder(base), fuse_cross_attention(base))  # fmt: skip
        self.loss = CompiledLoss(answer_loss) if compile else answer_loss
        self.copies = ComputeCopies(compute_dtype) if compute_dtype is not None else None

    def forward(self, batch: TextBatch, source, cast: bool = True) -> torch.Tensor:
        """Summed cross-entropy over the batch's answer tokens (teacher forcing). `cast` false is the call that runs
        on the weights' copy."""
        if cast and self.copies is not None:
            return torch.func.functional_call(self, self.copies(self), (batch, source), {"cast": False})
        vision = tower_output(unwrap(self.model), source, batch, batch.input_ids.device)
        return self.loss(self.model, vision, batch.input_ids, batch.attention_mask, batch.labels,
                         batch.decoder_attention_mask)  # fmt: skip


def answer_loss(model, vision, input_ids, attention_mask, labels, decoder_attention_mask) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens `labels` of questions `input_ids` about pages whose tower output
    is `vision` (one row per question)."""
    base = unwrap(model)
    multiple = SEQUENCE_MULTIPLE if input_ids.is_cuda else 1
    embeds, mask = embed_inputs(base, project_vision(base, vision), input_ids, attention_mask, multiple)
    text_config = base.config.text_config
    decoder_input_ids = shift_tokens_right(labels, text_config.pad_token_id, text_config.decoder_start_token_id)
    logits = model(
        inputs_embeds=embeds,
        attention_mask=key_padding_mask(base, mask),
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=causal_padding_mask(base, decoder_attention_mask),
        use_cache=False,  # teacher forcing decodes in one pass: a key/value cache is only copies (and recompiles)
    ).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class CompiledLoss:
    """`loss(model, vision, *text)` compiled once for every batch: batch size and text lengths are dynamic from the
    first call (sizes that happen to be equal in it are not taken to be equal for ever), the pages' features
    contiguous, so that batches of other shapes reuse one graph (forward and backward) instead of compiling again.
    On a GPU inductor still compiles again now and then for a shape it guards on (answers a multiple of 8 tokens
    long, an epoch's short last batch: 40-65 s each on a cold H200, seconds from warm compile caches); a batch of
    one question compiles apart (torch specialises sizes 0 and 1)."""

    def __init__(self, loss):
        # The tiling analysis is for static shapes; with dynamic ones, torch 2.11's fails an assertion on this graph.
        self.compiled = torch.compile(loss, options={"triton.coalesce_tiling_analysis": False})

    def __call__(self, model, vision: torch.Tensor, *text: torch.Tensor | None) -> torch.Tensor:
        vision = vision.contiguous()
        torch._dynamo.maybe_mark_dynamic(vision, 0)
        for tensor in text:
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, (0, 1))
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self.compiled(model, vision, *text)


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already trained
    step: int = 0  # optimizer steps so far
    best_score: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict] = field(default_factory=list)


def fused_kernels(params: Params, device: torch.device) -> bool:
    """Whether the text encoder trains on `florence_ops.kernels`: `train.fused_kernels` on CUDA, where Triton is
    (torch's Linux CUDA builds bring it)."""
    if not params.train.fused_kernels or device.type != "cuda":
        return False
    if importlib.util.find_spec("triton") is None:
        log.warning("train.fused_kernels: Triton is not installed; the text encoder trains on PyTorch's kernels")
        return False
    return True


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW over trainable parameters only; no decay on biases and norms; fused kernels on CUDA."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def make_accelerator(params: Params) -> Accelerator:
    """The accelerator for this run: mixed precision as `train.precision` decides (`precision.mixed_precision`), batches
    split over processes, and `train.collective_timeout_s` for every collective: a process whose peer is gone (a machine
    lost) fails after that long instead of waiting for ever.

    Gradient accumulation is done by `train_window`, not by accelerate, which would divide every micro-batch by the
    number of micro-batches (a mean of means, and a short last window scaled down).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Accelerator(
        mixed_precision=mixed_precision(params.train.precision, device),
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=torch.cuda.is_available()),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=params.train.collective_timeout_s))],
    )


def make_loader(rows, collator: Collator, params: Params, sampler, source) -> DataLoader:
    """The batches of `sampler` over `rows`: DataLoader workers tokenize and load the vision input (pixels or cached
    features)."""
    workers = params.train.num_workers
    return DataLoader(
        rows,
        batch_sampler=sampler,
        collate_fn=WithVision(collator, source),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def global_batches(rows, params: Params) -> LengthGroupedBatches:
    """Length-grouped global batches of `batch_size` questions, each as `grad_accum_steps` micro-batches (accelerate
    splits them across processes)."""
    lengths = [len(row["question"]) for row in rows]
    accum = params.train.grad_accum_steps
    return LengthGroupedBatches(lengths, params.batch_size, params.seed, params.train.length_grouping, accum)


def lr_scheduler(optimizer, params: Params, steps_per_epoch: int):
    """Warmup then linear, cosine or constant, over all optimizer steps of the run."""
    total = steps_per_epoch * params.epochs
    name = "constant_with_warmup" if params.train.schedule == "constant" else params.train.schedule
    warmup = math.ceil(total * params.train.warmup_ratio)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total), total


def accumulate_gradients(accelerator, objective, window: list[TextBatch], source) -> torch.Tensor:
    """Backward over the micro-batches of one optimizer step; returns the step's per-token loss (a 0-d tensor).

    Every micro-batch's summed loss is divided by the answer-token count of the whole step on all processes (DDP and
    FSDP average gradients over processes, hence the factor), so the accumulated gradient is the global per-token
    mean. Gradients are synchronised only on the last micro-batch.
    """
    tokens = sum((batch.labels != IGNORE_INDEX).sum() for batch in window).float()
    global_tokens = accelerator.reduce(tokens, reduction="sum")
    total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(objective):
            with accelerator.autocast():
                loss_sum = objective(batch, source)
            accelerator.backward(loss_sum * accelerator.num_processes / global_tokens)
        total += loss_sum.detach()
    return accelerator.reduce(total, reduction="sum") / global_tokens


def train_window(accelerator, objective, optimizer, scheduler, window, source, max_grad_norm: float) -> StepLoss:
    """One optimizer step over `window`, queued on the device; returns its loss, to be read later (`StepLoss`)."""
    loss = accumulate_gradients(accelerator, objective, window, source)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(objective.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepLoss(loss)


def full_parameters(accelerator, model):
    """Gather FSDP's sharded parameters for work outside its forward (generation); a no-op otherwise."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(model, writeback=False)


def validation_score(accelerator, model, rows, collator, source, decoding: Decoding, num_workers: int = 0) -> float:
    """Mean ANLS of greedy answers on `rows`, each process answering its share."""
    from florence_ops.metrics import anls  # rapidfuzz: imported here so benchmarks run without it

    with full_parameters(accelerator, model):
        predictions = answer_across_processes(accelerator, model, rows, collator, source, decoding, num_workers)
    scores = [anls(p, row["answers"]) for p, row in zip(predictions, rows)]
    train_mode(model)
    return sum(scores) / max(1, len(scores))


@dataclass
class Run:
    """Everything `fit` needs, built by the train stage's setup."""

    params: Params
    accelerator: Accelerator
    model: torch.nn.Module  # the (possibly LoRA-wrapped) transformers model
    train_rows: list[dict]  # the split's questions; with `own_batches`, this process's share
    val_rows: list[dict]
    collator: Collator
    eval_collator: Collator
    source: object  # PixelSource or CachedSource
    checkpoints: object  # CheckpointStore
    save_best: object  # callable(objective) -> None, called on every process
    live: object | None = None  # DVCLive on the main process
    own_batches: object | None = None  # ShardBatches: each process's own micro-batches (`train.streaming`)


def fit(run: Run) -> tuple[Progress, torch.nn.Module]:
    """Train `run.model` for `params.epochs`, resuming from the run's last checkpoint if there is one.

    Returns the progress and the prepared training objective (which `save_best` can save).
    """
    params, acc = run.params, run.accelerator
    accum = params.train.grad_accum_steps
    step_dtype = compute_dtype(params.train.precision, acc.device)
    objective = DocVQAObjective(run.model, params.train.compile, step_dtype, fused_kernels(params, acc.device))
    optimizer = make_optimizer(objective, params.lr, params.train.weight_decay, acc.device)
    if run.own_batches is None:  # global batches, split across processes by accelerate
        loader = make_loader(run.train_rows, run.collator, params, global_batches(run.train_rows, params), run.source)
        scheduler, total_steps = lr_scheduler(optimizer, params, math.ceil(len(run.train_rows) / params.batch_size))
        objective, optimizer, loader, scheduler = acc.prepare(objective, optimizer, loader, scheduler)
    else:  # each process's own micro-batches, moved to its device here
        loader = make_loader(run.train_rows, run.collator, params, run.own_batches, run.source)
        scheduler, total_steps = lr_scheduler(optimizer, params, len(run.own_batches) // accum)
        objective, optimizer, scheduler = acc.prepare(objective, optimizer, scheduler)
    progress = Progress()
    latest = run.checkpoints.latest()
    if latest is not None:
        progress = Progress(**run.checkpoints.load(acc, latest))
        log.info("resuming from %s: epoch %d, step %d", latest, progress.epoch, progress.step)
    # Per-epoch validation decodes as far as training teaches: the answer-token budget.
    decoding = Decoding(params.evaluate.batch_size, 1, params.train.max_answer_tokens, params.train.precision)
    clip = params.train.max_grad_norm
    train_mode(objective)
    with _progress_bar(acc, total_steps, progress.step) as bar:
        steps = StepLog(run.live, bar, acc.device, run.checkpoints.folder)
        for epoch in range(progress.epoch, params.epochs):
            batches = _epoch_batches(acc, loader, run.own_batches, epoch, progress.batches_done)
            for window in batched(batches, accum):  # one optimizer step's micro-batches
                loss = train_window(acc, objective, optimizer, scheduler, window, run.source, clip)
                progress.batches_done += len(window)
                progress.step += 1
                samples = sum(len(batch.image_ids) for batch in window) * acc.num_processes
                steps.queued(loss, epoch, progress.step, samples, scheduler.get_last_lr()[0])
                if progress.step % params.train.checkpoint_every == 0:
                    steps.flush()
                    run.checkpoints.save(acc, asdict(progress), (objective, optimizer, scheduler))
            steps.flush()
            progress.epoch, progress.batches_done = epoch + 1, 0
            if _end_of_epoch(run, objective, progress, decoding, (optimizer, scheduler)):
                break
    run.checkpoints.wait()
    acc.wait_for_everyone()  # the best model and the last checkpoint are on disk, whichever process wrote them
    return progress, objective


def _end_of_epoch(run: Run, objective, progress: Progress, decoding: Decoding, training: tuple) -> bool:
    """Score validation, keep the best model, checkpoint; true when early stopping says stop."""
    params, acc = run.params, run.accelerator
    record = {"epoch": progress.epoch, "step": progress.step}
    if params.train.eval_every_epoch and run.val_rows:
        start = time.perf_counter()
        score = validation_score(acc, objective, run.val_rows, run.eval_collator, run.source, decoding,
                                 params.train.num_workers)  # fmt: skip
        seconds = time.perf_counter() - start
        record["val_anls"] = score
        if score > progress.best_score:
            progress.best_score, progress.best_epoch, progress.stale_epochs = score, progress.epoch, 0
            run.save_best(objective)
        else:
            progress.stale_epochs += 1
        if run.live is not None:
            run.live.log_metric("val/anls", score)
        log.info("epoch %d: validation ANLS %.4f (best %.4f) on %d questions in %.1f s", progress.epoch, score,
                 progress.best_score, len(run.val_rows), seconds)  # fmt: skip
    progress.history.append(record)
    run.checkpoints.save(acc, asdict(progress), (objective, *training))
    patience = params.train.early_stopping_patience
    return patience is not None and progress.stale_epochs >= patience


def _epoch_batches(acc, loader, own_batches, epoch: int, done: int):
    """The micro-batches of `epoch` on this process's device, after the first `done` (a resume)."""
    if own_batches is not None:
        own_batches.set_epoch(epoch, skip=done)
        return (batch.to(acc.device) for batch in loader)
    set_epoch(loader, epoch)
    return acc.skip_first_batches(loader, done) if done else loader


def set_epoch(loader, epoch: int) -> None:
    """Make `loader` yield `epoch`'s order.

    accelerate's DataLoaderShard passes its own epoch counter to the sampler at the start of every pass; that counter
    starts at 0 in a fresh process, so it is set here too, not only the sampler (a resumed run would otherwise replay
    earlier epochs' orders). Samplers accelerate cannot reach (inside its process-sharding wrapper) are set directly.
    """
    loader.set_epoch(epoch)
    sampler = loader.batch_sampler
    while not isinstance(sampler, LengthGroupedBatches):
        sampler = sampler.batch_sampler
    sampler.set_epoch(epoch)


def _progress_bar(accelerator, total: int, initial: int):
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not writes_outputs(accelerator))
