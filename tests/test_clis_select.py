"""Cherry-picking rules on hand-made candidates: the kept set is exactly the expected one."""

from __future__ import annotations

import pytest

from acp_data.clis.select import (
    ALL_INSTANCES_BELOW,
    INSTANCES_BELOW,
    INSTANCES_KEPT,
    INSTANCES_UNSCORED,
    LAYOUT_BELOW,
    NO_SCORED_CANDIDATE,
    SELECTED,
    passes,
    select_unit,
)


def test_best_of_n_and_instance_filter():
    # four candidates of one unit (the paper's N = 4)
    r = select_unit(image_scores=[55.0, 81.0, None, 79.0], layout_score=70.0,
                    instance_scores=[[90, 20], [65.0, 59.9, None], [99.0], [60.0, 60.0]])
    assert r.selected_idx == 1
    assert r.kept_instances == [[True, False], [True, False, False], [True], [True, True]]
    assert r.reasons[SELECTED] == 1
    assert (r.reasons[INSTANCES_KEPT], r.reasons[INSTANCES_BELOW], r.reasons[INSTANCES_UNSCORED]) == (1, 1, 1)


def test_all_instances_below_drops_the_unit():
    r = select_unit([90.0, 40.0], None, [[59.0, 10.0], [95.0]])
    assert r.selected_idx is None  # no fall-back to the second best
    assert r.reasons[ALL_INSTANCES_BELOW] == 1 and r.reasons[SELECTED] == 0
    assert r.kept_instances == [[False, False], [True]]


def test_ties_go_to_layout_then_index():
    inst = [[70.0]] * 3
    assert select_unit([80.0, 80.0, 80.0], 50.0, inst).selected_idx == 0
    assert select_unit([80.0, 80.0, 80.0], [40.0, 60.0, 60.0], inst).selected_idx == 1
    assert select_unit([80.0, 80.0, 79.0], [None, 10.0, 99.0], inst).selected_idx == 1  # unscored ranks last
    assert select_unit([80.0, 80.0], [None, None], inst[:2]).selected_idx == 0


def test_unscored_values_pass_only_a_zero_threshold():
    assert passes(None, 0) and not passes(None, 60) and passes(60.0, 60) and not passes(59.99, 60)
    r = select_unit([None, None], 80.0, [[90.0], [90.0]])
    assert r.selected_idx is None and r.reasons[NO_SCORED_CANDIDATE] == 1
    # CLIS-L: off by default; a score below, or no score, fails a positive threshold
    assert select_unit([70.0], None, [[70.0]]).selected_idx == 0
    assert select_unit([70.0], 49.0, [[70.0]], min_clis_l=50).reasons[LAYOUT_BELOW] == 1
    assert select_unit([70.0], None, [[70.0]], min_clis_l=50).selected_idx is None
    assert select_unit([70.0], 50.0, [[70.0]], min_clis_l=50).selected_idx == 0
    # per-candidate layout scores: only candidates passing the layout filter compete
    assert select_unit([90.0, 70.0], [40.0, 55.0], [[70.0], [70.0]], min_clis_l=50).selected_idx == 1
    # instance threshold 0 keeps everything, unscored instances included
    r = select_unit([70.0], 10.0, [[None, 5.0]], min_clis_i=0)
    assert r.selected_idx == 0 and r.kept_instances == [[True, True]]


def test_bad_lengths_are_errors():
    with pytest.raises(ValueError):
        select_unit([1.0, 2.0], None, [[1.0]])
    with pytest.raises(ValueError):
        select_unit([1.0, 2.0], [1.0], [[1.0], [2.0]])
    assert select_unit([], None, []).selected_idx is None


def test_nan_is_unscored_like_the_index():
    nan = float("nan")
    r = select_unit([nan, 70.0], nan, [[90.0], [nan, 65.0]], min_clis_l=0)
    assert r.selected_idx == 1 and r.kept_instances == [[True], [False, True]]
    assert select_unit([70.0], nan, [[70.0]], min_clis_l=50).selected_idx is None
    assert not passes(nan, 60) and passes(nan, 0)
