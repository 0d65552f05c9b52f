"""Training samples streamed from shards (``dinomx.shards``), front to back, from a folder or a URL.

Each reader (one per process and DataLoader worker) gets its own shards: every epoch the shards
are put in a seeded order and dealt round-robin to the readers (with fewer shards than readers,
every reader reads all shards and keeps every n-th sample). A reader opens ``open_shards`` of its
shards at a time, interleaves their samples into a buffer of ``buffer`` and emits from it at
random; the buffer empties at the end of each such group. So the stream of a reader is a pure
function of the seed and its sample count, and a group is the most that must be read again to
continue from any position: resuming at iteration ``s`` skips whole epochs and groups by the
sample counts of the index and re-reads (without decoding) only the start of one group.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dinomx.errors import DataError
from dinomx.images import to_model_mode
from dinomx.shards import ShardDamaged, ShardSet, decode, read_shard

logger = logging.getLogger(__name__)


def mix(*values: int) -> int:
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + value) % (2**63)
    return seed


@dataclass(frozen=True)
class Reader:
    """Reader ``index`` of ``count`` (processes x workers)."""

    index: int
    count: int

    def kept(self, samples: int, shard: int, dealt: bool) -> int:
        """Samples of a shard of ``samples`` this reader keeps: all of a dealt shard, else every
        ``count``-th, starting where ``(i + shard) % count == index``."""
        if dealt:
            return samples
        first = (self.index - shard) % self.count
        return max(0, (samples - first + self.count - 1) // self.count)


class Sample(NamedTuple):
    """A sample as a reader emits it, with where it came from, so that an error can name both."""

    shard: str
    key: str
    parts: dict[str, bytes]


class ShardOrder:
    """Which samples a reader emits, in order, from any starting count. ``verify``: each shard
    checked against its index's md5 before it is read ("stop" on a mismatch, "skip" the shard,
    or "off")."""

    def __init__(self, shards: ShardSet, seed: int, open_shards: int, buffer: int,
                 read: Callable[..., Iterator] = read_shard, retries: int = 3, wait_s: float = 1.0,
                 verify: str = "stop"):
        self.shards, self.seed, self.open_shards, self.buffer, self.read = shards, seed, open_shards, buffer, read
        self.retries, self.wait_s, self.verify = retries, wait_s, verify
        self.checked: set[int] = set()  # shards this process has found whole

    def groups(self, reader: Reader, epoch: int) -> tuple[list[list[int]], bool]:
        order = torch.randperm(len(self.shards.shards), generator=torch.Generator().manual_seed(mix(self.seed, epoch)))
        order = order.tolist()
        dealt = len(order) >= reader.count
        mine = order[reader.index::reader.count] if dealt else order
        return [mine[i:i + self.open_shards] for i in range(0, len(mine), self.open_shards)], dealt

    def group_size(self, reader: Reader, group: list[int], dealt: bool) -> int:
        return sum(reader.kept(self.shards.shards[j].samples, j, dealt) for j in group)

    def __call__(self, reader: Reader, start: int) -> Iterator[Sample]:
        """The samples of ``reader`` from its ``start``-th on, endlessly."""
        groups, dealt = self.groups(reader, 0)
        if not sum(self.group_size(reader, group, dealt) for group in groups):
            raise DataError(f"{self.shards.root}: {self.shards.samples} sample(s) in {len(self.shards.shards)} shard(s) "
                            f"leave nothing for reader {reader.index} of {reader.count} (processes x dataset.num_workers); "
                            "use fewer workers or more data")
        for epoch in itertools.count():
            groups, dealt = self.groups(reader, epoch)
            for number, group in enumerate(groups):
                size = self.group_size(reader, group, dealt)
                if start >= size:
                    start -= size
                    continue
                yield from itertools.islice(self._group(reader, epoch, number, group, dealt), start, None)
                start = 0

    def _group(self, reader: Reader, epoch: int, number: int, group: list[int], dealt: bool) -> Iterator[Sample]:
        rng = random.Random(mix(self.seed, epoch, reader.index, number))
        buffer: list[Sample] = []
        for sample in _round_robin([self._kept(reader, j, dealt) for j in group]):
            buffer.append(sample)
            if len(buffer) >= self.buffer:
                pick = rng.randrange(len(buffer))
                buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _kept(self, reader: Reader, j: int, dealt: bool) -> Iterator[Sample]:
        """The samples of shard ``j`` this reader keeps. A read that breaks off (a dropped
        connection to the store) is tried again ``retries`` times, going on after the last sample
        already given: a long run does not die of one network hiccup."""
        shard, url = self.shards.shards[j], self.shards.url(self.shards.shards[j])
        count, failures = 0, 0
        while True:
            md5 = shard.md5 if self.verify != "off" and j not in self.checked else None
            try:
                for member, (key, parts) in enumerate(self.read(url, md5=md5)):
                    self.checked.add(j)
                    if member < count:
                        continue
                    count += 1
                    if dealt or (member + j) % reader.count == reader.index:
                        yield Sample(url, key, parts)
                break
            except FileNotFoundError:
                raise
            except ShardDamaged as exc:  # read again, the same bytes: no retry mends them
                if self.verify != "skip":
                    raise
                logger.warning("%s; left out (dataset.verify_shards=skip)", exc)
                return
            except (OSError, DataError) as exc:
                failures += 1
                if failures > self.retries:
                    raise
                logger.warning("%s: read failed after %d sample(s) (%s); trying again (%d/%d)", url, count, exc,
                               failures, self.retries)
                time.sleep(self.wait_s * 2 ** (failures - 1))
        if count != shard.samples:
            raise DataError(f"{url}: {count} samples, its index says {shard.samples}; "
                            "the shard changed after it was indexed (ingest again)")


def _round_robin(iterators: list[Iterator]) -> Iterator:
    active = list(iterators)
    while active:
        for iterator in list(active):
            try:
                yield next(iterator)
            except StopIteration:
                active.remove(iterator)


class ShardStream(IterableDataset):
    """The training views of the samples this process reads: iterations ``start`` to ``end`` of
    ``batch_size`` samples each, dealt over its DataLoader workers as the DataLoader takes
    batches from them (round-robin), so that each worker knows how far a resumed run has come."""

    def __init__(self, order: ShardOrder, views: Callable, num_channels: int, batch_size: int, start: int, end: int,
                 rank: int = 0, world: int = 1):
        self.order, self.views, self.num_channels = order, views, num_channels
        self.batch_size, self.start, self.end, self.rank, self.world = batch_size, start, end, rank, world

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader takes its first batch from worker 0; resumed at ``start``, that batch is
        # the one the worker of role ``start % workers`` would have made.
        role = (self.start + worker) % workers
        reader = Reader(self.rank * workers + role, self.world * workers)

        def batches_before(step: int) -> int:  # of this role, among the first ``step`` of the process
            return max(0, (step - role + workers - 1) // workers)

        first = batches_before(self.start) * self.batch_size
        count = batches_before(self.end) * self.batch_size - first
        image = self.order.shards.image
        for n, (shard, key, parts) in enumerate(itertools.islice(self.order(reader, first), count)):
            if image not in parts:
                raise DataError(f"{shard}: sample {key} has no {image!r} (it has {sorted(parts)}); "
                                "set dataset.shard_image to one of its images")
            img = to_model_mode(decode(parts[image], f"{shard}: sample {key}'s {image!r}"), self.num_channels)
            yield self.views(img, mix(reader.index, first + n))
