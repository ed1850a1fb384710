"""The training split read in shards per process (`train.streaming: true`), never whole: for processed data larger
than one machine's disk or memory, trained with the frozen vision tower inside the step (`train.vision_cache: false`).

The shard is a row group of `images.parquet` (preprocess writes 16 pages a group). Process r of W trains on the pages
of row groups r, r + W, r + 2W, ... of the split and on the questions about them. It reads the `image_id` columns of
`images.parquet` and `<split>.parquet` (to count every process's questions), its own questions (a filtered scan) and
its own pages, one row group at a time as its batches need them (`ParquetPages`). Nothing is loaded, converted or
copied whole, and a process touches only its own row groups of pages.

Each epoch shuffles a process's row groups, then its questions within windows of `WINDOW` row groups, and cuts its
micro-batches from that stream (`ShardBatches`): a batch's pages come from at most two windows, which stay in the
row-group cache of the DataLoader worker reading them. Every process trains the same number of micro-batches an epoch,
as DDP needs: that of the process with the fewest questions, rounded down to whole optimizer steps. The other
processes leave their last questions of the epoch out (other ones each epoch); `Share.left_out` says how many.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Sampler

from florence_ops.data.processed import IMAGES_FILE, image_ids, processed_file
from florence_ops.errors import DataSourceError, UserError

log = logging.getLogger(__name__)
WINDOW = 16  # row groups whose questions are shuffled together


class ParquetPages(Mapping[str, Image.Image]):
    """The preprocessed pages by image_id, read from `images.parquet` a row group at a time; the `keep` row groups
    read last stay in memory (encoded). `ids` lists every page in file order, as `ImageTable` does."""

    def __init__(self, processed_dir: str | Path, keep: int = 2 * WINDOW):
        self.path = processed_file(processed_dir, IMAGES_FILE)
        metadata = pq.ParquetFile(self.path).metadata
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        self.ids: list[str] = image_ids(self.path)
        self.group = np.repeat(np.arange(len(sizes)), sizes)  # the row group of each page, in file order
        starts = np.cumsum([0, *sizes])
        self._where = {
            image_id: (int(g), i - int(starts[g])) for i, (image_id, g) in enumerate(zip(self.ids, self.group))
        }
        self.keep = keep
        self._groups: OrderedDict[int, list[bytes]] = OrderedDict()
        self._file: tuple[int, pq.ParquetFile] | None = None  # opened per process (DataLoader workers are forked)
        self.groups_read: list[int] = []  # row groups read by this process, in order

    @property
    def num_groups(self) -> int:
        return int(self.group[-1]) + 1 if len(self.group) else 0

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._where

    def __getitem__(self, image_id: str) -> Image.Image:
        group, row = self._where[image_id]
        image = Image.open(io.BytesIO(self._row_group(group)[row]))
        return image if image.mode == "RGB" else image.convert("RGB")

    def _row_group(self, group: int) -> list[bytes]:
        if group in self._groups:
            self._groups.move_to_end(group)
            return self._groups[group]
        if self._file is None or self._file[0] != os.getpid():
            self._file = (os.getpid(), pq.ParquetFile(self.path))
        column = self._file[1].read_row_group(group, columns=["image"]).column("image").combine_chunks()
        self._groups[group] = column.field("bytes").to_pylist()
        self.groups_read.append(group)
        while len(self._groups) > self.keep:
            self._groups.popitem(last=False)
        return self._groups[group]


@dataclass
class Share:
    """One process's part of a split: its questions, the row group of each one's page, and the micro-batches every
    process trains an epoch."""

    rows: list[dict]
    groups: list[int]
    micro_batches: int
    left_out: int  # questions of the split that an epoch leaves out, all processes together


def process_share(
    processed_dir: str | Path, split: str, pages: ParquetPages, columns: Sequence[str], rank: int, world: int,
    micro_batch: int, micro_batches_per_step: int = 1,
) -> Share:  # fmt: skip
    """The questions of `split` about the pages of row groups `rank`, `rank + world`, ... (see the module's doc)."""
    path = processed_file(processed_dir, f"{split}.parquet")
    page_ids = pa.array(pages.ids, pa.string())
    asked = pc.index_in(pq.read_table(path, columns=["image_id"]).column("image_id"), value_set=page_ids)
    if asked.null_count:
        raise DataSourceError(f"{path}: {asked.null_count} question(s) about pages missing from {pages.path}")
    shard = pages.group[asked.to_numpy(zero_copy_only=False)] % world
    counts = np.bincount(shard, minlength=world)
    per_step = micro_batch * micro_batches_per_step
    steps = int(counts.min()) // per_step
    if steps == 0:
        raise UserError(
            f"train.streaming: process {int(counts.argmin())} of {world} gets {int(counts.min())} questions, fewer "
            f"than one step's {per_step}: {pages.num_groups} row groups of pages are too few to share among {world} "
            "processes (set train.streaming: false)"
        )
    mine = pc.field("image_id").isin(pa.array([i for i, g in zip(pages.ids, pages.group) if g % world == rank]))
    table = ds.dataset(path, format="parquet").to_table(columns=list(columns), filter=mine)
    groups = pages.group[pc.index_in(table.column("image_id"), value_set=page_ids).to_numpy(zero_copy_only=False)]
    micro_batches = steps * micro_batches_per_step
    return Share(
        table.to_pylist(), groups.tolist(), micro_batches, int(counts.sum()) - world * micro_batches * micro_batch
    )


class ShardBatches(Sampler[list[int]]):
    """A process's micro-batches of `Share.rows` for one epoch (`set_epoch`), in an order that depends on the seed,
    the epoch and the rank only: row groups shuffled, questions shuffled within windows of `window` row groups."""

    def __init__(self, share: Share, micro_batch: int, seed: int, rank: int, window: int = WINDOW):
        self.micro_batch, self.count = micro_batch, share.micro_batches
        self.seed, self.rank, self.window = seed, rank, window
        self.epoch, self.skip = 0, 0
        self.rows: dict[int, list[int]] = {}  # row group -> its rows of the share, in file order
        for i, group in enumerate(share.groups):
            self.rows.setdefault(group, []).append(i)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch whose order `__iter__` yields, leaving out its first `skip` micro-batches (a resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.count - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}")
        order = sorted(self.rows)
        rng.shuffle(order)
        stream: list[int] = []
        for start in range(0, len(order), self.window):
            window = [i for group in order[start : start + self.window] for i in self.rows[group]]
            rng.shuffle(window)
            stream += window
        size = self.micro_batch
        for b in range(self.skip, self.count):
            yield stream[b * size : (b + 1) * size]
