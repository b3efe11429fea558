"""Rows skipped as unusable (data.on_bad_row=skip): the tally per stage and kind, its one-line summary, and the
dropped rows' errors crossing from a DataLoader worker. (Through the data module:
``tests/reliability/test_data_faults.py``.)"""

from dapo_lightning.data.rows import BAD_SOLUTION, UNREADABLE_IMAGE, BadRow
from dapo_lightning.data.skipped import SkippedRows, summary, summed_over_processes


def test_the_tally_by_hand():
    tally = SkippedRows()
    tally.add("val", [BadRow("a.parquet", 4, "solution 'Z' is not a letter A-J", BAD_SOLUTION)])
    tally.add("val", [BadRow("a.parquet", 9, "odd", "something new"), BadRow("a.parquet", 2, "x", BAD_SOLUTION)])
    counts, first = tally.take("val")
    assert counts == {BAD_SOLUTION: 2, "other": 1} and first == "a.parquet: row 4: solution 'Z' is not a letter A-J"
    assert tally.take("val") == ({}, None) and tally.take("train") == ({}, None)
    assert summed_over_processes({BAD_SOLUTION: 2, "other": 1}, "cpu") == {BAD_SOLUTION: 2, "other": 1}  # one process


def test_the_summary_line_by_hand():
    assert summary("train", 0, {}, None) is None  # nothing skipped: nothing said
    # kinds by count, then by name; one row is "row", not "rows"
    assert summary("val", 3, {UNREADABLE_IMAGE: 1}, "a.parquet: row 4: image is empty (0 bytes)") == (
        "val epoch 3: 1 unusable row skipped (data.on_bad_row=skip): 1 unreadable image; the first: a.parquet: row 4: "
        "image is empty (0 bytes); python -m dapo_lightning.data_prep validate lists every unusable row")
    assert summary("train", 0, {UNREADABLE_IMAGE: 2, "other": 2, BAD_SOLUTION: 5}, None) == (
        "train epoch 0: 9 unusable rows skipped (data.on_bad_row=skip): 5 solution not a letter, 2 other, "
        "2 unreadable image; python -m dapo_lightning.data_prep validate lists every unusable row")


def test_a_dropped_row_crosses_from_a_worker_process_whole():
    """A DataLoader worker pickles its batch, with the BadRows of the rows it dropped."""
    import pickle

    error = pickle.loads(pickle.dumps(BadRow("a.parquet", 4, "solution 'Z' is not a letter A-J", BAD_SOLUTION)))
    assert (error.source, error.row, error.reason, error.kind) == ("a.parquet", 4, "solution 'Z' is not a letter A-J",
                                                                   BAD_SOLUTION)
    assert str(error) == "a.parquet: row 4: solution 'Z' is not a letter A-J"
