"""``MarkdownRolloutLog``: readable rollouts in Markdown files (SPEC section 7).

Files, in ``dirpath`` (default: the logger's version folder, else ``default_root_dir``):

- ``rollout_results.md``: one section per logged training step: an overall table (mean ±
  std of every reward and the total; accuracy, format and success rates), a per-segment
  VGR/AEI table when ``AttentionMetrics`` ran, a "Token Weights" section when
  ``TokenWeights`` ran, then a few samples, each with its prompt, completion, solution,
  rewards, advantage and attention metrics as JSON;
- ``eval_results.md``: the same for each validation epoch (all its rollouts in the tables), with
  accuracy per ``source`` when the data has that column and, for the text-bias task's held-out
  rows (a ``cue`` column too), a table per split of accuracy, answers picking the cue and VGR;
- ``token_weights.md``: the completion tokens of a few samples with their weights.

Model text is untrusted and written only fenced or escaped (the rendering, pure, is
``markdown_render.py``; this file decides what is written and when).

Only rank zero writes (it logs its own rows). Each logged step costs one string render
and one appended write; the time spent is kept in ``seconds`` (see the benchmark).

A step whose update was skipped for non-finite values says so, with the tensors and rows.
When the run stops on an exception (a SIGTERM or Ctrl-C through ``GracefulShutdown``, an
error), the latest step's section is written if ``every_n_steps`` had passed it over, so
the log ends where the run did; to do that the latest rollout is kept until the next one
replaces it. The folder is probe-written at set-up, and a failing write names the file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from dapo_lightning.callbacks.markdown_render import (
    RenderSettings,
    render_eval,
    render_step,
    render_token_weights,
    sample_block,
    sample_indices,
    usable_segment_values,
)
from dapo_lightning.callbacks.text_bias import TextBiasRows, missing_columns, text_bias_rows
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.metrics import rate_columns, source_name
from dapo_lightning.storage import probe_writable


# --- the callback ------------------------------------------------------------------------------------


@dataclass
class _EvalParts:
    """What a validation epoch's rollouts leave for ``eval_results.md``: per rollout, or per row."""

    names: list[str] = field(default_factory=list)  # the reward names
    per_func: list[Tensor] = field(default_factory=list)  # per rollout [n, K]
    totals: list[Tensor] = field(default_factory=list)  # per rollout [n]
    rates: list[dict[str, Tensor]] = field(default_factory=list)  # per rollout: accuracy, format, success [n]
    segments: list[dict] = field(default_factory=list)  # per rollout: usable VGR/AEI values per segment
    samples: list[str] = field(default_factory=list)  # rendered sample blocks, at most eval_samples
    sources: list[str] = field(default_factory=list)  # per row: the data's ``source`` (when it has that column)
    text_bias: list[TextBiasRows] = field(default_factory=list)  # per rollout, when the data has a ``cue`` column


