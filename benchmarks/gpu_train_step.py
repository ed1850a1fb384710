"""GPU training-step throughput: the common recipe's step against florence-ops' engine step.

Florence-2-base architecture built from a config (231.4M parameters, random weights: the numbers are timing only;
BART's config defaults, so no attention or activation dropout, where the real checkpoint's config has 0.1 on both:
`train_step_variants.py` measures the pipeline's model, whose dropouts cost it 11%),
DocVQA-shaped inputs: 768x768 images (random normalised pixels), 18 question tokens, 6 answer tokens (random ids,
answers of 3-6 tokens padded to 6). Variants, each on the same model with a fresh optimizer:

- recipe: fp32, batch 6, the model's own `labels=` loss with padding ids left in (trained on), no attention mask,
  processor-style input (577 image placeholder ids + text ids, `input_ids` + `pixel_values`), pixels through the
  frozen vision tower every step, plain `torch.optim.AdamW` (not fused), linear schedule, `loss.item()` each step.
- engine_pixels: `florence_ops.training.train_window` (the engine's own optimizer step: bf16 autocast, summed masked
  cross-entropy over answer tokens from `DocVQAObjective` divided by the step's token count, grad clipping at 1.0)
  with `make_optimizer` (fused AdamW), attention masks and -100 labels as `florence_ops.model_inputs` builds them,
  pixels through the frozen tower.
- engine_cached: the same with the vision cache: `CachedSource` over a real `VisionFeatureCache` folder (bf16
  (N, 1024, 24, 24) memory-mapped .npy, read and copied to the GPU inside the step).
- engine_cached_loader: the cache read as training reads it: `WithVision` in DataLoader workers, pinned memory.
- engine_cached_gpu: the same with the cached features already on the GPU (no host read or copy): the model's share.
- *_compiled: the objective under `torch.compile` (what `train.compile: true` does).

Pixels (and the GPU-resident features) are precomputed on the GPU for both sides: image decoding and preprocessing
are left out of every variant. Each variant warms up, then times `--steps` steps (synchronised host clock around each
whole step) and reports the median; peak memory is `torch.cuda.max_memory_allocated`, reset between variants.

    PYTHONPATH=. python benchmarks/gpu_train_step.py [--out reports/benchmarks] [--steps 20] [--warmup 5]
    PYTHONPATH=. python benchmarks/gpu_train_step.py --tiny --device cpu --steps 2 --warmup 1   # smoke test

Writes <out>/train_step_<device-slug>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BartConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2VisionConfig,
    get_scheduler,
)

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.model_inputs import IGNORE_INDEX, TextBatch  # noqa: E402
from florence_ops.modeling import train_mode  # noqa: E402
from florence_ops.precision import autocast_dtype, describe, mixed_precision  # noqa: E402
from florence_ops.training import DocVQAObjective, make_optimizer, train_window  # noqa: E402
from florence_ops.vision.cache_build import build_cache  # noqa: E402
from florence_ops.vision.sources import CachedSource, WithVision  # noqa: E402

PAD, BOS, EOS = 1, 0, 2
# Work per sample counted with torch.utils.flop_counter on this architecture and these shapes (shared/reference).
TOWER_GFLOP = 380.0  # vision tower forward, one 768x768 image
REST_GFLOP = 206.0  # projector + encoder + decoder, forward and backward, one sample
PRECISION = "auto"  # train.precision as params.yaml sets it; florence_ops.precision decides what it means here


@dataclass
class Shapes:
    image_size: int
    question_tokens: int
    answer_tokens: int
    vocab_size: int
    image_tokens: int  # grid * grid + 1
    tower_channels: int
    grid: int


def build_model(tiny: bool, device: torch.device, seed: int = 0) -> tuple[Florence2ForConditionalGeneration, Shapes]:
    """Florence-2-base (or a toy of the same architecture) with random weights, built on `device`, no hub."""
    if tiny:
        vision = Florence2VisionConfig(
            depths=[1, 1, 1, 1], embed_dim=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], num_groups=[1, 2, 3, 4],
            projection_dim=64, window_size=4, max_position_embeddings=16,
        )  # fmt: skip
        text = dict(vocab_size=512, d_model=64, layers=1, heads=4, ffn=128)
        image_size = 128
    else:
        vision = Florence2VisionConfig(projection_dim=768)  # defaults are base: dims 128..1024, depths 1,1,9,1
        text = dict(vocab_size=51289, d_model=768, layers=6, heads=12, ffn=3072)
        image_size = 768
    text_config = BartConfig(
        vocab_size=text["vocab_size"], d_model=text["d_model"],
        encoder_layers=text["layers"], decoder_layers=text["layers"],
        encoder_attention_heads=text["heads"], decoder_attention_heads=text["heads"],
        encoder_ffn_dim=text["ffn"], decoder_ffn_dim=text["ffn"], max_position_embeddings=1024,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
    )  # fmt: skip
    config = Florence2Config(
        vision_config=vision.to_dict(), text_config=text_config.to_dict(), image_token_id=text["vocab_size"] - 1
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Florence2ForConditionalGeneration(config)
    grid = image_size // 32
    shapes = Shapes(image_size, 18, 6, text["vocab_size"], grid * grid + 1, vision.embed_dim[-1], grid)
    return model, shapes


def random_text(shapes: Shapes, batch: int, gen: torch.Generator, question_lengths=None) -> dict[str, torch.Tensor]:
    """Token ids shaped like tokenized DocVQA questions and answers (<s> ... </s>, right-padded), on the CPU."""
    v = shapes.vocab_size
    q_lens = question_lengths or [shapes.question_tokens] * batch
    q_max = max(q_lens)
    ids = torch.full((batch, q_max), PAD, dtype=torch.long)
    qmask = torch.zeros((batch, q_max), dtype=torch.long)
    for i, n in enumerate(q_lens):
        ids[i, 0], ids[i, n - 1] = BOS, EOS
        ids[i, 1 : n - 1] = torch.randint(4, v - 1, (n - 2,), generator=gen)
        qmask[i, :n] = 1
    a_lens = torch.randint(3, shapes.answer_tokens + 1, (batch,), generator=gen).tolist()
    a_lens[0] = shapes.answer_tokens  # the batch pads to the longest answer
    labels = torch.full((batch, shapes.answer_tokens), PAD, dtype=torch.long)
    amask = torch.zeros_like(labels)
    for i, n in enumerate(a_lens):
        labels[i, 0], labels[i, n - 1] = BOS, EOS
        labels[i, 1 : n - 1] = torch.randint(4, v - 1, (n - 2,), generator=gen)
        amask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": qmask, "labels_padded": labels, "answer_mask": amask}


def processor_ids(shapes: Shapes, input_ids: torch.Tensor) -> torch.Tensor:
    """What the processor feeds the model: one placeholder id per image token, then the text ids."""
    image = torch.full((input_ids.shape[0], shapes.image_tokens), shapes.vocab_size - 1, dtype=torch.long)
    return torch.cat([image, input_ids], dim=1)


def text_batch(text: dict[str, torch.Tensor], image_ids: list[str]) -> TextBatch:
    """The engine's batch, built as florence_ops.model_inputs's Collator/encode_labels build it."""
    labels = text["labels_padded"].masked_fill(text["answer_mask"] == 0, IGNORE_INDEX)
    return TextBatch(text["input_ids"], text["attention_mask"], image_ids, labels, text["answer_mask"])


class DevicePixels:
    """Normalised pixels already on the device (uncached source; preprocessing left out on both sides)."""

    cached = features = gives_tower_output = False

    def __init__(self, pool: torch.Tensor):
        self.pool = pool

    def load(self, image_ids):
        return self.pool[torch.tensor([int(i) for i in image_ids], device=self.pool.device)]

    def prepare(self, loaded, device):
        return loaded


class DeviceFeatures(DevicePixels):
    """Cached vision-tower outputs already on the device."""

    cached = features = gives_tower_output = True


def random_pixels(shapes: Shapes, n: int, device, gen: torch.Generator) -> torch.Tensor:
    """Normalised pixels: uniform [0, 1] images through the ImageNet mean/std."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = torch.empty((n, 3, shapes.image_size, shapes.image_size), device=device)
    for i in range(n):
        img = torch.rand((1, 3, shapes.image_size, shapes.image_size), generator=gen)
        out[i] = ((img - mean) / std)[0].to(device)
    return out


