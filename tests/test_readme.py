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
