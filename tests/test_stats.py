"""harness.stats against independent references.

Each test names where its reference value comes from: a published worked example, a separate
implementation (scipy, sklearn when installed) or brute force written out in the test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from harness import stats


# ----------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), Stat. Med. 17:857-872, Table I, method 3 (Wilson score, no continuity
        # correction), 95% limits printed to 4 decimals.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_table_1(k, n, low, high):
    got_low, got_high = stats.wilson_interval(k, n)
    assert got_low == pytest.approx(low, abs=5e-5)
    assert got_high == pytest.approx(high, abs=5e-5)


def test_wilson_matches_scipy_on_a_grid_of_arrays():
    # Reference: scipy.stats.binomtest(k, n).proportion_ci(method="wilson"), a separate
    # implementation of the same interval.
    ks, ns = np.meshgrid(np.arange(0, 41), np.array([40, 57, 200]))
    ks, ns = ks.ravel(), ns.ravel()
    for confidence in (0.9, 0.95, 0.99):
        low, high = stats.wilson_interval(ks, ns, confidence)
        for i in range(ks.size):
            ref = sps.binomtest(int(ks[i]), int(ns[i])).proportion_ci(confidence_level=confidence, method="wilson")
            assert low[i] == pytest.approx(ref.low, abs=1e-12)
            assert high[i] == pytest.approx(ref.high, abs=1e-12)


def test_wilson_edge_cases_and_errors():
    # n = 0 is the formula's limit (no information); k > n is an error.
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    assert stats.wilson_interval(5, 5)[1] == 1.0
    with pytest.raises(ValueError):
        stats.wilson_interval(6, 5)
    with pytest.raises(ValueError):
        stats.wilson_interval(1, 5, confidence=1.0)


# ----------------------------------------------------------------------------- McNemar


def _table(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired booleans (a, b) realising a 2x2 table: n10 = #(a right, b wrong) and so on."""
    a = np.repeat([1, 1, 0, 0], [n11, n10, n01, n00]).astype(bool)
    b = np.repeat([1, 0, 1, 0], [n11, n10, n01, n00]).astype(bool)
    return a, b


def test_mcnemar_agresti_presidential_approval():
    # Agresti (1990), Categorical Data Analysis, p. 350: approval of the President in two surveys
    # of the same 1600 voters; approve/approve 794, approve/disapprove 150, disapprove/approve 86,
    # disapprove/disapprove 570. Published results for this table: without continuity correction
    # X^2 = 17.3559, p = 3.099e-05 (Penn State STAT 504 notes, "McNemar Test in R - Example
    # Presidential Approval"; Agresti reports z = -4.17); with the correction, R's
    # mcnemar.test(Performance) documentation example gives X^2 = 16.818, p = 4.115e-05.
    a, b = _table(794, 150, 86, 570)
    plain = stats.mcnemar_test(a, b, exact=False, continuity=False)
    assert (plain.b01, plain.b10) == (86, 150)
    assert plain.statistic == pytest.approx(17.3559, abs=5e-5)
    assert plain.statistic == pytest.approx(64**2 / 236, abs=1e-12)  # (b - c)^2 / (b + c) by hand
    assert math.sqrt(plain.statistic) == pytest.approx(4.17, abs=5e-3)
    assert plain.pvalue == pytest.approx(3.099e-05, abs=5e-9)
    corrected = stats.mcnemar_test(a, b, exact=False, continuity=True)
    assert corrected.statistic == pytest.approx(16.818, abs=5e-4)
    assert corrected.statistic == pytest.approx(63**2 / 236, abs=1e-12)  # (|b - c| - 1)^2 / (b + c)
    assert corrected.pvalue == pytest.approx(4.115e-05, abs=5e-9)
    exact = stats.mcnemar_test(a, b)
    # Exact two-sided binomial, written out: 2 * P(X <= 86), X ~ Binomial(236, 1/2).
    assert exact.pvalue == pytest.approx(2 * sps.binom.cdf(86, 236, 0.5), rel=1e-9)


def test_mcnemar_exact_matches_binomtest_directly():
    # Reference: scipy.stats.binomtest on the discordant counts, computed here independently.
    rng = np.random.default_rng(7)
    for n in (10, 57, 400):
        a = rng.random(n) < 0.6
        b = np.where(rng.random(n) < 0.3, ~a, a)
        result = stats.mcnemar_test(a, b)
        b01 = int(np.sum(~a & b))
        b10 = int(np.sum(a & ~b))
        assert (result.b01, result.b10) == (b01, b10)
        assert result.pvalue == pytest.approx(sps.binomtest(b01, b01 + b10, 0.5).pvalue, abs=1e-12)