def write_feature_cache(root: Path, shapes: Shapes, n: int, gen: torch.Generator):
    """A real VisionFeatureCache of n random tower outputs (bf16 features.npy, index with checksums)."""
    ids = [str(i) for i in range(n)]
    shape = (shapes.tower_channels, shapes.grid, shapes.grid)
    batches = ((ids[i : i + 16], torch.randn((len(ids[i : i + 16]), *shape), generator=gen)) for i in range(0, n, 16))
    return build_cache(root, "bench", ids, batches, lambda features: features)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(model, device: torch.device) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """Milliseconds of each timed step (host clock, synchronised before and after) and the last loss."""
    loss = float("nan")
    for i in range(warmup):
        loss = step(i)
    times = []
    for i in range(warmup, warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step(i)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, loss


def profile_steps(step, start: int, steps: int, device: torch.device, title: str, path: Path | None) -> None:
    """Append a torch.profiler table (top kernels by device time) of `steps` more steps to `path`."""
    if path is None:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(start, start + steps):
            step(i)
        sync(device)
    wall = (time.perf_counter() - t0) * 1e3
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=40)
    except Exception:  # noqa: BLE001 - older key names
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    with open(path, "a") as f:
        f.write(f"=== {title}: {steps} steps, {wall:.1f} ms wall under the profiler ===\n{table}\n\n")


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_recipe(model, shapes, pixels, batch, args, device, gen) -> dict:
    """The common recipe's step: fp32, processor-style input, the model's own loss on padded labels."""
    reset_memory(model, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10_000)
    pool = pixels.shape[0]
    texts = [random_text(shapes, batch, gen) for _ in range(4)]

    def step(i):
        text = texts[i % len(texts)]
        start = (i * batch) % (pool - batch + 1)
        out = model(
            input_ids=processor_ids(shapes, text["input_ids"]).to(device),
            pixel_values=pixels[start : start + batch],
            labels=text["labels_padded"].to(device),
        )
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return out.loss.item()

    times, loss = time_steps(step, args.warmup, args.steps, device)
    profile_steps(step, args.warmup + args.steps, 3, device, f"recipe batch {batch}", args.profile_path)
    return summarise("recipe", batch, times, loss, device, cached=False, precision="fp32", optimizer="AdamW")


