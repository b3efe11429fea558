"""Extra rollouts (dynamic-sampling rounds, probe variants) are not mixed into the attention curves."""

from types import SimpleNamespace

from dapo_lightning.callbacks.attention_metrics import AttentionMetrics


def _rollout(stage, requested_by):
    return SimpleNamespace(stage=stage, requested_by=requested_by, is_extra=requested_by is not None, annotations={})


def test_extra_rollouts_are_captured_only_when_a_reward_needs_vgr():
    callback = AttentionMetrics(every_n_steps=1, on_validation=True)
    module = SimpleNamespace(needed_annotations=frozenset())
    assert callback.teacher_forced_recorder(None, module, _rollout("val", "probe:black_image")) is None
    assert callback.teacher_forced_recorder(None, module, _rollout("train", "dynamic_sampling")) is None


def test_extra_rollouts_do_not_advance_the_capture_cadence():
    callback = AttentionMetrics(every_n_steps=3)
    for requested_by in (None, "dynamic_sampling", "dynamic_sampling", None):
        callback.on_rollout_generated(None, None, _rollout("train", requested_by))
    assert callback.train_rollouts == 2
