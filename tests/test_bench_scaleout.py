"""How the scale-out benchmark splits the queue's overhead (bench/scaleout.py)."""

from __future__ import annotations

import pytest

from bench.scaleout import split_overhead


def test_the_queue_overhead_splits_into_a_cost_per_study_and_a_cost_once():
    # each further study: 50 ms queued against 45 ms local; once: 0.8 s
    split = split_overhead({40: 2.0, 80: 3.8}, {40: 3.0, 80: 5.0})
    assert split == {"marginal_overhead_pct": 11.1, "fixed_overhead_s": 0.8}


def test_a_queue_that_costs_only_once_has_no_marginal_overhead():
    assert split_overhead({10: 1.0, 30: 3.0}, {10: 1.5, 30: 3.5}) == pytest.approx(
        {"marginal_overhead_pct": 0.0, "fixed_overhead_s": 0.5})