class MarkdownRolloutLog(RolloutCallback):
    def __init__(
        self,
        dirpath: str | None = None,
        every_n_steps: int = 1,
        samples_per_step: int = 4,
        eval_samples: int = 8,
        prompt_preview_chars: int | None = 600,
        completion_preview_chars: int | None = 2000,
        token_weight_samples: int = 2,
        token_preview: int | None = 64,
        log_eval: bool = True,
    ):
        """
        Args:
            dirpath: Folder of the Markdown files (None: the logger's version folder, else default_root_dir).
            every_n_steps: Write every n-th training rollout.
            samples_per_step: Samples written per logged training step (spread over the groups).
            eval_samples: Samples written per validation epoch.
            prompt_preview_chars: Characters of each prompt shown, from its end (None: all).
            completion_preview_chars: Characters of each completion shown (None: all).
            token_weight_samples: Samples listed in token_weights.md per logged step.
            token_preview: Tokens per sample in the token-weight lists (None: all).
            log_eval: Write eval_results.md.
        """
        if every_n_steps < 1:
            raise ValueError(f"MarkdownRolloutLog.every_n_steps: must be >= 1, got {every_n_steps}")
        for name, value in (
            ("samples_per_step", samples_per_step),
            ("eval_samples", eval_samples),
            ("token_weight_samples", token_weight_samples),
        ):
            if value < 0:
                raise ValueError(f"MarkdownRolloutLog.{name}: must be >= 0, got {value}")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.eval_samples = eval_samples
        self.settings = RenderSettings(samples_per_step=samples_per_step, prompt_chars=prompt_preview_chars,
                                       completion_chars=completion_preview_chars,
                                       token_weight_samples=token_weight_samples, token_preview=token_preview)
        self.log_eval = log_eval
        self.train_rollouts = 0
        self.seconds = 0.0  # time spent rendering and writing
        self.folder: Path | None = None
        self._eval: _EvalParts | None = None  # the validation epoch's collected parts (rank zero)
        self._unwritten: tuple | None = None  # (rollout, step, metrics) of the latest step not written

    # --- paths -----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir
        self.folder = Path(folder)
        problem = None
        if trainer.is_global_zero:
            try:
                probe_writable(self.folder, "Markdown log folder (MarkdownRolloutLog.dirpath)")
            except OSError as error:
                problem = (error.errno, error.strerror)
        if getattr(trainer, "world_size", 1) > 1:  # every process fails alike (none waits for a dead rank 0)
            problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise OSError(*problem)

    @property
    def rollout_path(self) -> Path:
        return self.folder / "rollout_results.md"

    @property
    def eval_path(self) -> Path:
        return self.folder / "eval_results.md"

    @property
    def token_weights_path(self) -> Path:
        return self.folder / "token_weights.md"

    def _append(self, path: Path, title: str, text: str) -> None:
        new = not path.exists()
        try:
            with path.open("a", encoding="utf-8") as f:
                f.write((f"# {title}\n\n" if new else "") + text)
        except OSError as error:  # a write error alone does not say which file
            raise OSError(error.errno, f"cannot append to the Markdown log {path} ({error.strerror or error})") from error

    # --- training --------------------------------------------------------------------------------

    def on_rollout_update_end(self, trainer, pl_module, rollout, result) -> None:
        if rollout.stage != "train":
            return
        due = self.train_rollouts % self.every_n_steps == 0
        self.train_rollouts += 1
        if not trainer.is_global_zero:
            return
        metrics = result.metrics()
        # the latest step that was not written: its section is the log's tail when the run stops
        self._unwritten = None if due else (rollout, trainer.global_step, metrics)
        if not due:
            return
        start = time.perf_counter()
        step = trainer.global_step
        self._append(self.rollout_path, "Rollouts", self.render_step(rollout, step, metrics, pl_module.tokenizer))
        if rollout.token_weights is not None and self.settings.token_weight_samples > 0:
            self._append(self.token_weights_path, "Token weights",
                         render_token_weights(rollout, step, pl_module.tokenizer, self.settings))
        self.seconds += time.perf_counter() - start

    def render_step(self, rollout, step: int, metrics: dict[str, Any] | None, tokenizer, note: str = "") -> str:
        """This log's section for a training step (``markdown_render.render_step`` with its settings)."""
        return render_step(rollout, step, metrics, tokenizer, self.settings, note)

    # --- validation ------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval = _EvalParts()

    def on_rollout_scored(self, trainer, pl_module, rollout) -> None:
        own_validation = rollout.stage == "val" and not rollout.is_extra  # not a probe variant's rollout
        if not own_validation or not self.log_eval or not trainer.is_global_zero or self._eval is None:
            return
        start = time.perf_counter()
        self._eval.names = list(rollout.reward_names)
        self._eval.per_func.append(rollout.rewards_per_func.detach().float().cpu())
        self._eval.totals.append(rollout.rewards.detach().float().cpu())
        self._eval.rates.append(rate_columns(rollout))
        self._eval.sources.extend(source_name(s) for s in rollout.row_columns().get("source", []))
        if not missing_columns(rollout.prompts.columns):  # the text-bias task's held-out rows (docs/text_bias.md)
            self._eval.text_bias.append(text_bias_rows(rollout))
        report = rollout.annotations.get("attention")
        if report is not None:
            self._eval.segments.append(usable_segment_values(report))
        room = self.eval_samples - len(self._eval.samples)
        for row in sample_indices(rollout.num_rows, room):
            self._eval.samples.append(sample_block(
                rollout, row, len(self._eval.samples) + 1, tokenizer=pl_module.tokenizer,
                prompt_chars=self.settings.prompt_chars, completion_chars=self.settings.completion_chars,
            ))
        self.seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        state, self._eval = self._eval, None
        if state is None or not state.totals or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        when = "before training (sanity check)" if trainer.sanity_checking else f"step {trainer.global_step}"
        text = render_eval(when, state.names, state.per_func, state.totals, state.rates, state.segments,
                           state.samples, state.sources, state.text_bias)
        self._append(self.eval_path, "Evaluation", text)
        self.seconds += time.perf_counter() - start

    # --- stopping ---------------------------------------------------------------------------------

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Write the latest step's section if it was not written (a stopped run's log ends at its last step)."""
        pending, self._unwritten = getattr(self, "_unwritten", None), None
        if pending is None or not trainer.is_global_zero or self.folder is None:
            return
        rollout, step, metrics = pending
        try:
            note = f" (written when the run stopped: {type(exception).__name__})"
            self._append(self.rollout_path, "Rollouts", self.render_step(rollout, step, metrics, pl_module.tokenizer, note))
        except Exception as error:  # never hide the exception that stopped the run
            print(f"MarkdownRolloutLog: could not write the log tail ({type(error).__name__}: {error})")

    # --- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"train_rollouts": self.train_rollouts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_rollouts = int(state_dict.get("train_rollouts", 0))
