"""``MarkdownRolloutLog``: readable rollouts in Markdown files (SPEC section 7).

Files, in ``dirpath`` (default: the logger's version folder, else ``default_root_dir``):

- ``rollout_results.md``: one section per logged training step: an overall table (mean ±
  std of every reward and the total; accuracy, format and success rates), a per-segment
  VGR/AEI table when ``AttentionMetrics`` ran, a "Token Weights" section when
  ``TokenWeights`` ran, then a few samples, each with its prompt, completion, solution,
  rewards, advantage and attention metrics as JSON;
- ``eval_results.md``: the same for each validation epoch (all its rollouts in the tables);
- ``token_weights.md``: the completion tokens of a few samples with their weights.

Model text (prompts, completions, solutions, tokens) is untrusted: it is written only
inside fenced code blocks whose fence is longer than any backtick run in the text, or,
in table cells, with ``|``, newlines and HTML escaped, so a completion containing ``|``,
backticks, ``</details>`` or a Markdown heading stays inside its sample.

Only rank zero writes (it logs its own rows). Each logged step costs one string render
and one appended write; the time spent is kept in ``seconds`` (see the benchmark).

A step whose update was skipped for non-finite values says so, with the tensors and rows.
When the run stops on an exception (a SIGTERM or Ctrl-C through ``GracefulShutdown``, an
error), the latest step's section is written if ``every_n_steps`` had passed it over, so
the log ends where the run did; to do that the latest rollout is kept until the next one
replaces it. The folder is probe-written at set-up, and a failing write names the file.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from dapo_lightning.attention import SEGMENTS
from dapo_lightning.storage import probe_writable
from dapo_lightning.rewards.accuracy import accuracy as accuracy_reward
from dapo_lightning.rewards.format import format_reward

TABLE_METRICS = ("vgr", "aei_text", "aei_vision", "vision_ratio")
_BACKTICK_RUN = re.compile(r"`+")


# --- escaping ----------------------------------------------------------------------------------------


def clean(text: Any) -> str:
    """Untrusted text as a str with \\n line ends and no NUL or other C0 controls except tab and newline."""
    text = str(text).replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch if ch in "\n\t" or ord(ch) >= 32 else f"\\x{ord(ch):02x}" for ch in text)


def fence(text: Any, info: str = "text") -> str:
    """``text`` as a fenced code block that nothing inside it can close (CommonMark 4.5)."""
    text = clean(text)
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{info}\n{text}\n{marks}\n"


def cell(text: Any) -> str:
    """Untrusted text for one table cell: HTML escaped, ``|`` and backslashes escaped, on one line."""
    text = html.escape(clean(text), quote=False)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return " ".join(text.split("\n")) or " "


def preview(text: str, limit: int | None, *, tail: bool = False) -> str:
    """At most ``limit`` characters of ``text`` (its end when ``tail``), saying how much was left out."""
    if limit is None or len(text) <= limit:
        return text
    cut = len(text) - limit
    if tail:
        return f"[... {cut} characters before]\n{text[-limit:]}"
    return f"{text[:limit]}\n[... {cut} more characters]"


def number(value: Any, digits: int = 3) -> str:
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def mean_std(values: torch.Tensor) -> str:
    values = values[torch.isfinite(values)].double()
    if values.numel() == 0:
        return "n/a"
    std = values.std() if values.numel() > 1 else torch.zeros(())
    return f"{number(values.mean())} ± {number(std)}"


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


# --- rollout summaries (pure) ------------------------------------------------------------------------


def rate_columns(rollout) -> dict[str, torch.Tensor]:
    """Per-row accuracy, format and success (both) in {0, 1}: the reward columns when configured, else computed."""
    columns = rollout.row_columns()

    def column(name: str, compute) -> torch.Tensor:
        if name in rollout.reward_names:
            return rollout.rewards_per_func[:, rollout.reward_names.index(name)].detach().float().cpu().nan_to_num(0.0)
        return torch.tensor(compute(), dtype=torch.float32)

    accuracy = column(
        "accuracy",
        lambda: (
            accuracy_reward(rollout.completions, solution=columns["solution"])
            if "solution" in columns
            else [math.nan] * rollout.num_rows
        ),
    )
    fmt = column("format", lambda: format_reward(rollout.completions))
    return {"accuracy": accuracy, "format": fmt, "success": ((accuracy == 1) & (fmt == 1)).float()}


def overall_table(
    reward_names: list[str], per_func: torch.Tensor, totals: torch.Tensor, rates: dict[str, torch.Tensor]
) -> str:
    """Markdown table: mean ± std per reward and of the total, then the rates. ``per_func`` [N, K], ``totals`` [N]."""
    lines = ["| metric | value |", "|---|---|"]
    for k, name in enumerate(reward_names):
        lines.append(f"| reward {cell(name)} | {mean_std(per_func[:, k])} |")
    lines.append(f"| total reward | {mean_std(totals)} |")
    for name, values in rates.items():
        finite = values[torch.isfinite(values)]
        lines.append(f"| {name} rate | {number(finite.mean()) if finite.numel() else 'n/a'} |")
    lines.append(f"| rows | {totals.shape[0]} |")
    return "\n".join(lines) + "\n"


def segment_table(segment_values: dict[str, dict[str, torch.Tensor]]) -> str:
    """Markdown table of mean ± std per segment of VGR, AEI and vision ratio over usable rows."""
    lines = ["| segment | VGR | AEI text | AEI vision | vision ratio | rows |", "|---|---|---|---|---|---|"]
    for segment, values in segment_values.items():
        cells = " | ".join(mean_std(values[m]) for m in TABLE_METRICS)
        lines.append(f"| {segment} | {cells} | {int(torch.isfinite(values['vgr']).sum())} |")
    return "\n".join(lines) + "\n"


def usable_segment_values(report) -> dict[str, dict[str, torch.Tensor]]:
    """Per non-empty segment and table metric, the values of the usable rows."""
    usable = report.usable
    out = {}
    for segment in SEGMENTS:
        if len(report.segment_layers[segment]) == 0:
            continue
        metrics = report.segments[segment]
        out[segment] = {m: getattr(metrics, m).cpu()[usable] for m in TABLE_METRICS}
    return out


def token_weight_stats(rollout) -> dict[str, float] | None:
    """Statistics of the weighted tokens (valid, not replayed), or None without token weights."""
    if rollout.token_weights is None:
        return None
    valid = rollout.completion_mask.bool()
    if rollout.replayed is not None:
        valid = valid & ~rollout.replayed.bool().unsqueeze(-1)
    values = rollout.token_weights[valid].double().cpu()
    if values.numel() == 0:
        return None
    return {
        "mean": float(values.mean()),
        "std": float(values.std()) if values.numel() > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "frac_above_1": float((values > 1).double().mean()),
        "frac_below_1": float((values < 1).double().mean()),
    }


def token_weight_pairs(rollout, row: int, tokenizer, limit: int | None) -> list[str]:
    """``token(weight)`` for the first ``limit`` completion tokens of ``row``."""
    length = int(rollout.completion_mask[row].sum())
    count = length if limit is None else min(length, limit)
    ids = rollout.completion_ids[row, :count].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
    weights = rollout.token_weights[row, :count].tolist()
    return [f"{token}({weight:.3f})" for token, weight in zip(tokens, weights, strict=True)]


def sample_indices(num_rows: int, count: int) -> list[int]:
    """``count`` rows spread evenly over the rollout (so several groups are shown)."""
    count = min(count, num_rows)
    return sorted({(j * num_rows) // count for j in range(count)}) if count > 0 else []


def prompt_text(rollout, row: int, tokenizer) -> str:
    group = row // rollout.num_generations
    if rollout.prompts.prompts:
        return rollout.prompts.prompts[group]
    ids = rollout.prompts.input_ids[group][rollout.prompts.attention_mask[group].bool()].tolist()
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))


def sample_block(
    rollout, row: int, number_in_step: int, *, tokenizer, prompt_chars: int | None, completion_chars: int | None
) -> str:
    """One sample: summary line, prompt, completion, solution and rewards, attention metrics JSON."""
    group = row // rollout.num_generations
    total = float(rollout.rewards[row]) if rollout.rewards is not None else math.nan
    advantage = float(rollout.advantages[row]) if rollout.advantages is not None else math.nan
    replayed = bool(rollout.replayed[row]) if rollout.replayed is not None else False
    summary = (
        f"Sample {number_in_step}: row {row}, group {group}, total reward {number(total)}, "
        f"advantage {number(advantage)}{', replayed' if replayed else ''}"
    )
    solution = rollout.prompts.columns.get("solution", [""] * rollout.num_groups)[group]
    header = ["solution", "total", "advantage", *[cell(n) for n in rollout.reward_names]]
    values = [cell(solution), number(total), number(advantage)]
    if rollout.rewards_per_func is not None:
        values += [number(v) for v in rollout.rewards_per_func[row].tolist()]
    parts = [
        f"<details><summary>{html.escape(summary)}</summary>\n",
        "**Prompt**\n",
        fence(preview(prompt_text(rollout, row, tokenizer), prompt_chars, tail=True)),
        f"**Completion** ({int(rollout.completion_mask[row].sum())} tokens)\n",
        fence(preview(rollout.completions[row], completion_chars)),
        "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| " + " | ".join(values) + " |\n",
    ]
    report = rollout.extras.get("attention")
    if report is not None and row < report.num_rows:
        parts.append("**Attention metrics**\n")
        parts.append(fence(json.dumps(_json_value(report.row(row)), indent=1, sort_keys=True), "json"))
    parts.append("</details>\n")
    return "\n".join(parts)


def token_weights_section(stats: dict[str, float], preview_pairs: list[str], row: int) -> str:
    lines = [
        "### Token Weights\n",
        "| mean | std | min | max | fraction > 1 | fraction < 1 |",
        "|---|---|---|---|---|---|",
        "| "
        + " | ".join(number(stats[k]) for k in ("mean", "std", "min", "max", "frac_above_1", "frac_below_1"))
        + " |\n",
    ]
    if preview_pairs:
        lines.append(f"Preview, row {row}:\n")
        lines.append(fence(json.dumps(preview_pairs, ensure_ascii=False), "json"))
    return "\n".join(lines)


# --- the callback ------------------------------------------------------------------------------------


class MarkdownRolloutLog(Callback):
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
        self.samples_per_step = samples_per_step
        self.eval_samples = eval_samples
        self.prompt_chars = prompt_preview_chars
        self.completion_chars = completion_preview_chars
        self.token_weight_samples = token_weight_samples
        self.token_preview = token_preview
        self.log_eval = log_eval
        self.train_rollouts = 0
        self.seconds = 0.0  # time spent rendering and writing
        self.folder: Path | None = None
        self._eval: dict[str, Any] = {}
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

    def on_rollout_update_end(self, trainer, pl_module, rollout, metrics: dict[str, Any]) -> None:
        if rollout.stage != "train":
            return
        due = self.train_rollouts % self.every_n_steps == 0
        self.train_rollouts += 1
        if not trainer.is_global_zero:
            return
        # the latest step that was not written: its section is the log's tail when the run stops
        self._unwritten = None if due else (rollout, trainer.global_step, metrics)
        if not due:
            return
        start = time.perf_counter()
        tokenizer = getattr(pl_module, "tokenizer", None)
        step = trainer.global_step
        self._append(self.rollout_path, "Rollouts", self.render_step(rollout, step, metrics, tokenizer))
        if rollout.token_weights is not None and self.token_weight_samples > 0:
            self._append(self.token_weights_path, "Token weights", self.render_token_weights(rollout, step, tokenizer))
        self.seconds += time.perf_counter() - start

    def render_step(self, rollout, step: int, metrics: dict[str, Any] | None, tokenizer, note: str = "") -> str:
        parts = [f"## Step {step}{note}\n"]
        if rollout.faults:
            found = "; ".join(f.describe() for f in rollout.faults)
            parts.append(f"**Skipped**: non-finite {cell(found)}\n")
        if metrics:
            shown = {k: metrics[k] for k in ("loss", "grad_norm", "entropy") if k in metrics}
            if shown:
                parts.append(", ".join(f"{k} {number(v, 4)}" for k, v in shown.items()) + "\n")
        parts.append(
            overall_table(
                rollout.reward_names,
                rollout.rewards_per_func.detach().float().cpu(),
                rollout.rewards.detach().float().cpu(),
                rate_columns(rollout),
            )
        )
        report = rollout.extras.get("attention")
        if report is not None:
            parts.append("### Attention (VGR / AEI)\n")
            parts.append(segment_table(usable_segment_values(report)))
        stats = token_weight_stats(rollout)
        if stats is not None:
            rows = sample_indices(rollout.num_rows, 1)
            pairs = token_weight_pairs(rollout, rows[0], tokenizer, 16) if rows else []
            parts.append(token_weights_section(stats, pairs, rows[0] if rows else 0))
        parts.append("### Samples\n")
        for k, row in enumerate(sample_indices(rollout.num_rows, self.samples_per_step)):
            parts.append(
                sample_block(
                    rollout,
                    row,
                    k + 1,
                    tokenizer=tokenizer,
                    prompt_chars=self.prompt_chars,
                    completion_chars=self.completion_chars,
                )
            )
        return "\n".join(parts) + "\n"

    def render_token_weights(self, rollout, step: int, tokenizer) -> str:
        parts = [f"## Step {step}\n"]
        for row in sample_indices(rollout.num_rows, self.token_weight_samples):
            parts.append(f"### Row {row}\n")
            parts.append(
                fence(
                    json.dumps(token_weight_pairs(rollout, row, tokenizer, self.token_preview), ensure_ascii=False),
                    "json",
                )
            )
        return "\n".join(parts) + "\n"

    # --- validation ------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval = {"names": None, "per_func": [], "totals": [], "rates": [], "segments": [], "samples": []}

    def on_rollout_scored(self, trainer, pl_module, rollout) -> None:
        own_validation = rollout.stage == "val" and rollout.tag is None  # not a probe variant's rollout
        if not own_validation or not self.log_eval or not trainer.is_global_zero or not self._eval:
            return
        start = time.perf_counter()
        tokenizer = getattr(pl_module, "tokenizer", None)
        self._eval["names"] = rollout.reward_names
        self._eval["per_func"].append(rollout.rewards_per_func.detach().float().cpu())
        self._eval["totals"].append(rollout.rewards.detach().float().cpu())
        self._eval["rates"].append(rate_columns(rollout))
        report = rollout.extras.get("attention")
        if report is not None:
            self._eval["segments"].append(usable_segment_values(report))
        room = self.eval_samples - len(self._eval["samples"])
        for row in sample_indices(rollout.num_rows, room):
            self._eval["samples"].append(
                sample_block(
                    rollout,
                    row,
                    len(self._eval["samples"]) + 1,
                    tokenizer=tokenizer,
                    prompt_chars=self.prompt_chars,
                    completion_chars=self.completion_chars,
                )
            )
        self.seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        state, self._eval = self._eval, {}
        if not state or not state["totals"] or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        when = "before training (sanity check)" if trainer.sanity_checking else f"step {trainer.global_step}"
        rates = {k: torch.cat([r[k] for r in state["rates"]]) for k in state["rates"][0]}
        parts = [
            f"## Eval, {when}\n",
            overall_table(state["names"], torch.cat(state["per_func"]), torch.cat(state["totals"]), rates),
        ]
        if state["segments"]:
            merged = {
                seg: {m: torch.cat([s[seg][m] for s in state["segments"]]) for m in TABLE_METRICS}
                for seg in state["segments"][0]
            }
            parts.append("### Attention (VGR / AEI)\n")
            parts.append(segment_table(merged))
        parts.append("### Samples\n")
        parts.extend(state["samples"])
        self._append(self.eval_path, "Evaluation", "\n".join(parts) + "\n")
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
            self._append(self.rollout_path, "Rollouts",
                         self.render_step(rollout, step, metrics, getattr(pl_module, "tokenizer", None), note))
        except Exception as error:  # never hide the exception that stopped the run
            print(f"MarkdownRolloutLog: could not write the log tail ({type(error).__name__}: {error})")

    # --- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"train_rollouts": self.train_rollouts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_rollouts = int(state_dict.get("train_rollouts", 0))
