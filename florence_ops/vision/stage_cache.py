"""The vision-feature cache as the stages key, open and build it from their params: evaluate finds exactly the cache
that train built, because both ask these functions.

With several processes on a machine, its processes build its copy of the cache together (`open_or_build_together`),
each a share of the pages; every machine holds a whole copy under `paths.vision_cache` on its own disk, as its
processes read any page.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from florence_ops.precision import autocast_dtype
from florence_ops.vision.cache import VisionFeatureCache, cache_key, open_cache
from florence_ops.vision.cache_build import (
    SHARDS,
    build_cache,
    build_shard,
    finish_shards,
    new_build_folder,
    shard_rows,
)
from florence_ops.vision.encoder import EncodedSource, computed_with, tower_encoder, warm_up
from florence_ops.vision.sources import PixelSource, page_loader

if TYPE_CHECKING:
    from florence_ops.config import Params
    from florence_ops.data.processed import ImageTable

log = logging.getLogger(__name__)


@dataclass
class CacheRecipe:
    """Where the cache of these params lives and how it is computed."""

    root: Path
    key: str
    dtype: torch.dtype | None
    compiled: bool


def cache_recipe(params: Params, tower: torch.nn.Module, image_processor, image_ids: list[str],
                 device) -> CacheRecipe:  # fmt: skip
    """Where the cache of `image_ids` lives under these params, its key, and how `tower` computes it on `device`."""
    dtype = autocast_dtype(params.train.precision, device)
    compiled = params.model.vision_compile
    key = cache_key(tower, image_processor.to_dict(), image_ids, computed_with(device, dtype, compiled))
    return CacheRecipe(Path(params.paths.vision_cache), key, dtype, compiled)


def open_or_build_cache(
    params: Params, tower: torch.nn.Module, image_processor, images: ImageTable, device: torch.device, *, verify: bool,
    build: bool,
) -> VisionFeatureCache | None:  # fmt: skip
    """The cache of the frozen `tower`'s output on `images` under `paths.vision_cache`, keyed by the tower's weights,
    the preprocessing, the pages and how they are computed on `device` (`train.precision`, `model.vision_compile`);
    its checksums re-hashed when `verify` (a damaged cache counts as missing). A missing cache is built when `build`
    (`model.vision_batch_size` pages a batch, decoded by `train.num_workers` DataLoader workers), else None."""
    recipe = cache_recipe(params, tower, image_processor, images.ids, device)
    start = time.perf_counter()
    cache = open_cache(recipe.root, recipe.key, verify=verify)
    if cache is not None:
        log.info("vision cache of %d pages opened%s in %.1f s", len(images), " and verified" if verify else "",
                 time.perf_counter() - start)  # fmt: skip
    if cache is not None or not build:
        return cache
    encode, batches, ahead = _encoding(params, tower, image_processor, images, images.ids, device, recipe)
    return build_cache(recipe.root, recipe.key, images.ids, batches, encode, warm_up=ahead)


def open_or_build_together(
    params: Params, tower: torch.nn.Module, image_processor, images: ImageTable, accelerator
) -> VisionFeatureCache:  # fmt: skip
    """`open_or_build_cache` for the train stage's processes: one process opens (checksums re-hashed) or builds the
    cache alone; several build each machine's missing copy together, each process a contiguous share of whole batches
    of pages (`shard_rows`) written into one file, whose bytes are a one-process build's. Every process of every
    machine passes the same barriers, so a machine that has its copy waits while another builds its own."""
    acc, device = accelerator, accelerator.device
    if acc.num_processes == 1:
        return open_or_build_cache(params, tower, image_processor, images, device, verify=True, build=True)
    recipe = cache_recipe(params, tower, image_processor, images.ids, device)
    local_main = acc.is_local_main_process
    cache = open_cache(recipe.root, recipe.key, verify=True) if local_main else None
    acc.wait_for_everyone()
    if not local_main:
        cache = open_cache(recipe.root, recipe.key)
    missing = torch.tensor([int(cache is None)], device=device)
    if not acc.reduce(missing, reduction="sum").item():
        return cache
    build, folder, start = cache is None, recipe.root / f".{recipe.key}.{SHARDS}", time.perf_counter()
    if build and local_main:
        new_build_folder(recipe.root, recipe.key, SHARDS)
    acc.wait_for_everyone()
    meta = None
    if build:
        ids = images.ids
        start_row, end_row = shard_rows(len(ids), params.model.vision_batch_size, acc.local_process_index,
                                        params.train.num_processes)  # fmt: skip
        encode, batches, ahead = _encoding(params, tower, image_processor, images, ids[start_row:end_row], device,
                                           recipe)  # fmt: skip
        meta = build_shard(folder, ids, (start_row, end_row), batches, encode, warm_up=ahead)
    acc.wait_for_everyone()
    if build and local_main:
        cache = finish_shards(folder, recipe.root, recipe.key, images.ids, meta, start, params.train.num_processes)
    acc.wait_for_everyone()
    return cache if cache is not None else VisionFeatureCache(recipe.root / recipe.key)


def _encoding(params: Params, tower, image_processor, images: ImageTable, image_ids: list[str], device,
              recipe: CacheRecipe):  # fmt: skip
    """The encoder, the page batches of `image_ids` and the compiled encoder's warm-up (or None) for a build."""
    pixels = PixelSource(images, image_processor)
    size = params.model.vision_batch_size
    batches = page_loader(pixels, image_ids, size, params.train.num_workers)
    encode = tower_encoder(tower, pixels, device, recipe.dtype, recipe.compiled)
    ahead = partial(warm_up, encode, pixels, image_ids, size, device) if recipe.compiled and image_ids else None
    return encode, batches, ahead


def encoded_source(params: Params, tower: torch.nn.Module, pixels: PixelSource, image_ids: list[str], device,
                   micro_batch: int) -> EncodedSource:  # fmt: skip
    """The frozen `tower` run inside the step, without the cache (`train.vision_cache: false`), computing as the cache
    build would on `device` (`train.precision`, `model.vision_compile`), on up to `model.vision_batch_size` pages a
    call (fewer when a process's micro-batch is smaller); a compiled tower is warmed up for that many pages of
    `image_ids`, which fixes its batch size."""
    dtype = autocast_dtype(params.train.precision, device)
    compiled = params.model.vision_compile
    encode = tower_encoder(tower, pixels, device, dtype, compiled)
    pages_per_call = min(params.model.vision_batch_size, micro_batch)
    if compiled:
        warm_up(encode, pixels, image_ids, pages_per_call, device)
    return EncodedSource(pixels, encode, pages_per_call)
