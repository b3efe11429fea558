"""The orders in which the data module serves rows: a resumable training shuffle and an exact validation shard.

Both are ``DistributedSampler`` subclasses so that Lightning leaves them in place under
DDP: it wraps any other sampler in a ``DistributedSamplerWrapper``, which would shard
the shard again.

Training (:class:`ResumableShuffleSampler`) uses the orders Lightning would use
(``RandomSampler`` on one process, a seeded per-rank shard under DDP), and a run resumed
mid-epoch continues where the checkpointed run stopped (Lightning restarts a plain
loader's epoch from its first batch). Validation (:class:`ShardSampler`) shards without
padding, so every held-out question is scored exactly once and the metrics are exact.
"""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler


class ShardSampler(DistributedSampler):
    """Rank r of W takes indices r, r + W, ... in order: no padding, no duplicates (exact eval metrics).

    A ``DistributedSampler`` so that Lightning leaves it in place under DDP (it wraps any
    other sampler in a ``DistributedSamplerWrapper``, which would shard the shard again).
    ``pad`` (parameters sharded over processes, where every forward is a collective): every rank gets
    the same number of indices, the first ones repeated as ``DistributedSampler`` pads (at most W - 1
    questions are then scored twice), so every process runs as many batches of the same sizes.
    """

    def __init__(self, length: int, rank: int, world_size: int, pad: bool = False):
        super().__init__(range(length), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        order = list(range(length))
        if pad and length:
            order += order[: -length % world_size]
        self.indices = order[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableShuffleSampler(DistributedSampler):
    """The training order of the data module: Lightning's own orders, made resumable mid-epoch.

    One process (``seed=None``): each epoch's permutation is seeded by a draw from torch's
    global generator when the epoch's iteration starts, exactly as ``RandomSampler``
    does; the drawn seed is kept (``epoch_seed``) for checkpoints. Several processes
    (``seed`` set): ``torch.randperm`` seeded with ``seed + epoch`` and rank r of W takes
    every W-th index, exactly as the ``DistributedSampler`` Lightning would inject; being a
    ``DistributedSampler``, Lightning leaves it in place.

    ``resume_at(epoch, start, epoch_seed, epoch_offset)``: Lightning restarts a plain loader's
    epoch from its first batch when it resumes, so the data module tells the sampler the epoch's
    seed and how many of this rank's indices the checkpointed run had consumed; they are
    skipped in that epoch only. ``epoch_offset``: Lightning's epoch number minus the epoch of the
    order served. It is 1 after a fit that stopped at ``max_steps`` mid-epoch is extended: that
    fit's checkpoint counts its epoch as finished, so Lightning numbers the continued epoch one
    higher, while the order continues the unfinished one (and every later epoch's order is the
    one an uninterrupted run would use).
    """

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0, seed: int | None = None):
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed if seed is not None else 0, drop_last=False)
        self.draw_seed = seed is None
        self.epoch_seed: int | None = None
        self.start, self._start_epoch, self._pinned_seed = 0, 0, None
        self.epoch_offset = 0

    @property
    def order_epoch(self) -> int:
        """The epoch whose order is served (Lightning's epoch less ``epoch_offset``)."""
        return self.epoch - self.epoch_offset

    def resume_at(self, epoch: int, start: int, epoch_seed: int | None = None, epoch_offset: int = 0) -> None:
        self.set_epoch(epoch)
        self.start, self._start_epoch, self._pinned_seed = start, epoch, epoch_seed
        self.epoch_offset = epoch_offset

    def __iter__(self):
        resuming = self.epoch == self._start_epoch
        if self.draw_seed:
            if resuming and self._pinned_seed is not None:
                seed = self._pinned_seed
            else:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's draw
            self.epoch_seed = seed
            indices = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        else:  # DistributedSampler's permutation of seed + the order's epoch
            lightning_epoch, self.epoch = self.epoch, self.order_epoch
            try:
                indices = list(super().__iter__())
            finally:
                self.epoch = lightning_epoch
        if resuming and self.start:
            indices = indices[self.start :]
        return iter(indices)


__all__ = ["ResumableShuffleSampler", "ShardSampler"]
