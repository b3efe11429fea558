"""A variant of the ``vgr`` reward for the tiny model's scale: the IQR gate without its absolute floor.

``rewards.vgr`` (SPEC 2) gives a group no ranking when iqr < max(5.0, 0.10 x median). The floor
5.0 is absolute: on the tiny model VGR lies between about 0.2 and 1.6, so no group's spread
reaches it and the reward is 0.5 for every row (``train/vgr_reward/gate_closed_groups`` is 1,
docs/text_bias.md). ``vgr_relative_gate`` keeps everything else of ``vgr`` (the quantiles, the
score clip((q_hi - vgr) / iqr, 0, 1), 0.5 for unusable rows and ungated groups) and gates on
iqr < 0.10 x median alone. An extra experiment of ``benchmarks/ablations.py``
(``exp3+vgr_relative_gate``, docs/ablations.md) names it by its dotted path:

    model.rewards.reward_funcs: [accuracy, benchmarks.text_bias_rewards.vgr_relative_gate, format, length]

``AttentionMetrics``' ``gate_closed_groups`` keeps measuring SPEC 2's gate; this reward's own
activity shows in ``train/rewards/benchmarks.text_bias_rewards.vgr_relative_gate/std`` (0 when
every group is ungated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dapo_lightning.rewards.vgr import grounding_scores


def vgr_relative_gate(
    completions: list, vgr: Sequence[float] | None = None, num_generations: int = 1, **kwargs: Any
) -> list[float]:
    """SPEC 2's ``vgr`` reward with the gate iqr < 0.10 x median (no absolute floor), per completion in [0, 1]."""
    if vgr is None or len(vgr) != len(completions):
        raise ValueError("vgr_relative_gate needs one VGR value per completion (keyword vgr): add "
                         "dapo_lightning.callbacks.AttentionMetrics to trainer.callbacks")
    return grounding_scores(vgr, num_generations, absolute_floor=0.0)


vgr_relative_gate.reward_needs = ("vgr",)  # rewards.registry: a dotted-path reward declares what it reads
vgr_relative_gate.reward_provider_hint = "dapo_lightning.callbacks.AttentionMetrics"
