"""The offline model and data a config asks for, built where they are missing.

Two config keys name offline fixtures: ``model.policy.build_tiny_if_missing`` (write the
random Qwen2.5-VL of that size to ``model.policy.model_name_or_path``) and
``data.build_synthetic_if_missing`` (write synthetic questions with those settings to
``data.train_path``). With ``task: text_bias`` among its settings, the latter writes the
text-bias task instead (``text_bias.py``, docs/text_bias.md): its training questions to
``data.train_path`` and its held-out splits to ``data.eval_path``, each if missing, with the
settings ``rows``, ``eval_rows``, ``cue_accuracy``, ``seed`` and ``image_size``. The data
module stores that key as a plain dict (its type is ``SyntheticData | dict``), so the text-bias
settings are checked here, each error naming its key. The library only stores these keys; the
building is done here:

- by ``dapo-lightning fit``, which runs every function registered under the entry-point
  group ``dapo_lightning.offline_fixtures`` (this module's :func:`build_missing`, see
  ``setup.cfg``) on the parsed config before it creates the model and the data module;
- by ``python -m dapo_lightning.data_prep fixtures --config A.yaml [--config B.yaml]``
  (later files win, as in the CLI), to prepare a machine before a run.

Both skip what already exists, so a second run (or a second process) changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dapo_lightning.data_prep import text_bias
from dapo_lightning.data_prep.synthetic import SyntheticConfig, ensure_parquet
from dapo_lightning.data_prep.tiny_model import ensure_tiny_model


def _get(config: Any, *keys: str) -> Any:
    for key in keys:
        if config is None:
            return None
        config = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return config


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        return value.as_dict()
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    return value


def build_missing(config: dict[str, Any]) -> list[str]:
    """Build the fixtures ``config`` (a fit config: ``model``, ``data``) asks for and lacks; what was written."""
    written = []
    size = _get(config, "model", "policy", "build_tiny_if_missing")
    model_path = _get(config, "model", "policy", "model_name_or_path")
    if size and model_path and not Path(model_path).exists():
        ensure_tiny_model(model_path, size=size)
        written.append(f"the offline {size} Qwen2.5-VL to {model_path}")
    synthetic = _plain(_get(config, "data", "build_synthetic_if_missing"))
    train_path = _get(config, "data", "train_path")
    if synthetic is not None and "task" in synthetic:
        written += _text_bias(dict(synthetic), train_path, _get(config, "data", "eval_path"))
    elif synthetic is not None and train_path and not Path(train_path).exists():
        settings = dict(synthetic)
        types = settings.pop("question_types", None) or ("colour", "shape", "count")
        ensure_parquet(train_path, SyntheticConfig(question_types=tuple(types), **settings))
        written.append(f"synthetic questions to {train_path}")
    return written


def _text_bias(settings: dict[str, Any], train_path: str | None, eval_path: str | None) -> list[str]:
    """The text-bias task's files a config asks for (``task: text_bias``) and lacks; what was written."""
    key = "data.build_synthetic_if_missing"
    task = settings.pop("task")
    if task != "text_bias":
        raise ValueError(f"{key}.task: the only task is text_bias (leave task out for the demo's questions), "
                         f"got {task!r}")
    # the demo's settings, which a stacked config may carry: accepted where they describe this task
    if list(settings.pop("question_types", None) or ["colour"]) != ["colour"] or settings.pop("shuffle_options", False):
        raise ValueError(f"{key}: task text_bias asks colour questions in the fixed option order; drop "
                         "question_types and shuffle_options")
    config = text_bias.TextBiasConfig.from_settings(settings, key)
    if not train_path or not eval_path:
        missing = "data.train_path" if not train_path else "data.eval_path"
        raise ValueError(f"{missing}: {key}.task text_bias writes the training questions to data.train_path and the "
                         f"held-out splits ({', '.join(text_bias.SPLITS)}) to data.eval_path; set both")
    return text_bias.ensure_files(train_path, eval_path, config)


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="python -m dapo_lightning.data_prep fixtures",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="a fit config (repeat: later files win)")
    args = parser.parse_args(argv)
    config: dict = {}
    for path in args.config:
        config = _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    written = build_missing(config)
    print("\n".join(f"wrote {what}" for what in written) or "nothing to build: every fixture exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
