"""The redesign changes no behaviour: the demo's 50 fixed-seed steps end with the recorded parameters.

The reference (``tests/reference/demo_50_steps.json``) was recorded before the architecture
redesign of issue 11 with torch 2.13.0 on the CPU; ``python -m tests.reference.demo_fingerprint
--write`` re-records it when a change of behaviour is intended (say so in the commit).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference.demo_fingerprint import REFERENCE, STEPS, fingerprint, run_demo


@pytest.mark.slow
def test_demo_run_ends_with_the_recorded_parameters(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    assert reference["steps"] == STEPS
    final = run_demo(tmp_path)
    actual = fingerprint(final)
    assert sorted(actual) == sorted(reference["tensors"])
    for name, expected in reference["tensors"].items():
        torch.testing.assert_close(
            torch.tensor(actual[name], dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
            rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}",
        )
    # the run trained: the initial weights are far from the reference
    initial = fingerprint(tmp_path / "model")
    assert max(abs(a - b) for k in initial for a, b in zip(initial[k], reference["tensors"][k])) > 1e-3
