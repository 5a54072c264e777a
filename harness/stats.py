"""Statistics for honest evaluation of language-model runs.

Every function is vectorised with numpy/scipy and documents its formula and a reference. Outcomes
are per-document arrays; paired functions take two arrays aligned on the same documents.

Sign convention for every paired quantity: ``gap = mean(b) - mean(a)``, so with ``a`` the baseline
run and ``b`` the candidate, a positive gap means the candidate is better.

Contents:

- proportions: :func:`wilson_interval`;
- paired tests: :func:`mcnemar_test`, :func:`paired_bootstrap`, :func:`bootstrap_mean`;
- sampling: :func:`pass_at_k`, :func:`pass_at_k_mean`;
- difficulty tiers: :func:`difficulty_buckets`, :func:`bucket_accuracy`, :func:`bucket_paired_gap`;
- grouped questions and power: :func:`clustered_mean`, :func:`paired_clustered_mean`,
  :func:`minimum_detectable_difference`;
- calibration: :func:`reliability_bins`, :func:`expected_calibration_error`,
  :func:`negative_log_likelihood`, :func:`brier_score`;
- ranking: :func:`auroc`, :func:`auroc_ci`, :func:`spearman`, :func:`spearman_ci`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

# Bootstrap work is done in blocks of at most this many matrix elements (32 MiB of float64).
_BLOCK_ELEMENTS = 1 << 22

DEFAULT_BUCKET_EDGES = (2, 4)
DEFAULT_BUCKET_NAMES = ("easy", "medium", "hard")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _binary(x, name: str) -> np.ndarray:
    """``x`` as a bool array; raises if any value is not 0/1 (or False/True)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    values = arr.astype(float)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must hold only 0/1 outcomes; found {arr[i]!r} at index {i}")
    return values.astype(bool)


def _paired(a, b, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    if binary:
        a, b = _binary(a, "a"), _binary(b, "b")
    else:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired inputs must be 1-D of equal length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired inputs are empty")
    return a, b


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _z(confidence: float) -> float:
    _check_confidence(confidence)
    return float(_sps.norm.ppf(0.5 + confidence / 2.0))


def _percentile_ci(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    _check_confidence(confidence)
    alpha = 1.0 - confidence
    low, high = np.nanquantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------
# proportions
# --------------------------------------------------------------------------------------------


def wilson_interval(k, n, confidence: float = 0.95):
    """Wilson score interval for a binomial proportion (Wilson 1927, JASA 22:209).

    With ``p = k / n`` and ``z`` the two-sided normal quantile for ``confidence``::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        [centre - half, centre + half]

    This is method 3 ("score, no continuity correction") of Newcombe (1998), Stat. Med. 17:857.
    ``k`` and ``n`` may be arrays (broadcast together); scalars give floats. ``n = 0`` gives the
    uninformative interval (0, 1), the limit of the formula as n -> 0.

    Returns ``(low, high)``.
    """
    z = _z(confidence)
    k_arr, n_arr = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(n, dtype=float))
    if np.any(n_arr < 0) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError("wilson_interval needs 0 <= k <= n")
    safe_n = np.where(n_arr > 0, n_arr, 1.0)
    p = k_arr / safe_n
    denom = 1.0 + z * z / safe_n
    centre = (p + z * z / (2.0 * safe_n)) / denom
    half = z / denom * np.sqrt(p * (1.0 - p) / safe_n + z * z / (4.0 * safe_n * safe_n))
    low = np.where(n_arr > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    high = np.where(n_arr > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


# --------------------------------------------------------------------------------------------
# paired tests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class McNemarResult:
    """Outcome of :func:`mcnemar_test`.

    ``b01``: documents run ``a`` got wrong and run ``b`` got right; ``b10``: the reverse.
    ``statistic`` is the chi-square statistic (continuity-corrected when ``continuity``);
    ``pvalue`` is exact (binomial) when ``exact``, else from chi-square with 1 degree of freedom.
    """

    b01: int
    b10: int
    statistic: float
    pvalue: float
    exact: bool
    continuity: bool


def mcnemar_test(a, b, exact: bool = True, continuity: bool = True) -> McNemarResult:
    """McNemar's test of equal accuracy for two runs graded on the same documents.

    Only discordant documents carry information: ``b01 = #(a wrong, b right)``,
    ``b10 = #(a right, b wrong)``, ``m = b01 + b10``.

    - exact (McNemar 1947; Agresti 2013, *Categorical Data Analysis*, sec. 11.1): under H0
      ``b01 ~ Binomial(m, 1/2)``; the two-sided p-value is ``scipy.stats.binomtest(b01, m, 0.5)``,
      i.e. ``min(1, 2 * P(X <= min(b01, b10)))``.
    - chi-square: ``X^2 = (|b01 - b10| - c)^2 / m`` with ``c = 1`` (Edwards 1948 continuity
      correction) or ``c = 0``, referred to chi-square(1).

    ``statistic`` always holds ``X^2`` (for reporting); ``exact`` chooses where ``pvalue`` comes
    from. With no discordant documents the statistic is 0 and the p-value 1.
    """
    a, b = _paired(a, b, binary=True)
    b01 = int(np.count_nonzero(~a & b))
    b10 = int(np.count_nonzero(a & ~b))
    m = b01 + b10
    if m == 0:
        return McNemarResult(b01, b10, 0.0, 1.0, exact, continuity)
    excess = max(abs(b01 - b10) - (1.0 if continuity else 0.0), 0.0)
    statistic = excess * excess / m
    if exact:
        pvalue = float(_sps.binomtest(b01, m, 0.5).pvalue)
    else:
        pvalue = float(_sps.chi2.sf(statistic, df=1))
    return McNemarResult(b01, b10, float(statistic), pvalue, exact, continuity)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap confidence interval."""

    value: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int


def _resampled_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_resamples`` bootstrap resamples (size n, with replacement) of ``values``.

    Two exact implementations of the same distribution, chosen for speed:

    - few distinct values ``u_1..u_U`` with counts ``c_j`` (binary outcomes, paired differences in
      {-1, 0, 1}, pass@k of a fixed n): drawing n documents with replacement is drawing counts
      ``(N_1..N_U) ~ Multinomial(n, c / n)``, and the resampled mean is ``sum_j N_j u_j / n``;
    - otherwise an integer index matrix ``I`` of shape (resamples, n) with ``I_rj ~ U{0..n-1}``,
      processed in blocks to bound memory.
    """
    n = values.size
    unique, counts = np.unique(values, return_counts=True)
    # Measured on numpy 2.4: one binomial draw costs about 8x one gathered index element.
    if unique.size * 8 <= n:
        draws = rng.multinomial(n, counts / n, size=n_resamples)
        return draws @ unique / n
    out = np.empty(n_resamples)
    rows = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def _check_resamples(n_resamples: int) -> None:
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def bootstrap_mean(values, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``values`` with a percentile-bootstrap CI (Efron & Tibshirani 1993, ch. 13).

    Resample the n values with replacement ``n_resamples`` times; the CI is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.
    Reproducible for a given ``seed``.
    """
    _check_resamples(n_resamples)
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_mean needs a non-empty 1-D array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = _resampled_means(values, int(n_resamples), rng)
    low, high = _percentile_ci(means, confidence)
    return Estimate(float(values.mean()), low, high, confidence, int(n_resamples))


def paired_bootstrap(a, b, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Gap ``mean(b) - mean(a)`` with a paired percentile-bootstrap CI.

    Documents are resampled jointly: one resample draws n document indices with replacement and
    takes both runs' outcomes on those documents, so the CI keeps the correlation between runs.
    Because the gap is linear, this equals bootstrapping the mean of ``d_i = b_i - a_i``
    (:func:`bootstrap_mean`). ``a`` and ``b`` may be booleans or any per-document scores.

    Positive gap: ``b`` is better than ``a``.
    """
    a, b = _paired(a, b, binary=False)
    return bootstrap_mean(b - a, n_resamples=n_resamples, confidence=confidence, seed=seed)


# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------


def pass_at_k(n, c, k: int):
    """Unbiased pass@k of Chen et al. (2021), arXiv:2107.03374, eq. 1 and fig. 3.

    For a problem with ``n`` samples of which ``c`` are correct::

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    and exactly 1 when ``n - c < k``. The product form avoids huge binomial coefficients.
    ``n`` and ``c`` may be arrays (one entry per problem); needs ``0 <= c <= n`` and
    ``1 <= k <= n``.
    """
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n), np.asarray(c))
    if not (np.issubdtype(n_arr.dtype, np.integer) and np.issubdtype(c_arr.dtype, np.integer)):
        raise ValueError("pass_at_k needs integer sample counts n and correct counts c")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError("pass_at_k needs 0 <= c <= n")
    if k < 1 or np.any(n_arr < k):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k} and min n={n_arr.min()}")
    flat_n, flat_c = n_arr.ravel().astype(float), c_arr.ravel()
    width = int(flat_c.max()) if flat_c.size else 0
    offsets = np.arange(width)
    i = flat_n[:, None] - flat_c[:, None] + 1.0 + offsets[None, :]
    factors = np.where(offsets[None, :] < flat_c[:, None], 1.0 - k / i, 1.0)
    result = np.where(flat_n - flat_c < k, 1.0, 1.0 - factors.prod(axis=1)).reshape(n_arr.shape)
    return float(result) if result.ndim == 0 else result


def pass_at_k_mean(n, c, k: int, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Task-level pass@k: the mean of :func:`pass_at_k` over problems, with a bootstrap CI over
    problems (:func:`bootstrap_mean`)."""
    per_problem = np.atleast_1d(pass_at_k(n, c, k))
    return bootstrap_mean(per_problem, n_resamples=n_resamples, confidence=confidence, seed=seed)


# --------------------------------------------------------------------------------------------
# difficulty buckets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketAccuracy:
    """Accuracy of one run in one difficulty bucket ``(low, high]``, with a Wilson CI."""

    name: str
    low: float
    high: float
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class BucketGap:
    """Paired gap ``mean(b) - mean(a)`` in one difficulty bucket ``(low, high]``."""

    name: str
    low: float
    high: float
    n: int
    gap: Estimate
    mcnemar: McNemarResult


def difficulty_buckets(difficulty, edges=DEFAULT_BUCKET_EDGES, names=DEFAULT_BUCKET_NAMES) -> np.ndarray:
    """Bucket index of each document from its difficulty (e.g. number of gold reasoning steps).

    With increasing ``edges = (e_1, ..., e_m)`` bucket j covers ``(e_j, e_{j+1}]`` with
    ``e_0 = -inf`` and ``e_{m+1} = +inf``; the defaults give easy (<= 2 steps), medium (3-4)
    and hard (>= 5) for integer step counts. ``names`` needs one entry per bucket.
    """
    edges_arr = np.asarray(edges, dtype=float)
    if edges_arr.ndim != 1 or np.any(np.diff(edges_arr) <= 0):
        raise ValueError(f"bucket edges must be strictly increasing, got {tuple(edges)}")
    if len(names) != edges_arr.size + 1:
        raise ValueError(f"{edges_arr.size} edges make {edges_arr.size + 1} buckets, got {len(names)} names")
    values = np.asarray(difficulty, dtype=float)
    if np.isnan(values).any():
        raise ValueError("difficulty holds NaN")
    return np.digitize(values, edges_arr, right=True)


def _bucket_bounds(edges) -> list[tuple[float, float]]:
    bounds = [-np.inf, *map(float, edges), np.inf]
    return list(zip(bounds[:-1], bounds[1:]))


def bucket_accuracy(
    correct, difficulty, edges=DEFAULT_BUCKET_EDGES, names=DEFAULT_BUCKET_NAMES, confidence: float = 0.95
) -> list[BucketAccuracy]:
    """Per-bucket accuracy with :func:`wilson_interval`; empty buckets are left out."""
    correct = _binary(correct, "correct")
    codes = difficulty_buckets(difficulty, edges, names)
    if codes.shape != correct.shape:
        raise ValueError("correct and difficulty must have the same length")
    n = np.bincount(codes, minlength=len(names))
    k = np.bincount(codes, weights=correct, minlength=len(names))
    low, high = wilson_interval(k, n, confidence)
    return [
        BucketAccuracy(
            names[j], lo_edge, hi_edge, int(n[j]), int(k[j]), float(k[j] / n[j]), float(low[j]), float(high[j])
        )
        for j, (lo_edge, hi_edge) in enumerate(_bucket_bounds(edges))
        if n[j] > 0
    ]


def bucket_paired_gap(
    a,
    b,
    difficulty,
    edges=DEFAULT_BUCKET_EDGES,
    names=DEFAULT_BUCKET_NAMES,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[BucketGap]:
    """Per-bucket paired gap (:func:`paired_bootstrap`, resampling within the bucket) and exact
    :func:`mcnemar_test`; empty buckets are left out."""
    a, b = _paired(a, b, binary=True)
    codes = difficulty_buckets(difficulty, edges, names)
    if codes.shape != a.shape:
        raise ValueError("outcomes and difficulty must have the same length")
    result = []
    for j, (lo_edge, hi_edge) in enumerate(_bucket_bounds(edges)):
        mask = codes == j
        if mask.any():
            gap = paired_bootstrap(a[mask], b[mask], n_resamples, confidence, seed)
            result.append(BucketGap(names[j], lo_edge, hi_edge, int(mask.sum()), gap, mcnemar_test(a[mask], b[mask])))
    return result


# --------------------------------------------------------------------------------------------
# grouped questions and power
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusteredMean:
    """A mean with its cluster-robust standard error and, for contrast, the iid one."""

    mean: float
    se: float
    iid_se: float
    n: int
    n_clusters: int

    @property
    def design_effect(self) -> float:
        """``(se / iid_se)^2``: how much the clustering inflates the variance."""
        return (self.se / self.iid_se) ** 2


def clustered_mean(values, clusters) -> ClusteredMean:
    """Mean with a cluster-robust (CR1) standard error, for questions that come in groups.

    The mean is the intercept-only least-squares fit; its sandwich variance with clusters
    g = 1..G (Liang & Zeger 1986; Cameron & Miller 2015, J. Human Resources 50:317, with the
    Stata-style CR1 factor ``G / (G - 1) * (N - 1) / (N - K)`` at K = 1)::

        se^2 = G / (G - 1) * (1 / n^2) * sum_g ( sum_{i in g} (x_i - mean) )^2

    With one item per cluster this is exactly the iid ``std(x, ddof=1) / sqrt(n)``. Same-cluster
    residual covariance is what widens it (Miller 2024, "Adding Error Bars to Evals",
    arXiv:2411.00640). Needs at least two clusters.
    """
    x = np.asarray(values, dtype=float)
    groups = np.asarray(clusters)
    if x.ndim != 1 or groups.shape != x.shape:
        raise ValueError(f"values and clusters must be 1-D of equal length, got {x.shape} and {groups.shape}")
    labels, codes = np.unique(groups, return_inverse=True)
    n, n_clusters = x.size, labels.size
    if n_clusters < 2:
        raise ValueError("clustered standard errors need at least two clusters")
    resid = x - x.mean()
    cluster_sums = np.bincount(codes, weights=resid, minlength=n_clusters)
    se = np.sqrt(n_clusters / (n_clusters - 1) * np.sum(cluster_sums**2)) / n
    iid_se = x.std(ddof=1) / np.sqrt(n)
    return ClusteredMean(float(x.mean()), float(se), float(iid_se), n, n_clusters)


def paired_clustered_mean(a, b, clusters) -> ClusteredMean:
    """Cluster-robust SE of the paired gap ``mean(b - a)``: :func:`clustered_mean` of
    ``d_i = b_i - a_i``, which keeps both the pairing and the clustering."""
    a, b = _paired(a, b, binary=False)
    return clustered_mean(b - a, clusters)


def minimum_detectable_difference(
    n, p, alpha: float = 0.05, power: float = 0.8, paired: bool = False, discordant_rate=None
):
    """Smallest accuracy gap a two-sided test at level ``alpha`` detects with probability ``power``.

    Normal approximation with ``z_a = Phi^-1(1 - alpha/2)`` and ``z_b = Phi^-1(power)``
    (Fleiss, Levin & Paik 2003, ch. 4; Connor 1987, Biometrics 43:207, for the paired case)::

        unpaired (two independent runs, n documents each, accuracy near p):
            MDD = (z_a + z_b) * sqrt(2 p (1 - p) / n)
        paired (both runs on the same n documents, McNemar-style):
            MDD = (z_a + z_b) * sqrt(q / n),  q = discordant_rate = P(runs disagree on a document)

    The paired form uses the null variance ``q`` of ``d_i in {-1, 0, 1}`` for both terms, which
    slightly overstates the MDD. Without a measured ``discordant_rate`` the paired case assumes
    independent errors, ``q = 2 p (1 - p)``, and equals the unpaired one: pairing only helps
    through the correlation a measured ``q`` captures. Arrays broadcast.
    """
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError("alpha and power must be in (0, 1)")
    if discordant_rate is not None and not paired:
        raise ValueError("discordant_rate only applies to paired=True")
    n_arr, p_arr = np.asarray(n, dtype=float), np.asarray(p, dtype=float)
    if np.any(n_arr <= 0) or np.any((p_arr < 0) | (p_arr > 1)):
        raise ValueError("need n > 0 and 0 <= p <= 1")
    variance = 2.0 * p_arr * (1.0 - p_arr)
    if discordant_rate is not None:
        variance = np.asarray(discordant_rate, dtype=float)
        if np.any((variance < 0) | (variance > 1)):
            raise ValueError("discordant_rate must be in [0, 1]")
    z_sum = _sps.norm.ppf(1.0 - alpha / 2.0) + _sps.norm.ppf(power)
    result = z_sum * np.sqrt(variance / n_arr)
    return float(result) if np.ndim(result) == 0 else result


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def _confidence_and_hit(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence and whether top-1 is right (2-D probs), or the event probability and the
    event indicator (1-D probs)."""
    p = np.asarray(probs, dtype=float)
    if p.ndim == 2:
        y = _class_labels(p, labels)
        return p.max(axis=1), p.argmax(axis=1) == y
    p, y = _event_probs(p, labels)
    return p, y.astype(bool)


def _event_probs(p: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probabilities must be a non-empty 1-D or 2-D array, got shape {p.shape}")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    y = _binary(labels, "labels")
    if y.shape != p.shape:
        raise ValueError("probs and labels must have the same length")
    return p, y.astype(float)


def _class_labels(p: np.ndarray, labels) -> np.ndarray:
    if p.shape[0] == 0:
        raise ValueError("probabilities are empty")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("each row of probs must be a probability distribution (did you pass logits?)")
    y = np.asarray(labels)
    if y.shape != (p.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError("labels must be integer class indices, one per row of probs")
    if np.any((y < 0) | (y >= p.shape[1])):
        raise ValueError("labels out of range of the class axis")
    return y


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins: bin m covers ``(edges[m], edges[m+1]]`` (bin 0 also holds 0)."""

    edges: np.ndarray
    counts: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray


def reliability_bins(probs, labels, n_bins: int = 15) -> ReliabilityBins:
    """Reliability-diagram bins (Guo et al. 2017, ICML, sec. 2).

    ``probs`` of shape (N, C) with integer ``labels``: confidence is the top-1 probability and a
    hit is ``argmax == label``. ``probs`` of shape (N,) with 0/1 ``labels``: confidence is the
    probability of the event and a hit is the event (e.g. a judge's P(correct) vs the verifier).
    Empty bins have NaN mean confidence and accuracy.
    """
    if int(n_bins) < 1:
        raise ValueError("n_bins must be >= 1")
    conf, hit = _confidence_and_hit(probs, labels)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    codes = np.digitize(conf, edges[1:-1], right=True)
    counts = np.bincount(codes, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(codes, weights=conf, minlength=n_bins) / counts
        accuracy = np.bincount(codes, weights=hit.astype(float), minlength=n_bins) / counts
    return ReliabilityBins(edges, counts, mean_conf, accuracy)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins (Naeini et al. 2015; Guo et al. 2017)::

        ECE = sum_m (|B_m| / N) * | acc(B_m) - conf(B_m) |

    over the bins of :func:`reliability_bins` (same input conventions)."""
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins.counts > 0
    weights = bins.counts[filled] / bins.counts.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[filled] - bins.mean_confidence[filled])))


def negative_log_likelihood(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels (log loss), natural log.

    (N, C) probs: ``-mean_i log p_i[y_i]``. (N,) event probabilities with 0/1 labels:
    ``-mean_i [y_i log p_i + (1 - y_i) log(1 - p_i)]``. Probabilities are clipped to
    ``[eps, 1]`` so one confident miss gives a large finite value rather than infinity.
    """
    p = np.asarray(probs, dtype=float)
    if p.ndim == 2:
        y = _class_labels(p, labels)
        return float(-np.mean(np.log(np.clip(p[np.arange(p.shape[0]), y], eps, 1.0))))
    p, y = _event_probs(p, labels)
    return float(-np.mean(y * np.log(np.clip(p, eps, 1.0)) + (1 - y) * np.log(np.clip(1.0 - p, eps, 1.0))))


def brier_score(probs, labels) -> float:
    """Brier score (Brier 1950, Monthly Weather Review 78:1).

    (N, C) probs: ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (Brier's original multi-class form, in
    [0, 2]). (N,) event probabilities: ``mean_i (p_i - y_i)^2`` (in [0, 1]; for two classes it is
    half the multi-class form).
    """
    p = np.asarray(probs, dtype=float)
    if p.ndim == 2:
        y = _class_labels(p, labels)
        onehot = np.zeros_like(p)
        onehot[np.arange(p.shape[0]), y] = 1.0
        return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    p, y = _event_probs(p, labels)
    return float(np.mean((p - y) ** 2))


# --------------------------------------------------------------------------------------------
# ranking: AUROC and Spearman
# --------------------------------------------------------------------------------------------


def _scores_and_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    y = _binary(labels, "labels")
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN")
    if y.all() or not y.any():
        raise ValueError("AUROC needs at least one positive and one negative label")
    return s, y


def _auc_from_ranks(ranks: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """Mann-Whitney AUC from midranks whose first ``n_pos`` columns are the positives."""
    rank_sum = ranks[..., :n_pos].sum(axis=-1)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auroc(scores, labels) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (Hanley & McNeil 1982, Radiology
    143:29)::

        AUROC = P(S_pos > S_neg) + 1/2 P(S_pos = S_neg)
              = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    with ``R_pos`` the sum of the positives' midranks (ties get the average rank, which is what
    counts a tied pair as one half). Higher scores should mean the positive class.
    """
    s, y = _scores_and_labels(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = _sps.rankdata(np.concatenate([s[y], s[~y]]))
    return float(_auc_from_ranks(ranks, n_pos, n_neg))


def auroc_ci(scores, labels, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """:func:`auroc` with a stratified percentile-bootstrap CI: positives and negatives are
    resampled separately, keeping their counts fixed so no resample lacks a class (the default
    of pROC, Robin et al. 2011)."""
    _check_resamples(n_resamples)
    s, y = _scores_and_labels(scores, labels)
    pos, neg = s[y], s[~y]
    rng = np.random.default_rng(seed)
    draws = np.empty(int(n_resamples))
    rows = max(1, _BLOCK_ELEMENTS // s.size)
    for start in range(0, int(n_resamples), rows):
        stop = min(start + rows, int(n_resamples))
        pos_idx = rng.integers(0, pos.size, (stop - start, pos.size))
        neg_idx = rng.integers(0, neg.size, (stop - start, neg.size))
        block = np.concatenate([pos[pos_idx], neg[neg_idx]], axis=1)
        draws[start:stop] = _auc_from_ranks(_sps.rankdata(block, axis=1), pos.size, neg.size)
    low, high = _percentile_ci(draws, confidence)
    return Estimate(auroc(s, y), low, high, confidence, int(n_resamples))


def _xy(x, y) -> tuple[np.ndarray, np.ndarray]:
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_arr.ndim != 1 or x_arr.shape != y_arr.shape or x_arr.size < 3:
        raise ValueError("spearman needs two 1-D arrays of equal length >= 3")
    return x_arr, y_arr


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson correlation of midranks (ties averaged);
    ``scipy.stats.spearmanr``. NaN when either input is constant."""
    x_arr, y_arr = _xy(x, y)
    if np.ptp(x_arr) == 0 or np.ptp(y_arr) == 0:
        return float("nan")
    return float(_sps.spearmanr(x_arr, y_arr).statistic)


def spearman_ci(x, y, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """:func:`spearman` with a percentile-bootstrap CI, resampling (x, y) pairs jointly.

    Each resample is re-ranked with midranks, so ties are handled as in :func:`spearman`.
    Resamples in which x or y is constant have no correlation and are left out of the quantiles.
    """
    _check_resamples(n_resamples)
    x_arr, y_arr = _xy(x, y)
    rng = np.random.default_rng(seed)
    n = x_arr.size
    draws = np.empty(int(n_resamples))
    rows = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, int(n_resamples), rows):
        stop = min(start + rows, int(n_resamples))
        idx = rng.integers(0, n, size=(stop - start, n))
        rx = _sps.rankdata(x_arr[idx], axis=1)
        ry = _sps.rankdata(y_arr[idx], axis=1)
        rx -= rx.mean(axis=1, keepdims=True)
        ry -= ry.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            draws[start:stop] = (rx * ry).sum(axis=1) / np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    low, high = _percentile_ci(draws, confidence)
    return Estimate(spearman(x_arr, y_arr), low, high, confidence, int(n_resamples))
