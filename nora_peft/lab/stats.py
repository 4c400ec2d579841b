"""Statistics over seeds (and over latency rounds): means with Student-t 95% CIs, and differences ``A - B``.

* **Means and 95% CIs** -- ``mean +- t_{0.975, n-1} sd / sqrt(n)``; with one value there is no interval.
* **Proportions** -- the Wilson score interval (``wilson_interval``), e.g. of an exact-match accuracy.
* **Differences** -- ``A - B`` over seeds, *paired* by seed when both sides ran the same seeds (same seed = same data
  order, so pairing removes that shared noise), Welch otherwise. A difference is *significant* when its 95% CI
  excludes 0.

Pure numpy; the verdicts, the report and the latency benchmark share it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the normal quantile of a two-sided 95% interval (the limit of ``t975`` as df -> inf)
Z95 = 1.959963984540054

# two-sided 95% Student-t quantiles t_{0.975, df}
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    25: 2.060,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t975(df: float) -> float:
    """``t_{0.975}`` for ``df`` degrees of freedom (table, linear in 1/df between entries; 1.96 for df -> inf)."""
    if df < 1:
        return float("inf")
    keys = sorted(_T975)
    if df >= keys[-1]:
        lo, hi, tlo, thi = keys[-1], math.inf, _T975[keys[-1]], Z95
    else:
        lo = max(k for k in keys if k <= df)
        hi = min(k for k in keys if k >= df)
        if lo == hi:
            return _T975[lo]
        tlo, thi = _T975[lo], _T975[hi]
    w = (1 / lo - 1 / df) / (1 / lo - (0 if hi == math.inf else 1 / hi))
    return tlo + w * (thi - tlo)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``correct / n`` (95% by default): the ``p`` with
    ``|correct/n - p| <= z * sqrt(p (1 - p) / n)``. Unlike ``p +- z*se`` it stays within [0, 1] and is not empty at
    0 or n correct. ``None`` for ``n == 0``."""
    if n <= 0:
        return None
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0 and n correct the bound is exactly 0 / 1 (the formula gives it up to rounding)
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == n else centre + half)


@dataclass
class Stat:
    """Mean and 95% CI of a quantity over seeds (``lo``/``hi`` are NaN with fewer than 2 values)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        """Half the CI width (NaN without a CI)."""
        return (self.hi - self.lo) / 2

    def fmt(self, digits: int = 3) -> str:
        """``mean ± half`` (or the mean alone without a CI; ``n/a`` without values)."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a"
        if self.n < 2 or not math.isfinite(self.half):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def mean_ci(values: Iterable[float]) -> Stat:
    """Mean and 95% Student-t CI of the finite values (``None``/NaN/inf are dropped)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return Stat(math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if len(v) < 2:
        return Stat(m, math.nan, math.nan, 1)
    h = t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return Stat(m, m - h, m + h, len(v))


@dataclass
class Diff:
    """``A - B`` with its 95% CI (paired by seed when possible)."""

    mean: float
    lo: float
    hi: float
    n: int
    paired: bool

    @property
    def known(self) -> bool:
        """Whether the difference has a CI."""
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def positive(self) -> bool:
        """Significantly > 0 (the CI excludes 0 from below)."""
        return self.known and self.lo > 0

    @property
    def negative(self) -> bool:
        """Significantly < 0."""
        return self.known and self.hi < 0

    def fmt(self, digits: int = 3) -> str:
        """``+mean [lo, hi]`` (or a note that there is no CI)."""
        if not math.isfinite(self.mean):
            return "n/a"
        ci = f" [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]" if self.known else " (no CI: < 2 seeds)"
        return f"{self.mean:+.{digits}f}{ci}"


def compare(a: dict[int, float], b: dict[int, float]) -> Diff:
    """Difference of means ``A - B`` of per-seed values; paired when both have the same seeds."""
    a = {s: v for s, v in a.items() if v is not None and math.isfinite(v)}
    b = {s: v for s, v in b.items() if v is not None and math.isfinite(v)}
    if not a or not b:
        return Diff(math.nan, math.nan, math.nan, 0, False)
    if set(a) == set(b) and len(a) >= 2:
        d = mean_ci([a[s] - b[s] for s in sorted(a)])
        return Diff(d.mean, d.lo, d.hi, d.n, True)
    va, vb = np.array(list(a.values())), np.array(list(b.values()))
    mean = float(va.mean() - vb.mean())
    if len(va) < 2 or len(vb) < 2:
        return Diff(mean, math.nan, math.nan, min(len(va), len(vb)), False)
    sa, sb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
    se = math.sqrt(sa + sb)
    if se == 0:
        return Diff(mean, mean, mean, min(len(va), len(vb)), False)
    df = (sa + sb) ** 2 / (sa**2 / (len(va) - 1) + sb**2 / (len(vb) - 1))
    h = t975(df) * se
    return Diff(mean, mean - h, mean + h, min(len(va), len(vb)), False)


def round_overhead(row: dict[str, Any], ref: dict[str, Any]) -> float:
    """``row``'s latency over ``ref``'s, minus 1, in one round: the median of the per-repeat ratios when both rows
    hold their repeats' times (``times_ms``; the variants of a repeat ran back to back, so each ratio is paired in
    time and a shared machine's load changes cancel), else the ratio of the rows' medians (``ms``)."""
    a, b = row.get("times_ms"), ref.get("times_ms")
    if a and b and len(a) == len(b):
        return float(np.median([x / y for x, y in zip(a, b)])) - 1
    return row["ms"] / ref["ms"] - 1


def latency_overheads(rounds: list[list[dict[str, Any]]] | None) -> dict[str, Stat] | None:
    """Per-round unmerged-NoRA latency overhead (:func:`round_overhead`) vs merged LoRA (else the base) and vs
    unmerged LoRA, as means with 95% CIs over rounds; ``None`` when no round has a NoRA row.

    A round is a list of rows ``{"label", "ms", "method", "merged"[, "times_ms"]}`` measured alternately
    (``bench.latency``)."""
    vs_merged, vs_unmerged = [], []
    for rows in rounds or []:
        nora = next((r for r in rows if r.get("method") == "nora" and not r.get("merged")), None)
        base = next((r for r in rows if r.get("label") == "base"), None)
        merged = next((r for r in rows if r.get("method") == "lora" and r.get("merged")), base)
        unmerged = next((r for r in rows if r.get("method") == "lora" and not r.get("merged")), None)
        if nora is None or merged is None:
            continue
        vs_merged.append(round_overhead(nora, merged))
        if unmerged is not None:
            vs_unmerged.append(round_overhead(nora, unmerged))
    if not vs_merged:
        return None
    return {"vs_merged_lora": mean_ci(vs_merged), "vs_unmerged_lora": mean_ci(vs_unmerged)}
