"""The data module's settings, checked when it is made: every error names its key (``data.<key>``).

A number out of range used to surface far from its cause (``data.max_image_side: 0`` as a
``ZeroDivisionError`` inside Pillow at the first batch); here it is refused before anything loads.
"""

from __future__ import annotations

from typing import Any


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def whole_number(key: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    """``value`` is an int (not a bool) >= ``minimum`` (or None when ``optional``), else a ValueError naming ``key``."""
    if value is None and optional:
        return
    if not _whole(value) or value < minimum:
        unset = " or null" if optional else ""
        raise ValueError(f"{key}: must be a whole number >= {minimum}{unset}, got {value!r}")


def fraction(key: str, value: Any) -> None:
    """``value`` is a number strictly between 0 and 1, else a ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{key}: must be in (0, 1), got {value!r}")


def check_settings(hparams: dict[str, Any]) -> None:
    """Every setting of ``VisualMCQDataModule`` that can be checked without reading a file."""
    if not (hparams["train_path"] or hparams["dataset_name"] or hparams["test_path"] or hparams["predict_path"]):
        raise ValueError("data: set data.train_path (a parquet file) or data.dataset_name (a datasets hub name); "
                         "data.test_path or data.predict_path alone for test or predict")
    if hparams["eval_path"] is None:
        fraction("data.eval_ratio", hparams["eval_ratio"])
    whole_number("data.split_seed", hparams["split_seed"], minimum=0)
    whole_number("data.max_image_side", hparams["max_image_side"], minimum=1, optional=True)
    whole_number("data.batch_size", hparams["batch_size"], minimum=1)
    whole_number("data.eval_batch_size", hparams["eval_batch_size"], minimum=1, optional=True)
    whole_number("data.eval_limit", hparams["eval_limit"], minimum=1, optional=True)
    whole_number("data.num_workers", hparams["num_workers"], minimum=0)
    whole_number("data.max_prompt_length", hparams["max_prompt_length"], minimum=1, optional=True)
    whole_number("data.max_image_pixels", hparams["max_image_pixels"], minimum=1)
    if hparams["on_bad_row"] not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row: choose from error, skip; got {hparams['on_bad_row']!r}")
    synthetic = hparams["build_synthetic_if_missing"] or {}
    synthetic = synthetic if isinstance(synthetic, dict) else vars(synthetic)  # a SyntheticData
    for key, minimum in (("rows", 1), ("seed", 0), ("image_size", 1)):
        if key in synthetic:
            whole_number(f"data.build_synthetic_if_missing.{key}", synthetic[key], minimum=minimum)
