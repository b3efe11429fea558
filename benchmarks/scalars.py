"""A run's TensorBoard scalars, read back: what the benchmarks tabulate and the tests check.

A run folder (``trainer.default_root_dir``) holds one event file per logger version
(``lightning_logs/version_N/events.out.tfevents.*``); a resumed or repeated fit adds one.
"""

from __future__ import annotations

from pathlib import Path

Curve = list[tuple[int, float]]  # (global step, value), as logged


def event_files(run_dir: Path) -> list[Path]:
    """Every TensorBoard event file under ``run_dir``, by path (so versions in the order they were written)."""
    return sorted(Path(run_dir).rglob("events.out.tfevents.*"))


def scalar_events(run_dir: Path) -> dict[str, Curve]:
    """{tag: [(step, value), ...]} of every scalar under ``run_dir``: event files in :func:`event_files` order, each
    file's values in the order written (a step logged twice appears twice). Tags sorted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, Curve] = {}
    for path in event_files(run_dir):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every value
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return dict(sorted(out.items()))


def scalar_curves(run_dir: Path) -> dict[str, Curve]:
    """{tag: [(step, value), ...]} sorted by step, one value per step: where a step was logged twice (a resumed run),
    the later event file's value."""
    return {tag: sorted(dict(points).items()) for tag, points in scalar_events(run_dir).items()}


def scalar_tags(run_dir: Path) -> set[str]:
    """The scalar tags of the latest event file under ``run_dir`` (the last fit's); an error when there is none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = event_files(run_dir)
    if not events:
        raise FileNotFoundError(f"no TensorBoard event file under {run_dir}")
    accumulator = EventAccumulator(str(events[-1]))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])
