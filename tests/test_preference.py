"""The preference term among correct completions (SPEC 9): pairing, the pair loss, and its gradient in the update.

The update's gradient is checked against autograd of the written formula,
``weight * mean over pairs of -log sigmoid(beta * (d_top - d_bottom) - margin)``, in every case
the update claims it exactly: on-policy rows, replayed rows (stored old log-probs), later
optimizer steps (num_iterations, steps_per_generation), any micro-batch size, two processes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import softplus
from torch.testing import assert_close

from dapo_lightning import distributed, preference
from dapo_lightning.annotations import RowValues
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.config import LossConfig
from dapo_lightning.logprobs import LogProbs
from dapo_lightning.loss import (
    PolicyLossSettings,
    PreferenceSettings,
    preference_coefficients,
    preference_pair_loss,
    preference_surrogate,
    sequence_log_ratio,
)
from dapo_lightning.preference import Pairs, pair_rows
from dapo_lightning.update import UpdateSettings, update_policy

NAN = math.nan

# --- pairing (preference.py) ------------------------------------------------------------------------------


def test_pairs_the_most_grounded_with_the_least_grounded_correct_rows():
    # one group of 6: row 2's VGR is unusable, row 3 is wrong; the others ranked by VGR: 1 (1.0), 5 (2.0), 0 (3.0),
    # 4 (5.0) -> the best with the worst, then the second best with the second worst
    correct = [True, True, True, False, True, True]
    vgr = [3.0, 1.0, NAN, 0.5, 5.0, 2.0]
    assert pair_rows(correct, vgr, 6, 2) == Pairs(top=(1, 5), bottom=(4, 0))
    assert pair_rows(correct, vgr, 6, 1) == Pairs(top=(1,), bottom=(4,))
    assert pair_rows(correct, vgr, 6, 5) == Pairs(top=(1, 5), bottom=(4, 0))  # K at most floor(4 / 2)


def test_odd_counts_leave_the_middle_row_out_and_fewer_than_two_make_no_pair():
    assert pair_rows([True] * 3, [2.0, 1.0, 3.0], 3, 4) == Pairs(top=(1,), bottom=(2,))  # row 0 (the median) out
    assert pair_rows([True, False, False], [2.0, 1.0, 3.0], 3, 4) == Pairs((), ())  # one correct row
    assert pair_rows([True, True, True], [2.0, NAN, math.inf], 3, 4) == Pairs((), ())  # one usable VGR


def test_equal_vgr_states_no_preference():
    assert pair_rows([True] * 4, [1.0] * 4, 4, 2) == Pairs((), ())
    # the outer pair differs, the inner one is tied: only the outer one is kept
    assert pair_rows([True] * 4, [0.5, 1.0, 1.0, 2.0], 4, 2) == Pairs(top=(0,), bottom=(3,))


def test_pairs_stay_within_their_group_and_ignore_a_partial_group():
    # two groups of 3, then a stray row 6 (no whole group): group 0 pairs 1 with 0, group 1 pairs 3 with 5
    correct = [True, True, False, True, False, True, True]
    vgr = [9.0, 1.0, 0.1, 0.2, 0.0, 8.0, 0.0]
    assert pair_rows(correct, vgr, 3, 2) == Pairs(top=(1, 3), bottom=(0, 5))


def scored_rollout(n_groups: int = 2, *, old_logps=None, replayed=None, advantages=None, truncated=None,
                   accuracy=None, vgr=None, lengths=None) -> RolloutBatch:
    """Groups of 4 rows, 4 completion tokens. Default pairs: group 0 (1, 3); group 1 (7, 6) and (4, 5)."""
    G, T = 4, 4
    N = G * n_groups
    lengths = lengths if lengths is not None else ([4, 3, 2, 4, 1, 4, 3, 2] * n_groups)[:N]
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)).long()  # [N, T]
    accuracy = accuracy if accuracy is not None else ([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0] * n_groups)[:N]
    vgr = vgr if vgr is not None else ([2.0, 0.5, 1.0, 3.0, 1.0, 2.5, 4.0, 0.2] * n_groups)[:N]
    prompts = PromptBatch(input_ids=torch.ones(n_groups, 1, dtype=torch.long),
                          attention_mask=torch.ones(n_groups, 1, dtype=torch.long),
                          pixel_values=torch.zeros(n_groups, 1),
                          image_grid_thw=torch.ones(n_groups, 3, dtype=torch.long), image_counts=[1] * n_groups,
                          index=list(range(n_groups)))
    rewards = torch.stack([torch.tensor(accuracy), torch.ones(N)], dim=-1)  # [N, 2]: accuracy, format
    return RolloutBatch(prompts=prompts, num_generations=G, completion_ids=torch.ones(N, T, dtype=torch.long),
                        completion_mask=mask, completions=["a"] * N,
                        truncated=torch.zeros(N, dtype=torch.bool) if truncated is None else truncated,
                        old_logps=old_logps, reward_names=["accuracy", "format"], rewards_per_func=rewards,
                        rewards=rewards.sum(-1), advantages=torch.zeros(N) if advantages is None else advantages,
                        replayed=replayed, annotations={"vgr": RowValues(torch.tensor(vgr))})


def test_a_rollouts_pairs_read_its_accuracy_column_and_vgr_annotation():
    rollout = scored_rollout()
    assert preference.rollout_pairs(rollout, 2) == Pairs(top=(1, 7, 4), bottom=(3, 6, 5))
    assert preference.rollout_pairs(rollout, 1) == Pairs(top=(1, 7), bottom=(3, 6))
    eligible = [True] * 8
    eligible[6] = False  # e.g. truncated and masked: group 1's candidates become 7 (0.2), 4 (1.0), 5 (2.5)
    assert preference.rollout_pairs(rollout, 2, eligible) == Pairs(top=(1, 7), bottom=(3, 5))
    rollout.rewards_per_func[3, 0] = NAN  # no accuracy value: not correct
    assert preference.rollout_pairs(rollout, 2).top[:1] == (1,) and 3 not in preference.rollout_pairs(rollout, 2).rows()
    rollout.annotations.pop("vgr")
    assert preference.rollout_pairs(rollout, 2) == Pairs((), ())  # nothing recorded: no pairs
    rollout.reward_names = ["correct", "format"]
    with pytest.raises(ValueError, match=r"model\.loss\.preference_weight: .*add the accuracy reward"):
        preference.rollout_pairs(rollout, 2)


# --- the pair loss (loss.py) ------------------------------------------------------------------------------


def test_pair_loss_and_its_derivatives_by_hand():
    # beta 0.5, margin 0.25, d_top 1, d_bottom -1: z = 0.5 * 2 - 0.25 = 0.75
    # loss = -log sigmoid(0.75) = log(1 + e^-0.75) = 0.386871; w = sigmoid(-0.75) = 0.320821
    # dl/d d_top = -beta w = -0.160411, dl/d d_bottom = +0.160411; row 2 is in no pair
    d = torch.tensor([1.0, -1.0, 7.0], requires_grad=True)
    top, bottom = torch.tensor([0]), torch.tensor([1])
    loss = preference_pair_loss(d[top], d[bottom], beta=0.5, margin=0.25)
    assert loss.shape == (1,)
    assert_close(loss, torch.tensor([0.386871]))
    coefficients = preference_coefficients(d, top, bottom, beta=0.5, margin=0.25)
    assert coefficients.shape == (3,) and not coefficients.requires_grad
    assert_close(coefficients, torch.tensor([-0.160411, 0.160411, 0.0]))
    (autograd,) = torch.autograd.grad(loss.sum(), d)
    assert_close(coefficients, autograd)
    # at the sampling point (d = 0): loss log(1 + e^margin), w = sigmoid(margin); margin 0: log 2 and 1/2
    zero = torch.zeros(1)
    assert_close(preference_pair_loss(zero, zero, 0.1, 0.0), torch.tensor([math.log(2)]))
    assert_close(preference_pair_loss(zero, zero, 0.1, 0.5), torch.tensor([0.974077]))
    assert_close(preference_pair_loss(zero, zero, 0.1, 100.0), torch.tensor([100.0]))  # no overflow


def test_sequence_log_ratio_sums_the_valid_tokens():
    # row 0: (-1 - -1.5) + (-2 - -1) = -0.5 (third token masked); row 1: 0.25 * 3
    logps = torch.tensor([[-1.0, -2.0, -9.0], [0.0, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -1.0, 0.0], [-0.25, -0.25, -0.25]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert_close(sequence_log_ratio(logps, old, mask), torch.tensor([-0.5, 0.75]))


def test_the_surrogate_is_zero_with_the_gradient_of_the_mean_pair_loss():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    top, bottom = torch.tensor([0, 4]), torch.tensor([3, 1])
    weight, beta, margin = 0.7, 0.3, 0.2
    written = weight * preference_pair_loss(d[top], d[bottom], beta, margin).mean()
    surrogate = preference_surrogate(d, preference_coefficients(d, top, bottom, beta, margin), weight, 2.0)
    assert surrogate.item() == 0.0
    assert_close(torch.autograd.grad(surrogate, d)[0], torch.autograd.grad(written, d)[0], rtol=1e-12, atol=1e-12)


# --- the gradient in the update (update.py) -------------------------------------------------------------------


class TableHost:
    """The policy is a learnable [N, T] table of log-probs (minus 1); each optimizer step records the table and its
    gradient, then takes an SGD step of ``lr``. ``calls`` records (rows, grad enabled) of every forward."""

    device = torch.device("cpu")

    def __init__(self, n_rows: int, lr: float = 0.0, seed: int = 0, table: torch.Tensor | None = None):
        g = torch.Generator().manual_seed(seed)
        start = 0.3 * torch.randn(n_rows, 4, generator=g, ) if table is None else table.clone()
        self.table = torch.nn.Parameter(start)
        self.lr, self.steps, self.calls = lr, [], []

    def logps(self) -> torch.Tensor:
        return self.table - 1.0  # [N, T]

    def completion_logps(self, rollout, rows, *, with_entropy=False, width=None):
        self.calls.append((tuple(rows), torch.is_grad_enabled()))
        index = torch.tensor(rows)
        width = width or 4
        return LogProbs(logps=self.logps()[index, :width], mask=rollout.completion_mask[index, :width],
                        entropy=torch.zeros(len(rows), width) if with_entropy else None)

    def manual_backward(self, loss):
        loss.backward()

    def trainable_parameters(self):
        return [("table", self.table)]

    def step_optimizer(self):
        grad = self.table.grad.clone()
        self.steps.append((self.table.detach().clone(), grad))
        with torch.no_grad():
            self.table -= self.lr * grad
        self.table.grad = None
        return grad.norm()

    def discard_gradients(self):
        self.table.grad = None


WEIGHT, BETA, MARGIN = 0.5, 0.4, 0.3
ON = PreferenceSettings(weight=WEIGHT, beta=BETA, margin=MARGIN, pairs_per_group=2)


def settings(term=ON, **kwargs) -> UpdateSettings:
    return UpdateSettings(loss=PolicyLossSettings(loss_type="dapo", preference=term), **kwargs)


def written_term(table, rollout, pairs: Pairs, rows_in_step=None) -> torch.Tensor:
    """weight x mean over pairs of -log sigmoid(beta (d_top - d_bottom) - margin), straight from SPEC 9.

    With ``rows_in_step``, the gradient of one optimizer step: d of rows outside it detached, and the mean over the
    step's pairs, a pair with one row in the step counting half."""
    logps = table - 1.0  # [N, T]
    old = logps.detach() if rollout.old_logps is None else rollout.old_logps
    d = ((logps - old) * rollout.completion_mask).sum(-1)  # [N]
    count = len(pairs)
    if rows_in_step is not None:
        inside = torch.zeros(len(d), dtype=torch.bool)
        inside[list(rows_in_step)] = True
        d = torch.where(inside, d, d.detach())
        count = sum(r in rows_in_step for r in pairs.rows()) / 2
    top, bottom = torch.tensor(pairs.top), torch.tensor(pairs.bottom)
    return WEIGHT * (-torch.nn.functional.logsigmoid(BETA * (d[top] - d[bottom]) - MARGIN)).sum() / count


