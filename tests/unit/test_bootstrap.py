import numpy as np
import pytest

from tunegate.evals.bootstrap import bootstrap_ci, paired_bootstrap
from tunegate.evals.metrics import exact_match, normalize_answer


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = rng.random(50) < 0.7
    large = rng.random(5000) < 0.7
    a, b = bootstrap_ci(small, 2000, 0), bootstrap_ci(large, 2000, 0)
    assert a.low <= a.mean <= a.high
    assert (b.high - b.low) < (a.high - a.low) / 5
    # binomial standard error at n=5000, p=0.7: 0.0065 -> 95% CI half-width ~0.0127
    assert (b.high - b.low) / 2 == pytest.approx(1.96 * np.sqrt(0.7 * 0.3 / 5000), rel=0.1)


def test_paired_bootstrap_of_identical_systems_is_zero():
    x = np.array([1, 0, 1, 1, 0] * 20)
    d = paired_bootstrap(x, x, 1000, 0)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_detects_a_real_gain_and_not_a_tie():
    base = np.array([1, 0] * 100)
    cand = base.copy()
    cand[1::2][:60] = 1  # 60 more right out of 200
    d = paired_bootstrap(base, cand, 2000, 0)
    assert d.mean == pytest.approx(0.3) and d.low > 0.2
    flip = np.array([0, 1] * 100)  # same accuracy, different rows
    assert paired_bootstrap(base, flip, 2000, 0).low < 0 < paired_bootstrap(base, flip, 2000, 0).high


def test_paired_bootstrap_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap([1, 0], [1, 0, 1])


def test_exact_match_normalisation():
    assert normalize_answer(" Card_Arrival.\n") == "card_arrival"
    assert exact_match("card_arrival", "card_arrival") == 1.0
    assert exact_match('"card_arrival"', "card_arrival") == 1.0
    assert exact_match("card arrival", "card_arrival") == 0.0
    assert exact_match("card_arrival, card_linking", "card_arrival") == 0.0
