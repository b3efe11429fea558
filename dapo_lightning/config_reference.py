"""The README's config-key reference, generated from the code's own docstrings.

    python -m dapo_lightning.config_reference          # print the Markdown tables
    python -m dapo_lightning.config_reference --write  # replace them in README.md

Each key is documented once, in the code (attribute docstrings of the config
dataclasses and the ``Args`` of ``VisualMCQDataModule``); a test fails when README.md
is out of date.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path

from dapo_lightning import config as cfg

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
SECTIONS = [
    ("model.policy", cfg.PolicyConfig),
    ("model.policy.lora", cfg.LoraSettings),
    ("model.rollout", cfg.RolloutConfig),
    ("model.rewards", cfg.RewardConfig),
    ("model.loss", cfg.LossConfig),
    ("model.optim", cfg.OptimConfig),
]


def attribute_docstrings(cls) -> dict[str, str]:
    """``name: type = default`` followed by a string literal -> {name: docstring}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    return "null" if value is None else repr(value).replace("|", "\\|")


def _table(prefix: str, rows: list[tuple[str, str, str]]) -> str:
    lines = [f"**`{prefix}`**", "", "| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {doc} |" for name, default, doc in rows]
    return "\n".join(lines)


def init_rows(cls, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """Rows for the ``__init__`` arguments of ``cls`` documented in its Google-style ``Args``."""
    from docstring_parser import parse

    docs = {p.arg_name: " ".join(p.description.split()) for p in parse(cls.__init__.__doc__).params}
    rows = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in skip:
            continue
        default = parameter.default
        shown = "null" if default is None else repr(default)
        if name == "system_prompt" and default:
            shown = "the prompt of docs/spec.md section 1"
        rows.append((name, shown.replace("|", "\\|"), docs.get(name, "")))
    return rows


def render() -> str:
    from dapo_lightning.data import VisualMCQDataModule
    from dapo_lightning.module import DAPOModule

    parts = [_table("model", init_rows(DAPOModule, skip=("policy", "rollout", "rewards", "loss", "optim")))]
    for prefix, cls in SECTIONS:
        docs = attribute_docstrings(cls)
        rows = [(f.name, _default(f), docs.get(f.name, "")) for f in dataclasses.fields(cls)]
        parts.append(_table(prefix, rows))
    parts.append(_table("data", init_rows(VisualMCQDataModule)))
    return "\n\n".join(parts) + "\n"


def updated_readme(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{render()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--write" in argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        readme.write_text(updated_readme(readme.read_text()))
        print(f"updated {readme}")
    else:
        print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
