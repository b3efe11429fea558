"""The README and docs/*.md: the generated config reference is up to date, the Python example runs, and every
command line they show is accepted by the program it calls, every repository path they name exists.

Command lines are found in the Markdown itself, so a new one is checked without touching this file:

- every line of a ```bash (sh, shell, console) block; a program this file cannot check fails the test;
- lines of other code blocks, and inline code spans, that start with a program named in ``CHECKS``
  (after ``NAME=value`` assignments), with at least one argument (`dapo-data` alone is a name, not a command).

Each is checked without running anything heavy, GPU-only commands included:

- ``dapo-lightning ...`` (also ``python -m dapo_lightning.cli``, under ``torchrun`` or ``srun``): parsed by the real
  CLI, with its configs, through ``dapo_lightning.cli.main``; nothing is instantiated and no fixture is built;
- ``python -m MODULE ...`` / ``python SCRIPT ...`` / ``dapo-data ...``: run with argparse stopped right after it
  parsed the arguments (the data converters, the benchmarks); a script without argparse is not run, and each
  of its ``--options`` must appear in its source;
- ``make TARGET VAR=value``: the target and the variables exist in the Makefile;
- ``pytest PATHS``: the paths exist; ``pip install -e .[EXTRAS]``: the extras exist in setup.cfg;
- ``torchrun ...``: parsed by torch's own parser, then its module as above.

Placeholders: ``$VAR`` is replaced by ``STAND_INS[VAR]`` (an unknown one fails: add it), ``--config ...`` by the demo
config.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib.util
import io
import itertools
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from markdown_it import MarkdownIt

from dapo_lightning.config_reference import END, START, render, updated_readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "reliability_report.md")  # that one is generated
GENERATED = [(START, END), ("<!-- reliability-report:start -->", "<!-- reliability-report:end -->")]
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
STAND_INS = {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
ELLIPSIS_CONFIG = "configs/demo.yaml"  # `--config ...` in prose: any config will do
DISPATCHERS = ("dapo_lightning.data_prep",)  # no argparse of their own: they hand argv to a command's main(argv)


# --- the existing checks -------------------------------------------------------------------------------


def test_readme_config_reference_is_up_to_date():
    text = README.read_text()
    assert START in text and END in text
    assert updated_readme(text) == text, "run: python -m dapo_lightning.config_reference --write"


def test_reference_documents_every_key():
    table = render()
    for key in ("`num_generations`", "`epsilon_high`", "`reward_weights`", "`micro_batch_size`", "`on_bad_row`",
                "`export_final`", "`target_modules`"):
        assert key in table
    assert "|  |" not in table.replace("| `null` |", "")  # no key without a description


def test_the_python_example_runs(tmp_path):
    """The README's notebook example, run as written in a fresh folder (only its step count shortened)."""
    import subprocess

    text = README.read_text()
    block = text.split("<!-- python-example:start -->")[1].split("<!-- python-example:end -->")[0]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    assert len(code.strip().splitlines()) <= 20 and "max_steps=200" in code
    code = code.replace("max_steps=200", "max_steps=2").replace("val_check_interval=100", "val_check_interval=2")
    code = code.replace("eval_limit=64", "eval_limit=4")
    script = tmp_path / "example.py"
    script.write_text(code + "\nprint('trained', trainer.global_step, sorted(trainer.callback_metrics)[:3])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 2" in result.stdout
    assert (tmp_path / ".cache" / "models" / "tiny" / "config.json").exists()


# --- finding the command lines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandLine:
    where: str  # file:line
    text: str  # as written, continuation lines joined
    argv: tuple[str, ...]  # shell words, placeholders not yet replaced


def without_generated(text: str) -> str:
    """``text`` with the generated blocks blanked out, line count kept (they are checked against the code above)."""
    for start, end in GENERATED:
        if start in text and end in text:
            head, rest = text.split(start, 1)
            body, tail = rest.split(end, 1)
            text = head + start + "\n" * body.count("\n") + end + tail
    return text


def env_and_words(argv) -> tuple[dict[str, str], list[str]]:
    """Leading ``NAME=value`` assignments, then the command's words."""
    argv, env = list(argv), {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    return env, argv


def program(argv) -> str | None:
    words = env_and_words(argv)[1]
    return Path(words[0]).name if words and words[0].startswith(".venv/bin/") else (words[0] if words else None)


def shell_lines(content: str) -> list[tuple[int, str]]:
    """(offset of its first line, text) of each logical line: backslash continuations joined."""
    lines, start, parts = [], None, []
    for offset, line in enumerate(content.split("\n")):
        start = offset if start is None else start
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        lines.append((start, " ".join(p.strip() for p in parts)))
        start, parts = None, []
    return lines


def command_lines(path: Path) -> list[CommandLine]:
    text = without_generated(path.read_text())
    lines = text.split("\n")
    name = path.relative_to(ROOT).as_posix()
    found: list[CommandLine] = []
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type in ("fence", "code_block"):
            info = token.info.strip().split()[0] if token.info.strip() else ""
            if token.type == "fence" and info not in ("", *SHELL_BLOCKS):
                continue  # python, yaml, text, ...
            strict = info in SHELL_BLOCKS  # every line must be a command this file can check
            first = token.map[0] + (2 if token.type == "fence" else 1)  # 1-based line of the block's first line
            for offset, line in shell_lines(token.content):
                if info == "console":  # commands after a prompt, the rest is their output
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                try:
                    argv = shlex.split(line, comments=True)
                except ValueError:  # unbalanced quotes: a command only in a shell block, where it then fails
                    argv = None
                if argv == [] or (argv is None and not strict):
                    continue  # a blank line or a comment
                if strict or program(argv) in CHECKS:
                    found.append(CommandLine(f"{name}:{first + offset}", line.strip(), tuple(argv or ())))
        elif token.type == "inline":
            for child in token.children or []:
                if child.type != "code_inline":
                    continue
                try:
                    argv = shlex.split(child.content)
                except ValueError:
                    continue
                if program(argv) in CHECKS and len(env_and_words(argv)[1]) > 1:
                    block = "\n".join(lines[token.map[0]:token.map[1]])  # the span may run over a line break
                    at = re.search(r"\s+".join(map(re.escape, child.content.split())), block)
                    line = token.map[0] + (block[:at.start()].count("\n") if at else 0)
                    found.append(CommandLine(f"{name}:{line + 1}", child.content, tuple(argv)))
    return found


# --- checking one command line ---------------------------------------------------------------------------


class CommandError(AssertionError):
    pass


class _Parsed(BaseException):
    """Raised by argparse once it has parsed a command's arguments: nothing after that runs."""


@contextlib.contextmanager
def stop_after_parsing():
    """argparse parses as usual (errors exit 2, ``--help`` exits 0), then raises ``_Parsed`` instead of returning."""
    parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]  # inside a parse (subparsers call parse_known_args again): let it return

    def parsed_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            result = parse_args(self, args, namespace)
        finally:
            depth[0] -= 1
        raise _Parsed(result)

    def parsed_known_args(self, args=None, namespace=None):
        if depth[0]:
            return parse_known_args(self, args, namespace)
        depth[0] += 1
        try:
            result = parse_known_args(self, args, namespace)
        finally:
            depth[0] -= 1
        raise _Parsed(result)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parsed_args), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", parsed_known_args):
        yield


