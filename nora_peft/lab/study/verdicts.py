"""Verdicts on the paper's claims, from the study's results rows (pure functions; tested on synthetic rows).

**Learning rate** -- per (dataset, method, rank, variant) the lr of the spec's grid with the lowest mean *validation*
perplexity over seeds is selected (:func:`select_groups`); every test number is taken at that lr only.

Verdicts: **holds** / **does not hold** need a significant difference (95% CI, :mod:`.stats`) in the stated direction;
anything else is **inconclusive** (overlapping CIs, too few seeds); **not tested** when the cells are missing. With one
seed there is no interval, so every verdict that needs one is inconclusive.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..stats import Diff, Stat, compare, latency_overheads, mean_ci
from .spec import StudySpec

HOLDS, FAILS, INCONCLUSIVE, NOT_TESTED = "holds", "does not hold", "inconclusive", "not tested"


# ---------------------------------------------------------------------------------------------------------------
# Groups: the cells of one (dataset, method, rank, variant) at the lr chosen on validation
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """The rows (one per seed) of one (dataset, method, rank, variant) at its validation-selected lr."""

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
        """Mean and 95% CI over seeds of ``key`` (see :meth:`values`)."""
        return mean_ci(self.values(key).values())

    @property
    def first(self) -> dict[str, Any]:
        """The first row (the settings every row of the group shares)."""
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
# Verdicts
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """One claim's verdict (``HOLDS`` ...) with the numbers behind it, per dataset (claim 5 has none)."""

    claim: str
    verdict: str
    evidence: str
    dataset: str = ""


def find_group(groups: dict[GroupKey, Group], ds: str, method: str, r: int, variant: str = "default") -> Group | None:
    """The group of (dataset, method, rank, variant), or ``None`` when no cell of it ran."""
    return groups.get((ds, method, r, variant))


def verdict_nora_vs_lora(groups, ds: str, nora_r: int, lora_r: int, margin: float = 0.005) -> list[Verdict]:
    """Claim 1: NoRA at ``nora_r`` reaches a test PPL <= LoRA (and rsLoRA) at ``lora_r``.

    holds: the 95% CI of PPL(NoRA) - PPL(other) lies below ``margin`` x PPL(other) (NoRA better, or at most 0.5%
    worse -- non-inferiority); does not hold: NoRA significantly worse; otherwise inconclusive."""
    out = []
    nora = find_group(groups, ds, "nora", nora_r)
    for other in ("lora", "rslora"):
        g = find_group(groups, ds, other, lora_r)
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
    lo, hi = find_group(groups, ds, method, min(ranks)), find_group(groups, ds, method, max(ranks))
    if lo is None or hi is None:
        return False, None
    d = compare(lo.values("test_ppl"), hi.values("test_ppl"))
    return d.positive, d


