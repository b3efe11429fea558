"""What attention diagnostics cost a training step: ours (AttentionMetrics) on and off, and the original approach.

    python benchmarks/attention_overhead.py                 # small offline model, completion length 256, ~5 minutes
    python benchmarks/attention_overhead.py --steps 4 --completion-length 128

The ``small`` offline Qwen2.5-VL (4 layers, 4 heads, 64 image tokens per image) trains on
the same synthetic questions in three configurations:

- ``off``: the core step;
- ``on``: ``AttentionMetrics`` (capture during generation, or in the teacher-forced pass with
  another generator) feeding the ``vgr`` reward, and ``MarkdownRolloutLog`` writing the step
  (its own share is printed);
- ``original``: the original system's way: the policy loaded with eager attention,
  ``generate(output_attentions=True, return_dict_in_generate=True)``, the generation rows
  collected step by step from the returned attentions (``attention.reference.generation_step_masses``),
  feeding the ``vgr`` reward.

``off`` and ``on`` run side by side in one process, alternating step by step (an
``AttentionMetrics`` that captures every other rollout; on the others the ``vgr`` reward has
no value, as when nothing provides it), so that load from other work on the machine hits
both alike. ``original`` runs in its own process. Rewards are [accuracy, vgr] throughout,
and every completion runs to ``--completion-length`` tokens (EOS is replaced by a token the
policy never samples), so every step does the same work.

Time: wall time per step and the process's CPU time (the fairer figure when other work
shares the cores; the run uses one thread), medians over the measured steps.
Memory: in separate processes where glibc mmaps every allocation above 64 KiB (so freed
tensors leave the resident set at once; it slows allocation, hence not used for timing),
the peak resident set size above its value at the start of the step, from the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), for the whole step
and for the rollout phase (generation + attention statistics, up to scoring), which is
where the original keeps every decode step's attention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("off", "on", "original")


# --- measurement inside a child ----------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set size (Linux >= 4.0)


def _child(args) -> None:
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from dapo_lightning.annotations import RowValues
    from dapo_lightning.attention import (CapturedAttention, SpecialTokens, attention_report, generation_rows,
                                          generation_step_masses, modality_masks)
    from dapo_lightning.batch import RolloutBatch
    from dapo_lightning.callbacks import AttentionMetrics, MarkdownRolloutLog
    from dapo_lightning.config import OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
    from dapo_lightning.data import VisualMCQDataModule
    from dapo_lightning.hooks import RolloutCallback
    from dapo_lightning.module import DAPOModule
    from dapo_lightning.rollout import completion_mask_from_eos

    torch.set_num_threads(1)

    class FullLength(DAPOModule):
        """Every completion runs to max_completion_length: EOS becomes a token the policy never samples."""

        def configure_model(self) -> None:
            super().configure_model()
            never = self.actor.token_ids.suppress[0]
            self.actor.token_ids = replace(self.actor.token_ids, eos=(never,))

    class Original(FullLength):
        """The original system: attention kept from generate(output_attentions=True), rows collected per step."""

        def sample(self, batch, stage, requested_by=None):
            start = time.perf_counter()
            settings = self.actor.sampling(stage)
            token_ids = self.actor.token_ids
            with self.actor.eval_mode(), torch.no_grad():
                inputs = {
                    "input_ids": batch.input_ids,
                    "attention_mask": batch.attention_mask,
                    "pixel_values": batch.pixel_values,
                    "image_grid_thw": batch.image_grid_thw,
                }
                if batch.mm_token_type_ids is not None:
                    inputs["mm_token_type_ids"] = batch.mm_token_type_ids
                out = self.policy.generate(
                    **inputs,
                    do_sample=True,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    top_k=settings.top_k,
                    num_return_sequences=settings.num_generations,
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=list(token_ids.eos),
                    pad_token_id=token_ids.pad,
                    suppress_tokens=list(token_ids.suppress),
                    use_cache=True,
                    output_attentions=True,
                    return_dict_in_generate=True,
                )
            P, G = batch.input_ids.shape[1], settings.num_generations
            completion_ids = out.sequences[:, P:]
            mask, truncated = completion_mask_from_eos(completion_ids, token_ids.eos)
            rollout = RolloutBatch(
                prompts=batch,
                num_generations=G,
                completion_ids=completion_ids,
                completion_mask=mask,
                completions=self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                stage=stage,
                truncated=truncated,
                replayed=torch.zeros(completion_ids.shape[0], dtype=torch.bool),
            )
            rollout.timings["generate"] = time.perf_counter() - start
            start = time.perf_counter()
            special = SpecialTokens.from_tokenizer(self.tokenizer)
            prompt_mask = batch.attention_mask.repeat_interleave(G, 0)  # [N, P]
            masks = modality_masks(batch.input_ids.repeat_interleave(G, 0), prompt_mask, special)
            text, vision = generation_step_masses(out.attentions, prompt_mask, mask, masks)
            del out
            L = text.shape[0]
            captured = CapturedAttention(text, vision, generation_rows(mask), masks.num_text, masks.num_vision,
                                         torch.ones(L, text.shape[1], dtype=torch.bool))
            report = attention_report(captured)
            rollout.annotations.update(vgr=RowValues(report.reward_vgr), attention=report, attention_tokens=captured)
            rollout.timings["attention"] = time.perf_counter() - start
            return rollout

    class ProvidesVGR(RolloutCallback):
        provides = ("vgr",)  # the Original module attaches the values itself

    class StepMeter(RolloutCallback):
        def __init__(self):
            self.steps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _reset_peak()
            self.rss = _status_kib("VmRSS")
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()
            self.rollout_peak = 0

        def on_rollout_scored(self, trainer, pl_module, rollout):
            if rollout.stage == "train" and not rollout.is_extra:
                self.rollout_peak = _status_kib("VmHWM") - self.rss
                self.rollout = rollout

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seconds = time.perf_counter() - self.start
            cpu_seconds = time.process_time() - self.cpu_start
            peak = max(_status_kib("VmHWM") - self.rss, self.rollout_peak)
            timings = {k: v for k, v in self.rollout.timings.items()}
            captured = "attention" in self.rollout.annotations
            label = "original" if args.child == "original" else ("on" if captured else "off")
            self.steps.append(
                {
                    "config": label,
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "step_peak_mib": peak / 1024,
                    "rollout_peak_mib": self.rollout_peak / 1024,
                    "timings": timings,
                }
            )

    class EveryOtherRollout(AttentionMetrics):
        """Captures training rollouts 0, 2, 4, ...: 'on' and 'off' steps alternate in one process."""

        def should_capture(self, pl_module, stage: str) -> bool:
            return self.train_rollouts % 2 == 0

    original = args.child == "original"
    seed_everything(0)
    module = (Original if original else FullLength)(
        policy=PolicyConfig(model_name_or_path=str(args.model), attn_implementation="eager" if original else "sdpa"),
        rollout=RolloutConfig(num_generations=args.num_generations, max_completion_length=args.completion_length),
        rewards=RewardConfig(reward_funcs=["accuracy", "vgr"]),
        optim=OptimConfig(learning_rate=1e-5, micro_batch_size=args.micro_batch_size),
        export_final=False,
    )
    meter = StepMeter()
    scratch = tempfile.TemporaryDirectory(prefix="bench-attention-")  # removed when the child exits
    markdown = MarkdownRolloutLog(dirpath=os.path.join(scratch.name, "markdown"), every_n_steps=2)
    callbacks = [ProvidesVGR()] if original else [EveryOtherRollout(), markdown]
    warmup = 1 if original else 2  # ours: one step of each kind
    data = VisualMCQDataModule(train_path=str(args.data), processor=str(args.model), batch_size=args.batch_size)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + args.steps * (1 if original else 2),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, meter],
        default_root_dir=os.path.join(scratch.name, "run"),
    )
    trainer.fit(module, data)
    on_steps = max(sum(1 for step in meter.steps if step["config"] == "on"), 1)
    result = {
        "steps": meter.steps[warmup:],
        "markdown_seconds_per_step": None if original else markdown.seconds / on_steps,
        "prompt_tokens": int(meter.rollout.prompts.attention_mask.sum(-1).max()),
    }
    if not original and not args.memory:
        result["teacher_forced_cpu"] = _teacher_forced_cpu_seconds(module, meter.rollout, repeats=3)
    Path(args.json).write_text(json.dumps(result))


def _teacher_forced_cpu_seconds(module, rollout, repeats: int) -> dict[str, float]:
    """Median CPU seconds of the module's teacher-forced forward over ``rollout``, without and with the capture."""
    import torch

    from dapo_lightning.attention import SpecialTokens, TeacherForcedRecorder
    from dapo_lightning.logprobs import completion_logps
    from dapo_lightning.update import row_chunks

    special = SpecialTokens.from_tokenizer(module.tokenizer)
    policy = module.policy.eval()
    times: dict[str, list[float]] = {"plain": [], "capture": []}
    for _ in range(repeats):
        for kind in times:
            recorder = TeacherForcedRecorder(policy, special, rollout.num_rows, rollout.completion_ids.shape[1])
            start = time.process_time()
            with torch.no_grad(), recorder if kind == "capture" else contextlib.nullcontext():
                for rows in row_chunks(rollout.num_rows, module.optim_cfg.micro_batch_size):
                    inputs = rollout.model_inputs(rows)
                    if kind == "capture":
                        recorder.before_chunk(rows, inputs)
                    completion_logps(policy, inputs)
            if kind == "capture":
                recorder.finish(rollout)
            times[kind].append(time.process_time() - start)
    return {kind: statistics.median(values) for kind, values in times.items()}


