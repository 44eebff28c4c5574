"""The experiment's verdict, written down before the sweep that it judges (issue 41).

Concurrent experiment i is paired with serial experiment i: the same seed, so the same problems
and the same initial adapter. At N = 8, `PAIRS` = 8 pairs and `MARGIN` = 0.10 reward (chosen
before the first sweep at the product's defaults; the pooled 16-pair design with margin 0.07 was
the alternative). `noninferior` holds when both:

1. For both summaries of an experiment's rewards (steps are numbered 0..9), the mean over steps
   1..9 and the mean of the last 3 steps, the paired differences d_i = concurrent_i - serial_i
   have a one-sided 95% t lower bound, mean(d) - t(0.95, n-1) sd(d) / sqrt(n), above -MARGIN;
2. no step k has z_k = (serial mean_k - concurrent mean_k) / sqrt(v_s/n_s + v_c/n_c) > 2.58,
   where v is the larger of an arm's sample variance and p(1-p)/16, p that arm's mean at step k
   clamped to [1/32, 31/32]: a step where every run scored 1.0 has no spread, but its score is
   still the mean of 16 answers, whose binomial error the floor stands for.

`false_fail_rate` is the share of all 2^n sign flips (flip i swaps pair i's serial and
concurrent runs at every step: a world where the arm makes no difference) in which the whole
verdict fails, counted exactly. Rewards are arrays of shape (pairs, steps).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import stats

PAIRS = 8
MARGIN = 0.10
Z_LIMIT = 2.58  # one-sided 0.5% per step
ANSWERS_PER_STEP = 16  # 2 problems x group 8: the binomial floor of a step's variance
LAST = 3  # the "last steps" summary


@dataclass(frozen=True)
class Verdict:
    noninferior: bool
    lower_bounds: dict[str, float]  # per summary: the paired one-sided 95% t lower bound
    per_step_z: list[float]
    mean_differences: dict[str, float]  # per summary: mean of concurrent - serial

    def as_dict(self) -> dict:
        return {"noninferior": self.noninferior,
                "noninferiority_lower_bounds": {k: round(v, 4) for k, v in self.lower_bounds.items()},
                "mean_paired_differences": {k: round(v, 4) for k, v in self.mean_differences.items()},
                "per_step_z": [round(z, 3) for z in self.per_step_z]}


def summaries(rewards: np.ndarray) -> dict[str, np.ndarray]:
    """Each experiment's two summaries: mean over steps 1.. (step 0 samples the base model), and
    mean of the last `LAST` steps."""
    return {"steps_1_on": rewards[:, 1:].mean(axis=1), f"last_{LAST}": rewards[:, -LAST:].mean(axis=1)}


def lower_bound(differences: np.ndarray) -> float:
    """One-sided 95% lower bound of the mean of paired differences (Student t, n - 1 df)."""
    n = len(differences)
    spread = differences.std(ddof=1) / np.sqrt(n) if n > 1 else np.inf
    return float(differences.mean() - stats.t.ppf(0.95, n - 1) * spread) if n > 1 else -np.inf


def step_variance(rewards: np.ndarray) -> np.ndarray:
    p = np.clip(rewards.mean(axis=0), 1 / 32, 31 / 32)
    return np.maximum(rewards.var(axis=0, ddof=1), p * (1 - p) / ANSWERS_PER_STEP)


def per_step_z(serial: np.ndarray, concurrent: np.ndarray) -> np.ndarray:
    """Per step, how far the concurrent mean is below the serial one in standard errors of the
    difference (positive: concurrent behind)."""
    error = np.sqrt(step_variance(serial) / len(serial) + step_variance(concurrent) / len(concurrent))
    return (serial.mean(axis=0) - concurrent.mean(axis=0)) / error


def verdict(serial: np.ndarray, concurrent: np.ndarray, margin: float = MARGIN) -> Verdict:
    """The whole verdict for paired runs (row i of each: the same seed)."""
    serial, concurrent = np.asarray(serial, float), np.asarray(concurrent, float)
    if serial.shape != concurrent.shape or serial.ndim != 2 or len(serial) < 2 or serial.shape[1] <= LAST:
        raise ValueError(f"paired rewards of shape (pairs >= 2, steps > {LAST}) expected, "
                         f"got {serial.shape} and {concurrent.shape}")
    s, c = summaries(serial), summaries(concurrent)
    bounds = {name: lower_bound(c[name] - s[name]) for name in s}
    z = per_step_z(serial, concurrent)
    passed = all(b > -margin for b in bounds.values()) and not bool((z > Z_LIMIT).any())
    return Verdict(passed, bounds, [float(v) for v in z], {name: float((c[name] - s[name]).mean()) for name in s})


def false_fail_rate(serial: np.ndarray, concurrent: np.ndarray, margin: float = MARGIN) -> float:
    """The share of all 2^n sign flips of the pairs for which the verdict fails (exact)."""
    serial, concurrent = np.asarray(serial, float), np.asarray(concurrent, float)
    n, failed = len(serial), 0
    for flips in itertools.product((False, True), repeat=n):
        swap = np.array(flips)[:, None]
        s, c = np.where(swap, concurrent, serial), np.where(swap, serial, concurrent)
        failed += not verdict(s, c, margin).noninferior
    return failed / 2 ** n


def paired_rewards(result: dict, n: int = PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Serial and concurrent rewards of a sweep's N = n row, paired by seed (serial experiments
    of seeds 0..n-1, cold or warm; concurrent experiment i has seed i)."""
    serial = {e["seed"]: e["rewards"] for kind in ("cold", "warm") for e in result["experiments"][kind]}
    missing = [i for i in range(n) if i not in serial]
    if missing:
        raise ValueError(f"no serial experiment for seeds {missing}: N={n} needs serial seeds 0..{n - 1}")
    return np.array([serial[i] for i in range(n)]), np.array(result["concurrent_rewards"][str(n)])