def run_engine(name, model, shapes, source, pool, batch, args, device, accelerator, gen, profile=False,
               loader_workers=0, compiled=False) -> dict:  # fmt: skip
    """florence_ops.training.train_window with the engine's objective, optimizer and batches.

    `loader_workers` reads cached features the way training does: `WithVision` in DataLoader workers, into pinned
    memory, overlapping the device's work. `compiled` runs the objective under torch.compile (`train.compile`).
    """
    reset_memory(model, device)
    objective = DocVQAObjective(model)
    train_mode(objective)  # as the training loop does: a frozen tower runs in eval mode
    if compiled:
        objective = torch.compile(objective)
        name = f"{name}_compiled"
    optimizer = make_optimizer(objective, lr=3e-4, weight_decay=0.01, device=device)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=10, num_training_steps=10_000)
    texts = [random_text(shapes, batch, gen) for _ in range(4)]

    def make_batch(i):
        start = (i * batch) % (pool - batch + 1)
        return text_batch(texts[i % len(texts)], [str(j) for j in range(start, start + batch)])

    def step(i):
        window = [make_batch(i).to(device)]
        return train_window(accelerator, objective, optimizer, scheduler, window, source, 1.0).value()

    if loader_workers:
        loader = DataLoader(range(10_000), batch_size=None, collate_fn=WithVision(make_batch, source),
                            num_workers=loader_workers, pin_memory=device.type == "cuda",
                            prefetch_factor=4)  # fmt: skip
        batches = iter(loader)

        def step(i):  # noqa: F811 - the DataLoader variant of the step above
            window = [next(batches).to(device)]
            return train_window(accelerator, objective, optimizer, scheduler, window, source, 1.0).value()

    try:
        times, loss = time_steps(step, args.warmup, args.steps, device)
        if profile:
            profile_steps(step, args.warmup + args.steps, 3, device, f"{name} batch {batch}", args.profile_path)
    except torch.OutOfMemoryError:
        return {"variant": name, "batch": batch, "error": "out of memory"}  # the next variant's reset frees it
    finally:
        model.train()
    precision = describe(autocast_dtype(PRECISION, device))
    fused = any(g.get("fused") for g in optimizer.param_groups)
    return summarise(name, batch, times, loss, device, source.cached, precision, f"AdamW fused={fused}")