def verdict_plateau(groups, ds: str, ranks: list[int]) -> list[Verdict]:
    """Claim 2: LoRA's PPL plateaus with rank (also checked for rsLoRA, whose scaling is meant to fix it).

    Needs capacity to matter (significant gain smallest -> largest rank), else inconclusive with the explicit
    "this study cannot test a linear ceiling" (saying whether the PPL got worse). With ``share = gain of the last
    rank step / gain over all ranks``: holds when the last step's gain is confidently below a quarter of the total
    (CI upper bound < 0.25 x total gain; log-linear scaling over evenly spaced ranks would give a half); does not hold
    when it is confidently above a quarter; otherwise inconclusive."""
    ranks = sorted(ranks)
    out = []
    if len(ranks) < 3:
        return [Verdict("(2) LoRA plateaus with rank", NOT_TESTED, "needs at least 3 ranks", ds)]
    for method in ("lora", "rslora"):
        claim = f"(2) {method} plateaus with rank"
        gs = [find_group(groups, ds, method, r) for r in ranks]
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
            worse = full is not None and full.known and full.hi < 0
            change = "gets worse" if worse else "does not improve measurably"
            ev += (
                f". {method}'s PPL {change} from r={ranks[0]} to r={ranks[-1]}"
                + (" at the learning rates this study gives each rank" if worse else "")
                + ": this study cannot test a linear ceiling"
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
        n, lo = find_group(groups, ds, "nora", r), find_group(groups, ds, "lora", r)
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
        rs = find_group(groups, ds, "rslora", r)
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


def _ablation_activation(groups, ds: str, r: int, base: Group) -> tuple[str, str, str] | None:
    """SiLU beats every other activation (same granularity and dropout): each ``other - silu`` significantly > 0."""
    b = base.first
    acts = [
        g
        for g in (
            _variant_group(groups, ds, r, activation=a, granularity="weight", dropout=b["dropout"])
            for a in ("identity", "relu", "gelu", "tanh")
        )
        if g is not None
    ]
    if b.get("activation") != "silu" or not acts:
        return None
    diffs = [(g.first["activation"], compare(g.values("test_ppl"), base.values("test_ppl"))) for g in acts]
    ev = "; ".join(f"{a} - silu: {d.fmt()}" for a, d in diffs)
    v = HOLDS if all(d.positive for _, d in diffs) else FAILS if any(d.negative for _, d in diffs) else INCONCLUSIVE
    return "SiLU best activation", v, ev


def _ablation_granularity(groups, ds: str, r: int, base: Group) -> tuple[str, str, str] | None:
    """Module granularity is worse than weight granularity (same activation and dropout)."""
    b = base.first
    mod = _variant_group(groups, ds, r, granularity="module", activation=b["activation"], dropout=b["dropout"])
    if mod is None:
        return None
    d = compare(mod.values("test_ppl"), base.values("test_ppl"))
    return "module granularity worse", _sign_verdict(d), f"module - weight: {d.fmt()}"


def _ablation_dropout(groups, ds: str, r: int, base: Group) -> tuple[str, str, str] | None:
    """The larger latent dropout gives the lower test PPL (same activation, weight granularity)."""
    b = base.first
    other = [
        g
        for (gds, m, gr, _), g in groups.items()
        if gds == ds
        and m == "nora"
        and gr == r
        and g.first.get("activation") == b["activation"]
        and g.first.get("granularity") == "weight"
        and g.first.get("dropout") != b["dropout"]
    ]
    if not other:
        return None
    g = other[0]
    with_d, without = (base, g) if (b["dropout"] or 0) > (g.first["dropout"] or 0) else (g, base)
    d = compare(without.values("test_ppl"), with_d.values("test_ppl"))
    name = f"dropout {with_d.first['dropout']:g} helps"
    return (
        name,
        _sign_verdict(d),
        f"dropout {without.first['dropout']:g} - dropout {with_d.first['dropout']:g}: {d.fmt()}",
    )


def _sign_verdict(d: Diff) -> str:
    return HOLDS if d.positive else FAILS if d.negative else INCONCLUSIVE


def verdict_ablations(groups, ds: str, r: int | None) -> list[Verdict]:
    """Claim 4 (Table 2): SiLU is the best activation, module granularity is worse, latent dropout helps.

    Each sub-claim present in the cells is judged on its own; overall: does not hold if any does not, holds if all
    hold, else inconclusive."""
    claim = "(4) ablation ordering"
    base = find_group(groups, ds, "nora", r) if r is not None else None
    if base is None:
        return [Verdict(claim, NOT_TESTED, "no ablation cells", ds)]
    checks = (_ablation_activation, _ablation_granularity, _ablation_dropout)
    subs = [s for s in (check(groups, ds, r, base) for check in checks) if s is not None]
    if not subs:
        return [Verdict(claim, NOT_TESTED, "no ablation variants", ds)]
    verdicts = [v for _, v, _ in subs]
    overall = FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE
    ev = " | ".join(f"{name}: **{v}** ({e})" for name, v, e in subs)
    return [Verdict(claim, overall, f"NoRA r={r}, test PPL differences: {ev}", ds)]


def _overhead_text(ov: dict[str, Stat], unit: str) -> str:
    m, u = ov["vs_merged_lora"], ov["vs_unmerged_lora"]
    return (
        f"NoRA (unmerged) vs merged LoRA: {m.mean:+.1%} (95% CI {m.lo:+.1%} .. {m.hi:+.1%}, {m.n} {unit}); vs unmerged "
        f"LoRA: {u.mean:+.1%} (CI {u.lo:+.1%} .. {u.hi:+.1%})"
    )


def verdict_latency(latency: dict[str, Any] | None, claimed: float = 0.06) -> Verdict:
    """Claim 5: NoRA (unmerged) costs ~6% more latency than merged LoRA, judged on prefill latency.

    holds: the CI of the overhead lies at or below twice the claim; does not hold: it lies above; else inconclusive.
    Decode latency, when measured, is given as evidence."""
    claim = f"(5) ~{claimed:.0%} latency overhead"
    ov = latency_overheads(latency.get("rounds")) if latency else None
    if ov is None:
        return Verdict(claim, NOT_TESTED, "no latency measurement")
    m = ov["vs_merged_lora"]
    ev = f"prefill: {_overhead_text(ov, 'rounds')}; {latency.get('setting', '')}"
    decode = latency_overheads(latency.get("decode_rounds"))
    if decode is not None:
        ev += f". Decode: {_overhead_text(decode, 'rounds')}; {latency.get('decode_setting', '')}"
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
    """Every claim, per dataset (claims 1-4) and once for latency (claim 5)."""
    nora_r = spec.verdict_ranks()[0]
    out: list[Verdict] = []
    for ds in [d.name for d in spec.datasets]:
        for lora_r in spec.verdict_lora_ranks():
            out += verdict_nora_vs_lora(groups, ds, nora_r, lora_r)
        out += verdict_plateau(groups, ds, spec.ranks)
        out += verdict_effective_rank(groups, ds, spec.ranks, "er_output")
        out += verdict_effective_rank(groups, ds, spec.ranks, "er_latent")
        out += verdict_ablations(groups, ds, spec.ablations.rank if spec.ablations.variants else None)
    out.append(verdict_latency(latency, float(spec.verdict.get("latency_claim", 0.06))))
    return out
