"""Every YAML under configs/ through the CLI; SPEC 8's table; overlays change exactly what they say, on every
experiment they apply to; named callbacks; one run folder per stack of configs; strategies.

Parsing uses the CLI's own parser (built once: LightningCLI builds it slowly); the
experiment smoke runs go through ``dapo_lightning.cli.main`` like a user's command.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dyn_helpers import scalars
from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer

from dapo_lightning.cli import DAPOLightningCLI, expand_run_folder, main, ordered_callbacks
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.hooks import check_callbacks
from dapo_lightning.module import DAPOModule
from dapo_lightning.rewards import get_reward_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
EXPERIMENTS = ["exp1", "exp2", "exp3", "exp4", "exp5", "lora"]
TOP_LEVEL = sorted(p.name for p in CONFIGS.glob("*.yaml"))
ABLATIONS = sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / "ablations").rglob("*.yaml"))
STRATEGIES = sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / "strategies").glob("*.yaml"))
# benchmarks/demo_seeds.py's overlays, stacked on the demo (benchmarks/configs/text_bias.yaml stacks on the experiments)
BENCHMARK_OVERLAYS = sorted(str(p) for p in (ROOT / "benchmarks" / "configs").glob("demo_*.yaml"))


class ParseOnlyCLI(DAPOLightningCLI):
    def instantiate_classes(self) -> None:  # keep the parser, build nothing
        pass


@pytest.fixture(scope="module")
def parser():
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    cli = ParseOnlyCLI(DAPOModule, VisualMCQDataModule, run=False, args=["--config", str(CONFIGS / "demo.yaml")],
                       auto_configure_optimizers=False)
    return cli.parser


def parse(parser, *configs, overrides=()):
    args = []
    for config in configs:
        args += ["--config", str(CONFIGS / config) if not Path(config).is_absolute() else config]
    return parser.parse_args([*args, *overrides])


def test_every_yaml_under_configs_is_covered():
    every = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert every == set(TOP_LEVEL) | set(ABLATIONS) | set(STRATEGIES)
    assert {"demo.yaml", "cpu.yaml", *(f"{e}.yaml" for e in EXPERIMENTS)} <= set(TOP_LEVEL)
    assert len(ABLATIONS) == 13 + 18 and len(STRATEGIES) == 4 and BENCHMARK_OVERLAYS


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_config_parses(parser, name):
    import yaml

    policy = yaml.safe_load((CONFIGS / name).read_text()).get("model", {}).get("policy") or {}
    complete = "model_name_or_path" in policy
    cfg = parse(parser, name) if complete else parse(parser, "demo.yaml", name)  # an overlay: on the demo
    assert cfg.model.policy.model_name_or_path and cfg.data


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_overlay_parses(parser, name):
    parse(parser, "demo.yaml", name)


@pytest.mark.parametrize("path", BENCHMARK_OVERLAYS)
def test_benchmark_overlay_parses_on_the_demo(parser, path):
    parse(parser, "demo.yaml", path)


def test_a_config_prints_through_the_cli_entry_point(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "exp3.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in capsys.readouterr().out


# --- SPEC 8 ----------------------------------------------------------------------------------------------

ACC_VGR = ["accuracy", "vgr", "format", "length"]
HARD = ["accuracy", "vgr_hard_negative", "format", "length"]
# SPEC 8's table: reward_funcs, reward_weights, early_reward_weights, filter_min_reward, epochs, token weights, LoRA,
# eval generations, prompts per process (TRL's per-device completions x accumulation / 8), completions per
# forward (TRL's per-device batch), eval batch, prompt / completion length, checkpoint every n steps
SPEC8 = {
    "exp1": (ACC_VGR, [2.5, 0.0, 0.5, 1.0], [1.0, 0.0, 2.0, 1.0], 1.5, 2, False, False, 4, 4, 4, 8, 1024, 384, 400),
    "exp2": (ACC_VGR, [0.0, 2.5, 0.5, 1.0], [0.0, 1.0, 2.0, 1.0], 1.5, 2, False, False, 4, 4, 4, 8, 1024, 384, 400),
    "exp3": (ACC_VGR, [2.5, 1.0, 0.5, 1.0], [1.0, 1.0, 2.0, 1.0], 1.5, 2, False, False, 4, 4, 4, 8, 1024, 384, 400),
    "exp4": (HARD, [2.5, 1.0, 0.5, 1.0], [1.0, 1.0, 2.0, 1.0], 1.0, 1, False, False, 4, 4, 4, 8, 1024, 384, 400),
    "exp5": (ACC_VGR, [2.5, 0.0, 0.5, 1.0], [1.0, 0.0, 2.0, 1.0], 1.5, 1, True, True, 2, 2, 4, 4, 1024, 384, 400),
    "lora": (HARD, [2.5, 1.0, 0.5, 1.0], [1.0, 1.0, 2.0, 1.0], 1.5, 1, False, True, 2, 1, 1, 4, 2048, 512, 500),
}


def build(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def effective_callbacks(cfg) -> list[dict]:
    """{class_path, init_args} of each callback the trainer gets, in order: the named ones as the CLI orders them
    (``cli.ordered_callbacks``), then the plain ``trainer.callbacks`` list."""
    config = cfg.as_dict()
    named = {name: spec for name, spec in (config.get("callbacks") or {}).items() if spec is not None}
    built = {name: build(spec) for name, spec in named.items()}
    name_of = {id(instance): name for name, instance in built.items()}
    listed = config["trainer"].get("callbacks") or []
    return [named[name_of[id(c)]] for c in ordered_callbacks(built)] + (listed if isinstance(listed, list) else [listed])


def callback(cfg, name):
    found = [c for c in effective_callbacks(cfg) if c["class_path"].endswith("." + name)]
    return SimpleNamespace(**found[0].get("init_args") or {}) if found else None


def check_stack(cfg) -> None:
    """The set-up checks the module runs before the model loads: callbacks' needs, rewards' inputs, order."""
    rewards = cfg.model.rewards
    callbacks = [build(spec) for spec in effective_callbacks(cfg)]
    check_callbacks(callbacks, [get_reward_spec(name) for name in rewards.reward_funcs],
                    rewards.reward_weights or [1.0] * len(rewards.reward_funcs))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_reproduces_spec_8(parser, name):
    (funcs, weights, early, min_reward, epochs, token_weights, lora, eval_generations, prompts, per_forward,
     eval_batch, prompt_length, completion_length, checkpoint_every) = SPEC8[name]
    cfg = parse(parser, f"{name}.yaml")
    check_stack(cfg)
    assert not cfg.trainer.callbacks  # every callback named: an overlay can switch one off or change one setting
    # common settings
    assert cfg.model.policy.model_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert cfg.model.policy.dtype == "bfloat16" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.policy.gradient_checkpointing
    assert cfg.trainer.strategy.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert cfg.trainer.strategy.init_args.config == "configs/deepspeed_zero2.json"
    assert cfg.model.rollout.num_generations == 8
    assert (cfg.model.optim.learning_rate, cfg.model.optim.lr_scheduler, cfg.model.optim.warmup_ratio) == (1e-5,
                                                                                                         "cosine", 0.05)
    assert cfg.model.optim.max_grad_norm == 1.0 and cfg.model.rewards.soft_punish_cache == 50
    assert cfg.trainer.val_check_interval == 10
    # epsilon 0.2 with epsilon_high unset: the upper clip was 0.2 too; beta 0, dapo, group scaling, no truncation mask
    assert (cfg.model.loss.epsilon_low, cfg.model.loss.epsilon_high, cfg.model.loss.beta) == (0.2, 0.2, 0.0)
    assert cfg.model.loss.loss_type == "dapo" and cfg.model.rewards.scale_rewards == "group"
    assert cfg.model.loss.mask_truncated_completions is False
    assert callback(cfg, "AttentionMetrics") is not None and callback(cfg, "MarkdownRolloutLog") is not None
    buffer = callback(cfg, "ReplayBuffer")
    assert (buffer.replay_buffer_size, buffer.replay_var_epsilon) == (64, 1e-6)
    assert callback(cfg, "ModelCheckpoint").save_last
    # the table's row
    assert cfg.model.rewards.reward_funcs == funcs and cfg.model.rewards.reward_weights == weights
    assert callback(cfg, "RewardWeightWarmup").early_reward_weights == early
    assert buffer.filter_min_reward == min_reward
    assert cfg.trainer.max_epochs == epochs and cfg.trainer.max_steps == -1
    assert cfg.model.rollout.eval_num_generations == eval_generations
    assert cfg.data.batch_size == prompts and cfg.model.optim.micro_batch_size == per_forward
    assert cfg.data.eval_batch_size == eval_batch
    assert (cfg.data.max_prompt_length, cfg.model.rollout.max_completion_length) == (prompt_length, completion_length)
    assert callback(cfg, "ModelCheckpoint").every_n_train_steps == checkpoint_every
    tw = callback(cfg, "TokenWeights")
    assert (tw is not None) == token_weights
    if tw is not None:  # every token, no top-k (the original's final code), sigma 1.0
        assert tw.smooth_sigma == 1.0 and tw.topk_ratio is None
    assert (cfg.model.policy.lora is not None) == lora
    if lora:
        assert cfg.model.policy.lora.target_modules == ["q_proj", "v_proj"]


# --- overlays change exactly what they say, on every experiment they apply to ------------------------------


def flat(tree, prefix=""):
    """{dotted key: value} of a config, into the named callbacks map too; tuples as lists."""
    out = {}
    for key, value in tree.items():
        if key == "__path__" or (not prefix and key == "config"):
            continue
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def class_defaults(class_path: str) -> dict:
    module, _, name = class_path.rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters.values()
    return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default
            for p in parameters if p.default is not inspect.Parameter.empty}


def expected_after(before: dict, named: dict) -> dict:
    """``before`` (a flat config) with what an overlay names applied as the CLI merges it: a callback switched off
    (``callbacks.NAME: None``) loses its settings; one switched on that the base lacks has its class's defaults
    where the overlay names nothing; one the base has keeps its other settings (exp 5's TokenWeights)."""
    after = dict(before)
    for key, value in named.items():
        parts = key.split(".")
        if parts[0] == "callbacks":
            entry = ".".join(parts[:2])
            if len(parts) == 2 and value is None:
                after = {k: v for k, v in after.items() if not k.startswith(entry + ".")}
            elif f"{entry}.class_path" not in after:
                after.pop(entry, None)
                class_path = named[f"{entry}.class_path"]
                after[f"{entry}.class_path"] = class_path
                after.update({f"{entry}.init_args.{k}": v for k, v in class_defaults(class_path).items()})
        after[key] = value
    return after


def switched_on(name: str, class_path: str, **init_args) -> dict:
    """What an overlay names to add the callback ``name`` (or, where the base has it, to change these settings)."""
    return {f"callbacks.{name}.class_path": class_path,
            **{f"callbacks.{name}.init_args.{key}": value for key, value in init_args.items()}}


ALL = EXPERIMENTS
NOT_VGR_ONLY = [e for e in EXPERIMENTS if e != "exp2"]  # exp 2 trains on the attention reward alone
# without the attention capture: nothing for exp 2's reward nor for exp 5's token weights to read
NEITHER_VGR_ONLY_NOR_TOKEN_WEIGHTS = [e for e in EXPERIMENTS if e not in ("exp2", "exp5")]
NO_VGR = {"model.rewards.reward_weights": [2.5, 0.0, 0.5, 1.0],
          "callbacks.reward_weight_warmup.init_args.early_reward_weights": [1.0, 0.0, 2.0, 1.0]}
DYNAMIC_SAMPLING = switched_on("dynamic_sampling", "dapo_lightning.callbacks.DynamicSampling", oversample_factor=1.0,
                               max_tries=3, keep_if="reward_std")
OVERLAYS = {  # overlay: (the experiments it applies to, what it names)
    "ablations/no_vgr.yaml": (NOT_VGR_ONLY, NO_VGR),
    "ablations/hard_negative.yaml": (ALL, {"model.rewards.reward_funcs": HARD}),
    "ablations/token_weights.yaml": (ALL, switched_on("token_weights", "dapo_lightning.callbacks.TokenWeights",
                                                      topk_ratio=0.4, smooth_sigma=1.0, clip=[0.2, 3.0])),
    "ablations/no_replay_buffer.yaml": (ALL, {"callbacks.replay_buffer": None}),
    "ablations/dynamic_sampling.yaml": (ALL, DYNAMIC_SAMPLING),
    "ablations/dynamic_sampling_only.yaml": (ALL, {**DYNAMIC_SAMPLING, "callbacks.replay_buffer": None}),
    "ablations/no_reward_warmup.yaml": (ALL, {"callbacks.reward_weight_warmup": None}),
    "ablations/no_attention_metrics.yaml": (NEITHER_VGR_ONLY_NOR_TOKEN_WEIGHTS,
                                            {"callbacks.attention_metrics": None, **NO_VGR}),
    "ablations/no_markdown_log.yaml": (ALL, {"callbacks.markdown_rollout_log": None}),
    "ablations/modality_probe.yaml": (ALL, switched_on("modality_probe", "dapo_lightning.callbacks.ModalityProbe",
        variants=["image_text", "image_only", "text_black", "text_white", "text_noise"])),
    "ablations/grpo.yaml": (ALL, {"callbacks.replay_buffer": None, "callbacks.dynamic_sampling": None,
                                  "model.loss.epsilon_high": 0.2}),
    "ablations/clip_higher.yaml": (ALL, {"model.loss.epsilon_high": 0.28}),
    "ablations/preference_shaping.yaml": (ALL, {"model.loss.preference_weight": 0.01}),  # SPEC 9
}
for _topk in (0.2, 0.4, 0.6):
    for _sigma in (0.0, 1.0, 2.0):
        for _clip in ((0.5, 2.0), (0.2, 3.0)):
            OVERLAYS[f"ablations/token_weights_grid/topk{_topk}_sigma{_sigma}_clip{_clip[0]}-{_clip[1]}.yaml"] = (
                ["exp1", "exp3", "exp5"],  # without token weights, and exp 5's own (its other settings kept)
                switched_on("token_weights", "dapo_lightning.callbacks.TokenWeights", topk_ratio=_topk,
                            smooth_sigma=_sigma, clip=list(_clip)))
CASES = [(overlay, experiment) for overlay, (applies_to, _) in sorted(OVERLAYS.items()) for experiment in applies_to]
_BASES: dict[str, dict] = {}


def test_every_ablation_has_an_expected_change():
    assert set(OVERLAYS) == set(ABLATIONS)
    assert all({"exp1", "exp3"} <= set(applies_to) for applies_to, _ in OVERLAYS.values())


@pytest.mark.parametrize("overlay, experiment", CASES)
def test_an_overlay_changes_exactly_what_it_names_on_every_experiment(parser, overlay, experiment):
    """Stacked on each experiment it applies to, an overlay changes the keys it names and nothing else (an overlay
    used to restate exp 3's callbacks, silently giving exp 1 exp 3's early weights); the stack passes set-up."""
    _, named = OVERLAYS[overlay]
    if experiment not in _BASES:
        _BASES[experiment] = flat(parse(parser, f"{experiment}.yaml").as_dict())
    stacked = parse(parser, f"{experiment}.yaml", overlay)
    assert flat(stacked.as_dict()) == expected_after(_BASES[experiment], named)
    check_stack(stacked)


def test_no_replay_buffer_on_exp1_keeps_exp1s_early_weights(parser):
    cfg = parse(parser, "exp1.yaml", "ablations/no_replay_buffer.yaml")
    assert callback(cfg, "ReplayBuffer") is None
    assert callback(cfg, "RewardWeightWarmup").early_reward_weights == [1.0, 0.0, 2.0, 1.0]  # exp 1's, not exp 3's
    assert cfg.model.rewards.reward_weights == [2.5, 0.0, 0.5, 1.0]


def names(callbacks):
    return [c["class_path"].rsplit(".", 1)[1] for c in callbacks]


def test_overlays_stack_on_each_other_in_a_documented_order(parser):
    """Names keep the place their first config gave them; a new one follows, except that dynamic sampling (which
    provides the group selection the replay buffer runs after) moves just before the replay buffer."""
    cfg = parse(parser, "exp1.yaml", "ablations/no_reward_warmup.yaml", "ablations/token_weights.yaml",
                "ablations/dynamic_sampling.yaml", "ablations/token_weights_grid/topk0.2_sigma2.0_clip0.5-2.0.yaml")
    assert names(effective_callbacks(cfg)) == ["AttentionMetrics", "DynamicSampling", "ReplayBuffer",
                                               "MarkdownRolloutLog", "ModelCheckpoint", "TokenWeights"]
    tw = callback(cfg, "TokenWeights")
    assert (tw.topk_ratio, tw.smooth_sigma, list(tw.clip)) == (0.2, 2.0, [0.5, 2.0])  # the last overlay's
    assert callback(cfg, "ReplayBuffer").filter_min_reward == 1.5  # exp 1's, untouched
    check_stack(cfg)


def test_a_named_callback_is_changed_or_added_from_the_command_line(parser):
    cfg = parse(parser, "exp4.yaml", overrides=["--callbacks.replay_buffer.init_args.replay_buffer_size=8",
                                                "--callbacks.markdown_rollout_log=null"])
    buffer = callback(cfg, "ReplayBuffer")
    assert (buffer.replay_buffer_size, buffer.filter_min_reward) == (8, 1.0)  # exp 4's filter kept
    assert callback(cfg, "MarkdownRolloutLog") is None


def test_a_misspelt_name_is_an_error_that_says_so(parser, tmp_path, capsys):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("callbacks:\n  replay_bufer:\n    init_args:\n      replay_buffer_size: 8\n")
    with pytest.raises(SystemExit):
        parse(parser, "exp1.yaml", str(overlay))
    assert (f"{overlay}: callbacks.replay_bufer has no class_path, and no earlier config switches on a callback "
            "named 'replay_bufer' (on so far: attention_metrics, reward_weight_warmup, replay_buffer, "
            "markdown_rollout_log, model_checkpoint)") in capsys.readouterr().err


def test_the_order_follows_the_declarations_and_names_a_cycle():
    class Provides:
        def __init__(self, provides=(), runs_after=()):
            self.provides, self.runs_after = provides, runs_after

    a, b, c = Provides(runs_after=("x",)), Provides(), Provides(provides=("x",), runs_after=("y",))
    d = Provides(provides=("y",))
    assert ordered_callbacks({"a": a, "off": None, "b": b, "c": c, "d": d}) == [d, c, a, b]
    with pytest.raises(ValueError, match=r"callbacks: a -> c -> a: each runs after what the next one provides"):
        ordered_callbacks({"a": Provides(provides=("y",), runs_after=("x",)), "c": c})


def test_a_plain_callbacks_list_still_works(parser):
    reference = ROOT / "tests" / "reference" / "every_callback.yaml"
    cfg = parse(parser, str(reference))
    assert not cfg.callbacks
    assert names(effective_callbacks(cfg)) == ["AttentionMetrics", "TokenWeights", "RewardWeightWarmup",
                                               "DynamicSampling", "ReplayBuffer", "ModalityProbe",
                                               "MarkdownRolloutLog"]


def test_the_trainer_gets_the_named_callbacks_then_the_list(tmp_path, monkeypatch, tiny_model_dir, synthetic_parquet):
    monkeypatch.setattr(sys, "argv", ["dapo-lightning"])
    cli = DAPOLightningCLI(DAPOModule, VisualMCQDataModule, run=False, auto_configure_optimizers=False, args=[
        "--config", str(CONFIGS / "demo.yaml"), "--config", str(ROOT / "benchmarks" / "configs" / "demo_dapo.yaml"),
        "--trainer.callbacks+=dapo_lightning.callbacks.ModalityProbe", f"--trainer.default_root_dir={tmp_path}",
        f"--model.policy.model_name_or_path={tiny_model_dir}", f"--data.train_path={synthetic_parquet}"])
    from lightning.pytorch.callbacks import ProgressBar

    ours = [type(c).__name__ for c in cli.trainer.callbacks
            if type(c).__module__.startswith("dapo_lightning") and not isinstance(c, ProgressBar)]
    assert ours == ["DynamicSampling", "ReplayBuffer", "ModalityProbe", "ContinuousLogSteps", "GracefulShutdown"]
    check_callbacks(cli.trainer.callbacks, cli.model.reward_specs, cli.model.reward_cfg.weights)


def test_the_attention_overlay_merges_into_the_demos_callbacks(parser):
    """configs/attention.yaml names the demo's two diagnostics' new settings and adds token weights."""
    cfg = parse(parser, "demo.yaml", "attention.yaml")
    assert names(effective_callbacks(cfg)) == ["AttentionMetrics", "MarkdownRolloutLog", "TokenWeights"]
    attention, markdown = callback(cfg, "AttentionMetrics"), callback(cfg, "MarkdownRolloutLog")
    assert (attention.every_n_steps, attention.on_validation, attention.variant) == (1, True, "original")
    assert (markdown.every_n_steps, markdown.samples_per_step, markdown.eval_samples) == (10, 4, 8)
    assert callback(cfg, "TokenWeights").topk_ratio is None
    check_stack(cfg)


@pytest.mark.parametrize("path", BENCHMARK_OVERLAYS)
def test_a_benchmark_overlay_switches_the_demos_diagnostics_off(parser, path):
    cfg = parse(parser, "demo.yaml", path)
    expected = ["DynamicSampling", "ReplayBuffer"] if path.endswith("demo_dapo.yaml") else []
    assert names(effective_callbacks(cfg)) == expected
    check_stack(cfg)


ABLATION_TABLE = ["exp1", "exp2", "exp3", "exp4", "exp5", "exp3+preference_shaping", "exp3+grpo",
                  *(f"exp3+{p.stem}" for p in sorted((ROOT / "benchmarks" / "configs" / "ablations").glob("*.yaml")))]


@pytest.mark.parametrize("experiment", ABLATION_TABLE)
def test_the_text_bias_overlay_keeps_each_experiments_rewards_and_runs_the_tiny_model(parser, experiment):
    """benchmarks/ablations.py: expN [+ overlays] + benchmarks/configs/text_bias.yaml changes the model, the lengths,
    the data and the diagnostics, never the rewards, their weights, the warm-up or the replay buffer."""
    from benchmarks.ablations import TEXT_BIAS, experiment_configs

    stack = [str(p) for p in experiment_configs(experiment)]
    own, cfg = parse(parser, *stack), parse(parser, *stack, str(TEXT_BIAS))
    assert cfg.model.rewards.reward_funcs == own.model.rewards.reward_funcs
    assert cfg.model.rewards.reward_weights == own.model.rewards.reward_weights
    for name in ("RewardWeightWarmup", "ReplayBuffer", "TokenWeights", "DynamicSampling"):
        assert callback(cfg, name) == callback(own, name), name
    assert cfg.model.loss == own.model.loss  # clip range, preference term
    assert cfg.model.optim.warmup_ratio == own.model.optim.warmup_ratio == 0.05  # the warm-up stays 5% of the steps
    assert names(effective_callbacks(cfg))[-2:] == ["TextBiasMetrics", "ModalityProbe"]
    assert callback(cfg, "AttentionMetrics").every_n_steps == 1
    assert callback(cfg, "ModelCheckpoint") is None and callback(cfg, "MarkdownRolloutLog") is None
    assert callback(cfg, "ModalityProbe").variants == ["image_text", "text_black"]
    policy, rollout = cfg.model.policy, cfg.model.rollout
    assert (policy.model_name_or_path, policy.lora, policy.dtype) == (".cache/models/tiny", None, "float32")
    assert (rollout.num_generations, rollout.max_completion_length, rollout.eval_greedy) == (8, 2, True)
    assert (cfg.trainer.accelerator, cfg.trainer.strategy, cfg.trainer.precision) == ("cpu", "auto", "32-true")
    assert (cfg.data.batch_size, cfg.data.build_synthetic_if_missing["task"], cfg.data.system_prompt) == (
        8, "text_bias", None)
    check_stack(cfg)


# --- one run folder per stack of configs ------------------------------------------------------------------------


@pytest.mark.parametrize("stack, folder", [
    (["exp3"], "runs/exp3"), (["exp3", "cpu"], "runs/exp3+cpu"), (["exp5", "cpu"], "runs/exp5+cpu"),
    (["exp1", "ablations/no_replay_buffer", "cpu"], "runs/exp1+no_replay_buffer+cpu"), (["demo"], "runs/demo"),
])
def test_each_stack_of_configs_has_its_own_run_folder(parser, stack, folder):
    """``configs/cpu.yaml`` used to send every experiment's smoke run to runs/cpu-smoke (a resume of exp 5 took
    exp 3's checkpoint); an ablation shared its experiment's folder the same way."""
    cfg = parse(parser, *(f"{name}.yaml" for name in stack))
    expand_run_folder(cfg)
    assert cfg.trainer.default_root_dir == folder


def test_print_config_names_the_run_folder(capsys, monkeypatch):
    import yaml

    monkeypatch.setattr(sys, "argv", ["dapo-lightning"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "exp5.yaml"), "--config", str(CONFIGS / "cpu.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["default_root_dir"] == "runs/exp5+cpu"


# --- strategies ---------------------------------------------------------------------------------------------


def instantiate_strategy(parser, overlay, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(ROOT)  # the configs name the DeepSpeed JSON relative to the repository root
    cfg = parse(parser, "demo.yaml", overlay, overrides=["--model.policy.model_name_or_path", str(tiny_model_dir)])
    return cfg, parser.instantiate_classes(cfg).trainer.strategy


@pytest.mark.parametrize(
    "overlay, json_file, offload",
    [("strategies/deepspeed.yaml", "deepspeed_zero2.json", "none"),
     ("strategies/deepspeed_offload.yaml", "deepspeed_zero2_offload.json", "cpu")],
)
def test_deepspeed_strategy_is_built_from_the_json(parser, monkeypatch, tiny_model_dir, overlay, json_file, offload):
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cfg, strategy = instantiate_strategy(parser, overlay, monkeypatch, tiny_model_dir)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config == json.loads((CONFIGS / json_file).read_text())
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == offload
    assert strategy.config["bf16"]["enabled"] is True
    # several manual_backward calls per optimizer step: step() owns the accumulation boundary, and
    # Lightning's accumulate_grad_batches (1) must stay the only gradient_accumulation_steps
    assert strategy.config["managed_gradient_accumulation"] is False
    assert "gradient_accumulation_steps" not in strategy.config
    assert strategy.config["gradient_clipping"] == 1.0
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, precision=cfg.trainer.precision, logger=False)
    assert isinstance(trainer.precision_plugin, DeepSpeedPrecision)
    assert trainer.precision_plugin.precision == "bf16-mixed"


def test_deepspeed_version_supports_caller_owned_accumulation():
    import deepspeed.runtime.config as ds_config

    assert hasattr(ds_config, "get_managed_gradient_accumulation")  # DeepSpeed >= the release that added it


def test_ddp_strategy_overlay(parser, monkeypatch, tiny_model_dir):
    from lightning.pytorch.strategies import DDPStrategy

    cfg, strategy = instantiate_strategy(parser, "strategies/ddp.yaml", monkeypatch, tiny_model_dir)
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs["find_unused_parameters"] is False
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.policy.dtype == "float32"


def test_fsdp_strategy_overlay(parser, monkeypatch, tiny_model_dir):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

    cfg, strategy = instantiate_strategy(parser, "strategies/fsdp.yaml", monkeypatch, tiny_model_dir)
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded" and strategy.kwargs["use_orig_params"] is True  # Lightning's default
    assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == {Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock}
    assert cfg.trainer.precision == "bf16-mixed"


# --- every experiment end to end on the CPU -------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_two_steps_on_the_cpu(tmp_path, monkeypatch, tiny_model_dir, synthetic_parquet, name):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--config", str(CONFIGS / "cpu.yaml"),
          "--model.policy.model_name_or_path", str(tiny_model_dir), "--data.train_path", str(synthetic_parquet),
          "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar=false"])
    losses = scalars(tmp_path / "run", "train/loss")
    assert [step for step, _ in losses] == [0, 1] and all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert len(scalars(tmp_path / "run", "val/accuracy")) == 1
    assert scalars(tmp_path / "run", "train/replay/fill")  # the buffer ran
    if SPEC8[name][2][1] or SPEC8[name][1][1]:
        assert scalars(tmp_path / "run", "train/rewards/vgr/mean") or scalars(
            tmp_path / "run", "train/rewards/vgr_hard_negative/mean")
    assert (tmp_path / "run" / "final").exists()


def test_a_deepspeed_config_with_managed_accumulation_is_refused():
    """ZeRO-2 with managed accumulation keeps only the last micro-batch's gradient: the module refuses it."""
    from dapo_lightning.config import OptimConfig
    from dapo_lightning.fit_checks import deepspeed_accumulation_problem

    ours = json.loads((CONFIGS / "deepspeed_zero2.json").read_text())
    assert deepspeed_accumulation_problem(ours, OptimConfig(micro_batch_size=4)) is None
    managed = {k: v for k, v in ours.items() if k != "managed_gradient_accumulation"}
    problem = deepspeed_accumulation_problem(managed, OptimConfig(micro_batch_size=4))
    assert problem.startswith('trainer.strategy: the DeepSpeed config must set "managed_gradient_accumulation": false')
    assert deepspeed_accumulation_problem(managed, OptimConfig(micro_batch_size=None)) is None  # one backward a step
