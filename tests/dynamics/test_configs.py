"""Every YAML under configs/ through the CLI; SPEC 8's table; overlays change exactly what they say; strategies.

Parsing uses the CLI's own parser (built once: LightningCLI builds it slowly); the
experiment smoke runs go through ``dapo_lightning.cli.main`` like a user's command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dyn_helpers import scalars
from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer

from dapo_lightning.cli import DAPOLightningCLI, main
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.module import DAPOModule

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
EXPERIMENTS = ["exp1", "exp2", "exp3", "exp4", "exp5", "lora"]
TOP_LEVEL = sorted(p.name for p in CONFIGS.glob("*.yaml"))
ABLATIONS = sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / "ablations").rglob("*.yaml"))
STRATEGIES = sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / "strategies").glob("*.yaml"))
BENCHMARK_OVERLAYS = sorted(str(p) for p in (ROOT / "benchmarks" / "configs").glob("*.yaml"))


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
    assert len(ABLATIONS) == 12 + 18 and len(STRATEGIES) == 4 and BENCHMARK_OVERLAYS


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_config_parses(parser, name):
    import yaml

    policy = yaml.safe_load((CONFIGS / name).read_text()).get("model", {}).get("policy") or {}
    complete = "model_name_or_path" in policy
    cfg = parse(parser, name) if complete else parse(parser, "demo.yaml", name)  # an overlay: on the demo
    assert cfg.model.policy.model_name_or_path and cfg.data


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_overlay_parses_on_exp3(parser, name):
    parse(parser, "exp3.yaml", name)


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


def callback(cfg, name):
    found = [c for c in cfg.trainer.callbacks if c.class_path.endswith("." + name)]
    return found[0].init_args if found else None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_reproduces_spec_8(parser, name):
    (funcs, weights, early, min_reward, epochs, token_weights, lora, eval_generations, prompts, per_forward,
     eval_batch, prompt_length, completion_length, checkpoint_every) = SPEC8[name]
    cfg = parse(parser, f"{name}.yaml")
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


# --- overlays change exactly what they say -------------------------------------------------------------


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def names(callbacks):
    return [c["class_path"].rsplit(".", 1)[1] for c in callbacks]


def early(weights):
    return lambda cbs: [dict(c, init_args={**c["init_args"], "early_reward_weights": weights})
                        if c["class_path"].endswith("RewardWeightWarmup") else c for c in cbs]


def without(name):
    return lambda cbs: [c for c in cbs if not c["class_path"].endswith("." + name)]


def insert(before, class_path, **init_args):
    def apply(cbs):
        i = names(cbs).index(before)
        return [*cbs[:i], {"class_path": class_path, "init_args": init_args}, *cbs[i:]]

    return apply


def chain(*fns):
    def apply(cbs):
        for fn in fns:
            cbs = fn(cbs)
        return cbs

    return apply


NO_VGR = {"model.rewards.reward_weights": [2.5, 0.0, 0.5, 1.0]}
OVERLAYS = {  # overlay: (callbacks transformation, other keys that change)
    "ablations/no_vgr.yaml": (early([1.0, 0.0, 2.0, 1.0]), NO_VGR),
    "ablations/hard_negative.yaml": (chain(), {"model.rewards.reward_funcs": HARD}),
    "ablations/token_weights.yaml": (insert("RewardWeightWarmup", "dapo_lightning.callbacks.TokenWeights", topk_ratio=0.4,
                                            smooth_sigma=1.0, clip=(0.2, 3.0)), {}),
    "ablations/no_replay_buffer.yaml": (without("ReplayBuffer"), {}),
    "ablations/dynamic_sampling.yaml": (insert("ReplayBuffer", "dapo_lightning.callbacks.DynamicSampling", oversample_factor=1.0,
                                               max_tries=3, keep_if="reward_std"), {}),
    "ablations/dynamic_sampling_only.yaml": (chain(insert("ReplayBuffer", "dapo_lightning.callbacks.DynamicSampling",
                                                          oversample_factor=1.0, max_tries=3, keep_if="reward_std"),
                                                   without("ReplayBuffer")), {}),
    "ablations/no_reward_warmup.yaml": (without("RewardWeightWarmup"), {}),
    "ablations/no_attention_metrics.yaml": (chain(without("AttentionMetrics"), early([1.0, 0.0, 2.0, 1.0])), NO_VGR),
    "ablations/no_markdown_log.yaml": (without("MarkdownRolloutLog"), {}),
    "ablations/modality_probe.yaml": (insert("ModelCheckpoint", "dapo_lightning.callbacks.ModalityProbe"), {}),
    "ablations/grpo.yaml": (without("ReplayBuffer"), {}),  # exp 3 clips at 0.2 already, as the scripts ran
    "ablations/clip_higher.yaml": (chain(), {"model.loss.epsilon_high": 0.28}),
}
for _topk in (0.2, 0.4, 0.6):
    for _sigma in (0.0, 1.0, 2.0):
        for _clip in ((0.5, 2.0), (0.2, 3.0)):
            OVERLAYS[f"ablations/token_weights_grid/topk{_topk}_sigma{_sigma}_clip{_clip[0]}-{_clip[1]}.yaml"] = (
                insert("RewardWeightWarmup", "dapo_lightning.callbacks.TokenWeights", topk_ratio=_topk, smooth_sigma=_sigma,
                       clip=_clip), {})


def test_every_ablation_has_an_expected_change():
    assert set(OVERLAYS) == set(ABLATIONS)


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_ablation_overlay_changes_exactly_what_it_names(parser, name):
    transform, changed = OVERLAYS[name]
    base = parse(parser, "exp3.yaml").as_dict()
    stacked = parse(parser, "exp3.yaml", name).as_dict()
    expected = transform(base["trainer"].pop("callbacks"))
    got = stacked["trainer"].pop("callbacks")
    assert names(got) == names(expected)
    for g, e in zip(got, expected):
        g_args, e_args = g.get("init_args") or {}, e.get("init_args") or {}
        if set(g_args) == set(e_args):  # a callback of exp 3: every argument, defaults included, as expected
            assert g_args == e_args, g["class_path"]
        else:  # a callback the overlay adds: the arguments it names
            assert {k: g_args[k] for k in e_args} == e_args, g["class_path"]
    before, after = flat(base), flat(stacked)
    diff = {k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    diff = {k: v for k, v in diff.items() if "__path__" not in k and k != "config"}
    assert diff == changed


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
