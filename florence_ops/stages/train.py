"""Stage `train`: fine-tune the base model on the processed training split.

Writes `paths.train/model` (the best model by validation ANLS, or the last one without validation: Hugging Face
layout, or LoRA adapters plus the trained projector) and `paths.train/summary.json`; DVCLive metrics and plots go to
`paths.live`. Until the run ends, the best model so far is kept beside the run's checkpoint, where a rerun that
resumes finds it (DVC deletes the stage's outputs before running it). With `train.num_processes > 1` (or FSDP) the
stage starts itself through `accelerate launch`; with `train.num_machines > 1` it does so on every machine, as
machine rank 0 under `dvc repro` and as `florence-ops train --machine-rank R` on the others. Only the first process
of machine rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed

from florence_ops.artifacts import SUMMARY_FILE, TRAINED_MODEL_DIR, move_directory, publish_directory, write_json
from florence_ops.checkpointing import BackgroundWrites, CheckpointStore, run_fingerprint
from florence_ops.config import Params, pick
from florence_ops.data.processed import ImageTable, read_questions
from florence_ops.data.streaming import ParquetPages, ShardBatches, process_share
from florence_ops.errors import UserError
from florence_ops.launch import launch, needs_launch, writes_outputs
from florence_ops.model_inputs import Collator
from florence_ops.modeling import apply_lora, checkpoint_activations, freeze, load_pretrained, save_processor, unwrap
from florence_ops.training import Run, fit, make_accelerator
from florence_ops.vision.sources import PixelSource, cached_source
from florence_ops.vision.stage_cache import encoded_source, open_or_build_together

log = logging.getLogger(__name__)
COLUMNS = ["questionId", "question", "answers", "image_id", "question_types"]
# What the stage reads: recorded in summary.json and the checkpoint fingerprint (dvc.yaml lists the same).
PARAMS_READ = ("lr", "epochs", "batch_size", "seed", "train", "model.attn_implementation", "model.trust_remote_code",
               "model.vision_batch_size", "model.vision_compile", "evaluate.batch_size")  # fmt: skip
# Where the machines meet, not what they compute: a run resumes under another address, port or timeout.
RENDEZVOUS = ("train.main_process_ip", "train.main_process_port", "train.collective_timeout_s")


def train(params: Params, machine_rank: int | None = None) -> dict:
    """Fine-tune, save the result and return the run summary (resuming this run's checkpoint if any).

    With `train.num_machines > 1` this machine joins the others as `machine_rank` (default 0, the machine whose
    processes write the outputs); on the other machines it returns once training ends, writing nothing.
    """
    cfg = params.train
    if cfg.distributed == "fsdp" and not torch.cuda.is_available():
        raise UserError("train.distributed: fsdp needs CUDA GPUs (accelerate has no FSDP on CPU); use ddp here")
    if machine_rank is not None and not 0 <= machine_rank < cfg.num_machines:
        raise UserError(f"machine rank {machine_rank} is outside 0..{cfg.num_machines - 1} (train.num_machines)")
    if needs_launch(cfg.num_processes, cfg.distributed, cfg.num_machines):
        return _launch(params, machine_rank)
    set_seed(params.seed)  # Python, NumPy and torch on every device
    acc = make_accelerator(params)
    if acc.num_processes != cfg.world_size:
        raise UserError(f"train.num_processes x train.num_machines is {cfg.world_size} but {acc.num_processes} "
                        "process(es) started")  # fmt: skip
    writer = writes_outputs(acc)
    if not writer:
        logging.getLogger().setLevel(logging.WARNING)

    model, processor = load_pretrained(params.paths.base_model, params.model)
    if params.train.lora.enabled:
        model = apply_lora(model, params.train.lora, params.train.freeze)
    trainable, total = freeze(model, params.train.freeze)
    log.info("trainable parameters: %d of %d (%.1f%%)", trainable, total, 100 * trainable / total)
    if params.train.gradient_checkpointing:
        checkpoint_activations(model)

    processed = Path(params.paths.processed)
    if cfg.streaming:
        images = ParquetPages(processed)
        train_rows, own_batches = _own_share(params, images, acc)
        source = vision_source(params, model, processor, images, acc, [row["image_id"] for row in train_rows])
    else:
        images, own_batches = ImageTable(processed), None
        train_rows = _rows(processed, "train")
        source = vision_source(params, model, processor, images, acc)
    out = Path(params.paths.train)
    fingerprint = run_fingerprint(params, PARAMS_READ, ignore=RENDEZVOUS)
    checkpoints = CheckpointStore(params.paths.checkpoints, fingerprint, params.paths.live, BackgroundWrites())
    live = _live(params, checkpoints) if writer else None
    run = Run(
        params=params,
        accelerator=acc,
        model=model,
        train_rows=train_rows,
        val_rows=_rows(processed, "validation")[: params.train.max_eval_questions],
        collator=_collator(processor, params, train=True),
        eval_collator=_collator(processor, params, train=False),
        source=source,
        checkpoints=checkpoints,
        save_best=lambda objective: save_trained(acc, objective, processor, checkpoints.best, checkpoints.writes),
        live=live,
        own_batches=own_batches,
    )
    progress, objective = fit(run)
    if progress.best_epoch < 0:  # no validation: the last weights are the result
        save_trained(acc, objective, processor, checkpoints.best)
    if writer:
        move_directory(checkpoints.best, out / TRAINED_MODEL_DIR)
        write_json(out / SUMMARY_FILE, _summary(params, progress, (trainable, total), source.cached))
        if live is not None:
            live.end()
        run.checkpoints.clear()
    acc.wait_for_everyone()
    acc.end_training()
    return {"steps": progress.step, "best_val_anls": progress.best_score}


def _summary(params: Params, progress, parameters: tuple[int, int], cached: bool) -> dict:
    """summary.json: the run's progress, its (trainable, total) parameters and the params it read."""
    return {
        "steps": progress.step,
        "epochs": progress.epoch,
        "best_epoch": progress.best_epoch,
        "best_val_anls": progress.best_score,
        "history": progress.history,
        "trainable_parameters": parameters[0],
        "total_parameters": parameters[1],
        "vision_cache": cached,
        "lora": params.train.lora.enabled,
        "params": pick(params, PARAMS_READ),
    }


def _launch(params: Params, machine_rank: int | None) -> dict:
    """Start this machine's processes and wait for them; machine rank 0 returns the run summary it wrote."""
    cfg = params.train
    rank = None if cfg.num_machines == 1 else machine_rank or 0
    launch("train", params, cfg.num_processes, fsdp=cfg.distributed == "fsdp", rank=rank)
    if rank:
        return {"machine_rank": rank}
    return json.loads((Path(params.paths.train) / SUMMARY_FILE).read_text())


def _own_share(params: Params, pages: ParquetPages, acc) -> tuple[list[dict], ShardBatches]:
    """This process's training questions and micro-batches under `train.streaming` (`florence_ops.data.streaming`)."""
    accum, world = params.train.grad_accum_steps, acc.num_processes
    if params.batch_size % (accum * world):
        raise UserError(f"train.streaming: batch_size {params.batch_size} must divide into grad_accum_steps x "
                        f"processes = {accum * world} equal micro-batches")  # fmt: skip
    micro = params.batch_size // (accum * world)
    share = process_share(params.paths.processed, "train", pages, COLUMNS, acc.process_index, world, micro, accum)
    log.info("streaming: each of %d processes trains %d micro-batches of %d an epoch; this one reads %d questions of "
             "its %d row groups of pages; %d questions of the split left out each epoch", world, share.micro_batches,
             micro, len(share.rows), len(set(share.groups)), share.left_out)  # fmt: skip
    return share.rows, ShardBatches(share, micro, params.seed, acc.process_index)


def vision_source(params: Params, model, processor, images, acc, warm_up_ids: list[str] | None = None):
    """Cached vision features when the tower is frozen and the cache is on, the frozen tower run inside the step when
    the cache is off (`encoded_source`, warmed up on `warm_up_ids`, default all pages); pixels for a tower that trains.

    An existing cache's checksums are checked (a damaged cache is rebuilt); a missing one is built by all the
    processes of each machine together (`open_or_build_together`).
    """
    pixels = PixelSource(images, processor.image_processor)
    if "vision_tower" not in params.train.freeze:
        return pixels
    tower = unwrap(model).model.vision_tower.to(acc.device).eval()
    if not params.train.vision_cache:
        micro_batch = params.batch_size // (params.train.grad_accum_steps * acc.num_processes)
        return encoded_source(params, tower, pixels, warm_up_ids or images.ids, acc.device, micro_batch)
    cache = open_or_build_together(params, tower, processor.image_processor, images, acc)
    return cached_source(cache, images.ids, acc.device)


def save_trained(acc, objective, processor, target: Path, writes: BackgroundWrites | None = None) -> None:
    """Save the model being trained (full weights, or LoRA adapters with the trained projector); call on every
    process: under FSDP the full state dict is gathered from all of them first. With `writes`, the weights are copied
    to host memory and written in the background; the processor is saved here, beside them, since its tokenizer is
    the one the training loop batches with (a fast tokenizer's padding state is not safe to touch from two threads)."""
    start, state = time.perf_counter(), None
    if acc.distributed_type == DistributedType.FSDP:
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in acc.get_state_dict(objective).items() if k.startswith(prefix)}
    if acc.is_main_process:
        model = acc.unwrap_model(objective).model
        if writes is None:
            save_model(model, processor, target, state)
        else:
            copied, _ = writes.copy("best model", state if state is not None else model.state_dict())
            target.parent.mkdir(parents=True, exist_ok=True)
            processor_files = Path(tempfile.mkdtemp(prefix=f".{target.name}-processor-", dir=target.parent))
            save_processor(processor, processor_files)
            writes.queue(lambda: save_model_with(model, copied, processor_files, target), ("best model",))
        log.info("model saved to %s in %.1f s%s", target, time.perf_counter() - start,
                 " (written in the background)" if writes is not None else "")  # fmt: skip
    acc.wait_for_everyone()


