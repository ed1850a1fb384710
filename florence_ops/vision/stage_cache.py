"""The vision-feature cache as the stages key, open and build it from their params: evaluate finds exactly the cache
that train built, because both ask this one function."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from florence_ops.precision import autocast_dtype
from florence_ops.vision.cache import VisionFeatureCache, build_cache, cache_key, open_cache
from florence_ops.vision.encoder import computed_with, tower_encoder, warm_up
from florence_ops.vision.sources import PixelSource, page_loader

if TYPE_CHECKING:
    from florence_ops.config import Params
    from florence_ops.data.processed import ImageTable


def open_or_build_cache(
    params: Params, tower: torch.nn.Module, image_processor, images: ImageTable, device: torch.device, *, verify: bool,
    build: bool,
) -> VisionFeatureCache | None:  # fmt: skip
    """The cache of the frozen `tower`'s output on `images` under `paths.vision_cache`, keyed by the tower's weights,
    the preprocessing, the pages and how they are computed on `device` (`train.precision`, `model.vision_compile`);
    its checksums re-hashed when `verify` (a damaged cache counts as missing). A missing cache is built when `build`
    (`model.vision_batch_size` pages a batch, decoded by `train.num_workers` DataLoader workers), else None."""
    dtype = autocast_dtype(params.train.precision, device)
    compiled = params.model.vision_compile
    key = cache_key(tower, image_processor.to_dict(), images.ids, computed_with(device, dtype, compiled))
    root = Path(params.paths.vision_cache)
    cache = open_cache(root, key, verify=verify)
    if cache is not None or not build:
        return cache
    pixels = PixelSource(images, image_processor)
    size = params.model.vision_batch_size
    batches = page_loader(pixels, images.ids, size, params.train.num_workers)
    encode = tower_encoder(tower, pixels, device, dtype, compiled)
    ahead = partial(warm_up, encode, pixels, images.ids, size, device) if compiled else None
    return build_cache(root, key, images.ids, batches, encode, warm_up=ahead)
