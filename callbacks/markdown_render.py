"""Rendering the Markdown rollout logs (SPEC 7): pure functions from a rollout to Markdown text.

``MarkdownRolloutLog`` (``markdown_log.py``) decides what to write and when; everything here
turns a rollout (or a validation epoch's collected parts) into text and writes nothing.
The rates and token-weight statistics come from ``dapo_lightning.metrics``, so the tables
say what TensorBoard says.

Model text (prompts, completions, solutions, tokens) is untrusted: it is written only
inside fenced code blocks whose fence is longer than any backtick run in the text, or,
in table cells, with ``|``, newlines and HTML escaped, so a completion containing ``|``,
backticks, ``</details>`` or a Markdown heading stays inside its sample.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import torch

from dapo_lightning.attention import SEGMENTS
from dapo_lightning.metrics import rate_columns, token_weight_stats

TABLE_METRICS = ("vgr", "aei_text", "aei_vision", "vision_ratio")
_BACKTICK_RUN = re.compile(r"`+")


@dataclass(frozen=True)
class RenderSettings:
    """How much of each rollout a log shows (the callback's arguments)."""

    samples_per_step: int = 4  # samples per training step, spread over the groups
    prompt_chars: int | None = 600  # characters of each prompt, from its end (None: all)
    completion_chars: int | None = 2000  # characters of each completion (None: all)
    token_weight_samples: int = 2  # samples listed in token_weights.md per step
    token_preview: int | None = 64  # tokens per sample in those lists (None: all)


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
    """One sample: summary line, prompt, completion, solution and rewards, attention metrics JSON.

    The summary names the sample's row in the rollout, its group, and where its question is
    stored, when known: the parquet file's name (its folder is the run's ``data.train_path``, so a
    log reads the same wherever the data lies) and its row, numbered as ``data_prep validate`` does.
    """
    group = row // rollout.num_generations
    total = float(rollout.rewards[row]) if rollout.rewards is not None else math.nan
    advantage = float(rollout.advantages[row]) if rollout.advantages is not None else math.nan
    replayed = bool(rollout.replayed[row]) if rollout.replayed is not None else False
    source_rows = rollout.prompts.source_rows
    question = f" (from {_file_row(source_rows[group])})" if group < len(source_rows) else ""
    summary = (
        f"Sample {number_in_step}: rollout row {row}, group {group}{question}, total reward {number(total)}, "
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
    report = rollout.annotations.get("attention")
    if report is not None and row < report.num_rows:
        parts.append("**Attention metrics**\n")
        parts.append(fence(json.dumps(_json_value(report.row(row)), indent=1, sort_keys=True), "json"))
    parts.append("</details>\n")
    return "\n".join(parts)


def _file_row(source_row) -> str:
    """``"data.parquet: row 17"``: a parquet file by its name, a hub dataset's split (``name[split]``) as it is."""
    file = PurePath(source_row.file).name if source_row.file.endswith(".parquet") else source_row.file
    return f"{file}: row {source_row.row}"


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


def render_step(rollout, step: int, metrics: dict[str, Any] | None, tokenizer, settings: RenderSettings,
                note: str = "") -> str:
    """A training step's section of ``rollout_results.md``."""
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
    report = rollout.annotations.get("attention")
    if report is not None:
        parts.append("### Attention (VGR / AEI)\n")
        parts.append(segment_table(usable_segment_values(report)))
    stats = token_weight_stats(rollout)
    if stats is not None:
        rows = sample_indices(rollout.num_rows, 1)
        pairs = token_weight_pairs(rollout, rows[0], tokenizer, 16) if rows else []
        parts.append(token_weights_section(stats, pairs, rows[0] if rows else 0))
    parts.append("### Samples\n")
    for k, row in enumerate(sample_indices(rollout.num_rows, settings.samples_per_step)):
        parts.append(sample_block(rollout, row, k + 1, tokenizer=tokenizer, prompt_chars=settings.prompt_chars,
                                  completion_chars=settings.completion_chars))
    return "\n".join(parts) + "\n"


def render_token_weights(rollout, step: int, tokenizer, settings: RenderSettings) -> str:
    """A training step's section of ``token_weights.md``: a few samples' tokens with their weights."""
    parts = [f"## Step {step}\n"]
    for row in sample_indices(rollout.num_rows, settings.token_weight_samples):
        parts.append(f"### Row {row}\n")
        pairs = token_weight_pairs(rollout, row, tokenizer, settings.token_preview)
        parts.append(fence(json.dumps(pairs, ensure_ascii=False), "json"))
    return "\n".join(parts) + "\n"


def source_table(sources: list[str], accuracy: torch.Tensor) -> str:
    """Markdown table of the accuracy of each source (the data's ``source`` column), in name order. ``accuracy`` [N]."""
    lines = ["| source | accuracy | rows |", "|---|---|---|"]
    for source in sorted(set(sources)):
        rows = torch.tensor([s == source for s in sources])
        lines.append(f"| {cell(source)} | {number(accuracy[rows].mean())} | {int(rows.sum())} |")
    return "\n".join(lines) + "\n"


def text_bias_table(splits: list[str], accuracy: torch.Tensor, picks_cue: torch.Tensor, vgr: torch.Tensor) -> str:
    """Markdown table per split (name order) of the text-bias task: rows, accuracy, the fraction of answers that pick
    the cue's option (n/a without a cue; on ``conflict``, the text reliance) and VGR (mean ± std over finite values).
    Every argument has one entry per row [N]."""
    lines = ["| split | rows | accuracy | picks the cue | VGR |", "|---|---|---|---|---|"]
    for split in sorted(set(splits)):
        rows = torch.tensor([s == split for s in splits])
        cued = picks_cue[rows][~picks_cue[rows].isnan()]
        lines.append(f"| {cell(split)} | {int(rows.sum())} | {number(accuracy[rows].mean())} | "
                     f"{number(cued.mean()) if cued.numel() else 'n/a'} | {mean_std(vgr[rows])} |")
    return "\n".join(lines) + "\n"


def render_eval(when: str, reward_names: list[str], per_func: list[torch.Tensor], totals: list[torch.Tensor],
                rates: list[dict[str, torch.Tensor]], segments: list[dict], samples: list[str],
                sources: list[str] | None = None, text_bias: list | None = None) -> str:
    """A validation epoch's section of ``eval_results.md`` from its rollouts' collected parts (``sources``: the
    ``source`` of every row, when the data has that column; ``text_bias``: each rollout's ``TextBiasRows``, when
    the data has the text-bias task's ``cue`` column)."""
    rate_values = {k: torch.cat([r[k] for r in rates]) for k in rates[0]}
    parts = [f"## Eval, {when}\n", overall_table(reward_names, torch.cat(per_func), torch.cat(totals), rate_values)]
    if sources:
        parts.append("### Accuracy per source\n")
        parts.append(source_table(sources, rate_values["accuracy"]))
    if text_bias:
        parts.append("### Text bias\n")
        parts.append(text_bias_table([s for rows in text_bias for s in rows.splits], rate_values["accuracy"],
                                     torch.cat([rows.picks_cue for rows in text_bias]),
                                     torch.cat([rows.vgr for rows in text_bias])))
    if segments:
        merged = {seg: {m: torch.cat([s[seg][m] for s in segments]) for m in TABLE_METRICS} for seg in segments[0]}
        parts.append("### Attention (VGR / AEI)\n")
        parts.append(segment_table(merged))
    parts.append("### Samples\n")
    parts.extend(samples)
    return "\n".join(parts) + "\n"
