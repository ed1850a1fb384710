"""Train's vision-feature cache built by the preprocess stage, from the pages as it writes them (`data.encode_pages`).

Preprocess is bound by its CPU workers (decoding, resizing, encoding pages); the cache build by the GPU. Built by the
train stage, the two run one after the other; here a thread of the preprocess stage loads the frozen tower and
encodes each batch of `model.vision_batch_size` pages as soon as preprocess has written them, in the order train's
build takes them, so the GPU works while the workers normalise the next pages. `finish` publishes the cache under
the key train asks for (`stage_cache`), with the bytes train's own build writes: the same tower, recipe and batches.
Train then opens it (checksums verified) instead of building it.

The cache is a head start, not an output: when anything fails here (the tower does not load, the GPU runs out of
memory), preprocess logs one warning and train builds the cache as it always has.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from florence_ops.data.images import rgb_png_pixels
from florence_ops.data.parallel import batched

if TYPE_CHECKING:
    from florence_ops.config import Params

log = logging.getLogger(__name__)

DECODE_THREADS = 8  # threads reading the written pages' pixels for the tower (zlib releases the GIL)
BUILD_NAME = "preprocess"  # the build folder's prefix under paths.vision_cache (its key is known only at the end)
# The GIL's time slice while the thread runs, in seconds (Python's default: 0.005). The thread runs Python for seconds
# on end (importing torch and transformers, loading the tower); at the default slice the threads that feed the
# workers and collect their pages (1 MB a task) wait up to 5 ms for the GIL at every turn, and the workers for them.
SWITCH_INTERVAL = 0.0005
_END, _ABANDON = object(), object()


def encodes_pages(params: Params) -> bool:
    """Whether preprocess builds train's vision cache: `data.encode_pages`, when train runs a frozen tower through
    the cache."""
    cfg = params.train
    return params.data.encode_pages and cfg.vision_cache and "vision_tower" in cfg.freeze and not cfg.streaming


class PreprocessBuild:
    """Encodes the pages that preprocess writes (`add`, in order) into train's vision cache; `finish` publishes it.

    The thread starts with the first page, once preprocess's worker processes are forked (a fork after CUDA or a
    thread has started is unsafe). `candidates` are the pages preprocess will try to write, in order: when all of
    them arrive and a verified cache of them exists, nothing is encoded again.
    """

    def __init__(self, params: Params, candidates: list[str]):
        self.params, self.candidates = params, candidates
        self.pages: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.built: tuple | None = None
        self.error: BaseException | None = None
        self.ended = False  # the end (or abandon) was taken from `pages`
        self.added = 0  # pages handed over so far
        self.started = 0.0  # when the thread started (with the first page)
        self.switch_interval: float | None = None  # the process's GIL time slice before the thread started

    def add(self, image_id: str, png: bytes) -> None:
        """Hand over a page that preprocess wrote (its model-size PNG)."""
        if self.thread is None:
            thread = threading.Thread(target=self._run, name="vision-cache-build", daemon=True)
            self.switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self.switch_interval, SWITCH_INTERVAL))
            try:
                thread.start()
            except BaseException:
                sys.setswitchinterval(self.switch_interval)
                raise
            self.thread = thread
        self.pages.put((image_id, png))
        self.added += 1

    def finish(self, image_ids: list[str]) -> None:
        """Wait for the last batch and publish the cache of `image_ids` (the pages written, in order); a build that
        failed is logged and left to the train stage."""
        if self.thread is None:
            return
        self.pages.put(_END)
        self._join()
        if self.error is not None:
            log.warning("vision cache not built in preprocess (%s: %s); the train stage builds it",
                        type(self.error).__name__, self.error)  # fmt: skip
            return
        tmp, key, ids, meta, timing = self.built
        if ids != image_ids:  # cannot happen unless the caller handed over other pages than it wrote
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError("the vision cache built in preprocess holds other pages than preprocess wrote")
        if tmp is not None:
            from florence_ops.vision.cache_build import publish_cache

            try:
                publish_cache(tmp, Path(self.params.paths.vision_cache), key, ids, meta, timing)
            except OSError as error:  # the disk filled up, say: the train stage builds the cache
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning("vision cache built in preprocess not published (%s); the train stage builds it", error)
        elif ids == self.candidates:
            log.info("vision cache of these %d pages exists already: not built again", len(ids))
        else:
            log.info("vision cache not built in preprocess (pages were quarantined after it started); the train "
                     "stage builds it")  # fmt: skip

    def abandon(self) -> None:
        """Stop the build and remove what it wrote (preprocess failed)."""
        if self.thread is None:
            return
        self.pages.put(_ABANDON)
        self._join()
        if self.built is not None and self.built[0] is not None:
            shutil.rmtree(self.built[0], ignore_errors=True)

    def _join(self) -> None:
        try:
            self.thread.join()
        finally:
            sys.setswitchinterval(self.switch_interval)

    def _run(self) -> None:
        self.started = time.perf_counter()
        try:
            self.built = self._build()
        except BaseException as error:  # any failure only costs the head start (module docstring)
            self.error = error
            while not self.ended:  # take what preprocess still hands over, until it finishes
                self.ended = self.pages.get() in (_END, _ABANDON)

    def _build(self):
        # torch and transformers' model code are imported here, in this thread: preprocess itself needs neither
        import torch

        from florence_ops.modeling import load_pretrained
        from florence_ops.vision.cache import FEATURES, VERIFY_THREADS, ChunkedDigest, open_cache
        from florence_ops.vision.cache_build import FeatureWriter, encode_pages, new_build_folder
        from florence_ops.vision.encoder import tower_encoder
        from florence_ops.vision.sources import PixelSource
        from florence_ops.vision.stage_cache import cache_recipe

        params = self.params
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model, processor = load_pretrained(params.paths.base_model, params.model)
        tower = model.model.vision_tower.to(device).eval()
        image_processor = processor.image_processor
        recipe = cache_recipe(params, tower, image_processor, self.candidates, device)
        log.info("vision cache build ready %.1f s after the first page (tower loaded, key computed), %d pages handed "
                 "over by then", time.perf_counter() - self.started, self.added)  # fmt: skip
        if open_cache(recipe.root, recipe.key, verify=True) is not None:  # preprocess ran again on the same pages
            return None, recipe.key, [image_id for image_id, _ in self._pages()], None, None
        pixels = PixelSource({}, image_processor)
        encode = tower_encoder(tower, pixels, device, recipe.dtype, recipe.compiled)
        tmp = new_build_folder(recipe.root, BUILD_NAME, f"tmp-{os.getpid()}")
        try:
            ids: list[str] = []
            with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="cache-sha256") as hashing:
                writer = FeatureWriter(tmp / FEATURES, len(self.candidates), ChunkedDigest(hashing))
                start = time.perf_counter()
                batches = self._batches(ids, params.model.vision_batch_size, device.type == "cuda")
                rates = encode_pages(writer, ids, batches, encode)
                looped = time.perf_counter()
                meta = writer.close(rows=len(ids))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        key = recipe.key if ids == self.candidates else cache_recipe(params, tower, image_processor, ids, device).key
        return tmp, key, ids, meta, (start, looped, rates)

    def _pages(self):
        """(image_id, PNG) as preprocess hands them over, until it finishes; raises when it gave up."""
        while (item := self.pages.get()) is not _END:
            if item is _ABANDON:
                self.ended = True
                raise RuntimeError("preprocess failed")
            yield item
        self.ended = True

    def _batches(self, ids: list[str], size: int, pin: bool):
        """Batches of `size` decoded pages (uint8 (N, H, W, 3), pinned for the copy to the GPU), each page's id
        appended to `ids` as its batch goes out."""
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="cache-decode") as decoders:
            for batch in batched(self._pages(), size):
                yield _decoded(batch, decoders, pin, ids)


def _decoded(batch: list[tuple[str, bytes]], decoders: ThreadPoolExecutor, pin: bool, ids: list[str]):
    import torch

    pages = list(decoders.map(pixels, [png for _, png in batch]))
    out = torch.empty((len(pages), *pages[0].shape), dtype=torch.uint8, pin_memory=pin)
    rows = out.numpy()
    for row, page in enumerate(pages):
        rows[row] = page
    names = [image_id for image_id, _ in batch]
    ids.extend(names)
    return names, out


def pixels(png: bytes) -> np.ndarray:
    """A written page's (H, W, 3) pixels, those the train stage's loader decodes through PIL (`PixelSource.load`),
    read straight from the zlib stream of preprocess's own PNG (`rgb_png_pixels`); any other bytes fail the build."""
    found = rgb_png_pixels(png)
    if found is None:
        raise ValueError("a page that preprocess's encoder did not write (`rgb_png`)")
    return found