def save_model_with(model, state_dict: dict, processor_files: Path, target: Path) -> None:
    """Save a model's weights (`state_dict`) with the processor files saved beforehand to `processor_files` (then
    removed) to `target` atomically."""
    try:
        with publish_directory(target) as staging:
            model.save_pretrained(staging, state_dict=state_dict)
            shutil.copytree(processor_files, staging, dirs_exist_ok=True)
    finally:
        shutil.rmtree(processor_files, ignore_errors=True)


def save_model(model, processor, target: Path, state_dict: dict | None = None) -> None:
    """Save a model (full weights, or LoRA adapters) and its processor to `target` atomically."""
    with publish_directory(target) as staging:
        model.save_pretrained(staging, state_dict=state_dict)
        save_processor(processor, staging)


def _rows(processed: Path, split: str) -> list[dict]:
    return read_questions(processed, split).select_columns(COLUMNS).to_list()


def _collator(processor, params: Params, train: bool) -> Collator:
    cfg = params.train
    return Collator(processor.tokenizer, cfg.prompt, cfg.max_question_tokens, cfg.max_answer_tokens, train)


def _live(params: Params, checkpoints: CheckpointStore):
    """DVCLive, for the process that writes the outputs; dvc.yaml declares its files. A run that resumes continues,
    step for step, the history its checkpoint holds (`dvc repro` deletes the stage's plots before running it again)."""
    from dvclive import Live

    latest = checkpoints.latest()
    if latest is not None:
        checkpoints.restore_live(latest)
    live = Live(params.paths.live, resume=latest is not None, dvcyaml=None, save_dvc_exp=False, report=None)
    if latest is not None:  # DVCLive reads its step back from metrics.json, except after one step (it restarts at 0)
        live.step = checkpoints.progress(latest)["step"]
    return live
