"""The study's figures (PNG) from the selected groups: metrics against rank (Figs 2/3) and spectra (Figs 4-9)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...io import read_json
from ..plotting import pyplot, save
from ..stats import Stat
from .verdicts import Group, find_group


def _err(stats: list[Stat]) -> np.ndarray:
    return np.array(
        [
            [s.mean - s.lo if math.isfinite(s.lo) else 0 for s in stats],
            [s.hi - s.mean if math.isfinite(s.hi) else 0 for s in stats],
        ]
    )


def plot_by_rank(groups, ds, methods, ranks, key, path: Path, ylabel: str, title: str, log_y: bool = False) -> Path:
    """Mean and 95% CI of ``key`` per method (one line each) against the study's ranks (log-2 x axis)."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for m in methods:
        found = [g for r in sorted(ranks) if (g := find_group(groups, ds, m, r)) is not None and g.values(key)]
        if not found:
            continue
        rs, st = [g.r for g in found], [g.stat(key) for g in found]
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
    return save(fig, path)


def _analysis_curve(g: Group, key: str, curve: str) -> list[float] | None:
    """A curve of the group's first run's analysis: from its row (``curves``, kept there so a copied results.jsonl
    suffices), else from its run dir's ``analysis.json`` (rows written before rows kept them); ``None`` if the run
    was not analysed."""
    kept = (g.first.get("curves") or {}).get(key, {}).get(curve)
    if kept:
        return kept
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
        if (g := find_group(groups, ds, m, r)) is not None
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
        g = find_group(groups, ds, m, r)
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