def autograd_of(table, rollout, pairs, rows_in_step=None) -> torch.Tensor:
    table = table.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(written_term(table, rollout, pairs, rows_in_step), table)
    return grad


def replayed_group_1(n_groups: int = 2, **kwargs) -> RolloutBatch:
    """Group 1 came from the replay buffer: its old log-probs are an earlier policy's (d != 0); group 0's are the
    current policy's (d = 0 at the first optimizer step)."""
    host = TableHost(4 * n_groups)
    old = host.logps().detach().clone()
    old[4:8] += 0.2 * torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    replayed = torch.zeros(4 * n_groups, dtype=torch.bool)
    replayed[4:8] = True
    return scored_rollout(n_groups, old_logps=old, replayed=replayed, **kwargs)


@pytest.mark.parametrize("replay", [False, True])
def test_the_step_gradient_is_the_written_terms_gradient_added_to_the_dapo_one(replay):
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.6, -0.2, 0.9, -1.0])
    rollout = replayed_group_1(advantages=advantages) if replay else scored_rollout(advantages=advantages)
    pairs = preference.rollout_pairs(rollout, 2)
    assert pairs == Pairs(top=(1, 7, 4), bottom=(3, 6, 5))
    off, on = TableHost(8), TableHost(8)
    update_policy(rollout, off, settings(term=None))
    result = update_policy(rollout, on, settings())
    ((start, with_term),), ((_, without),) = on.steps, off.steps
    assert_close(with_term - without, autograd_of(start, rollout, pairs), rtol=1e-5, atol=1e-7)
    # no-grad forwards only where d is not known to be 0: the replayed group's paired rows, once
    assert [rows for rows, grad in on.calls if not grad] == ([(4, 5, 6, 7)] if replay else [])
    assert set(result.metrics()) >= {"preference/pairs", "preference/loss", "preference/margin"}
    plain = update_policy(rollout, TableHost(8), settings(None)).metrics()
    assert not any(key.startswith("preference/") for key in plain)  # off: the scalars of before


