"""``DynamicSampling``: the DAPO paper's rule, train only on groups whose rewards vary.

A group whose G completions all got the same reward has zero advantage everywhere:
it costs a forward and backward and teaches nothing. The DAPO paper (Yu et al., 2025,
section 3.2) over-samples prompts and keeps only groups with 0 < correct < G. Here:

1. the step's own rollout (the data loader's B prompts) is scored as usual;
2. if fewer than B of its groups are *kept* (``keep_if="reward_std"``: the unbiased std
   of the total rewards exceeds ``epsilon``; ``keep_if="accuracy"``: 0 < correct < G),
   the callback draws ``ceil(oversample_factor * B)`` more prompts from the training
   set with its own seeded sampler (under DDP from the rows the data loader gives this rank
   in this epoch, so no other rank trains on them) and rolls them out through
   ``pl_module.make_rollout(..., requested_by="dynamic_sampling")``, so rewards, reward weights and
   attention annotations are computed exactly as for the step's own prompts;
3. it repeats at most ``max_tries`` times, then trains on B groups: the kept groups in
   the order they were generated (the loader's first), filled up, if still short, with
   the loader's ineligible groups (they carry zero advantage; a ``ReplayBuffer`` listed
   after this callback then replaces them).

Every step therefore trains on exactly B groups, so every rank runs the same number of
micro-batches. Under DDP the ranks agree on each extra round (an all-reduce of "still
short anywhere"): a rank with enough groups generates along and discards, because a
generation round may contain collectives (batch-scaled advantages, logging).

Extra rollouts are marked (``rollout.is_extra``): callbacks that act once per step (the
replay buffer, log writers) skip them, and this callback ignores them, so it never
recurses. A group moved into the step brings its annotations (attention statistics, VGR)
and its faults (a NaN found in it skips the step). Order in ``trainer.callbacks``: before
``ReplayBuffer``, which declares it runs after ``group_selection`` (checked at set-up).
"""

from __future__ import annotations

import math
import os
import time
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from dapo_lightning import distributed
from dapo_lightning.groups import assemble, take_group
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.metrics import row_accuracy

TAG = "dynamic_sampling"
KEEP_RULES = ("reward_std", "accuracy")


def kept_groups(rollout, keep_if: str, epsilon: float) -> Tensor:
    """[B] bool: the groups with a learning signal."""
    G = rollout.num_generations
    if keep_if == "accuracy":
        correct = row_accuracy(rollout).view(-1, G).round().sum(dim=1)  # [B]
        return (correct > 0) & (correct < G)
    return rollout.rewards.float().view(-1, G).std(dim=1) > epsilon  # [B]


