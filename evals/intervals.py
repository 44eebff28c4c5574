"""90% intervals on eval scores, so that a reported score says how much it can be trusted.

A score is the mean of per-prompt rewards in [0, 1]. When every reward is 0 or 1 the score is a
share, and the Wilson score interval is the right one: unlike mean +/- 1.645 standard errors it
stays inside [0, 1] and is not degenerate at 0/n or n/n, where small suites often are. Rewards
in between get a percentile bootstrap (seeded: the same rewards always give the same interval).
"""

from __future__ import annotations

import math
import random
import statistics

Z90 = 1.6448536269514722  # two-sided 90%: the standard normal's 95th percentile
RESAMPLES = 2000


def wilson(successes: float, n: int, z: float = Z90) -> tuple[float, float]:
    """Wilson score interval of a share."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: list[float], level: float = 0.90, resamples: int = RESAMPLES,
              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]


def interval90(rewards: list[float]) -> tuple[float, float]:
    """The 90% interval of the mean reward: Wilson for 0/1 rewards, else a bootstrap."""
    if not rewards:
        return 0.0, 1.0
    if all(r in (0.0, 1.0) for r in rewards):
        return wilson(sum(rewards), len(rewards))
    return bootstrap(rewards)


def half_width(low: float, high: float) -> float:
    return (high - low) / 2