def summarise(name, batch, times, loss, device, cached, precision, optimizer) -> dict:
    median = statistics.median(times)
    rate = batch / (median / 1e3)
    gflop = REST_GFLOP + (0.0 if cached else TOWER_GFLOP)
    return {
        "variant": name,
        "batch": batch,
        "precision": precision,
        "optimizer": optimizer,
        "step_ms_median": round(median, 2),
        "step_ms_min": round(min(times), 2),
        "step_ms_max": round(max(times), 2),
        "samples_per_s": round(rate, 1),
        "approx_tflops": round(rate * gflop / 1e3, 1),
        "peak_gib": None if peak_gib(device) is None else round(peak_gib(device), 2),
        "last_loss": round(loss, 4),
    }


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name


def environment(device: torch.device) -> dict:
    slug, name = device_slug(device)
    return {
        "device": name,
        "device_slug": slug,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy-size model and 128x128 images (smoke test)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--recipe-batch", type=int, default=6, help="0: skip the recipe variant")
    parser.add_argument("--pixel-batches", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--cached-batches", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--loader-batches", type=int, nargs="*", default=None, help="default: --cached-batches")
    parser.add_argument("--compiled-batches", type=int, nargs="*", default=[], help="engine_cached_gpu compiled")
    parser.add_argument("--no-memmap", action="store_true", help="skip engine_cached (the cache read in the step)")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    parser.add_argument("--loader-workers", type=int, default=6, help="DataLoader workers of engine_cached_loader")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write <out>/profile_train_<slug>.txt (recipe, first pixel and cached batches)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate import Accelerator

    device = torch.device(args.device)
    accelerator = Accelerator(mixed_precision=mixed_precision(PRECISION, device), cpu=device.type == "cpu")
    model, shapes = build_model(args.tiny, device)
    for param in model.model.vision_tower.parameters():
        param.requires_grad = False
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.1f}M trainable; {environment(device)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.profile_path = out / f"profile_train_{device_slug(device)[0]}.txt" if args.profile else None
    if args.profile_path is not None:
        args.profile_path.write_text("")
    gen = torch.Generator().manual_seed(0)
    loader_batches = args.cached_batches if args.loader_batches is None else args.loader_batches
    largest = max([args.recipe_batch, *args.pixel_batches, *args.cached_batches, *loader_batches,
                   *args.compiled_batches])  # fmt: skip
    pool = 2 * largest
    results = []

    if args.recipe_batch or args.pixel_batches:
        pixels = random_pixels(shapes, max(args.recipe_batch, *args.pixel_batches) * 2, device, gen)
        if args.recipe_batch:
            results.append(run_recipe(model, shapes, pixels, args.recipe_batch, args, device, gen))
            print(results[-1], flush=True)
        for batch in args.pixel_batches:
            first = batch == args.pixel_batches[0]
            results.append(run_engine("engine_pixels", model, shapes, DevicePixels(pixels), pixels.shape[0], batch,
                                      args, device, accelerator, gen, profile=first))  # fmt: skip
            print(results[-1], flush=True)
        del pixels
        reset_memory(model, device)

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp), shapes, pool, gen)
        for batch in [] if args.no_memmap else args.cached_batches:
            results.append(run_engine("engine_cached", model, shapes, CachedSource(cache), pool, batch, args, device,
                                      accelerator, gen))  # fmt: skip
            print(results[-1], flush=True)
        for batch in loader_batches:
            results.append(run_engine("engine_cached_loader", model, shapes, CachedSource(cache), pool, batch, args,
                                      device, accelerator, gen, loader_workers=args.loader_workers))  # fmt: skip
            print(results[-1], flush=True)
        features = torch.from_numpy(np.array(cache.array)).view(torch.bfloat16).to(device)
        del cache
    for batch in args.cached_batches:
        results.append(run_engine("engine_cached_gpu", model, shapes, DeviceFeatures(features), pool, batch, args,
                                  device, accelerator, gen, profile=batch == args.cached_batches[0]))  # fmt: skip
        print(results[-1], flush=True)
    for batch in args.compiled_batches:
        results.append(run_engine("engine_cached_gpu", model, shapes, DeviceFeatures(features), pool, batch, args,
                                  device, accelerator, gen, compiled=True))  # fmt: skip
        print(results[-1], flush=True)
    del features

    # the recipe's measured rate on an H100 (RECIPE.md) when the recipe variant is not rerun
    recipe_rate = results[0]["samples_per_s"] if args.recipe_batch else 40.7
    for row in results:
        if "samples_per_s" in row:
            row["ratio_vs_recipe"] = round(row["samples_per_s"] / recipe_rate, 2)

    def passes(name, ratio):
        return {f"batch_{r['batch']}": r.get("ratio_vs_recipe", 0) >= ratio for r in results if r["variant"] == name}

    peak = max((r["peak_gib"] or 0) for r in results if "peak_gib" in r)
    # cached: precomputed tower output on the GPU; memmap: the cache read inside the step; loader: the cache read as
    # training reads it (DataLoader workers, pinned memory)
    acceptance = {
        "cached_ge_10x": passes("engine_cached_gpu", 10),
        "cached_memmap_ge_10x": passes("engine_cached", 10),
        "cached_loader_ge_10x": passes("engine_cached_loader", 10),
        "uncached_ge_3.5x": passes("engine_pixels", 3.5),
        "peak_le_40gib": peak <= 40,
    }
    report = {
        "benchmark": "train_step",
        **environment(device),
        "model": {"architecture": "Florence-2-base (random weights)" if not args.tiny else "tiny",
                  "parameters": n_params, "trainable": n_trainable,
                  "attn_implementation": model.config._attn_implementation},
        "shapes": asdict(shapes) | {"encoder_tokens": shapes.image_tokens + shapes.question_tokens,
                                    "cached_feature_shape": [shapes.tower_channels, shapes.grid, shapes.grid]},
        "timing": {"warmup_steps": args.warmup, "timed_steps": args.steps, "statistic": "median step time",
                   "clock": "host perf_counter, cuda synchronised before and after each whole step"},
        "conditions": "random weights and inputs; pixels and GPU-resident features precomputed on the device "
                      "(image decoding/preprocessing excluded on both sides); engine_cached reads a real "
                      "VisionFeatureCache (memory-mapped .npy in the page cache) and copies to the GPU inside the step",
        "results": results,
        "acceptance": acceptance,
    }  # fmt: skip
    path = out / f"train_step_{report['device_slug']}.json"
    write_json(path, report)
    print_table(results)
    print("acceptance:", acceptance)
    print("wrote", path)
    return report


def print_table(results: list[dict]) -> None:
    print(f"{'variant':<38}{'batch':>6}{'step ms':>10}{'samples/s':>11}{'x recipe':>10}{'peak GiB':>10}{'TFLOP/s':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<38}{r['batch']:>6}  {r['error']}")
            continue
        print(f"{r['variant']:<38}{r['batch']:>6}{r['step_ms_median']:>10.1f}{r['samples_per_s']:>11.1f}"
              f"{r.get('ratio_vs_recipe', 0):>10.2f}{(r['peak_gib'] or 0):>10.2f}"
              f"{r['approx_tflops']:>9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
