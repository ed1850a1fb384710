"""What the vision side reads: page pixels, or the cached output of a frozen vision tower.

Pages travel as uint8 (a quarter of the bytes of float32): they are decoded in DataLoader workers and normalised on
the device, with exactly the arithmetic of the model's image processor (rescale in float64, then float32 mean and
std), so the tower sees the same numbers as `processor(images=...)` gives. A batch carries each distinct page once
plus an index from questions to pages: DocVQA asks about four questions per page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from florence_ops.batching import Collator, TextBatch


class PixelSource:
    """Pages by image id (PIL images already at the model's input size), as the vision tower's input."""

    cached = False

    def __init__(self, images: Mapping[str, Image.Image], image_processor):
        self.images = images
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def load(self, image_ids: Sequence[str]) -> torch.Tensor:
        """uint8 pixels (N, 3, H, W) of these pages; cheap enough for a DataLoader worker."""
        arrays = [np.asarray(_rgb(self.images[i])) for i in image_ids]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def prepare(self, loaded: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised float32 pixels on `device`, equal to the image processor's output."""
        pixels = loaded.to(device, non_blocking=True)
        rescaled = (pixels.double() * self.scale).float()
        return (rescaled - self.mean.to(device)) / self.std.to(device)


class CachedSource:
    """Vision tower outputs read from a `VisionFeatureCache` (valid only while the tower is frozen)."""

    cached = True

    def __init__(self, cache):
        self.cache = cache

    def load(self, image_ids: Sequence[str]) -> torch.Tensor:
        """bf16 tower outputs (N, C, h, w) of these pages, read from the memory-mapped cache."""
        return self.cache.features(list(image_ids))

    def prepare(self, loaded: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The loaded features on `device`."""
        return loaded.to(device, non_blocking=True)


class WithVision:
    """A collate function that adds each distinct page's vision input to the batch, so DataLoader workers decode
    pages (or read cached features) while the device computes."""

    def __init__(self, collator: Collator, source):
        self.collator, self.source = collator, source

    def __call__(self, rows: list[dict]) -> TextBatch:
        batch = self.collator(rows)
        batch.vision = self.source.load(list(dict.fromkeys(batch.image_ids)))
        batch.image_index = _page_index(batch.image_ids)
        return batch


def tower_output(model, source, batch: TextBatch, device: torch.device) -> torch.Tensor:
    """The vision tower's last hidden state for each question of `batch` (each distinct page computed once)."""
    loaded = batch.vision if batch.vision is not None else source.load(list(dict.fromkeys(batch.image_ids)))
    prepared = source.prepare(loaded, device)
    output = prepared if source.cached else model.model.vision_tower(prepared).last_hidden_state
    if output.shape[0] == len(batch.image_ids):  # no page asked about twice: pages are in question order
        return output
    index = batch.image_index if batch.image_index is not None else _page_index(batch.image_ids)
    return output[index.to(output.device)]


def _page_index(image_ids: Sequence[str]) -> torch.Tensor:
    distinct = {image_id: i for i, image_id in enumerate(dict.fromkeys(image_ids))}
    return torch.tensor([distinct[i] for i in image_ids])


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class PageBatches:
    """Collate function for a DataLoader over image ids: (ids, their pages as the source loads them)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, image_ids: list[str]) -> tuple[list[str], torch.Tensor]:
        return list(image_ids), self.source.load(image_ids)


def page_loader(source, image_ids: Sequence[str], batch_size: int, num_workers: int):
    """The pages of `image_ids`, in order, `batch_size` at a time, decoded by `num_workers` DataLoader workers."""
    from torch.utils.data import DataLoader

    return DataLoader(list(image_ids), batch_size=batch_size, collate_fn=PageBatches(source), num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())  # fmt: skip


def tower_encoder(
    tower: torch.nn.Module, source: PixelSource, device: torch.device, compile: bool = False, channels_last=None
):
    """A function from loaded pages to the tower's last hidden state on `device` (bf16 autocast on CUDA).

    With `compile`, the tower runs under `torch.compile`: its first call compiles (seconds), later calls are faster.
    `channels_last` (default: on CUDA) keeps the convolutions' activations in NHWC, which the tower's blocks flatten
    and transpose into token order without copies.
    """
    from florence_ops.generation import autocast

    nhwc = device.type == "cuda" if channels_last is None else channels_last
    if nhwc:
        tower = tower.to(memory_format=torch.channels_last)
    run = torch.compile(tower) if compile else tower

    def encode(pages: torch.Tensor) -> torch.Tensor:
        pixels = source.prepare(pages, device)
        if nhwc:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device):
            return run(pixels).last_hidden_state

    return encode