def test_the_logged_pairs_loss_and_margin():
    rollout = replayed_group_1()
    host = TableHost(8)
    result = update_policy(rollout, host, settings())
    table = host.steps[0][0]
    d = sequence_log_ratio(table - 1.0, rollout.old_logps, rollout.completion_mask)  # [N]
    top, bottom = torch.tensor([1, 7, 4]), torch.tensor([3, 6, 5])
    metrics = result.metrics()
    assert metrics["preference/pairs"] == 3
    assert_close(metrics["preference/loss"], (WEIGHT * softplus(MARGIN - BETA * (d[top] - d[bottom]))).mean(),
                 rtol=1e-6, atol=1e-7)
    assert_close(metrics["preference/margin"], (BETA * (d[top] - d[bottom])).mean(), rtol=1e-6, atol=1e-7)
    # group 0's rows were sampled by this policy: their pair's d is 0 (to float error), so its loss is softplus(margin)
    assert abs(float(d[1] - d[3])) < 1e-12


def test_no_pairs_no_term():
    rollout = scored_rollout(accuracy=[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # one correct row per group
    off, on = TableHost(8), TableHost(8)
    update_policy(rollout, off, settings(term=None))
    metrics = update_policy(rollout, on, settings()).metrics()
    assert torch.equal(on.steps[0][1], off.steps[0][1])
    assert metrics["preference/pairs"] == 0 and metrics["preference/loss"] == 0
    assert math.isnan(metrics["preference/margin"])


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3, 5, None])
def test_the_gradient_does_not_depend_on_the_micro_batch_size(micro_batch_size):
    """Pair (1, 3) lies in two micro-batches for sizes 1, 2 and 3; (7, 6) in two for size 5."""
    rollout = replayed_group_1(advantages=torch.tensor([1.0, -0.5, 0.3, -0.8, 0.6, -0.2, 0.9, -1.0]))
    whole, split = TableHost(8), TableHost(8)
    update_policy(rollout, whole, settings())
    update_policy(rollout, split, settings(micro_batch_size=micro_batch_size))
    assert_close(split.steps[0][1], whole.steps[0][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("on_policy", [False, True])
def test_every_optimizer_step_of_several_passes_is_exact(on_policy):
    """num_iterations 3: after the first step the policy has moved, so every row's d is measured at the step's
    parameters (a no-grad forward) and the step's gradient is the written term's there."""
    rollout = scored_rollout() if on_policy else replayed_group_1()
    pairs = preference.rollout_pairs(rollout, 2)
    host = TableHost(8, lr=0.5)
    update_policy(rollout, host, settings(num_iterations=3, micro_batch_size=3))
    assert len(host.steps) == 3
    assert not torch.equal(host.steps[0][0], host.steps[2][0])  # the policy moved
    for table, grad in host.steps:
        assert_close(grad, autograd_of(table, rollout, pairs), rtol=1e-5, atol=1e-7)


def test_mini_batches_split_pairs_and_each_step_is_exact():
    """steps_per_generation 3 over 8 rows: rows [0, 1, 2], [3, 4, 5], [6, 7]. Pair (1, 3) lies in steps 1 and 2,
    (4, 5) in step 2, (7, 6) in step 3: each step's gradient is the written term's over its own rows, its pairs
    counted by halves (step 1: 0.5 pair, step 2: 1.5, step 3: 1)."""
    rollout = replayed_group_1()
    pairs = preference.rollout_pairs(rollout, 2)
    host = TableHost(8, lr=0.5)
    result = update_policy(rollout, host, settings(steps_per_generation=3))
    parts = [[0, 1, 2], [3, 4, 5], [6, 7]]
    for (table, grad), rows in zip(host.steps, parts, strict=True):
        assert_close(grad, autograd_of(table, rollout, pairs, rows_in_step=rows), rtol=1e-5, atol=1e-7)
    assert result.metrics()["preference/pairs"] == 3


def test_two_processes_average_to_the_whole_step(monkeypatch):
    """Group 0 on process 0, group 1 on process 1: each divides by the pairs of both / 2, DDP averages the gradients,
    and the logged loss's mean over processes is the mean over all pairs."""
    whole = replayed_group_1()
    old = whole.old_logps
    halves = [scored_rollout(1, old_logps=old[:4]),
              scored_rollout(1, old_logps=old[4:8], replayed=torch.ones(4, dtype=torch.bool), vgr=[1.0, 2.5, 4.0, 0.2],
                             accuracy=[1.0] * 4, lengths=[1, 4, 3, 2])]
    reference = TableHost(8)
    metrics_whole = update_policy(whole, reference, settings()).metrics()
    table, grad_whole = reference.steps[0]

    sent = []  # what each process puts into the all-reduce, in call order
    monkeypatch.setattr(distributed, "global_sum", lambda value: sent.append(value.clone()) or value)
    for rollout in halves:
        update_policy(rollout, TableHost(4, table=table[:4]), settings())
    other = {0: sent[1], 1: sent[0]}  # one all-reduce each
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    grads, losses = [], []
    for rank, (rollout, rows) in enumerate(zip(halves, (slice(0, 4), slice(4, 8)))):
        monkeypatch.setattr(distributed, "global_sum", lambda value, rank=rank: value + other[rank])
        host = TableHost(4, table=table[rows])
        losses.append(update_policy(rollout, host, settings()).metrics()["preference/loss"])
        grads.append(host.steps[0][1])
    assert_close(torch.cat(grads) / 2, grad_whole, rtol=1e-5, atol=1e-7)  # DDP's mean over the two processes
    assert_close(sum(losses) / 2, metrics_whole["preference/loss"])


def test_sharded_parameters_pad_the_measuring_forwards_to_the_busiest_process(monkeypatch):
    """With sharded parameters (``host.lockstep``) every forward is a collective: a process that measures fewer
    rows than another runs as many no-grad forwards (on row 0, discarded); the gradient is unchanged."""
    from dapo_lightning import update as update_module

    rollout = replayed_group_1()
    plain, sharded = TableHost(8), TableHost(8)
    sharded.lockstep = True
    update_policy(rollout, plain, settings())
    monkeypatch.setattr(update_module, "micro_batches_on_busiest_process", lambda count, device: count + 1)
    update_policy(rollout, sharded, settings())
    measuring = [rows for rows, grad in sharded.calls if not grad]
    assert measuring == [(4, 5, 6, 7), (0,)]
    assert torch.equal(sharded.steps[0][1], plain.steps[0][1])


def test_masked_truncated_completions_are_not_paired():
    truncated = torch.zeros(8, dtype=torch.bool)
    truncated[6] = True
    rollout = scored_rollout(truncated=truncated)
    host = TableHost(8)
    update_policy(rollout, host, UpdateSettings(loss=PolicyLossSettings(preference=ON, mask_truncated=True)))
    pairs = Pairs(top=(1, 7), bottom=(3, 5))  # group 1 without row 6: 7 (0.2), 4 (1.0), 5 (2.5)
    assert_close(host.steps[0][1], autograd_of(host.steps[0][0], rollout, pairs), rtol=1e-5, atol=1e-7)


# --- settings and set-up checks -------------------------------------------------------------------------------


def test_the_term_is_off_by_default_and_its_settings_reach_the_loss():
    assert LossConfig().settings(384).preference is None
    cfg = LossConfig(preference_weight=0.01, preference_beta=0.2, preference_margin=0.1, preference_pairs_per_group=1)
    assert cfg.settings(384).preference == PreferenceSettings(weight=0.01, beta=0.2, margin=0.1, pairs_per_group=1)


@pytest.mark.parametrize("key, value", [("preference_weight", -0.1), ("preference_weight", math.nan),
                                        ("preference_beta", 0.0), ("preference_beta", math.inf),
                                        ("preference_margin", -1.0), ("preference_pairs_per_group", 0),
                                        ("preference_pairs_per_group", 1.5)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=rf"model\.loss\.{key}: must be"):
        LossConfig(**{key: value})


def test_the_term_needs_the_accuracy_reward_and_a_vgr_provider():
    preference.check_rewards(0.0, ["format"])  # off: nothing needed
    with pytest.raises(ValueError, match=r"model\.loss\.preference_weight: 0\.1 needs the accuracy reward"):
        preference.check_rewards(0.1, ["format", "length"])

    class Provides:
        def __init__(self, *names):
            self.provides = names

    assert preference.needed_annotations(0.0, []) == frozenset()
    assert preference.needed_annotations(0.1, [Provides("vgr", "attention")]) == {"vgr"}
    with pytest.raises(ValueError, match=r"model\.loss\.preference_weight: 0\.1 needs per-sample vgr values that no "
                                         r"callback provides; add dapo_lightning\.callbacks\.AttentionMetrics"):
        preference.needed_annotations(0.1, [Provides("group_selection")])


def test_the_module_refuses_the_term_without_the_accuracy_reward():
    from dapo_lightning.config import RewardConfig
    from dapo_lightning.module import DAPOModule

    with pytest.raises(ValueError, match=r"model\.loss\.preference_weight"):
        DAPOModule(rewards=RewardConfig(reward_funcs=["format"]), loss=LossConfig(preference_weight=0.1))
