"""benchmarks/per_class_fmnist_10pc.py's arithmetic on a hand-checkable confusion matrix (the script itself reads the
campaign's checkpoints, which a fresh clone does not have; its report checks its top-1 against the campaign's)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from benchmarks.per_class_fmnist_10pc import class_recall, gap_shares, top_confusions

# true:  0 0 1 1 1 2    predicted: 0 1 1 1 0 0
#   rows (true) x columns (predicted): class 0 [1 1 0], class 1 [1 2 0], class 2 [1 0 0]
CM = confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 0], labels=range(3))


def test_class_recall_is_each_true_class_share_predicted_right():
    assert class_recall(CM) == pytest.approx([1 / 2, 2 / 3, 0.0])


def test_top_confusions_rank_off_diagonal_cells_by_share_of_the_true_class():
    # class 2's only image went to 0 (share 1) outranks class 0 -> 1 (1 of 2), then 1 -> 0 (1 of 3)
    assert top_confusions(CM, 3) == [(2, 0, pytest.approx(1.0)), (0, 1, pytest.approx(0.5)),
                                     (1, 0, pytest.approx(1 / 3))]
    assert top_confusions(CM, 6) == top_confusions(CM, 3)  # only 3 mistaken cells: no empty or diagonal cell
    assert CM[0, 0] == 1  # and the matrix it read is untouched


def test_gap_shares_split_the_mean_gap_by_class_and_sum_to_one():
    shares = gap_shares(np.array([0.5, 0.75, 1.0]), np.array([1.0, 1.0, 1.0]))
    assert shares == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert shares.sum() == pytest.approx(1.0)
