"""``update.update_policy`` on hand-built rollouts: mini-batches per optimizer step, masked truncated completions.

A fake host stands in for the LightningModule: its log-probs are a learnable [N, T] table (so
each micro-batch's loss has a gradient), and it records every backward and optimizer step.
"""

from __future__ import annotations

import math

import pytest
import torch

from dapo_lightning import update as update_module
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.logprobs import LogProbs
from dapo_lightning.loss import PolicyLossSettings
from dapo_lightning.update import UpdateSettings, mini_batches, update_policy

N, T, G = 4, 3, 2


def rollout() -> RolloutBatch:
    """4 rows of 2 groups; row 1 has no EOS (truncated, 3 tokens); the others have 3, 2 and 1 tokens."""
    prompts = PromptBatch(input_ids=torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1, dtype=torch.long),
                          pixel_values=torch.zeros(2, 1), image_grid_thw=torch.tensor([[1, 1, 1], [1, 1, 1]]),
                          image_counts=[1, 1], index=[0, 1])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    return RolloutBatch(prompts=prompts, num_generations=G, completion_ids=torch.ones(N, T, dtype=torch.long),
                        completion_mask=mask, completions=["a"] * N, truncated=torch.tensor([False, True, False, False]),
                        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), rewards=torch.zeros(N))


class FakeHost:
    device = torch.device("cpu")

    def __init__(self):
        self.table = torch.nn.Parameter(torch.zeros(N, T))  # the "policy": log-prob of every completion token
        self.steps, self.backwards, self.discarded = [], [], 0

    def completion_logps(self, rollout, rows, *, with_entropy=False, width=None):
        index = torch.tensor(rows)
        width = width or T
        return LogProbs(logps=self.table[index, :width] - 1.0, mask=rollout.completion_mask[index, :width],
                        entropy=torch.zeros(len(rows), width) if with_entropy else None)

    def manual_backward(self, loss):
        loss.backward()
        self.backwards.append(float(loss))

    def trainable_parameters(self):
        return [("table", self.table)]

    def step_optimizer(self):
        self.steps.append(self.table.grad.clone())
        norm = self.table.grad.norm()
        self.table.grad = None
        return norm

    def discard_gradients(self):
        self.discarded += 1
        self.table.grad = None


def test_mini_batches_split_rows_in_order():
    assert mini_batches(4, 1) == [[0, 1, 2, 3]]
    assert mini_batches(4, 2) == [[0, 1], [2, 3]]
    assert mini_batches(5, 2) == [[0, 1, 2], [3, 4]]
    assert mini_batches(2, 4) == [[0], [1]]  # never an empty step


def test_one_step_per_mini_batch_and_pass():
    host = FakeHost()
    settings = UpdateSettings(loss=PolicyLossSettings(loss_type="dapo"), num_iterations=2, steps_per_generation=2)
    result = update_policy(rollout(), host, settings)
    assert len(host.steps) == 4 and not result.skipped  # 2 passes x 2 mini-batches
    # the first step's gradient: rows 0 and 1 only, dapo-normalised by their 6 tokens. At ratio 1 (old = current,
    # detached) d(-r*A)/d logp = -A per token: row 0 -1/6 each, row 1 +1/6 each
    first = host.steps[0]
    torch.testing.assert_close(first[:2], torch.tensor([[-1 / 6] * 3, [1 / 6] * 3]))
    assert (first[2:] == 0).all()
    second = host.steps[1]  # rows 2 (2 tokens, A 0.5) and 3 (1 token, A -0.5), over their 3 tokens
    torch.testing.assert_close(second[2:], torch.tensor([[-0.5 / 3, -0.5 / 3, 0.0], [0.5 / 3, 0.0, 0.0]]))
    assert result.grad_norm is not None and result.tokens == 9  # the first pass's tokens: every row's


def test_truncated_completions_leave_the_loss_when_masked():
    for masked in (False, True):
        host = FakeHost()
        settings = UpdateSettings(loss=PolicyLossSettings(loss_type="dapo", mask_truncated=masked))
        result = update_policy(rollout(), host, settings)
        (grad,) = host.steps
        if masked:  # row 1 has no EOS: no gradient, and the normaliser counts the other rows' 6 tokens
            assert (grad[1] == 0).all()
            torch.testing.assert_close(grad[0], torch.tensor([-1 / 6] * 3))
            assert result.tokens == 6
        else:  # every row, normalised by all 9 tokens
            torch.testing.assert_close(grad[1], torch.tensor([1 / 9] * 3))
            assert result.tokens == 9


def test_a_non_finite_step_in_a_later_mini_batch_stops_the_pass(monkeypatch):
    host = FakeHost()
    original = host.completion_logps

    def nan_in_row_3(rollout, rows, **kwargs):
        out = original(rollout, rows, **kwargs)
        if 3 in rows:
            out.logps = out.logps.clone()
            out.logps[rows.index(3), 0] = math.nan
        return out

    host.completion_logps = nan_in_row_3
    settings = UpdateSettings(loss=PolicyLossSettings(), steps_per_generation=2)
    result = update_policy(rollout(), host, settings)
    assert result.skipped and len(host.steps) == 1 and host.discarded == 1  # the first step was taken
    assert [f.describe() for f in result.faults][0].startswith("logps at rows [3]")


@pytest.mark.parametrize("steps", [1, 2])
def test_processes_with_fewer_micro_batches_pad_every_step(monkeypatch, steps):
    monkeypatch.setattr(update_module, "micro_batches_on_busiest_process", lambda count, device: count + 1)
    host = FakeHost()
    update_policy(rollout(), host, UpdateSettings(loss=PolicyLossSettings(), steps_per_generation=steps,
                                                  micro_batch_size=1))
    assert len(host.backwards) == N + steps  # one padding backward per optimizer step
    assert host.backwards.count(0.0) >= steps