def test_mcnemar_small_hand_cases():
    # b01 = 0, b10 = 5: exact p = 2 * 0.5^5 = 0.0625 (hand calculation).
    a, b = _table(3, 5, 0, 2)
    assert stats.mcnemar_test(a, b).pvalue == pytest.approx(0.0625, abs=1e-12)
    # No discordant pairs: no evidence either way.
    same = np.array([1, 0, 1], dtype=bool)
    result = stats.mcnemar_test(same, same)
    assert (result.statistic, result.pvalue) == (0.0, 1.0)


def test_mcnemar_rejects_non_binary_and_mismatched_inputs():
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_test([0, 1, 0.5], [0, 1, 1])
    with pytest.raises(ValueError, match="equal length"):
        stats.mcnemar_test([0, 1], [0, 1, 1])


# ----------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_gap_sign_ci_and_seed():
    # Data with a known population gap of +0.10 (b better); the realised CI must contain it.
    rng = np.random.default_rng(3)
    n = 2000
    a = rng.random(n) < 0.5
    flip_up = rng.random(n) < 0.25
    flip_down = rng.random(n) < 0.05
    b = np.where(~a & flip_up, True, np.where(a & flip_down, False, a))  # P(b) = .5 + .125 - .025
    result = stats.paired_bootstrap(a, b, n_resamples=10_000, seed=11)
    assert result.value == pytest.approx(b.mean() - a.mean(), abs=1e-15)
    assert result.ci_low < 0.10 < result.ci_high
    assert result.ci_low > 0  # the gap is clearly positive at this n
    # The percentile CI should be close to the normal-theory paired CI: mean(d) +/- 1.96 sd(d)/sqrt(n).
    d = b.astype(float) - a.astype(float)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(n)
    assert result.ci_high - result.ci_low == pytest.approx(2 * half, rel=0.05)
    assert stats.paired_bootstrap(a, b, seed=11) == stats.paired_bootstrap(a, b, seed=11)
    assert stats.paired_bootstrap(a, b, seed=12) != stats.paired_bootstrap(a, b, seed=11)
    assert stats.paired_bootstrap(b, a, seed=11).value == pytest.approx(-result.value)


@pytest.mark.parametrize("continuous", [False, True])
def test_bootstrap_mean_agrees_with_scipy_bootstrap(continuous):
    # Reference: scipy.stats.bootstrap(method="percentile"), an independent resampler; the two
    # use different random streams, so they agree to Monte Carlo error only. Both internal paths
    # are covered: few distinct values (multinomial counts) and continuous values (index matrix).
    rng = np.random.default_rng(5)
    values = rng.normal(0.3, 1.0, 800) if continuous else rng.integers(-1, 2, 800).astype(float)
    ours = stats.bootstrap_mean(values, n_resamples=20_000, seed=1)
    ref = sps.bootstrap((values,), np.mean, n_resamples=20_000, method="percentile", random_state=2)
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert ours.value == pytest.approx(values.mean())
    assert ours.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.05 * se)
    assert ours.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.05 * se)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError):
        stats.bootstrap_mean([], n_resamples=10)
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 0], [1, 0], n_resamples=0)
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 0], [1, 0], confidence=95)


# ----------------------------------------------------------------------------- pass@k


def _pass_at_k_brute_force(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_of_all_subsets():
    # Reference: brute-force enumeration over every k-subset, for all small (n, c, k).
    for n in range(1, 9):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert stats.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_vectorised_and_large_n():
    # Reference: closed form 1 - C(n-c, k) / C(n, k) with exact integer arithmetic (math.comb).
    n = np.array([16, 16, 16, 200, 200, 3])
    c = np.array([0, 1, 16, 7, 150, 1])
    for k in (1, 2, 3):
        got = stats.pass_at_k(n, c, k)
        ref = [1 - math.comb(int(ni - ci), k) / math.comb(int(ni), k) for ni, ci in zip(n, c)]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    # pass@1 is the plain fraction correct.
    np.testing.assert_allclose(stats.pass_at_k(n, c, 1), c / n, atol=1e-15)


def test_pass_at_k_mean_and_errors():
    n = np.full(50, 16)
    c = np.random.default_rng(0).integers(0, 17, 50)
    est = stats.pass_at_k_mean(n, c, 4, n_resamples=2000)
    assert est.value == pytest.approx(np.mean(stats.pass_at_k(n, c, 4)), abs=1e-15)
    assert est.ci_low <= est.value <= est.ci_high
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 2, 5)
    with pytest.raises(ValueError):
        stats.pass_at_k(4.0, 2.0, 1)


