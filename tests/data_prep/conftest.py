from __future__ import annotations

from collections.abc import Callable

import pytest

from dapo_lightning.data_prep.__main__ import main


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``python -m dapo_lightning.data_prep ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def run(*argv: object) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(arg) for arg in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