@contextlib.contextmanager
def environment(env: dict[str, str], argv0: str, args, path: Path | None = None):
    """The process state a command line would run in: its variables, sys.argv, sys.path, the repository as cwd."""
    saved_env, saved_argv, saved_path, saved_cwd = dict(os.environ), sys.argv[:], sys.path[:], os.getcwd()
    os.environ.update(env)
    sys.argv = [argv0, *args]
    sys.path[:0] = [str(path.parent if path else ROOT), str(ROOT)]
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)


def captured_exit(run) -> tuple[object, str, object]:
    """Run ``run()``: its exit code (None when it returned), what it printed on stderr, what it returned."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            result = run()
    except SystemExit as exit_:
        return (0 if exit_.code is None else exit_.code), err.getvalue(), None
    return None, err.getvalue(), result


def check_cli(args, env):
    """``dapo-lightning ARGS``: the real CLI parses ARGS and its configs; instantiation and the run are stubbed.
    ``export`` has its own parser (``dapo_lightning/export.py``), stopped once it has parsed ARGS."""
    if list(args[:1]) == ["export"]:
        return check_python_target("dapo_lightning.export", args[1:], env, module=True)
    from lightning.pytorch.cli import LightningCLI

    import dapo_lightning.cli as cli

    reached = []
    stubs = {"_set_seed": lambda self: None, "instantiate_classes": lambda self: None,
             "after_instantiate_classes": lambda self: None,
             "_run_subcommand": lambda self, subcommand: reached.append(subcommand)}
    with contextlib.ExitStack() as stack:
        for cls in {LightningCLI, cli.DAPOLightningCLI}:  # also shadows any override of the project's CLI class
            for name, stub in stubs.items():
                stack.enter_context(mock.patch.object(cls, name, stub))
        stack.enter_context(mock.patch.object(cli, "build_offline_fixtures", lambda config: None))
        stack.enter_context(environment(env, "dapo-lightning", args))
        code, err, _ = captured_exit(cli.main)  # as the console script runs it: the arguments from sys.argv
    if code not in (None, 0):
        raise CommandError(f"dapo-lightning refuses it (exit {code}):\n{err[-2000:]}")
    if code is None and not reached:
        raise CommandError("dapo-lightning parsed it but reached no subcommand")


def _static_options(source: str, args, what: str):
    options = [a.split("=")[0] for a in args if a.startswith("--")]
    missing = [o for o in options if f'"{o}"' not in source and f"'{o}'" not in source]
    if missing:
        raise CommandError(f"{what} has no option {', '.join(missing)} (it is not run here: it uses no argparse)")


def check_python_target(target: str, args, env, *, module: bool):
    """``python -m MODULE ARGS`` or ``python SCRIPT ARGS``, stopped once argparse has parsed ARGS."""
    if module:
        if target == "pytest":
            return check_pytest(args, env)
        if target == "pip":
            return check_pip(args, env)
        if target == "dapo_lightning.cli":
            return check_cli(args, env)
        spec = importlib.util.find_spec(target)
        if spec is None:
            raise CommandError(f"no module {target}")
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            spec = importlib.util.find_spec(f"{target}.__main__")
            if spec is None:
                raise CommandError(f"{target} is a package without __main__")
        path = Path(spec.origin)
    else:
        path = ROOT / target
        if not path.is_file():
            raise CommandError(f"no script {target}")
    source = path.read_text()
    if "argparse" not in source and target not in DISPATCHERS:
        return _static_options(source, args, target)

    def run():
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(path), run_name="__main__")
        raise CommandError(f"{target} ran to its end without parsing its arguments")

    with stop_after_parsing(), environment(env, str(path), args, None if module else path):
        try:
            code, err, _ = captured_exit(run)
        except _Parsed:
            return
    if code != 0:
        raise CommandError(f"{target} refuses it (exit {code}):\n{err[-2000:]}")


def check_python(args, env):
    args = list(args)
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
        args.pop(0)  # interpreter options (-u, -X ...)
    if not args or args[0] == "-c":
        raise CommandError("python: only `python -m MODULE ...` and `python SCRIPT ...` can be checked")
    if args[0] == "-m":
        return check_python_target(args[1], args[2:], env, module=True)
    return check_python_target(args[0], args[1:], env, module=False)


def check_data_prep(args, env):
    return check_python_target("dapo_lightning.data_prep", args, env, module=True)


def check_pytest(args, env):
    for arg in args:
        if not arg.startswith("-") and not (ROOT / arg.split("::")[0]).exists():
            raise CommandError(f"pytest: no {arg}")


def check_make(args, env):
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE))
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", text, re.MULTILINE))
    for arg in args:
        name = arg.split("=")[0]
        if "=" in arg and name not in variables:
            raise CommandError(f"make: the Makefile sets no variable {name} ({', '.join(sorted(variables))})")
        if "=" not in arg and not arg.startswith("-") and arg not in targets:
            raise CommandError(f"make: no target {arg} ({', '.join(sorted(targets))})")


def check_pip(args, env):
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = set(setup["options.extras_require"])
    for arg in args:
        match = re.fullmatch(r"\.\[([\w,-]+)\]", arg)  # the project with extras: `pip install -e .[bench]`
        unknown = set(match[1].split(",")) - extras if match else set()
        if unknown:
            raise CommandError(f"pip: setup.cfg has no extra {', '.join(unknown)} ({', '.join(sorted(extras))})")


def check_tensorboard(args, env):
    if "--logdir" not in args[:-1]:
        raise CommandError("tensorboard: give --logdir DIR")


def check_torchrun(args, env):
    from torch.distributed.run import get_args_parser

    code, err, parsed = captured_exit(lambda: get_args_parser().parse_args(list(args)))
    if code is not None:
        raise CommandError(f"torchrun refuses it (exit {code}):\n{err[-2000:]}")
    return check_python_target(parsed.training_script, parsed.training_script_args, env, module=parsed.module)


def check_srun(args, env):
    args = list(args)
    while args and args[0].startswith("-"):
        args.pop(0)  # srun's own options, as --opt=value
    check(args, env)


CHECKS = {
    "dapo-lightning": check_cli,
    "dapo-data": check_data_prep,
    "python": check_python,
    "python3": check_python,
    "pytest": check_pytest,
    "make": check_make,
    "pip": check_pip,
    "tensorboard": check_tensorboard,
    "torchrun": check_torchrun,
    "srun": check_srun,
}


def substituted(argv) -> list[str]:
    words = []
    for i, word in enumerate(argv):
        if word == "..." and i and argv[i - 1] == "--config":
            word = ELLIPSIS_CONFIG
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", word):
            if name not in STAND_INS:
                raise CommandError(f"${name}: add a stand-in value to STAND_INS in tests/test_readme.py")
            word = re.sub(rf"\$\{{?{name}\}}?", STAND_INS[name], word)
        words.append(word)
    return words


def check(argv, env=None):
    """Raise ``CommandError`` unless the command line is accepted by the program it calls."""
    more_env, words = env_and_words(substituted(argv))
    env = {**(env or {}), **more_env}
    name = program(words)
    if name is None:
        raise CommandError("not a command")
    if name not in CHECKS:
        raise CommandError(f"{name}: tests/test_readme.py cannot check this program; add it to CHECKS")
    CHECKS[name](words[1:], env)


README_COMMANDS = command_lines(README)
DOC_COMMANDS = [c for doc in DOCS for c in command_lines(doc)]


@pytest.mark.parametrize("command", README_COMMANDS + DOC_COMMANDS, ids=lambda c: f"{c.where} {c.text[:70]}")
def test_command_line_is_accepted(command):
    """The command line, as written in the README or docs (placeholders replaced), is accepted by its program."""
    try:
        check(command.argv)
    except CommandError as error:
        message = f"{command.where}: {command.text}\n{error}"
    else:
        return
    pytest.fail(message, pytrace=False)


def test_the_readme_shows_its_commands():
    """The extraction finds the README's commands: each kind, and a command line for every data converter."""
    programs = {program(c.argv) for c in README_COMMANDS}
    assert {"dapo-lightning", "python", "make", "torchrun", "srun", "tensorboard"} <= programs, programs
    assert len(README_COMMANDS) >= 25, [c.text for c in README_COMMANDS]
    data_prep = {c.argv[c.argv.index("dapo_lightning.data_prep") + 1] for c in README_COMMANDS
                 if "dapo_lightning.data_prep" in c.argv and c.argv[-1] != "dapo_lightning.data_prep"}
    assert {"aokvqa", "visrag-arxivqa", "mmmu-pro", "merge", "validate"} <= data_prep, data_prep