# ----------------------------------------------------------------------------- buckets


def test_difficulty_buckets_and_per_bucket_statistics():
    # Hand case: edges (2, 4) give (-inf, 2], (2, 4], (4, inf).
    difficulty = np.array([1, 2, 3, 4, 5, 8, 2, 6])
    np.testing.assert_array_equal(stats.difficulty_buckets(difficulty), [0, 0, 1, 1, 2, 2, 0, 2])
    a = np.array([1, 0, 1, 0, 0, 0, 1, 1], dtype=bool)
    b = np.array([1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    rows = stats.bucket_accuracy(b, difficulty)
    assert [(r.name, r.n, r.correct) for r in rows] == [("easy", 3, 3), ("medium", 2, 2), ("hard", 3, 2)]
    assert (rows[2].ci_low, rows[2].ci_high) == stats.wilson_interval(2, 3)
    assert (rows[1].low, rows[1].high) == (2.0, 4.0)
    gaps = stats.bucket_paired_gap(a, b, difficulty, n_resamples=500, seed=3)
    assert [g.name for g in gaps] == ["easy", "medium", "hard"]
    assert gaps[1].gap == stats.paired_bootstrap(a[2:4], b[2:4], n_resamples=500, seed=3)
    assert (gaps[2].mcnemar.b01, gaps[2].mcnemar.b10) == (1, 0)


def test_buckets_custom_edges_skip_empty_and_validate():
    rows = stats.bucket_accuracy([1, 0, 1], [1, 1, 1], edges=(1, 2, 3), names=("a", "b", "c", "d"))
    assert [r.name for r in rows] == ["a"]
    with pytest.raises(ValueError, match="increasing"):
        stats.difficulty_buckets([1, 2], edges=(4, 2))
    with pytest.raises(ValueError, match="names"):
        stats.difficulty_buckets([1, 2], edges=(2,), names=("x", "y", "z"))


# ----------------------------------------------------------------------------- clustered SE, MDE


def test_clustered_se_reduces_to_iid_with_singleton_clusters():
    # Reference: the textbook iid standard error of a mean, std(ddof=1) / sqrt(n).
    x = np.random.default_rng(2).random(101) < 0.4
    result = stats.clustered_mean(x, np.arange(101))
    assert result.se == pytest.approx(x.std(ddof=1) / math.sqrt(101), rel=1e-12)
    assert result.se == pytest.approx(result.iid_se, rel=1e-12)


def test_clustered_se_matches_explicit_sandwich_and_hand_case():
    # Reference 1: Cameron & Miller (2015)'s cluster-robust sandwich written out with matrices for the regression
    # of x on a constant: V = c (X'X)^-1 [sum_g X_g' u_g u_g' X_g] (X'X)^-1,
    # c = G/(G-1) * (N-1)/(N-K), K = 1.
    rng = np.random.default_rng(4)
    clusters = rng.integers(0, 30, 300)
    x = rng.normal(size=300) + 0.8 * rng.normal(size=30)[clusters]
    X = np.ones((300, 1))
    u = x - x.mean()
    bread = np.linalg.inv(X.T @ X)
    scores = [X[clusters == g].T @ u[clusters == g] for g in np.unique(clusters)]
    meat = sum(np.outer(s, s) for s in scores)
    G = np.unique(clusters).size
    V = G / (G - 1) * (299 / 299) * bread @ meat @ bread
    result = stats.clustered_mean(x, clusters)
    assert result.se == pytest.approx(math.sqrt(V[0, 0]), rel=1e-10)
    assert result.design_effect > 1.5  # strong shared cluster effect
    # Reference 2, by hand: x = [1, 1, 0, 0] in clusters [a, a, b, b]; residual sums +1 and -1,
    # se^2 = 2/1 * (1 + 1) / 16 = 0.25; iid se = sqrt(1/3) / 2.
    hand = stats.clustered_mean([1, 1, 0, 0], ["a", "a", "b", "b"])
    assert hand.se == pytest.approx(0.5, abs=1e-12)
    assert hand.iid_se == pytest.approx(math.sqrt(1 / 3) / 2, abs=1e-12)
    assert hand.design_effect == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="two clusters"):
        stats.clustered_mean([1, 0], [0, 0])


def test_paired_clustered_mean_is_clustered_mean_of_differences():
    a = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    b = np.array([1, 1, 1, 0, 1, 1], dtype=bool)
    groups = [0, 0, 1, 1, 2, 2]
    paired = stats.paired_clustered_mean(a, b, groups)
    assert paired == stats.clustered_mean(b.astype(float) - a.astype(float), groups)
    assert paired.mean == pytest.approx(2 / 6)


def test_minimum_detectable_difference_hand_calculation():
    # Hand calculation with normal-table quantiles z_0.975 = 1.959964, z_0.80 = 0.841621.
    z_sum = 1.959964 + 0.841621
    assert stats.minimum_detectable_difference(1319, 0.5) == pytest.approx(z_sum * math.sqrt(2 * 0.25 / 1319), abs=1e-6)
    assert stats.minimum_detectable_difference(500, 0.3, paired=True, discordant_rate=0.1) == pytest.approx(
        z_sum * math.sqrt(0.1 / 500), abs=1e-6
    )
    # Paired without a measured discordance assumes independent errors: same as unpaired.
    assert stats.minimum_detectable_difference(200, 0.7, paired=True) == stats.minimum_detectable_difference(200, 0.7)
    # alpha = 0.01, power = 0.9: z_0.995 = 2.575829, z_0.90 = 1.281552.
    assert stats.minimum_detectable_difference(100, 0.5, alpha=0.01, power=0.9) == pytest.approx(
        (2.575829 + 1.281552) * math.sqrt(0.5 / 100), abs=1e-6
    )
    np.testing.assert_allclose(
        stats.minimum_detectable_difference(np.array([100, 400]), 0.5),
        [stats.minimum_detectable_difference(100, 0.5), stats.minimum_detectable_difference(400, 0.5)],
    )
    with pytest.raises(ValueError):
        stats.minimum_detectable_difference(100, 0.5, discordant_rate=0.1)


# ----------------------------------------------------------------------------- calibration

# Hand case A (event probabilities): p = [.85, .85, .15, .65], y = [1, 0, 0, 1], 10 bins.
#   (0.8, 0.9]: conf .85, acc .5 -> weight 2/4 * .35;  (0.1, 0.2]: conf .15, acc 0 -> 1/4 * .15;
#   (0.6, 0.7]: conf .65, acc 1 -> 1/4 * .35.  ECE = .175 + .0375 + .0875 = .3
#   Brier = (.15^2 + .85^2 + .15^2 + .35^2) / 4 = .2225
P_EVENT = np.array([0.85, 0.85, 0.15, 0.65])
Y_EVENT = np.array([1, 0, 0, 1])
# Hand case B (3 classes): top-1 confidences .72 (hit), .62 (miss), .55 (hit), .85 (miss), 4 bins.
#   (0.5, 0.75]: mean conf (.72 + .62 + .55) / 3 = .63, acc 2/3 -> 3/4 * |2/3 - .63|;
#   (0.75, 1]: conf .85, acc 0 -> 1/4 * .85.
#   Brier rows: .28^2+.18^2+.1^2 = .1208; .72^2+.62^2+.1^2 = .9128; .2^2+.25^2+.45^2 = .305;
#   .05^2+.85^2+.9^2 = 1.535; mean .7184.
P_CLASS = np.array([[0.72, 0.18, 0.10], [0.28, 0.62, 0.10], [0.20, 0.25, 0.55], [0.05, 0.85, 0.10]])
Y_CLASS = np.array([0, 0, 2, 2])


def test_ece_hand_cases():
    assert stats.expected_calibration_error(P_EVENT, Y_EVENT, n_bins=10) == pytest.approx(0.3, abs=1e-12)
    expected = 0.75 * abs(2 / 3 - 0.63) + 0.25 * 0.85
    assert stats.expected_calibration_error(P_CLASS, Y_CLASS, n_bins=4) == pytest.approx(expected, abs=1e-12)
    # Perfect calibration: confidence .75 and 3 of 4 right.
    assert stats.expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0, abs=1e-12)
    bins = stats.reliability_bins(P_EVENT, Y_EVENT, n_bins=10)
    assert bins.counts.tolist() == [0, 1, 0, 0, 0, 0, 1, 0, 2, 0]
    assert np.isnan(bins.accuracy[0])


