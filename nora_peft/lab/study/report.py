"""From ``results.jsonl`` to ``report.md`` + figures + verdicts.

Statistics (all honest, all from the seeds actually run):

* **Learning rate** -- per (dataset, method, rank, variant) the lr of the spec's grid with the lowest mean
  *validation* perplexity over seeds; every test number is reported at that lr only.
* **Means and 95% CIs** -- Student-t intervals over seeds (``mean +- t_{0.975, n-1} sd / sqrt(n)``); with one seed
  there is no interval and every verdict that needs one is *inconclusive*.
* **Differences** -- ``A - B`` over seeds, *paired* by seed when both sides ran the same seeds (same seed = same data
  order, so pairing removes that shared noise), Welch otherwise. A difference is *significant* when its 95% CI
  excludes 0. Verdicts: **holds** / **does not hold** need a significant difference in the stated direction;
  anything else is **inconclusive** (overlapping CIs, too few seeds).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_json, write_json_atomic
from .runner import read_results
from .spec import StudySpec, expand_cells

HOLDS, FAILS, INCONCLUSIVE, NOT_TESTED = "holds", "does not hold", "inconclusive", "not tested"

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
        lo, hi, tlo, thi = keys[-1], math.inf, _T975[keys[-1]], 1.95996
    else:
        lo = max(k for k in keys if k <= df)
        hi = min(k for k in keys if k >= df)
        if lo == hi:
            return _T975[lo]
        tlo, thi = _T975[lo], _T975[hi]
    w = (1 / lo - 1 / df) / (1 / lo - (0 if hi == math.inf else 1 / hi))
    return tlo + w * (thi - tlo)


@dataclass
class Stat:
    """Mean and 95% CI of a quantity over seeds (``lo``/``hi`` are NaN with fewer than 2 values)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a"
        if self.n < 2 or not math.isfinite(self.half):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def mean_ci(values: Iterable[float]) -> Stat:
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
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def positive(self) -> bool:  # significantly > 0
        return self.known and self.lo > 0

    @property
    def negative(self) -> bool:  # significantly < 0
        return self.known and self.hi < 0

    def fmt(self, digits: int = 3) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# Groups: the cells of one (dataset, method, rank, variant) at the lr chosen on validation
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    dataset: str
    method: str
    r: int
    variant: str
    lr: float
    rows: list[dict[str, Any]]
    val_by_lr: dict[float, float] = field(default_factory=dict)

    def values(self, key: str) -> dict[int, float]:
        """Per-seed values of a row field (``test_ppl``) or of a nested eval scalar (``test.accuracy``)."""
        out = {}
        for r in self.rows:
            v = r
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[int(r["seed"])] = float(v)
        return out

    def stat(self, key: str) -> Stat:
        return mean_ci(self.values(key).values())

    @property
    def first(self) -> dict[str, Any]:
        return self.rows[0]


GroupKey = tuple[str, str, int, str]


def select_groups(rows: list[dict[str, Any]]) -> dict[GroupKey, Group]:
    """Group rows by (dataset, method, r, variant) and keep, per group, the lr with the best mean validation PPL."""
    by: dict[GroupKey, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["dataset"], r["method"], int(r["r"]), r["variant"])][float(r["lr"])].append(r)
    groups = {}
    for key, per_lr in by.items():
        val = {lr: mean_ci(x.get("val_ppl") for x in rs).mean for lr, rs in per_lr.items()}
        best = min(val, key=lambda lr: (math.inf if not math.isfinite(val[lr]) else val[lr], lr))
        rows_best = sorted(per_lr[best], key=lambda x: x["seed"])
        groups[key] = Group(*key, lr=best, rows=rows_best, val_by_lr=val)
    return groups


# ---------------------------------------------------------------------------------------------------------------
# Verdicts (pure functions of groups + spec settings; tested on synthetic rows)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    claim: str
    verdict: str
    evidence: str
    dataset: str = ""