def test_a_wrong_command_line_is_caught():
    """The checks refuse what a reader could not run: each of these lines is wrong in one word."""
    wrong = [
        "dapo-lightning fit --config configs/exp3.yaml --config "
        "configs/ablations/token_weights_grid/topk0.4_sigma1_clip0.2-3.0.yaml",
        "dapo-lightning fit --config configs/exp3.yaml --trainer.num_nodez 2",
        "dapo-lightning fitt --config configs/exp3.yaml",
        "python -m dapo_lightning.data_prep merge --input data/a.parquet --out data/ddm.parquet",
        "python -m dapo_lightning.data_prep mmmu-pro --hub MMMU/MMMU_Pro --multi-image all --out x.parquet",
        "python -m dapo_lightning.data_prep visrag --hub openbmb/VisRAG-Ret-Test-ArxivQA --out x.parquet",
        "python benchmarks/peer_trl.py --shapes 3b --device tpu",
        "python -m dapo_lightning.config_reference --writ",
        "make demo THREADS=2",
        "make tests",
        "pip install -e .[benchmarks]",
        "torchrun --nnodes 2 --node_rank $NODE_RANK -m dapo_lightning.cli fit --config configs/exp9.yaml",
        "srun dapo-lightning fit --config configs/exp3.yaml --trainer.num_nodes two",
        "dapo-lightning fit --config configs/exp3.yaml --trainer.devices $GPUS",
        "accelerate launch train.py",
    ]
    for line in wrong:
        with pytest.raises(CommandError):
            check(shlex.split(line))


