"""What ``dapo-lightning predict`` writes: one row per question and completion, to JSONL or parquet.

``DAPOModule.predict_step`` samples the questions of ``data.predict_path`` as validation does
(``model.rollout.eval_*``; greedy with ``eval_greedy``: one completion per question), scores them
with the configured rewards and returns :func:`prediction_rows`. :class:`PredictionWriter` streams
those rows to a hidden file beside ``output_path`` as batches end, one per process, and at the end
puts the file in place atomically (rename; with several processes rank 0 gathers every process's
rows, orders them by file, row and sample and writes them once): a run that fails leaves nothing
half-written at ``output_path``.

A row (``None`` where a value does not exist):

- ``file``, ``row``: the question's parquet file and its row there (``PromptBatch.source_rows``); ``sample``:
  the completion's number among the question's samples (0 when greedy);
- the dataset's columns but the image: ``problem``, ``solution`` (upper-cased), ``source`` when the file has one, ...;
- ``completion`` (decoded text), ``answer`` (the prediction the accuracy reward reads:
  ``rewards.accuracy.extract_answer``), ``correct`` (it equals the solution), ``completion_tokens``,
  ``truncated`` (no end of turn within ``model.rollout.max_completion_length``);
- ``reward`` (the weighted total) and ``rewards/<name>`` for each configured reward;
- with ``AttentionMetrics``: ``vgr`` (the value the ``vgr`` rewards read), ``attention/skip_reason`` and
  ``attention/<segment>/{vgr,aei_text,aei_vision,vision_ratio}`` for each layer segment with layers (SPEC 3).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from dapo_lightning import distributed, metrics, storage
from dapo_lightning.batch import RolloutBatch
from dapo_lightning.rewards.accuracy import extract_answer
from dapo_lightning.rewards.completions import completion_text

SUFFIXES = (".jsonl", ".parquet")
ATTENTION_METRICS = ("vgr", "aei_text", "aei_vision", "vision_ratio")  # the ones logged as test/attention/...
ORDER = ("file", "row", "sample")  # rows of several processes are sorted by these


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """A dataset value as written: a NaN or infinity as None (JSON has neither)."""
    return _number(value) if isinstance(value, float) else value


def prediction_rows(rollout: RolloutBatch) -> list[dict[str, Any]]:
    """One row per completion of a scored rollout (the fields are in the module docstring)."""
    prompts, G = rollout.prompts, rollout.num_generations
    where = prompts.source_rows or [(None, i) for i in prompts.index]
    correct = metrics.row_accuracy(rollout).tolist()  # NaN without a solution
    per_func, totals = rollout.rewards_per_func.tolist(), rollout.rewards.tolist()
    lengths, truncated = rollout.completion_lengths.tolist(), rollout.truncated.tolist()
    report = rollout.annotations.get("attention")
    rows = []
    for i, completion in enumerate(rollout.completions):
        g = i // G
        row = {"file": where[g][0], "row": int(where[g][1]), "sample": i % G}
        row.update({name: _plain(values[g]) for name, values in prompts.columns.items()})
        row.update(completion=completion_text(completion), answer=extract_answer(completion_text(completion)),
                   correct=None if math.isnan(correct[i]) else correct[i] == 1.0, completion_tokens=int(lengths[i]),
                   truncated=bool(truncated[i]), reward=_number(totals[i]))
        row.update({f"rewards/{name}": _number(per_func[i][k]) for k, name in enumerate(rollout.reward_names)})
        if report is not None:
            row.update(attention_columns(report.row(i)))
        rows.append(row)
    return rows


def attention_columns(report_row: dict[str, Any]) -> dict[str, Any]:
    """``AttentionReport.row`` as flat columns: ``vgr``, ``attention/skip_reason``, ``attention/<segment>/<metric>``."""
    columns = {"vgr": report_row["reward_vgr"], "attention/skip_reason": report_row["skip_reason"]}
    for segment, values in report_row["segments"].items():
        columns.update({f"attention/{segment}/{metric}": values[metric] for metric in ATTENTION_METRICS})
    return columns


class RowFile:
    """Rows appended to one ``.jsonl`` or ``.parquet`` file as they come (parquet: a row group per call).

    A parquet file's columns are those of the first rows written; a later column is an error naming it.
    """

    def __init__(self, path: Path, suffix: str):
        self.path, self.suffix = path, suffix
        self._file = open(path, "wb")
        self._parquet = None  # pyarrow.parquet.ParquetWriter, made with the first rows

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.suffix == ".jsonl":
            self._file.write(jsonl(rows))
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._file, parquet_schema(rows))
        new = sorted({name for row in rows for name in row} - set(self._parquet.schema.names))
        if new:
            raise ValueError(f"{self.path}: column(s) {', '.join(new)} appeared after the first rows were written")
        self._parquet.write_table(pa.Table.from_pylist(rows, schema=self._parquet.schema))

    def close(self) -> None:
        """Flush, ``fsync`` and close (the rows are on disk when this returns)."""
        if self._parquet is not None:
            self._parquet.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """``rows`` as JSON lines (UTF-8; a value JSON has no type for, such as a date, as its text)."""
    return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False, default=str) + "\n" for row in rows).encode()


def column_type(name: str, first: Any):
    """The parquet type of column ``name``: fixed for this module's columns, else that of its first value (text
    when all of the first rows have none), so a column empty in the first batch keeps its type in the next."""
    import pyarrow as pa

    if name in ("row", "sample", "completion_tokens"):
        return pa.int64()
    if name in ("correct", "truncated"):
        return pa.bool_()
    if name in ("reward", "vgr") or name.startswith("rewards/") or (
            name.startswith("attention/") and name != "attention/skip_reason"):
        return pa.float64()
    return pa.string() if first is None else pa.array([first]).type


def parquet_schema(rows: list[dict[str, Any]]):
    """The columns of ``rows`` in first-seen order (:func:`column_type`)."""
    import pyarrow as pa

    names = list(dict.fromkeys(name for row in rows for name in row))
    return pa.schema([(name, column_type(name, next((r[name] for r in rows if r.get(name) is not None), None)))
                      for name in names])


def write_rows(path: Path, rows: list[dict[str, Any]], suffix: str) -> None:
    """``rows`` to ``path`` atomically (``storage.atomic_write``)."""

    def write(f) -> None:
        if suffix == ".jsonl":
            f.write(jsonl(rows))
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema(rows)), f)

    storage.atomic_write(path, write, what="predictions file")


def read_rows(path: Path, suffix: str) -> list[dict[str, Any]]:
    """The rows of a file :class:`RowFile` wrote (an empty file: a process that had no question)."""
    if path.stat().st_size == 0:
        return []
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def merged(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every process's rows in one list, ordered by the question's file and row, then the sample."""
    return sorted((row for rows in per_rank for row in rows), key=lambda row: tuple(row[k] for k in ORDER))


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s rows (:func:`prediction_rows`) to ``output_path``, a ``.jsonl`` or ``.parquet`` file."""

    def __init__(self, output_path: str):
        """
        Args:
            output_path: The file to write: ``.jsonl`` (one JSON object per line) or ``.parquet``, chosen by the suffix;
                an existing file is replaced when the run ends (not before: a failed run leaves it as it was).
        """
        super().__init__(write_interval="batch")
        path = Path(output_path)
        if path.suffix not in SUFFIXES:
            raise ValueError(f"PredictionWriter.output_path: {output_path!r} ends in {path.suffix or 'no suffix'!r}; "
                             f"choose {', '.join(SUFFIXES)}")
        self.output_path = path
        self._part: RowFile | None = None
        self.rows_written = 0

    def part_path(self, rank: int) -> Path:
        """This process's hidden temporary file beside ``output_path`` (``storage`` removes it once the pid is gone)."""
        name = f".{self.output_path.name}.rank{rank}.{os.getpid()}{storage.PARTIAL_SUFFIX}"
        return self.output_path.with_name(name)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        storage.probe_writable(self.output_path.parent, "predictions folder (PredictionWriter.output_path)")
        storage.remove_stale_partials(self.output_path.parent)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._part = RowFile(self.part_path(trainer.global_rank), self.output_path.suffix)
        self.rows_written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self._part.append(prediction)
        self.rows_written += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        part, self._part = self._part, None
        part.close()
        report = getattr(trainer.datamodule, "report_skipped_rows", None)  # a collective: every process
        skipped = report("predict") if report is not None else 0
        if trainer.world_size == 1:
            os.replace(part.path, self.output_path)
            storage.fsync_folder(self.output_path.parent)
            total = self.rows_written
        else:  # rank 0 gathers every process's rows: no folder has to be shared between machines
            per_rank = distributed.gather_per_rank(read_rows(part.path, part.suffix))
            part.path.unlink()
            total = 0
            if per_rank is not None:
                rows = merged(per_rank)
                write_rows(self.output_path, rows, self.output_path.suffix)
                total = len(rows)
        note = f"; {skipped} unusable question(s) skipped" if skipped else ""
        rank_zero_info(f"predict: wrote {total} rows to {self.output_path}{note}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        try:
            part.close()
        except Exception:  # never hide the exception that stopped the run
            pass
        part.path.unlink(missing_ok=True)


DEFAULT_FILE = "predictions.jsonl"


def add_default_writer(trainer) -> PredictionWriter | None:
    """A :class:`PredictionWriter` to ``<trainer.default_root_dir>/predictions.jsonl`` when ``trainer`` has no
    prediction writer (the CLI's ``predict`` adds it: a prediction run that writes nothing is lost); returns it."""
    if any(isinstance(callback, BasePredictionWriter) for callback in trainer.callbacks):
        return None
    writer = PredictionWriter(str(Path(trainer.default_root_dir) / DEFAULT_FILE))
    trainer.callbacks.append(writer)
    return writer


__all__ = ["PredictionWriter", "add_default_writer", "prediction_rows"]