def _g(groups: dict[GroupKey, Group], ds: str, method: str, r: int, variant: str = "default") -> Group | None:
    return groups.get((ds, method, r, variant))


def verdict_nora_vs_lora(groups, ds: str, nora_r: int, lora_r: int, margin: float = 0.005) -> list[Verdict]:
    """Claim 1: NoRA at ``nora_r`` reaches a test PPL <= LoRA (and rsLoRA) at ``lora_r``.

    holds: the 95% CI of PPL(NoRA) - PPL(other) lies below ``margin`` x PPL(other) (NoRA better, or at most 0.5%
    worse -- non-inferiority); does not hold: NoRA significantly worse; otherwise inconclusive."""
    out = []
    nora = _g(groups, ds, "nora", nora_r)
    for other in ("lora", "rslora"):
        g = _g(groups, ds, other, lora_r)
        claim = f"(1) NoRA r={nora_r} <= {other} r={lora_r} in test PPL"
        if nora is None or g is None:
            out.append(Verdict(claim, NOT_TESTED, "cells missing", ds))
            continue
        d = compare(nora.values("test_ppl"), g.values("test_ppl"))
        ref = g.stat("test_ppl").mean
        ev = (
            f"NoRA r={nora_r}: {nora.stat('test_ppl').fmt()}, {other} r={lora_r}: {g.stat('test_ppl').fmt()}; "
            f"difference {d.fmt()} ({'paired' if d.paired else 'Welch'}, n={d.n}); non-inferiority margin "
            f"{margin * ref:.3f} ({margin:.1%})"
        )
        if not d.known:
            v = INCONCLUSIVE
        elif d.hi < margin * ref:
            v = HOLDS
        elif d.positive:
            v = FAILS
        else:
            v = INCONCLUSIVE
        out.append(Verdict(claim, v, ev, ds))
    return out


def capacity_matters(groups, ds: str, ranks: list[int], method: str = "lora") -> tuple[bool, Diff | None]:
    """Does ``method``'s test PPL improve significantly from the smallest to the largest rank?"""
    lo, hi = _g(groups, ds, method, min(ranks)), _g(groups, ds, method, max(ranks))
    if lo is None or hi is None:
        return False, None
    d = compare(lo.values("test_ppl"), hi.values("test_ppl"))
    return d.positive, d


def verdict_plateau(groups, ds: str, ranks: list[int]) -> list[Verdict]:
    """Claim 2: LoRA's PPL plateaus with rank (also checked for rsLoRA, whose scaling is meant to fix it).

    Needs capacity to matter (significant gain smallest -> largest rank), else inconclusive with the explicit
    "this demo cannot test a linear ceiling". With ``share = gain of the last rank step / gain over all ranks``:
    holds when the last step's gain is confidently below a quarter of the total (CI upper bound < 0.25 x total
    gain; log-linear scaling over evenly spaced ranks would give a half); does not hold when it is confidently above
    a quarter; otherwise inconclusive."""
    ranks = sorted(ranks)
    out = []
    if len(ranks) < 3:
        return [Verdict("(2) LoRA plateaus with rank", NOT_TESTED, "needs at least 3 ranks", ds)]
    for method in ("lora", "rslora"):
        claim = f"(2) {method} plateaus with rank"
        gs = [_g(groups, ds, method, r) for r in ranks]
        if any(g is None for g in gs):
            out.append(Verdict(claim, NOT_TESTED, "cells missing", ds))
            continue
        ppl = ", ".join(f"r={r}: {g.stat('test_ppl').fmt()}" for r, g in zip(ranks, gs))
        ok, full = capacity_matters(groups, ds, ranks, method)
        top = compare(gs[-2].values("test_ppl"), gs[-1].values("test_ppl"))
        ev = (
            f"test PPL {ppl}; gain r={ranks[0]}->{ranks[-1]}: {full.fmt()}, last step r={ranks[-2]}->{ranks[-1]}: "
            f"{top.fmt()}"
        )
        if not ok:
            v = INCONCLUSIVE
            ev += (
                f". {method}'s PPL does not improve measurably from r={ranks[0]} to r={ranks[-1]}: this demo cannot "
                "test a linear ceiling"
            )
        elif top.known and top.hi < 0.25 * full.mean:
            v = HOLDS
        elif top.known and top.lo > 0.25 * full.mean:
            v = FAILS
        else:
            v = INCONCLUSIVE
        if ok:
            ev += f"; last step = {top.mean / full.mean:.0%} of the total gain (plateau: CI below 25%)"
        out.append(Verdict(claim, v, ev, ds))
    return out