# --- the parent: runs the children side by side and prints the table ----------------------------------


def _build_assets(cache: Path) -> tuple[Path, Path]:
    from dapo_lightning.data_prep.synthetic import SyntheticConfig, ensure_parquet
    from dapo_lightning.data_prep.tiny_model import ensure_tiny_model

    model = ensure_tiny_model(cache / "models" / "small", size="small")
    data = ensure_parquet(cache / "data" / "synthetic-224.parquet", SyntheticConfig(rows=64, seed=0, image_size=224))
    return model, data


def _run_child(child: str, args, model: Path, data: Path, *, memory: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        if memory:
            env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        command = [sys.executable, __file__, "--child", child, "--json", str(out), "--model", str(model)]
        command += ["--data", str(data), "--steps", str(args.steps if not memory else 1)] + (
            ["--memory"] if memory else []
        )
        for flag in ("batch_size", "num_generations", "completion_length", "micro_batch_size"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{child} run failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def _median(steps: list[dict], key: str) -> float:
    return statistics.median(step[key] for step in steps)


def _phase(steps: list[dict], phase: str) -> float:
    return statistics.median(step["timings"].get(phase, 0.0) for step in steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per step, B (default 1)")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt, G (default 8)")
    parser.add_argument("--completion-length", type=int, default=256, help="tokens per completion, T (default 256)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward/backward (default 4)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench", help="model and data folder")
    parser.add_argument("--child", choices=("ours", "original"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    model, data = _build_assets(args.cache)
    started = time.perf_counter()
    timed: list[dict] = []
    measured: list[dict] = []
    results = {}
    for child in ("ours", "original"):
        for memory in (False, True):
            result = _run_child(child, args, model, data, memory=memory)
            (measured if memory else timed).extend(result["steps"])
            results[(child, memory)] = result
            kind = "memory" if memory else "time"
            print(f"{child} ({kind}) done, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    N = args.batch_size * args.num_generations
    P = results[("ours", False)]["prompt_tokens"]
    print(
        f"\nsmall offline Qwen2.5-VL, B={args.batch_size} x G={args.num_generations} = {N} rows, prompt {P} tokens, "
        f"completion {args.completion_length} tokens, micro-batch {args.micro_batch_size}, torch threads 1; "
        f"medians of {args.steps} timed steps per configuration\n"
    )
    header = (
        f"{'config':<10}{'step s':>8}{'cpu s':>8}{'generate':>10}{'teacher-f.':>11}{'attention':>10}{'update':>8}"
        f"{'step peak MiB':>15}{'rollout peak MiB':>18}"
    )
    print(header)
    print("-" * len(header))
    row = {}
    for config in CONFIGS:
        steps = [s for s in timed if s["config"] == config]
        memory_steps = [s for s in measured if s["config"] == config]
        row[config] = {
            "time": _median(steps, "seconds"),
            "cpu": _median(steps, "cpu_seconds"),
            "step_peak": _median(memory_steps, "step_peak_mib"),
            "rollout_peak": _median(memory_steps, "rollout_peak_mib"),
        }
        phases = "".join(
            f"{_phase(steps, phase):>{width}.2f}"
            for phase, width in (("generate", 10), ("teacher_forced", 11), ("attention", 10), ("update", 8))
        )
        print(
            f"{config:<10}{row[config]['time']:>8.2f}{row[config]['cpu']:>8.2f}{phases}"
            f"{row[config]['step_peak']:>15.1f}{row[config]['rollout_peak']:>18.1f}"
        )

    def ratio(a: str, b: str, key: str) -> float:
        return row[a][key] / row[b][key] if row[b][key] > 0 else float("inf")

    markdown = results[("ours", False)]["markdown_seconds_per_step"]
    print()
    print(
        f"step time    on / off        {ratio('on', 'off', 'time'):6.3f}   cpu {ratio('on', 'off', 'cpu'):6.3f}"
        "   (target <= 1.15)"
    )
    print(f"step peak    on / off        {ratio('on', 'off', 'step_peak'):6.3f}                (target <= 1.10)")
    print(
        f"step time    original / off  {ratio('original', 'off', 'time'):6.3f}"
        f"   cpu {ratio('original', 'off', 'cpu'):6.3f}"
    )
    print(f"step peak    original / off  {ratio('original', 'off', 'step_peak'):6.3f}")
    print(
        f"rollout peak original / on   {ratio('original', 'on', 'rollout_peak'):6.3f}"
        f"                (target >= 3 at length 256)"
    )
    share = 100 * markdown / row["on"]["time"]
    print(f"Markdown log (on steps): {1000 * markdown:.1f} ms per step = {share:.2f}% of a step")
    tf = results[("ours", False)]["teacher_forced_cpu"]
    alone = tf["capture"] - tf["plain"]
    print(
        f"teacher-forced pass over the rollout, CPU s: {tf['plain']:.3f} plain, {tf['capture']:.3f} with the capture "
        f"(the capture alone {alone:+.3f} s = {100 * alone / row['off']['cpu']:+.1f}% of an off step)"
    )
    print(f"total run time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
