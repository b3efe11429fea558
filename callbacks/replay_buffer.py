"""``ReplayBuffer``: replace groups without a learning signal by good groups from earlier steps (SPEC section 6).

A group (one prompt's G completions) is *eligible* when the unbiased std of its total
rewards exceeds ``replay_var_epsilon`` and its mean exceeds ``filter_min_reward``. Its
score is ``sum over the group of |advantage| * std``. A bounded min-heap keeps the
``replay_buffer_size`` best-scoring eligible groups seen so far. In every training step
each ineligible group of the batch is replaced by a buffer group drawn with
probability proportional to its score (with replacement only when more are needed
than the buffer holds).

How this departs from the original trainer (and TRL's ``GRPOWithReplayBuffer``):
- a stored group carries its own prompt ids, image tensors and grid, completions,
  masks, rewards, advantages and sampling log-probs (``dapo_lightning/groups.py``), so a
  replayed completion is trained with its own image and question; the original
  swapped only completions, pairing them with the wrong image;
- replacements are drawn from the buffer as it was *before* this step's groups are
  added, so a group is never trained twice in one step;
- sampling uses the callback's own seeded generator (saved in checkpoints), so replay
  does not shift the draws of generation.

Replayed rows keep the advantages and old log-probs of the step that sampled them (the
clipped ratio corrects for the policy having moved since); their token weights are 1
and ``rollout.replayed`` marks them. Validation never replays, and neither do extra
rollouts other callbacks ask for (``rollout.is_extra``). Under DDP each rank keeps and
replays its own groups; a replacement keeps the rank's row count, so every rank runs
the same number of micro-batches (DDP all-reduces at each backward), and padding is
redone for the assembled batch.
"""

from __future__ import annotations

import heapq
import os

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dapo_lightning import distributed
from dapo_lightning.groups import Group, assemble, take_group
from dapo_lightning.hooks import RolloutCallback


