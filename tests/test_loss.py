"""The DAPO loss (SPEC section 5): hand-computed values, gradient properties, a float64 reference."""

import math

import pytest
import torch
from torch.testing import assert_close

from dapo_lightning.loss import PolicyLossSettings, aggregate, dapo_policy_loss, importance_ratio, kl_penalty, micro_batch_scale

E = math.e
# One row, three tokens. log ratio = logp - old = [0, -0.5, 0.5]
LOGPS = torch.tensor([[-1.0, -2.0, -0.5]])
OLD = torch.tensor([[-1.0, -1.5, -1.0]])
FULL = torch.ones(1, 3)


def test_token_ratio_and_clip_higher_with_positive_advantage():
    # ratio = [1, e^-0.5, e^0.5] = [1, 0.60653, 1.64872]; A = 2
    # r*A          = [2, 1.21306, 3.29744]
    # clip(r)*A    = [2, 0.8*2=1.6, 1.28*2=2.56]      (eps_low 0.2, eps_high 0.28)
    # -min(...)    = [-2, -1.21306, -2.56]; mean over 3 tokens = -5.77306 / 3
    out = dapo_policy_loss(LOGPS, OLD, torch.tensor([2.0]), FULL, PolicyLossSettings(loss_type="bnpo"))
    expected = -(2 + 2 * E**-0.5 + 2.56) / 3
    assert_close(out.loss, torch.tensor(expected))
    # only the third token is clipped, and from above
    assert_close(out.metrics["clip_ratio/high_mean"], torch.tensor(1 / 3))
    assert_close(out.metrics["clip_ratio/low_mean"], torch.tensor(0.0))
    assert_close(out.metrics["ratio_mean"], torch.tensor((1 + E**-0.5 + E**0.5) / 3))


def test_negative_advantage_clips_from_below():
    # A = -1: r*A = [-1, -0.60653, -1.64872]; clip(r)*A = [-1, -0.8, -1.28]
    # min = [-1, -0.8, -1.64872] -> loss tokens [1, 0.8, 1.64872]
    out = dapo_policy_loss(LOGPS, OLD, torch.tensor([-1.0]), FULL, PolicyLossSettings(loss_type="bnpo"))
    assert_close(out.loss, torch.tensor((1 + 0.8 + E**0.5) / 3))
    assert_close(out.metrics["clip_ratio/low_mean"], torch.tensor(1 / 3))
    assert_close(out.metrics["clip_ratio/region_mean"], torch.tensor(1 / 3))


def test_symmetric_clip_is_grpo_clip():
    # eps_high = 0.2: third token clip(r)*A = 1.2*2 = 2.4
    out = dapo_policy_loss(LOGPS, OLD, torch.tensor([2.0]), FULL, PolicyLossSettings(epsilon_high=0.2, loss_type="bnpo"))
    assert_close(out.loss, torch.tensor(-(2 + 2 * E**-0.5 + 2.4) / 3))


# Two rows of different lengths: per-token losses with A = 1 and ratio 1 are all -1,
# so the normalisers are what differ.
LOGPS2 = torch.zeros(2, 3)
MASK2 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, -1.0),  # mean over rows of (sum/len): (-2/2 + -3/3) / 2
        ("bnpo", {}, -1.0),  # -5 / 5 tokens
        ("dr_grpo", {"max_completion_length": 4}, -5 / 8),  # -5 / (2 rows * 4)
        ("dapo", {"normalizer": 10.0}, -0.5),  # -5 / 10 tokens of the whole step
        ("dapo", {}, -1.0),  # no normaliser: this batch's own tokens
    ],
)
def test_aggregation_normalisers(loss_type, kwargs, expected):
    normalizer = kwargs.pop("normalizer", None)
    out = dapo_policy_loss(LOGPS2, LOGPS2, torch.tensor([1.0, 1.0]), MASK2, PolicyLossSettings(loss_type=loss_type, **kwargs),
                           normalizer=normalizer)
    assert_close(out.loss, torch.tensor(expected))


def test_grpo_weighs_sequences_and_dapo_weighs_tokens():
    # per-token loss: row 0 = [-2, -2, pad], row 1 = [-1, -1, -1]
    per_token = torch.tensor([[-2.0, -2.0, 99.0], [-1.0, -1.0, -1.0]])
    # grpo: (-4/2 + -3/3)/2 = -1.5 ; bnpo: -7/5 = -1.4
    assert_close(aggregate(per_token, MASK2, "grpo"), torch.tensor(-1.5))
    assert_close(aggregate(per_token, MASK2, "bnpo"), torch.tensor(-1.4))


def test_sequence_level_ratio_is_geometric_mean_over_valid_tokens():
    # masked mean log ratio of row [0, -0.5, (0.5 masked)] = -0.25 -> every token's ratio e^-0.25
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ratio = importance_ratio(LOGPS, OLD, mask, "sequence")
    assert ratio.shape == (1, 3)
    assert_close(ratio, torch.full((1, 3), E**-0.25))
    # A = 1: r = 0.7788 is inside [0.8, 1.28]? no: below 0.8 but A > 0 so min picks r: loss = -0.7788
    out = dapo_policy_loss(LOGPS, OLD, torch.tensor([1.0]), mask, PolicyLossSettings(importance_sampling_level="sequence", loss_type="bnpo"))
    assert_close(out.loss, torch.tensor(-(E**-0.25)))