class DynamicSampling(RolloutCallback):
    provides = ("group_selection",)  # the step trains on the groups it selects (the replay buffer runs after)

    def __init__(
        self,
        oversample_factor: float = 1.0,
        max_tries: int = 3,
        keep_if: Literal["reward_std", "accuracy"] = "reward_std",
        epsilon: float = 1e-6,
        seed: int | None = None,
    ):
        """
        Args:
            oversample_factor: Prompts per extra round, as a multiple of the batch's B prompts.
            max_tries: Most extra generation rounds per step (0: only filter and reorder the step's own groups).
            keep_if: ``reward_std``: keep groups whose total-reward std exceeds ``epsilon``; ``accuracy``: keep
                groups with 0 < correct < G.
            epsilon: Std threshold of ``keep_if=reward_std``.
            seed: Seed of the prompt sampler (None: the ``seed_everything`` seed); rank r uses seed + r.
        """
        super().__init__()
        if not oversample_factor > 0:
            raise ValueError(f"DynamicSampling.oversample_factor: must be > 0, got {oversample_factor}")
        if not isinstance(max_tries, int) or max_tries < 0:
            raise ValueError(f"DynamicSampling.max_tries: must be an integer >= 0, got {max_tries!r}")
        if keep_if not in KEEP_RULES:
            raise ValueError(f"DynamicSampling.keep_if: choose from {KEEP_RULES}, got {keep_if!r}")
        if epsilon < 0:
            raise ValueError(f"DynamicSampling.epsilon: must be >= 0, got {epsilon}")
        self.oversample_factor = oversample_factor
        self.max_tries = max_tries
        self.keep_if = keep_if
        self.epsilon = epsilon
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._loaded: dict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._generator is None:
            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            self._generator = torch.Generator().manual_seed(seed + trainer.global_rank)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._loaded is not None:
            per_rank = self._loaded.get("per_rank") or []
            if len(per_rank) == trainer.world_size and per_rank[trainer.global_rank].get("generator") is not None:
                self._generator.set_state(per_rank[trainer.global_rank]["generator"])
            self._loaded = None

    # --- the work -------------------------------------------------------------------------------------

    def on_rollout_scored(self, trainer, pl_module, rollout) -> None:
        if rollout.stage != "train" or rollout.is_extra:
            return
        start = time.perf_counter()
        B = rollout.num_groups
        keep = kept_groups(rollout, self.keep_if, self.epsilon)
        chosen: list[tuple] = [(rollout, g) for g in keep.nonzero().flatten().tolist()]
        spare = [(rollout, g) for g in (~keep).nonzero().flatten().tolist()]
        filtered = len(spare)
        rounds, generated = 1, B
        while rounds - 1 < self.max_tries and distributed.any_process(len(chosen) < B, trainer.strategy.root_device):
            prompts = self._draw(trainer, math.ceil(self.oversample_factor * B))
            extra = pl_module.make_rollout(prompts, "train", requested_by=TAG)
            rounds += 1
            generated += extra.num_groups
            extra_keep = kept_groups(extra, self.keep_if, self.epsilon)
            chosen += [(extra, g) for g in extra_keep.nonzero().flatten().tolist()]
            filtered += int((~extra_keep).sum())
        final = chosen[:B]
        filled = max(0, B - len(final))
        final += spare[:filled]
        if [(id(r), g) for r, g in final] != [(id(rollout), g) for g in range(B)]:
            groups = [take_group(r, g) for r, g in final]  # taken before the rollout is overwritten
            assemble(rollout, groups, pad_id=pl_module.pad_token_id)
        rollout.timings["dynamic_sampling"] = time.perf_counter() - start
        pl_module.log_dict(
            {
                "train/dynamic_sampling/kept_groups": float(min(len(chosen), B)),
                "train/dynamic_sampling/filtered_groups": float(filtered),
                "train/dynamic_sampling/filled_groups": float(filled),
                "train/dynamic_sampling/generated_groups": float(generated),
            },
            on_step=True, on_epoch=False, sync_dist=trainer.world_size > 1, reduce_fx="sum", batch_size=1,
        )
        pl_module.log("train/dynamic_sampling/rounds", float(rounds), on_step=True, on_epoch=False, batch_size=1)

    def _draw(self, trainer, count: int):
        """``count`` prompts of this rank's shard of the training set, encoded and on the module's device."""
        loader = trainer.train_dataloader
        dataset, collate = loader.dataset, loader.collate_fn
        shard = self._shard(trainer, loader, len(dataset))
        picks = shard[torch.randperm(len(shard), generator=self._generator)[: min(count, len(shard))]]
        batch = collate([dataset[int(i)] for i in picks])
        batch = trainer.precision_plugin.convert_input(batch)
        return trainer.strategy.batch_to_device(batch)

    @staticmethod
    def _shard(trainer, loader, length: int) -> Tensor:
        """The rows this rank may draw: under DDP the loader's own shard of this epoch (no other rank trains on
        them this epoch), else every row."""
        rank, world = trainer.global_rank, trainer.world_size
        sampler = getattr(loader, "sampler", None)
        if world > 1 and isinstance(sampler, DistributedSampler) and sampler.num_replicas == world:
            # the base class's order for the sampler's epoch: the whole shard, whatever a resume skips
            return torch.tensor(sorted(set(DistributedSampler.__iter__(sampler))), dtype=torch.long)
        return torch.arange(rank, length, world)

    # --- checkpoint -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        mine = {"generator": self._generator.get_state() if self._generator is not None else None}
        return {"per_rank": distributed.gather_per_rank(mine)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict
