"""The vision input of every inference path (training, validation, evaluation, serving): page pixels, or the cached
output of a frozen vision tower.

Pages travel as uint8 (a quarter of the bytes of float32): they are decoded in DataLoader workers and normalised on
the device, with exactly the arithmetic of the model's image processor (rescale in float64, then float32 mean and
std), so the tower sees the same numbers as `processor(images=...)` gives. A batch carries each distinct page once
plus an index from questions to pages: DocVQA asks about four questions per page.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from florence_ops.model_inputs import Collator, TextBatch

log = logging.getLogger(__name__)


class PixelSource:
    """Pages by image id (PIL images already at the model's input size), as the vision tower's input."""

    cached = False
    gives_tower_output = False  # `prepare` gives the tower's input, not its output

    def __init__(self, images: Mapping[str, Image.Image], image_processor):
        self.images = images
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def open(self) -> None:
        """Ready the pages for reading, in the process that forks the DataLoader workers reading them (`opened`)."""
        if hasattr(self.images, "open"):  # an `ImageTable`
            self.images.open()

    def load(self, image_ids: Sequence[str]) -> torch.Tensor:
        """uint8 pixels (N, H, W, 3) of these pages, contiguous as decoded; cheap enough for a DataLoader worker.

        `default_collate` stacks them straight into shared memory in a worker (no second copy to send the batch)."""
        with warnings.catch_warnings():  # decoded pages are read-only arrays; they are only read (stacked) here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            pages = [torch.from_numpy(np.asarray(_rgb(self.images[i]))) for i in image_ids]
        return default_collate(pages)

    def prepare(self, loaded: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised float32 pixels (N, 3, H, W) on `device`, equal to the image processor's output.

        The channel transpose happens on the device, after the copy: a strided copy of the pages on the host would
        cost more than the tower on a GPU.
        """
        pixels = loaded.to(device, non_blocking=True).permute(0, 3, 1, 2)
        rescaled = (pixels.double() * self.scale).float()
        return ((rescaled - self.mean.to(device)) / self.std.to(device)).contiguous()


class PageRows(PixelSource):
    """Pages already in one uint8 tensor (N, H, W, 3), on the device or pinned for it: batches carry row numbers,
    and the rows are gathered and normalised on the device (no host copy per batch). The server's worker reads its
    requests' pages straight into such a tensor."""

    def __init__(self, pages: torch.Tensor, image_ids: Sequence[str], image_processor):
        super().__init__({}, image_processor)
        self.pages = pages
        self.row = {image_id: i for i, image_id in enumerate(image_ids)}

    def load(self, image_ids: Sequence[str]) -> torch.Tensor:
        """Row numbers of these pages (what a batch carries)."""
        return torch.tensor([self.row[i] for i in image_ids])

    def prepare(self, loaded: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised float32 pixels (N, 3, H, W) of those rows on `device`."""
        pages = self.pages.to(device, non_blocking=True)
        return super().prepare(pages[loaded.to(device)], device)


class CachedSource:
    """Vision tower outputs read from a `VisionFeatureCache` (valid only while the tower is frozen)."""

    cached = gives_tower_output = True

    def __init__(self, cache):
        self.cache = cache

    def load(self, image_ids: Sequence[str]) -> torch.Tensor:
        """bf16 tower outputs (N, C, h, w) of these pages, read from the memory-mapped cache."""
        return self.cache.features(list(image_ids))

    def prepare(self, loaded: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The loaded features on `device`."""
        return loaded.to(device, non_blocking=True)


class ResidentSource:
    """Cached tower outputs of some pages held in device memory: batches carry row numbers, and features are gathered
    on the device (no host reads or copies per batch). Built by `cached_source` when they fit."""

    cached = gives_tower_output = True

    def __init__(self, cache, image_ids: Sequence[str], device: torch.device, chunk: int = 256):
        ids = sorted(set(image_ids), key=cache.row.__getitem__)  # the file's order: sequential reads
        self.row = {image_id: i for i, image_id in enumerate(ids)}
        shape = cache.array.shape[1:]
        self.features = torch.empty((len(ids), *shape), dtype=torch.bfloat16, device=device)
        # One copy from the mapped file into a reused (on CUDA, pinned) buffer, then one to the device, by chunks.
        staging = torch.empty((min(chunk, len(ids)), *shape), dtype=torch.bfloat16, pin_memory=device.type == "cuda")
        for start in range(0, len(ids), chunk):
            block = cache.read_into(ids[start : start + chunk], staging)
            self.features[start : start + len(block)].copy_(block)

    def load(self, image_ids: Sequence[str]) -> torch.Tensor:
        """Row numbers of these pages (what a batch carries)."""
        return torch.tensor([self.row[i] for i in image_ids])

    def prepare(self, loaded: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The features of those rows, gathered on the device."""
        return self.features[loaded.to(self.features.device)]


def cached_source(cache, image_ids: Sequence[str], device: torch.device, budget: float = 0.25):
    """Features of `image_ids` held on a CUDA device when they take at most `budget` of its free memory (a resident
    source); read from the memory-mapped cache in DataLoader workers otherwise."""
    if device.type != "cuda":
        return CachedSource(cache)
    pages = len(set(image_ids))
    needed = pages * int(np.prod(cache.array.shape[1:])) * 2
    free, _ = torch.cuda.mem_get_info(device)
    if needed > budget * free:
        log.info("vision features of %d pages (%.1f GiB) read from disk: over %.0f%% of free GPU memory", pages,
                 needed / 2**30, 100 * budget)  # fmt: skip
        return CachedSource(cache)
    log.info("vision features of %d pages (%.1f GiB) held in GPU memory", pages, needed / 2**30)
    return ResidentSource(cache, image_ids, device)


class WithVision:
    """A collate function that adds each distinct page's vision input to the batch, so DataLoader workers decode
    pages (or read cached features) while the device computes."""

    def __init__(self, collator: Collator, source):
        self.collator, self.source = collator, opened(source)

    def __call__(self, rows: list[dict]) -> TextBatch:
        batch = self.collator(rows)
        batch.vision = self.source.load(list(dict.fromkeys(batch.image_ids)))
        batch.image_index = _page_index(batch.image_ids)
        return batch


def opened(source):
    """`source`, its pages opened first when it reads pages (`PixelSource.open`): collate functions are made in the
    process that forks the DataLoader's workers, which then share what was opened instead of each opening it."""
    if hasattr(source, "open"):
        source.open()
    return source


def tower_output(model, source, batch: TextBatch, device: torch.device) -> torch.Tensor:
    """The vision tower's last hidden state for each question of `batch` (each distinct page computed once)."""
    loaded = batch.vision if batch.vision is not None else source.load(list(dict.fromkeys(batch.image_ids)))
    prepared = source.prepare(loaded, device)
    output = prepared if source.gives_tower_output else model.model.vision_tower(prepared).last_hidden_state
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
        self.source = opened(source)

    def __call__(self, image_ids: list[str]) -> tuple[list[str], torch.Tensor]:
        return list(image_ids), self.source.load(image_ids)


def page_loader(source, image_ids: Sequence[str], batch_size: int, num_workers: int):
    """The pages of `image_ids`, in order, `batch_size` at a time, decoded by `num_workers` DataLoader workers."""
    from torch.utils.data import DataLoader

    return DataLoader(list(image_ids), batch_size=batch_size, collate_fn=PageBatches(source), num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())  # fmt: skip