# --- paths and links ---------------------------------------------------------------------------------------

TOP_FOLDERS = "configs|docs|tests|benchmarks|dapo_lightning|callbacks|data_prep|ablations|strategies"
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{TOP_FOLDERS})/[\w.{{}},*/-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def brace_expanded(path: str) -> list[str]:
    """``a{1,2}b`` -> ``a1b``, ``a2b`` (every brace group, as the shell does)."""
    parts = re.split(r"(\{[^{}]*\})", path)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def named_paths(path: Path) -> list[tuple[str, Path]]:
    """Every repository path a document names, and its relative links.

    Brace groups are expanded; ``ablations/`` and ``strategies/`` are read under ``configs/``.
    """
    text = without_generated(path.read_text())
    found = []
    for match in REPO_PATH.finditer(text):
        written = match.group(1).rstrip(".,")
        for expanded in brace_expanded(written):
            if expanded.startswith(("ablations/", "strategies/")):
                expanded = "configs/" + expanded
            found.append((written, ROOT / expanded))
    for match in LINK.finditer(text):
        target = match.group(1).split("#")[0]
        if target and not re.match(r"[a-z]+:", target):
            found.append((target, path.parent / target))
    return found


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_named_path_exists(doc):
    missing = sorted({f"{written} ({target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})"
                      for written, target in named_paths(doc)
                      if not (target.exists() if "*" not in target.name else any(target.parent.glob(target.name)))})
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_the_readme_names_every_ablation_overlay():
    """configs/ablations/<name>.yaml (names listed) and the token-weight grid (a brace pattern): every overlay."""
    text = without_generated(README.read_text())
    paragraph = next(p for p in text.split("\n\n") if "configs/ablations/<name>.yaml" in p)
    listed = {ROOT / "configs" / "ablations" / f"{name}.yaml"
              for name in re.findall(r"`([a-z_]+)`", paragraph.split("configs/ablations/<name>.yaml", 1)[1])}
    listed |= {target for _, target in named_paths(README) if "configs/ablations/" in target.as_posix()}
    on_disk = set((ROOT / "configs" / "ablations").rglob("*.yaml"))
    assert not (on_disk - listed), f"overlays the README does not name: {sorted(p.name for p in on_disk - listed)}"
    assert not (listed - on_disk), f"overlays named but missing: {sorted(p.name for p in listed - on_disk)}"