def verdict_effective_rank(groups, ds: str, ranks: list[int], key: str = "er_output", ratio: float = 1.25):
    """Claim 3: NoRA's activations have a much higher effective rank than LoRA's (same rank, every rank >= 2).

    holds: NoRA's ER is significantly higher at every rank and on average >= ``ratio`` x LoRA's; does not hold:
    LoRA's is significantly higher at some rank, or NoRA's is significantly below ``ratio`` x LoRA's everywhere."""
    claim = f"(3) NoRA ER >> LoRA ER ({key.removeprefix('er_')} activations)"
    pieces, sig_up, sig_down, below = [], [], [], []
    for r in sorted(x for x in ranks if x >= 2):
        n, lo = _g(groups, ds, "nora", r), _g(groups, ds, "lora", r)
        if n is None or lo is None or not n.values(key) or not lo.values(key):
            continue
        d = compare(n.values(key), lo.values(key))
        ref = lo.stat(key).mean
        pieces.append(
            f"r={r}: NoRA {n.stat(key).fmt(2)} vs LoRA {lo.stat(key).fmt(2)} (x{n.stat(key).mean / ref:.2f}; "
            f"diff {d.fmt(2)})"
        )
        sig_up.append(d.positive and n.stat(key).mean >= ratio * ref)
        sig_down.append(d.negative)
        below.append(d.known and d.hi < (ratio - 1) * ref)
        rs = _g(groups, ds, "rslora", r)
        if rs is not None and rs.values(key):
            pieces[-1] += f"; rsLoRA {rs.stat(key).fmt(2)}"
    if not pieces:
        return [Verdict(claim, NOT_TESTED, "no analysed NoRA/LoRA cells at rank >= 2", ds)]
    if all(sig_up):
        v = HOLDS
    elif any(sig_down) or all(below):
        v = FAILS
    else:
        v = INCONCLUSIVE
    return [Verdict(claim, v, "; ".join(pieces), ds)]


def _variant_group(groups, ds: str, r: int, **knobs) -> Group | None:
    for (gds, m, gr, _), g in groups.items():
        if gds == ds and m == "nora" and gr == r and all(g.first.get(k) == v for k, v in knobs.items()):
            return g
    return None


def verdict_ablations(groups, ds: str, r: int | None) -> list[Verdict]:
    """Claim 4 (Table 2): SiLU is the best activation, module granularity is worse, latent dropout helps."""
    claim = "(4) ablation ordering"
    base = _g(groups, ds, "nora", r) if r is not None else None
    if base is None:
        return [Verdict(claim, NOT_TESTED, "no ablation cells", ds)]
    b = base.first
    ppl = base.values("test_ppl")
    subs: list[tuple[str, str, str]] = []
    acts = [
        g
        for g in (
            _variant_group(groups, ds, r, activation=a, granularity="weight", dropout=b["dropout"])
            for a in ("identity", "relu", "gelu", "tanh")
        )
        if g is not None
    ]
    if b.get("activation") == "silu" and acts:
        diffs = [(g.first["activation"], compare(g.values("test_ppl"), ppl)) for g in acts]  # other - silu
        ev = "; ".join(f"{a} - silu: {d.fmt()}" for a, d in diffs)
        v = HOLDS if all(d.positive for _, d in diffs) else FAILS if any(d.negative for _, d in diffs) else INCONCLUSIVE
        subs.append(("SiLU best activation", v, ev))
    mod = _variant_group(groups, ds, r, granularity="module", activation=b["activation"], dropout=b["dropout"])
    if mod is not None:
        d = compare(mod.values("test_ppl"), ppl)
        v = HOLDS if d.positive else FAILS if d.negative else INCONCLUSIVE
        subs.append(("module granularity worse", v, f"module - weight: {d.fmt()}"))
    other_dropout = [
        g
        for (gds, m, gr, _), g in groups.items()
        if gds == ds
        and m == "nora"
        and gr == r
        and g.first.get("activation") == b["activation"]
        and g.first.get("granularity") == "weight"
        and g.first.get("dropout") != b["dropout"]
    ]
    if other_dropout:
        g = other_dropout[0]
        with_d, without = (base, g) if (b["dropout"] or 0) > (g.first["dropout"] or 0) else (g, base)
        d = compare(without.values("test_ppl"), with_d.values("test_ppl"))
        v = HOLDS if d.positive else FAILS if d.negative else INCONCLUSIVE
        subs.append(
            (
                f"dropout {with_d.first['dropout']:g} helps",
                v,
                f"dropout {without.first['dropout']:g} - dropout {with_d.first['dropout']:g}: {d.fmt()}",
            )
        )
    if not subs:
        return [Verdict(claim, NOT_TESTED, "no ablation variants", ds)]
    overall = (
        FAILS
        if any(v == FAILS for _, v, _ in subs)
        else HOLDS
        if all(v == HOLDS for _, v, _ in subs)
        else (INCONCLUSIVE)
    )
    ev = " | ".join(f"{name}: **{v}** ({e})" for name, v, e in subs)
    return [Verdict(claim, overall, f"NoRA r={r}, test PPL differences: {ev}", ds)]


def latency_overhead(latency: dict[str, Any] | None) -> dict[str, Stat] | None:
    """Per-round NoRA (unmerged) latency relative to merged LoRA (= the base) and to unmerged LoRA."""
    if not latency or not latency.get("rounds"):
        return None
    vs_merged, vs_unmerged = [], []
    for rows in latency["rounds"]:
        by = {r["label"]: r for r in rows}
        nora = next((r for r in rows if r.get("method") == "nora"), None)
        merged = next((r for r in rows if r.get("method") == "lora" and r.get("merged")), by.get("base"))
        unmerged = next((r for r in rows if r.get("method") == "lora" and not r.get("merged")), None)
        if nora is None or merged is None:
            continue
        vs_merged.append(nora["ms"] / merged["ms"] - 1)
        if unmerged is not None:
            vs_unmerged.append(nora["ms"] / unmerged["ms"] - 1)
    if not vs_merged:
        return None
    return {"vs_merged_lora": mean_ci(vs_merged), "vs_unmerged_lora": mean_ci(vs_unmerged)}


def verdict_latency(latency: dict[str, Any] | None, claimed: float = 0.06) -> Verdict:
    """Claim 5: NoRA (unmerged) costs ~6% more latency than merged LoRA. holds: the CI of the overhead lies at or
    below twice the claim; does not hold: it lies above; else inconclusive."""
    claim = f"(5) ~{claimed:.0%} latency overhead"
    ov = latency_overhead(latency)
    if ov is None:
        return Verdict(claim, NOT_TESTED, "no latency measurement")
    m, u = ov["vs_merged_lora"], ov["vs_unmerged_lora"]
    ev = (
        f"NoRA (unmerged) vs merged LoRA: {m.mean:+.1%} (95% CI {m.lo:+.1%} .. {m.hi:+.1%}, {m.n} rounds); vs unmerged "
        f"LoRA: {u.mean:+.1%} (CI {u.lo:+.1%} .. {u.hi:+.1%}); {latency.get('setting', '')}"
    )
    if not (math.isfinite(m.lo) and math.isfinite(m.hi)):
        v = INCONCLUSIVE
    elif m.hi <= 2 * claimed:
        v = HOLDS
    elif m.lo > 2 * claimed:
        v = FAILS
    else:
        v = INCONCLUSIVE
    return Verdict(claim, v, ev)


