"""Pareto front of (size, Dice) points against hand-computed fronts."""

from edgeseg.report.pareto import dominates, pareto_front


def test_dominates_by_hand():
    assert dominates((1.0, 0.9), (2.0, 0.8))
    assert dominates((1.0, 0.9), (1.0, 0.8))  # same size, better Dice
    assert dominates((1.0, 0.9), (2.0, 0.9))  # same Dice, smaller
    assert not dominates((1.0, 0.9), (1.0, 0.9))  # identical
    assert not dominates((1.0, 0.7), (2.0, 0.8))  # a trade-off


def test_front_of_a_typical_sweep():
    # fp32 (400 kB, .90), 8/8 (100 kB, .89), 4/8 (60 kB, .88), 4/6 (60 kB, .86), 4/4 (55 kB, .70), 2/4 (35 kB, .72)
    points = [(400.0, 0.90), (100.0, 0.89), (60.0, 0.88), (60.0, 0.86), (55.0, 0.70), (35.0, 0.72)]
    # 4/6 is dominated by 4/8 (same size, lower Dice); 4/4 by 2/4 (larger and worse). By size: 2/4, 4/8, 8/8, fp32.
    assert pareto_front(points) == [5, 2, 1, 0]


def test_front_skips_failed_and_keeps_duplicates():
    points = [None, (10.0, 0.5), (10.0, 0.5), (20.0, 0.4), None, (5.0, 0.6)]
    # (5, .6) dominates every other point.
    assert pareto_front(points) == [5]
    assert pareto_front([(10.0, 0.5), (10.0, 0.5), None]) == [0, 1]
    assert pareto_front([None, None]) == []
    assert pareto_front([]) == []


def test_monotone_trade_off_is_all_front():
    points = [(3.0, 0.9), (1.0, 0.5), (2.0, 0.7)]
    assert pareto_front(points) == [1, 2, 0]


def test_front_on_keypoint_f1():
    # The axis is any "higher is better" accuracy: (size kB, mean F1); the smaller 8/8 has the higher F1.
    points = [(4.0, 0.6), (1.0, 0.7), (0.6, 0.4)]
    assert pareto_front(points) == [2, 1]