def test_nll_and_brier_hand_cases():
    nll_event = -(math.log(0.85) + math.log(0.15) + math.log(0.85) + math.log(0.65)) / 4
    assert stats.negative_log_likelihood(P_EVENT, Y_EVENT) == pytest.approx(nll_event, abs=1e-12)
    nll_class = -(math.log(0.72) + math.log(0.28) + math.log(0.55) + math.log(0.10)) / 4
    assert stats.negative_log_likelihood(P_CLASS, Y_CLASS) == pytest.approx(nll_class, abs=1e-12)
    assert stats.brier_score(P_EVENT, Y_EVENT) == pytest.approx(0.2225, abs=1e-12)
    assert stats.brier_score(P_CLASS, Y_CLASS) == pytest.approx(0.7184, abs=1e-12)
    # Two-class multi-class Brier is twice the event form (Brier 1950 vs the binary convention).
    two_class = np.stack([1 - P_EVENT, P_EVENT], axis=1)
    assert stats.brier_score(two_class, Y_EVENT) == pytest.approx(2 * stats.brier_score(P_EVENT, Y_EVENT))
    # A confident miss is large but finite (clipped at eps).
    assert np.isfinite(stats.negative_log_likelihood([1.0], [0]))


def test_calibration_against_sklearn_if_installed():
    # Reference: sklearn.metrics.log_loss / brier_score_loss, an independent implementation.
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(8)
    p = rng.uniform(0.01, 0.99, 300)
    y = (rng.random(300) < p).astype(int)
    assert stats.negative_log_likelihood(p, y) == pytest.approx(metrics.log_loss(y, p), abs=1e-12)
    assert stats.brier_score(p, y) == pytest.approx(metrics.brier_score_loss(y, p), abs=1e-12)
    probs = rng.dirichlet(np.ones(5), 300)
    labels = rng.integers(0, 5, 300)
    assert stats.negative_log_likelihood(probs, labels) == pytest.approx(
        metrics.log_loss(labels, probs, labels=range(5)), abs=1e-12
    )


