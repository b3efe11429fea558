"""The README's config reference is generated from the code; it must not drift."""

from pathlib import Path

from dapo_lightning.config_reference import END, START, render, updated_readme

README = Path(__file__).resolve().parents[1] / "README.md"


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
    import os
    import subprocess
    import sys

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
