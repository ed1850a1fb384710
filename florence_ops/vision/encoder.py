"""The encoder that builds the vision-feature cache: the frozen tower as a bf16 copy with fused kernels, compiled by
regions, fed on CUDA streams of their own and warmed up while the first pages decode; and `computed_with`, the part of
the cache key that records how it computed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from florence_ops.precision import autocast
from florence_ops.vision.sources import PixelSource


def tower_encoder(
    tower: torch.nn.Module, source: PixelSource, device: torch.device, dtype: torch.dtype | None,
    compile: bool = False, cast: bool = True,
):  # fmt: skip
    """A function from loaded pages to the frozen `tower`'s last hidden state on `device`, for the feature cache.

    With `dtype` (bf16 on CUDA, from `precision.autocast_dtype`) the tower runs as a bf16 copy, weights and
    activations (`cast`; else under bf16 autocast, whose layer norms and residual stream stay fp32): at 768 px most of
    the tower's time is memory traffic, which this halves, and its output is stored in bf16 either way. The copy also
    takes the kernels of `fuse_kernels`. Without `dtype` the tower runs as is, in fp32.

    With `compile`, the blocks that repeat are compiled with static shapes (regional compilation, see
    `compile_regions`). A smaller last batch is padded to the first batch's size so that it reuses the graph.
    Convolutions take cuDNN's heuristic algorithms: `cudnn.benchmark` found none faster for these shapes and cost
    6-8 s more at the first call (one H200, batch 256: 401.3-401.9 against 400.6 pages/s,
    `reports/benchmarks/first_calls_nvidia-h200.json`). On CUDA the pages go to the device on a stream of their own
    (`copy_on`), so a batch's upload overlaps the tower's work on the batch before.
    """
    if compile or (dtype is not None and cast):  # a copy: the model's own tower stays as it is
        tower = copy.deepcopy(tower)
        if dtype is not None and cast:
            fuse_kernels(tower.to(dtype))
    # the bf16 copy runs outside any caller's autocast (a training step's), as the cache build runs it: autocast would
    # hand its fused matmul fp32 activations from the layer norms it keeps in fp32
    mixed = autocast(dtype, device) if not cast else torch.autocast(device.type, enabled=False)
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
        with torch.no_grad(), mixed:
            return tower(pixels).last_hidden_state[:count]

    return encode


class EncodedSource:
    """Pages encoded by the frozen tower inside each training or validation step (`encode`, from `tower_encoder`: no
    grad, on CUDA a bf16 copy of the tower, compiled by regions when asked), for runs without the feature cache: the
    features the cache would hold, computed where they are used, so nothing but the pages is stored. A batch's pages go
    through the tower `pages_per_call` at a time (a compiled tower pads only the last call to that size)."""

    cached, gives_tower_output = False, True

    def __init__(self, pixels: PixelSource, encode, pages_per_call: int):
        self.pixels, self.encode, self.pages_per_call = pixels, encode, pages_per_call

    def open(self) -> None:
        """Ready the pages for reading (`PixelSource.open`)."""
        self.pixels.open()

    def load(self, image_ids: Sequence[str]) -> torch.Tensor:
        """uint8 pixels of these pages (what a batch carries)."""
        return self.pixels.load(image_ids)

    def prepare(self, loaded: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The tower's last hidden state of the loaded pages, on the encoder's device."""
        size = self.pages_per_call
        calls = [self.encode(loaded[start : start + size]) for start in range(0, loaded.shape[0], size)]
        return calls[0] if len(calls) == 1 else torch.cat(calls)


def computed_with(device: torch.device, dtype: torch.dtype | None, compiled: bool) -> dict:
    """How `tower_encoder` computes the features (part of the cache key): device type, precision (with
    `dtype`, a bf16 copy of the tower with `fuse_kernels`; fp32 without), compilation (the repeated blocks, static
    shapes)."""
    return {"device": device.type, "precision": "bf16 weights, fused kernels" if dtype is not None else "fp32",
            "compile": compiled and "repeated blocks"}  # fmt: skip


def warm_up(encode, source: PixelSource, image_ids: Sequence[str], batch_size: int, device: torch.device) -> None:
    """Call `encode` (from `tower_encoder`) once on the first page repeated to a full batch (`batch_size`, or fewer
    when there are fewer pages): a compiled tower compiles for that batch size without waiting for the
    DataLoader's first batch."""
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
    """`tower` (a Florence-2 DaViT, in eval mode) with the blocks of each stage that has several compiled as one
    graph, static shapes (accelerate's `compile_regions`, which takes one list of like modules); the rest stays eager.

    Florence-2's stages hold 1, 1, 9 and 1 blocks, so one graph covers three quarters of the blocks. Compiling also
    the patch embeddings and the single blocks (seven more graphs) takes Florence-2-base's tower from 491 to 682
    pages/s on an H200, but costs about 15 s more on a machine that has not compiled them before, more than the 6.5 s
    it saves over DocVQA's 11,480 pages (`vision_tower_nvidia-h200.cache-build.json`; benchmarks/README.md, run 16).
    """
    from accelerate.utils import compile_regions as compile_list

    for module in tower.modules():  # drop path is off in eval mode; equal rates let the blocks share graphs
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    stages = (compile_list(stage, dynamic=False) if len(stage) > 1 else stage for stage in tower.blocks)
    tower.blocks = torch.nn.ModuleList(stages)
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