def test_calibration_input_errors():
    with pytest.raises(ValueError, match="logits"):
        stats.brier_score(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError):
        stats.expected_calibration_error([1.2, 0.3], [1, 0])
    with pytest.raises(ValueError):
        stats.negative_log_likelihood(P_CLASS, np.array([0, 0, 3, 2]))


# ----------------------------------------------------------------------------- AUROC, Spearman


def _auroc_brute_force(scores, labels) -> float:
    """Count every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    # Reference: brute-force pairwise counting; scores drawn from 5 values so ties are common.
    rng = np.random.default_rng(9)
    for n in (5, 40, 200):
        labels = rng.random(n) < 0.4
        labels[:2] = [True, False]
        scores = rng.integers(0, 5, n) + labels * rng.integers(0, 2, n)
        assert stats.auroc(scores, labels) == pytest.approx(_auroc_brute_force(scores, labels), abs=1e-12)
    # Hand cases: perfect separation, perfect inversion, all tied.
    assert stats.auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert stats.auroc([0.1, 0.9], [1, 0]) == 0.0
    assert stats.auroc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5


def test_auroc_against_sklearn_if_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(10)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.random(500) + 0.3 * labels, 1)  # rounding creates ties
    assert stats.auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_ci_is_reproducible_and_brackets_estimate():
    rng = np.random.default_rng(12)
    labels = rng.random(300) < 0.5
    scores = np.round(rng.normal(size=300) + labels, 1)
    est = stats.auroc_ci(scores, labels, n_resamples=2000, seed=4)
    assert est.value == stats.auroc(scores, labels)
    assert est.ci_low < est.value < est.ci_high
    assert est == stats.auroc_ci(scores, labels, n_resamples=2000, seed=4)
    # Normal-theory check: Hanley & McNeil (1982) standard error, eq. 1.
    auc, n1, n0 = est.value, labels.sum(), (~labels).sum()
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = math.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0))
    assert est.ci_high - est.ci_low == pytest.approx(2 * 1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="positive and one negative"):
        stats.auroc([0.1, 0.2], [1, 1])


def test_spearman_matches_scipy_and_ranked_pearson_with_ties():
    # References: scipy.stats.spearmanr, and Pearson's r of scipy midranks via numpy.corrcoef.
    rng = np.random.default_rng(13)
    x = rng.integers(0, 6, 120)
    y = x + rng.integers(0, 4, 120)
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    ranked = np.corrcoef(sps.rankdata(x), sps.rankdata(y))[0, 1]
    assert stats.spearman(x, y) == pytest.approx(ranked, abs=1e-12)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_ci_reproducible_and_brackets_estimate():
    rng = np.random.default_rng(14)
    x = rng.integers(0, 6, 200)
    y = x + rng.integers(0, 6, 200)
    est = stats.spearman_ci(x, y, n_resamples=2000, seed=1)
    assert est.ci_low < est.value < est.ci_high
    assert est == stats.spearman_ci(x, y, n_resamples=2000, seed=1)
    # Fisher-z normal approximation of the CI width, se ~ 1.06 / sqrt(n - 3) (Fieller et al. 1957).
    half = 1.96 * 1.06 / math.sqrt(197) * (1 - est.value**2)
    assert est.ci_high - est.ci_low == pytest.approx(2 * half, rel=0.25)