def test_kl_penalty_k3_and_beta():
    # d = ref - logp = [0, 1]: k3 = [e^0 - 0 - 1, e^1 - 1 - 1] = [0, e - 2]
    logps = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0]])
    assert_close(kl_penalty(logps, ref), torch.tensor([[0.0, E - 2]]))
    out = dapo_policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), PolicyLossSettings(beta=0.5, loss_type="bnpo"), ref_logps=ref)
    # advantage 0: the loss is the KL term alone, 0.5 * mean([0, e - 2])
    assert_close(out.loss, torch.tensor(0.5 * (E - 2) / 2))
    assert_close(out.metrics["kl"], torch.tensor((E - 2) / 2))
    with pytest.raises(ValueError, match="ref_logps"):
        dapo_policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), PolicyLossSettings(beta=0.5))


def test_masked_tokens_get_zero_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = dapo_policy_loss(logps, OLD, torch.tensor([1.5]), mask)
    out.loss.backward()
    assert logps.grad[0, 2] == 0
    assert (logps.grad[0, :2] != 0).all()


def test_higher_advantage_gives_lower_loss():
    losses = [float(dapo_policy_loss(LOGPS, OLD, torch.tensor([a]), FULL).loss) for a in (-1.0, 0.0, 0.5, 2.0)]
    assert losses == sorted(losses, reverse=True)


def test_per_token_advantages_multiply_in():
    # advantages [1, T] = A * w with w = [2, 0, 1] and ratio 1: loss = -(2 + 0 + 1) / 3
    out = dapo_policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[2.0, 0.0, 1.0]]), FULL, PolicyLossSettings(loss_type="bnpo"))
    assert_close(out.loss, torch.tensor(-1.0))


def test_dapo_normaliser_across_micro_batches_matches_one_batch():
    torch.manual_seed(0)
    logps = torch.randn(6, 5, requires_grad=True)
    old = logps.detach() + 0.1 * torch.randn(6, 5)
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    whole = dapo_policy_loss(logps, old, adv, mask, PolicyLossSettings(loss_type="bnpo"))
    (g_whole,) = torch.autograd.grad(whole.loss, logps)
    total_tokens = mask.sum()
    micro = [slice(0, 2), slice(2, 6)]  # uneven micro-batches
    acc = torch.zeros(())
    for rows in micro:
        out = dapo_policy_loss(logps[rows], old[rows], adv[rows], mask[rows], normalizer=total_tokens)
        acc = acc + out.loss * micro_batch_scale("dapo", len(micro))
    (g_micro,) = torch.autograd.grad(acc, logps)
    assert_close(acc, whole.loss)
    assert_close(g_micro, g_whole)
    # the same step split over 2 processes: each divides by global tokens / 2, DDP averages the gradients
    halves = [slice(0, 3), slice(3, 6)]
    per_rank = [dapo_policy_loss(logps[h], old[h], adv[h], mask[h], normalizer=total_tokens / 2).loss for h in halves]
    assert_close(sum(per_rank) / 2, whole.loss)


def _reference_loss(logps, old, adv, mask, eps_low, eps_high, level, loss_type, max_len):
    """Plain Python float64 loops, written straight from SPEC section 5."""
    N, T = len(logps), len(logps[0])
    per_token = [[0.0] * T for _ in range(N)]
    for i in range(N):
        n_valid = sum(mask[i])
        seq = sum((logps[i][t] - old[i][t]) * mask[i][t] for t in range(T)) / max(n_valid, 1)
        for t in range(T):
            r = math.exp(seq) if level == "sequence" else math.exp(logps[i][t] - old[i][t])
            c1 = r * adv[i]
            c2 = min(max(r, 1 - eps_low), 1 + eps_high) * adv[i]
            per_token[i][t] = -min(c1, c2)
    if loss_type == "grpo":
        return sum(sum(per_token[i][t] * mask[i][t] for t in range(T)) / max(sum(mask[i]), 1) for i in range(N)) / N
    total = sum(per_token[i][t] * mask[i][t] for i in range(N) for t in range(T))
    if loss_type == "dr_grpo":
        return total / (N * max_len)
    return total / sum(sum(m) for m in mask)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_matches_float64_reference_on_random_inputs(level, loss_type):
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=g) > 0.25).double()
    mask[:, 0] = 1
    out = dapo_policy_loss(logps, old, adv, mask, PolicyLossSettings(importance_sampling_level=level, loss_type=loss_type,
                                                                     max_completion_length=9))
    expected = _reference_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, level, loss_type, 9)
    assert_close(out.loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="loss_type"):
        dapo_policy_loss(LOGPS, OLD, torch.tensor([1.0]), FULL, PolicyLossSettings(loss_type="ppo"))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        dapo_policy_loss(LOGPS, OLD, torch.tensor([1.0]), FULL, PolicyLossSettings(importance_sampling_level="group"))