def all_verdicts(spec: StudySpec, groups: dict[GroupKey, Group], latency: dict[str, Any] | None) -> list[Verdict]:
    nora_r, lora_r = spec.verdict_ranks()
    out: list[Verdict] = []
    for ds in [d.name for d in spec.datasets]:
        out += verdict_nora_vs_lora(groups, ds, nora_r, lora_r)
        out += verdict_plateau(groups, ds, spec.ranks)
        out += verdict_effective_rank(groups, ds, spec.ranks, "er_output")
        out += verdict_effective_rank(groups, ds, spec.ranks, "er_latent")
        out += verdict_ablations(groups, ds, spec.ablations.rank if spec.ablations.variants else None)
    out.append(verdict_latency(latency, float(spec.verdict.get("latency_claim", 0.06))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Latency (Table 3)
# ---------------------------------------------------------------------------------------------------------------
def measure_latency(spec: StudySpec, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """``bench.latency_table`` for LoRA and NoRA at the latency rank, ``rounds`` times; cached in latency.json."""
    path = out_dir / "latency.json"
    if path.exists():
        return read_json(path)
    if spec.latency.get("skip"):
        return None
    import torch

    from nora_peft.methods import AdapterSpec

    from ..base import load_model_and_tokenizer
    from ..bench import latency_table

    r = int(spec.latency.get("rank", spec.verdict_ranks()[0]))
    bs, seq = int(spec.latency.get("batch_size", 1)), int(spec.latency.get("seq_len", 128))
    repeats, rounds = int(spec.latency.get("repeats", 20)), int(spec.latency.get("rounds", 3))
    log(f"latency: LoRA vs NoRA at r={r}, batch {bs} x {seq} tokens, {rounds} rounds x {repeats} repeats")
    model, _ = load_model_and_tokenizer(spec.model)
    model.eval()
    specs = [AdapterSpec(method="lora", r=r, **spec.adapter), AdapterSpec(method="nora", r=r, **spec.adapter)]
    all_rounds = [
        latency_table(model, specs, batch_size=bs, seq_len=seq, repeats=repeats, warmup=3) for _ in range(rounds)
    ]
    device = str(next(model.parameters()).device)
    result = {
        "rank": r,
        "rounds": all_rounds,
        "setting": f"r={r}, batch {bs} x {seq} tokens, {device}, {torch.get_num_threads()} threads",
    }
    write_json_atomic(path, result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(stats: list[Stat]) -> np.ndarray:
    return np.array(
        [
            [s.mean - s.lo if math.isfinite(s.lo) else 0 for s in stats],
            [s.hi - s.mean if math.isfinite(s.hi) else 0 for s in stats],
        ]
    )


def plot_by_rank(groups, ds, methods, ranks, key, path: Path, ylabel: str, title: str, log_y: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in methods:
        rs = [r for r in sorted(ranks) if _g(groups, ds, m, r) is not None and _g(groups, ds, m, r).values(key)]
        if not rs:
            continue
        st = [_g(groups, ds, m, r).stat(key) for r in rs]
        ax.errorbar(rs, [s.mean for s in st], yerr=_err(st), marker="o", capsize=3, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ranks), [str(r) for r in sorted(ranks)])  # the study's ranks, not powers of two
    ax.minorticks_off()
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _analysis_curve(g: Group, key: str, curve: str) -> list[float] | None:
    path = Path(g.first.get("run_dir", "")) / "analysis.json"
    if not path.exists():
        return None
    agg = read_json(path).get("aggregate", {}).get(key) or {}
    return agg.get(curve)


def spectral_figures(groups, ds: str, methods: list[str], r: int, fig_dir: Path) -> list[Path]:
    """Figs 4/7 (update spectrum, log y) and 6/9 (cumulative energy) at rank ``r``, one line per method."""
    from ..analysis import ENERGY_THRESHOLD, plot_spectra

    paths = []
    sv = {
        m: _analysis_curve(g, "update", "normalized_singular_values_mean")
        for m in methods
        if (g := _g(groups, ds, m, r)) is not None
    }
    sv = {k: v for k, v in sv.items() if v}
    if sv:
        paths.append(
            plot_spectra(
                sv,
                fig_dir / f"spectrum_{ds}_r{r}.png",
                title=f"{ds}: singular values of Delta W, r={r} (mean over layers)",
                ylabel="s_i / s_1 (log)",
            )
        )
    curves = {}
    for m in methods:
        g = _g(groups, ds, m, r)
        if g is None:
            continue
        for key in ("update", "output"):
            c = _analysis_curve(g, key, "cumulative_energy_mean")
            if c:
                curves[f"{m} {key}"] = c
    if curves:
        paths.append(
            plot_spectra(
                curves,
                fig_dir / f"energy_{ds}_r{r}.png",
                title=f"{ds}: cumulative spectral energy, r={r} ({ENERGY_THRESHOLD:.0%} = AUC-90)",
                ylabel="cumulative energy",
                log=False,
            )
        )
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _knobs(g: Group) -> str:
    f = g.first
    return f"{f.get('activation')}, {f.get('granularity')}, dropout {f.get('dropout'):g}"


def write_report(spec: StudySpec, out_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """Write ``report.md`` and ``figures/*.png`` from ``results.jsonl`` (+ latency.json, measured if missing)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = read_results(out_dir)
    wanted = {c.cell_id for c in expand_cells(spec)}
    rows = [r for r in rows if r["cell_id"] in wanted]
    groups = select_groups(rows)
    latency = measure_latency(spec, out_dir, log)
    verdicts = all_verdicts(spec, groups, latency)
    nora_r, lora_r = spec.verdict_ranks()
    methods = [m for m in spec.methods]
    seeds = spec.seeds
    md: list[str] = [f"# Study `{spec.name}`", ""]
    if spec.description:
        md += [spec.description.strip(), ""]
    md += [
        f"- base model: `{spec.model or 'embedded default base'}`; datasets: "
        + ", ".join(f"`{d.name}` ({d.data})" for d in spec.datasets),
        f"- methods {methods}, ranks {spec.ranks}, seeds {seeds}, lr grids "
        + ", ".join(f"{m}: {spec.lr[m]}" for m in methods),
        "- budget (identical for every cell): " + ", ".join(f"{k}={v}" for k, v in sorted(spec.train.items())),
        f"- {len(rows)} cells; lr chosen per (dataset, method, rank, variant) on the **validation** split; test "
        "numbers at that lr; ± = 95% Student-t CI over seeds"
        + (" (a single seed has no CI)" if len(seeds) < 2 else ""),
    ]
    md += [f"- {n}" for n in spec.notes]
    md.append("")

    # -- verdicts -------------------------------------------------------------------------------------------------
    md += [
        "## Verdicts",
        "",
        f"Claim 1 compares NoRA at r={nora_r} with LoRA/rsLoRA at r={lora_r} "
        f"(the paper: NoRA r=64 vs LoRA r=512, a factor {lora_r // max(nora_r, 1)} here vs 8 there).",
        "",
    ]
    md.append(
        _table(
            ["claim", "dataset", "verdict", "evidence"],
            [[v.claim, v.dataset or "-", f"**{v.verdict}**", v.evidence] for v in verdicts],
        )
    )
    md.append("")
    for ds in [d.name for d in spec.datasets]:
        ok, full = capacity_matters(groups, ds, spec.ranks, "lora")
        if not ok:
            md += [
                f"> **{ds}: this demo cannot test a linear ceiling** -- LoRA's test PPL does not improve measurably "
                f"from r={min(spec.ranks)} to r={max(spec.ranks)} "
                f"(gain {full.fmt() if full else 'n/a'}), so adapter capacity is not what limits it here.",
                "",
            ]
        else:
            md += [
                f"> {ds}: adapter capacity matters here -- LoRA's test PPL improves from r={min(spec.ranks)} to "
                f"r={max(spec.ranks)} by {full.fmt()} (95% CI), so the rank question can be asked.",
                "",
            ]

    # -- scaling (Figs 2/3) ---------------------------------------------------------------------------------------
    for ds in [d.name for d in spec.datasets]:
        md += [f"## {ds}: scaling with rank (Figs 2/3)", ""]
        p = plot_by_rank(
            groups,
            ds,
            methods,
            spec.ranks,
            "test_ppl",
            fig_dir / f"scaling_{ds}.png",
            "test perplexity",
            f"{ds}: test PPL vs rank (mean, 95% CI over seeds)",
        )
        md += [f"![scaling]({p.relative_to(out_dir)})", ""]
        trs = []
        for m in methods:
            for r in sorted(spec.ranks):
                g = _g(groups, ds, m, r)
                if g is None:
                    continue
                trs.append(
                    [
                        m,
                        r,
                        f"{g.lr:g}",
                        _f(g.first.get("params")),
                        g.stat("val_ppl").fmt(),
                        g.stat("test_ppl").fmt(),
                        g.stat("test_accuracy").fmt(3),
                        len(g.rows),
                    ]
                )
        md += [
            _table(
                [
                    "method",
                    "r",
                    "lr (val-selected)",
                    "trainable params",
                    "val PPL",
                    "test PPL",
                    "test exact-match acc.",
                    "seeds",
                ],
                trs,
            ),
            "",
        ]

        # -- spectra / ER / AUC-90 (Figs 4-9) ---------------------------------------------------------------------
        md += [f"### {ds}: spectra, effective rank, AUC-90 (Figs 4-9)", ""]
        for key, name in (("er_output", "output"), ("er_latent", "latent")):
            p = plot_by_rank(
                groups,
                ds,
                methods,
                spec.ranks,
                key,
                fig_dir / f"effective_rank_{name}_{ds}.png",
                f"effective rank ({name})",
                f"{ds}: ER of adapter {name} activations",
            )
            md += [f"![ER {name}]({p.relative_to(out_dir)})"]
        for p in spectral_figures(groups, ds, methods, max(spec.ranks), fig_dir):
            md += [f"![spectrum]({p.relative_to(out_dir)})"]
        md.append("")
        srs = []
        for m in methods:
            for r in sorted(spec.ranks):
                g = _g(groups, ds, m, r)
                if g is None or not g.values("er_update"):
                    continue
                keys = ("er_update", "auc90_update", "er_latent", "auc90_latent", "er_output", "auc90_output")
                srs.append([m, r] + [g.stat(k).fmt(2) for k in keys])
        if srs:
            md += [
                _table(
                    [
                        "method",
                        "r",
                        "ER(ΔW)",
                        "AUC-90(ΔW)",
                        "ER(latent)",
                        "AUC-90(latent)",
                        "ER(output)",
                        "AUC-90(output)",
                    ],
                    srs,
                ),
                "",
                "ER = exp(entropy of s_i/Σs) (Roy & Vetterli); AUC-90 = components holding 90% of Σs_i² "
                "(mean over adapted layers). Output ER ≤ r for every method (the output lies in the column space "
                "of W_down / B); LoRA's latent A x is linear in x.",
                "",
            ]

        # -- ablations (Table 2) ----------------------------------------------------------------------------------
        if spec.ablations.variants:
            ra = int(spec.ablations.rank)
            ars = []
            for (gds, m, r, variant), g in sorted(groups.items(), key=lambda kv: kv[0][3]):
                if gds == ds and m == "nora" and r == ra:
                    ars.append(
                        [
                            variant,
                            _knobs(g),
                            _f(g.first.get("params")),
                            f"{g.lr:g}",
                            g.stat("val_ppl").fmt(),
                            g.stat("test_ppl").fmt(),
                            len(g.rows),
                        ]
                    )
            md += [
                f"### {ds}: ablations at r={ra} (Table 2)",
                "",
                _table(
                    [
                        "variant",
                        "activation, granularity, dropout",
                        "trainable params",
                        "lr",
                        "val PPL",
                        "test PPL",
                        "seeds",
                    ],
                    ars,
                ),
                "",
            ]

        # -- logistic map (Table 1) ------------------------------------------------------------------------------
        keys = sorted({k for r in rows if r["dataset"] == ds for k in r.get("test", {}) if "logistic" in k})
        if keys:
            lrs = []
            for m in methods:
                for r in sorted(spec.ranks):
                    g = _g(groups, ds, m, r)
                    if g is not None:
                        lrs.append([m, r] + [g.stat(f"test.{k}").fmt(3) for k in keys])
            md += [f"### {ds}: logistic-map iteration (Table 1)", "", _table(["method", "r"] + keys, lrs), ""]

    # -- Table 3 -----------------------------------------------------------------------------------------------------
    ov = latency_overhead(latency)
    if latency:
        md += [
            "## Efficiency (Table 3)",
            "",
            f"Prefill latency, {latency.get('setting', '')}, median of repeats, "
            "LoRA and NoRA measured alternately in one process; rel. latency vs the base model.",
            "",
        ]
        r_lat = int(latency.get("rank", nora_r))
        ds0 = spec.datasets[0].name
        trs = []
        by_label: dict[str, list[dict]] = defaultdict(list)
        for rnd in latency["rounds"]:
            for row in rnd:
                by_label[row["label"]].append(row)
        for label, rs in by_label.items():
            m = rs[0].get("method")
            g = _g(groups, ds0, m, r_lat) if m else None
            rel = mean_ci(x["rel_latency"] for x in rs)
            tps = mean_ci(x["tokens_per_s"] for x in rs)
            trs.append(
                [
                    label,
                    _f(g.first.get("params")) if g else "-",
                    g.stat("test_ppl").fmt() if g else "-",
                    rel.fmt(3),
                    tps.fmt(0),
                ]
            )
        md += [_table(["variant", "trainable params", f"test PPL ({ds0})", "rel. latency", "tokens/s"], trs), ""]
        if ov:
            md += [
                f"NoRA overhead vs merged LoRA: {ov['vs_merged_lora'].fmt(3)}; vs unmerged LoRA: "
                f"{ov['vs_unmerged_lora'].fmt(3)} (fractions, 95% CI over rounds).",
                "",
            ]

    # -- every cell ---------------------------------------------------------------------------------------------------
    md += ["## All cells", "", "Every row of results.jsonl (selected lr or not).", ""]
    crs = [
        [
            r["cell_id"],
            f"{r['lr']:g}",
            r["seed"],
            _f(r.get("val_ppl")),
            _f(r.get("test_ppl")),
            _f(r.get("test_accuracy")),
            _f(r.get("params")),
            _f(r.get("er_output"), 2),
            _f(r.get("cell_wall_s"), 1),
        ]
        for r in sorted(rows, key=lambda x: x["cell_id"])
    ]
    md += [_table(["cell", "lr", "seed", "val PPL", "test PPL", "acc.", "params", "ER(out)", "wall s"], crs), ""]
    path = out_dir / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md))
    tmp.replace(path)
    write_json_atomic(out_dir / "verdicts.json", [v.__dict__ for v in verdicts])
    return path
