"""The intervals every claimed gain in the course is quoted with."""
import math

import pytest

from course_utils.metrics import format_ci, mean_ci, paired_difference, proportion_ci


def test_wilson_interval_matches_the_formula_and_stays_in_range():
    rate, low, high = proportion_ci(87, 100)
    assert rate == 0.87
    assert (round(low, 3), round(high, 3)) == (0.790, 0.922)  # Wilson score interval, z = 1.96
    assert proportion_ci(0, 30)[1] == 0.0 and proportion_ci(30, 30)[2] == 1.0
    assert proportion_ci([True, False, True, True]) == proportion_ci(3, 4)
    assert all(math.isnan(v) for v in proportion_ci([], None))


def test_paired_difference_is_the_mean_difference_with_a_normal_interval():
    a, b = [1.0, 2.0, 4.0, 3.0], [0.5, 1.0, 1.0, 2.5]
    mean, low, high = paired_difference(a, b)
    d = [0.5, 1.0, 3.0, 0.5]
    sd = math.sqrt(sum((x - 1.25) ** 2 for x in d) / 3)
    assert mean == pytest.approx(1.25)
    assert (low, high) == pytest.approx((1.25 - 1.96 * sd / 2, 1.25 + 1.96 * sd / 2))
    assert mean_ci(d) == pytest.approx((mean, low, high))
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_paired_pass_fail_difference_stays_within_plus_minus_one():
    after = [1] * 45 + [0] * 2
    before = [0] * 47
    mean, low, high = paired_difference(after, before)
    assert mean == pytest.approx(45 / 47) and high == 1.0 and 0.85 < low < mean
    mean, low, high = paired_difference([0] * 30, [1] * 30)
    assert (mean, low, high) == (-1.0, -1.0, -1.0)
    # real-valued differences are not clipped
    assert paired_difference([3.0, 5.0], [0.0, 0.0])[2] > 1.0


def test_format_ci_prints_percent_or_raw():
    assert format_ci((0.9, 0.826, 0.945), 100) == "90.0% [82.6, 94.5] (n=100)"
    assert format_ci((2.107, 1.383, 2.831), 31, percent=False) == "2.107 [1.383, 2.831] (n=31)"
