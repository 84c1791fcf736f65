"""The comparison's statistics on data small enough to check by hand: cluster bootstrap intervals,
paired differences and their p-values, and averaging over seeds."""

from __future__ import annotations

import numpy as np
import pytest

from vlbridge.compare.stats import bootstrap_ci, cluster_weights, paired_difference, resampled_means, seed_mean


def test_interval_of_a_constant_is_a_point():
    ci = bootstrap_ci([0.5] * 12, [i // 3 for i in range(12)])
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.5, 0.5)


def test_interval_holds_the_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 40).astype(float)
    large = np.tile(small, 25)
    ci_small = bootstrap_ci(small, list(range(40)))
    ci_large = bootstrap_ci(large, list(range(1000)))
    assert ci_small.low <= ci_small.mean <= ci_small.high
    assert ci_large.mean == pytest.approx(ci_small.mean)
    assert (ci_large.high - ci_large.low) < (ci_small.high - ci_small.low) / 3  # ~ 1/sqrt(25)


def test_resampling_keeps_an_images_items_together():
    """Two images: one with three right answers, one with one wrong. Every resample draws the
    images whole, so the mean is 3/4 (both), 1 (first twice) or 0 (second twice) and nothing else."""
    means = resampled_means(np.array([1.0, 1.0, 1.0, 0.0]), ["a", "a", "a", "b"], resamples=500)
    assert set(np.round(means, 6)) <= {0.75, 1.0, 0.0}
    counts, index = cluster_weights(["a", "a", "a", "b"], resamples=10)
    assert counts.shape == (10, 2) and (counts.sum(axis=1) == 2).all() and list(index) == [0, 0, 0, 1]


def test_a_clear_difference_is_significant():
    clusters = [i // 2 for i in range(200)]
    better = [1.0 if i % 4 else 0.0 for i in range(200)]  # 75%
    worse = [1.0 if i % 4 == 0 else 0.0 for i in range(200)]  # 25%
    diff = paired_difference(better, worse, clusters)
    assert diff.diff == pytest.approx(0.5) and diff.low > 0 and diff.significant and diff.p < 0.01
    assert diff.n_items == 200


def test_identical_rows_are_not_significantly_different():
    values = [float(i % 3 == 0) for i in range(90)]
    diff = paired_difference(values, values, list(range(90)))
    assert (diff.diff, diff.low, diff.high, diff.p) == (0.0, 0.0, 0.0, 1.0) and not diff.significant


def test_a_small_noisy_difference_is_not_significant():
    a = [1.0, 0.0] * 10
    b = [1.0, 0.0] * 9 + [0.0, 0.0]  # one item of 20 differs
    diff = paired_difference(a, b, list(range(20)))
    assert diff.diff == pytest.approx(0.05) and not diff.significant and diff.low <= 0 <= diff.high


def test_seed_mean_averages_items_all_seeds_scored():
    assert seed_mean([{"q1": 1.0, "q2": 0.0, "q3": 1.0}, {"q1": 0.0, "q2": 0.0}]) == {"q1": 0.5, "q2": 0.0}


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Simulated splits of 200 images with 5 correlated questions each (an image's difficulty is
    shared by its questions): the cluster bootstrap's 95% interval holds the true accuracy in
    roughly 95 of 100 splits (a per-question bootstrap would be too narrow here)."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(100):
        difficulty = rng.uniform(0.1, 0.9, size=200)  # true mean 0.5
        right = (rng.random((200, 5)) < difficulty[:, None]).astype(float).ravel()
        images = np.repeat(np.arange(200), 5)
        ci = bootstrap_ci(right, images, resamples=500, seed=trial)
        covered += ci.low <= 0.5 <= ci.high
    assert 88 <= covered <= 99, covered


def test_one_or_a_few_images_cannot_be_significant():
    # every resample of one image (or of images all favouring a) is positive, which alone gave p = 0.001;
    # a sign-flip test on C images cannot go below 2 / 2^C, and neither does the p-value now
    one = paired_difference([1.0, 1.0], [0.0, 0.0], ["img", "img"])
    assert one.diff == 1.0 and one.p == 1.0 and not one.significant
    few = paired_difference([1.0] * 4, [0.0] * 4, list("abcd"))
    assert few.p == pytest.approx(2 / 2**4) and not few.significant
    many = paired_difference([1.0] * 12, [0.0] * 12, list(range(12)))
    assert many.p == pytest.approx(2 / 2001) and many.significant  # the bootstrap's own floor again


def test_images_both_rows_score_alike_do_not_lower_the_floor():
    # five images favour a, 95 are tied: flipping a tied image changes nothing, so a sign-flip test
    # has five images to flip (p >= 2 / 2^5); counting all 100 let the bootstrap's p = 0.009 through
    a, b = [1.0] * 5 + [0.5] * 95, [0.0] * 5 + [0.5] * 95
    few = paired_difference(a, b, list(range(100)))
    assert few.p == pytest.approx(2 / 2**5) and not few.significant
    same = paired_difference([0.5] * 10, [0.5] * 10, list(range(10)))
    assert same.p == 1.0