def group_statistics(rewards: Tensor, advantages: Tensor, num_generations: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per group: unbiased std and mean of the total rewards, and the score sum|A| * std. [N] -> three [B]"""
    grouped = rewards.float().view(-1, num_generations)  # [B, G]
    std = grouped.std(dim=1)  # [B]
    mean = grouped.mean(dim=1)  # [B]
    score = advantages.float().view(-1, num_generations).abs().sum(dim=1) * std  # [B]
    return std, mean, score


def eligible_groups(std: Tensor, mean: Tensor, *, var_epsilon: float, min_reward: float | None) -> Tensor:
    """SPEC 6: std > epsilon and mean > filter_min_reward (no mean condition when it is None). [B] bool"""
    ok = std > var_epsilon
    if min_reward is not None:
        ok &= mean > min_reward
    return ok


def sample_proportional(scores: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """``k`` indices drawn with probability proportional to ``scores``; with replacement only if k > len(scores)."""
    scores = scores.double().clamp_min(0)
    probs = scores / scores.sum() if scores.sum() > 0 else torch.full_like(scores, 1.0 / len(scores))
    return torch.multinomial(probs, k, replacement=k > len(scores), generator=generator).tolist()


class ReplayBuffer(RolloutCallback):
    needs_old_logps = True  # a stored group must keep the log-probs of the policy that sampled it
    runs_after = ("group_selection",)  # dynamic sampling filters the batch before the buffer fills what is left

    def __init__(
        self,
        replay_buffer_size: int = 64,
        replay_var_epsilon: float = 1e-6,
        filter_min_reward: float | None = None,
        save_in_checkpoint: bool = True,
        seed: int | None = None,
    ):
        """
        Args:
            replay_buffer_size: Most groups the buffer keeps per process (the highest-scoring ones).
            replay_var_epsilon: A group is eligible when the std of its total rewards exceeds this.
            filter_min_reward: ...and when its mean total reward exceeds this (None: no condition on the mean).
            save_in_checkpoint: Store the buffer's groups (prompts, images, completions) in checkpoints; when
                False a resumed run starts with an empty buffer.
            seed: Seed of the sampling generator (None: the ``seed_everything`` seed); rank r uses seed + r.
        """
        super().__init__()
        if not isinstance(replay_buffer_size, int) or replay_buffer_size < 1:
            raise ValueError(
                f"ReplayBuffer.replay_buffer_size: must be an integer >= 1, got {replay_buffer_size!r} "
                "(remove ReplayBuffer from trainer.callbacks to turn replay off)"
            )
        if replay_var_epsilon < 0:
            raise ValueError(f"ReplayBuffer.replay_var_epsilon: must be >= 0, got {replay_var_epsilon}")
        self.replay_buffer_size = replay_buffer_size
        self.replay_var_epsilon = replay_var_epsilon
        self.filter_min_reward = filter_min_reward
        self.save_in_checkpoint = save_in_checkpoint
        self.seed = seed
        self._heap: list[tuple[float, int, Group]] = []  # (score, insertion order, group): a min-heap on score
        self._counter = 0
        self._generator: torch.Generator | None = None
        self._reward_names: list[str] = []
        self._num_generations: int | None = None
        self._loaded: dict | None = None

    # --- set-up ---------------------------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        self._reward_names = list(pl_module.reward_names)
        self._num_generations = pl_module.num_generations
        if self._generator is None:
            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            self._generator = torch.Generator().manual_seed(seed + trainer.global_rank)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._loaded is not None:
            self._install(self._loaded, trainer)
            self._loaded = None

    # --- the work -------------------------------------------------------------------------------------

    def on_rollout_scored(self, trainer, pl_module, rollout) -> None:
        if rollout.stage != "train" or rollout.is_extra:
            return
        G = rollout.num_generations
        std, mean, score = group_statistics(rollout.rewards, rollout.advantages, G)
        ok = eligible_groups(std, mean, var_epsilon=self.replay_var_epsilon, min_reward=self.filter_min_reward)
        ineligible = (~ok).nonzero().flatten().tolist()
        fresh = [(float(score[g]), take_group(rollout, g, device="cpu", pixel_dtype=pl_module.policy_dtype))
                 for g in ok.nonzero().flatten().tolist()]

        replaced = 0
        if ineligible and self._heap:
            draws = iter(sample_proportional(torch.tensor(self.scores), len(ineligible), self._generator))
            groups = [self._heap[next(draws)][2].as_replayed() if g in ineligible else take_group(rollout, g)
                      for g in range(rollout.num_groups)]
            assemble(rollout, groups, pad_id=pl_module.pad_token_id)
            replaced = len(ineligible)

        for value, group in fresh:
            self._push(value, group)

        pl_module.log_dict(
            {"train/replay/replaced_groups": float(replaced), "train/replay/ineligible_groups": float(len(ineligible))},
            on_step=True, on_epoch=False, sync_dist=trainer.world_size > 1, reduce_fx="sum", batch_size=1,
        )
        scores = self.scores
        pl_module.log_dict(
            {"train/replay/fill": float(len(self._heap)),
             "train/replay/mean_score": float(sum(scores) / len(scores)) if scores else 0.0},
            on_step=True, on_epoch=False, sync_dist=trainer.world_size > 1, reduce_fx="mean", batch_size=1,
        )

    def _push(self, score: float, group: Group) -> None:
        item = (score, self._counter, group.for_storage())  # replayed rows get weight 1 (SPEC 6)
        self._counter += 1
        if len(self._heap) < self.replay_buffer_size:
            heapq.heappush(self._heap, item)
        elif score > self._heap[0][0]:
            heapq.heapreplace(self._heap, item)

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def scores(self) -> list[float]:
        return [s for s, _, _ in self._heap]

    # --- checkpoint -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        groups = [{"score": s, "order": c, "record": g.state()} for s, c, g in self._heap]
        if not self.save_in_checkpoint:
            groups = []
        mine = {
            "groups": groups,
            "counter": self._counter,
            "generator": self._generator.get_state() if self._generator is not None else None,
        }
        return {
            "replay_buffer_size": self.replay_buffer_size,
            "reward_names": list(self._reward_names),
            "num_generations": self._num_generations,
            "contents_saved": self.save_in_checkpoint,
            "per_rank": distributed.gather_per_rank(mine),  # index = rank; only rank 0's file is written
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict  # checked against the module's rewards at train start, when they are known

    def _install(self, state: dict, trainer) -> None:
        saved_size = state.get("replay_buffer_size")
        if saved_size != self.replay_buffer_size:
            raise ValueError(
                f"ReplayBuffer.replay_buffer_size: the checkpoint's buffer holds up to {saved_size} groups, this "
                f"configuration has {self.replay_buffer_size}; resume with the same value"
            )
        if state.get("reward_names") and state["reward_names"] != self._reward_names:
            raise ValueError(
                f"model.rewards.reward_funcs: the checkpoint's replay buffer was scored with {state['reward_names']}, "
                f"this configuration has {self._reward_names}"
            )
        if state.get("num_generations") not in (None, self._num_generations):
            raise ValueError(
                f"model.rollout.num_generations: the checkpoint's replay buffer holds groups of "
                f"{state['num_generations']}, this configuration has {self._num_generations}"
            )
        per_rank = state.get("per_rank") or []
        rank, world = trainer.global_rank, trainer.world_size
        shares = distributed.rank_share(per_rank, rank, world)
        items = [(g["score"], g["order"], Group.from_state(g["record"])) for share in shares for g in share["groups"]]
        if len(per_rank) == world and shares:
            self._heap = items  # the saved heap, in its saved order
            self._counter = shares[0]["counter"]
            if shares[0]["generator"] is not None:
                self._generator.set_state(shares[0]["generator"])
        else:
            rank_zero_warn(
                f"ReplayBuffer: the checkpoint was written by {len(per_rank)} processes, this run has {world}; "
                "the saved groups are shared out by rank and the sampling generators start afresh"
            )
            best = sorted(items, key=lambda item: (item[0], item[1]), reverse=True)[: self.replay_buffer_size]
            self._heap = best
            heapq.heapify(self._heap)
            self._counter = max((item[1] for item in items), default=-1) + 1
        if not state.get("contents_saved", True):
            rank_zero_warn("ReplayBuffer: the checkpoint was saved without the buffer's groups; it starts empty")

