"""Where each row of a dataset is stored: the parquet file and the row in it (``SourceRow``).

The data module serves rows by their position in a dataset: the train or held-out part of a
file split 9:1 (SPEC section 1), or a whole file, or a folder of files read as one table.
Every message about a row (a ``BadRow``, a ``RewardError``, a skipped step's faults, the
Markdown log) names it as ``python -m dapo_lightning.data_prep validate`` does instead: the
file, and the row numbered from 0 within that file. A :class:`RowLocator` turns a position
into that ``SourceRow``; :func:`split_rows` makes the train/held-out split on row numbers, so
the parts and their locators come from one split.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from dapo_lightning.batch import SourceRow


class RowLocator:
    """Position in a dataset -> ``SourceRow``.

    The table's rows come from ``files`` one after another, ``counts[k]`` rows from file ``k``;
    ``rows[p]`` is the table row at position ``p`` (None: position ``p`` is table row ``p``).
    A hub dataset is one "file", named ``name[split]``.
    """

    def __init__(self, files: Sequence[str], counts: Sequence[int], rows: Sequence[int] | None = None):
        if len(files) != len(counts):
            raise ValueError(f"RowLocator: {len(files)} files but {len(counts)} row counts")
        self.files = list(files)
        self.starts = np.cumsum([0, *counts]).tolist()  # [files + 1] first table row of each file, then the total
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)  # [positions] table rows

    def __len__(self) -> int:
        return self.starts[-1] if self.rows is None else len(self.rows)

    def at(self, position: int) -> SourceRow:
        table_row = int(position if self.rows is None else self.rows[position])
        if not 0 <= table_row < self.starts[-1]:
            raise IndexError(f"RowLocator: table row {table_row} is outside the {self.starts[-1]} rows of {self.files}")
        k = bisect_right(self.starts, table_row) - 1
        return SourceRow(self.files[k], table_row - self.starts[k])

    def select(self, positions: Sequence[int]) -> RowLocator:
        """The locator of ``dataset.select(positions)``."""
        positions = np.asarray(positions, dtype=np.int64)
        chosen = positions if self.rows is None else self.rows[positions]
        return RowLocator(self.files, np.diff(self.starts).tolist(), chosen)


def split_rows(num_rows: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """The table rows of the train and held-out parts, in their order: ``datasets.Dataset.train_test_split`` of the
    row numbers, the split it makes of the table itself (its permutation depends on the number of rows and the seed)."""
    from datasets import Dataset

    split = Dataset.from_dict({"row": range(num_rows)}).train_test_split(test_size=test_size, seed=seed)
    return list(split["train"]["row"]), list(split["test"]["row"])


__all__ = ["RowLocator", "split_rows"]
