"""The test behind "told apart" (tokenmix.bench.stats, issue 37.3): Welch's t-test, Holm's correction,
and nothing called apart with fewer than three seeds."""

from __future__ import annotations

import math
import random

import pytest

from tokenmix.bench.stats import MIN_SEEDS, holm, incomplete_beta, pair_tests, welch_p


@pytest.mark.parametrize("x", [1e-9, 0.01, 0.3, 0.5, 0.77, 0.999])
def test_the_incomplete_beta_function_against_its_closed_forms(x):
    assert incomplete_beta(1, 1, x) == pytest.approx(x, rel=1e-12)
    assert incomplete_beta(3.5, 1, x) == pytest.approx(x**3.5, rel=1e-10)
    assert incomplete_beta(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-10)
    assert incomplete_beta(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-10)


def test_welch_against_the_t_table_and_scipy():
    # [−d, d] against [m − d, m + d]: ν = 2 exactly, t = m / (d√2); 4.302653 is ν = 2's two-sided 5 % point.
    d = 0.5
    m = 4.302653 * d * math.sqrt(2)
    assert welch_p([-d, d], [m - d, m + d]) == pytest.approx(0.05, rel=1e-5)
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(300):
        x = [rng.gauss(0, rng.uniform(0.01, 2)) for _ in range(rng.randint(2, 7))]
        y = [rng.gauss(rng.uniform(-2, 2), rng.uniform(0.01, 2)) for _ in range(rng.randint(2, 7))]
        assert welch_p(x, y) == pytest.approx(stats.ttest_ind(x, y, equal_var=False).pvalue, rel=1e-9)


def test_holm_steps_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.9, 0.9]) == [1.0, 1.0]


def test_pairs_are_apart_only_after_the_correction_and_with_three_seeds():
    # c vs a: p ≈ 0.03 alone, but one of three pairs: Holm's 3 × p is above 0.05.
    values = {"a": [1.0, 1.2, 1.4], "b": [1.05, 1.25, 1.45], "c": [1.55, 1.7, 1.8]}
    tests = {(t["a"], t["b"]): t for t in pair_tests(values)}
    assert list(tests) == [("a", "b"), ("a", "c"), ("b", "c")]
    raw = tests["a", "c"]
    assert raw["p"] < 0.05 <= raw["p_holm"] and not raw["apart"]
    far = dict(values, c=[3.0, 3.1, 3.2])
    assert all(t["apart"] == ("c" in (t["a"], t["b"])) for t in pair_tests(far))
    # Two seeds each: nothing is tested, even two seeds that agree exactly (a spread of 0).
    two = {"a": [1.0, 1.0], "b": [5.0, 5.1]}
    assert pair_tests(two) == [{"a": "a", "b": "b", "p": None, "p_holm": None, "apart": False}]
    assert MIN_SEEDS == 3
