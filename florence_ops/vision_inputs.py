"""What the vision side reads: page pixels, or the cached output of a frozen vision tower.

Pages travel as uint8 (a quarter of the bytes of float32): they are decoded in DataLoader workers and normalised on
the device, with exactly the arithmetic of the model's image processor (rescale in float64, then float32 mean and
std), so the tower sees the same numbers as `processor(images=...)` gives. A batch carries each distinct page once
plus an index from questions to pages: DocVQA asks about four questions per page.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from florence_ops.batching import Collator, TextBatch
from florence_ops.precision import autocast

log = logging.getLogger(__name__)


class PixelSource:
    """Pages by image id (PIL images already at the model's input size), as the vision tower's input."""

    cached = False

    def __init__(self, images: Mapping[str, Image.Image], image_processor):
        self.images = images
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

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

    cached = True

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

    cached = True

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
    tower: torch.nn.Module, source: PixelSource, device: torch.device, dtype: torch.dtype | None,
    compile: bool = False, cast: bool = True,
):  # fmt: skip
    """A function from loaded pages to the frozen `tower`'s last hidden state on `device`, for the feature cache.

    With `dtype` (bf16 on CUDA, from `precision.autocast_dtype`) the tower runs as a bf16 copy, weights and
    activations (`cast`; else under bf16 autocast, whose layer norms and residual stream stay fp32): at 768 px most of
    the tower's time is memory traffic, which this halves, and its output is stored in bf16 either way. The copy also
    takes the kernels of `fuse_kernels`. Without `dtype` the tower runs as is, in fp32.

    With `compile`, each patch embedding and each block is compiled on its own with static shapes (regional
    compilation, accelerate's `compile_regions`): the nine blocks of stage 3 share one graph, so compiling costs a
    fraction of compiling the whole tower, for about the same speed. A smaller last batch is padded to the first
    batch's size so that it reuses the graphs. Convolutions use cuDNN's fastest algorithms for these fixed shapes
    (`cudnn.benchmark`, set during the calls only). On CUDA the pages go to the device on a stream of their own
    (`copy_on`), so a batch's upload overlaps the tower's work on the batch before.
    """
    if compile or (dtype is not None and cast):  # a copy: the model's own tower stays as it is
        tower = copy.deepcopy(tower)
        if dtype is not None and cast:
            fuse_kernels(tower.to(dtype))
    mixed = autocast(dtype, device) if not cast else contextlib.nullcontext()
    if compile:
        tower = compile_regions(tower)
    size = []  # the compiled batch size, fixed by the first call
    uploads = torch.cuda.Stream(device) if device.type == "cuda" else None

    def encode(pages: torch.Tensor) -> torch.Tensor:
        count = pages.shape[0]
        if uploads is not None:
            pages = copy_on(uploads, pages, device)
        if compile:
            size[:] = size or [count]
            if count < size[0]:
                pages = torch.cat([pages, pages.new_zeros((size[0] - count, *pages.shape[1:]))])
        pixels = source.prepare(pages, device)
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            with torch.no_grad(), mixed:
                return tower(pixels).last_hidden_state[:count]
        finally:
            torch.backends.cudnn.benchmark = benchmark

    return encode


def warm_up(encode, source: PixelSource, image_ids: Sequence[str], batch_size: int, device: torch.device) -> None:
    """Call `encode` (from `tower_encoder`) once on the first page repeated to a full batch (`batch_size`, or fewer
    when there are fewer pages): a compiled tower compiles for that batch size, and cuDNN picks its algorithms,
    without waiting for the DataLoader's first batch."""
    page = source.load(image_ids[:1]).to(device)
    encode(page.expand(min(batch_size, len(image_ids)), *page.shape[1:]).contiguous())


def copy_on(stream: torch.cuda.Stream, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` copied to `device` on `stream` (from pinned memory: asynchronously), overlapping the work already
    queued on the current stream, which waits for the copy before any work queued after this call."""
    with torch.cuda.stream(stream):
        moved = tensor.to(device, non_blocking=True)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    moved.record_stream(current)  # freed on the current stream's timeline, not the copy stream's
    return moved


def compile_regions(tower: torch.nn.Module) -> torch.nn.Module:
    """`tower` (a Florence-2 DaViT, in eval mode) with its patch embeddings and blocks compiled one by one, static
    shapes.

    accelerate's `compile_regions` compiles lists of like modules; the tower holds one such list of patch embeddings
    and one list per stage of blocks (a list of lists, which it cannot take whole).
    """
    from accelerate.utils import compile_regions as compile_list

    for module in tower.modules():  # drop path is off in eval mode; equal rates let the blocks share graphs
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    tower.convs = compile_list(tower.convs, dynamic=False)
    tower.blocks = torch.nn.ModuleList(compile_list(stage, dynamic=False) for stage in tower.blocks)
    return tower


def fuse_kernels(tower: torch.nn.Module) -> torch.nn.Module:
    """`tower` (a Florence-2 DaViT) with faster kernels in two places, which move its output within bf16 rounding:

    - channel attention as plain matmuls (transformers' eager attention). Its "sequence" is a group's channels and
      its "head size" the page's tokens (36,864 in the first stage), which no fused SDPA kernel takes; SDPA's math
      fallback then upcasts bf16 to fp32, copies and fp32 matmuls that took 12% of the compiled tower's time (H200);
    - each MLP's first linear layer and its GELU as one cuBLASLt matmul with a GELU epilogue, which saves writing and
      reading the 4x-wide hidden state (13% of the time). The epilogue computes GELU's tanh approximation, at most
      4.7e-4 from the exact GELU, a tenth of bf16's resolution where that difference is largest.
    """
    for module in tower.modules():
        if type(module).__name__ == "Florence2VisionChannelAttention":
            module.config = copy.copy(module.config)  # this module's own: the window attention keeps SDPA
            module.config._attn_implementation = "eager"
        mlp = getattr(module, "ffn", None)
        if mlp is not None and getattr(mlp.config, "activation_function", None) == "gelu":
            module.ffn = GeluMatmulMLP(mlp.fc1, mlp.fc2)
    return tower


class GeluMatmulMLP(torch.nn.Module):
    """fc2(GELU(fc1(x))), with fc1, its bias and the GELU in one matmul (`torch._addmm_activation`)."""

    def __init__(self, fc1: torch.nn.Linear, fc2: torch.nn.Linear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        hidden = torch._addmm_activation(self.fc1.bias, flat, self.fc1.weight.t(), use_gelu=True)
        return self.fc2(hidden).view(*hidden_states.shape[:-1], -1)
