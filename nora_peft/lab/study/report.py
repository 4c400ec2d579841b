"""From the study's stored results to ``report.md`` (+ ``figures/*.png`` and ``verdicts.json``); reads, never measures.

Inputs: ``results.jsonl`` (one row per cell), each cell's ``analysis.json`` (spectral curves) and ``latency.json``
(the latency step's measurement, if any). The report is one markdown section per function below: header, verdicts,
per dataset (scaling, spectra, ablations, logistic map), efficiency (Table 3), every cell. Statistics are in
:mod:`.stats`, lr selection and verdict rules in :mod:`.verdicts`, figures in :mod:`.figures`.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...io import write_json_atomic
from ..stats import latency_overheads, mean_ci
from .figures import plot_by_rank, spectral_figures
from .results import read_base_reference, read_latency, read_results
from .spec import StudySpec, expand_cells
from .verdicts import Group, GroupKey, Verdict, all_verdicts, capacity_matters, find_group, select_groups


@dataclass
class ReportInputs:
    """What every section reads: the spec, the selected groups, the rows, the latency measurement, where to write."""

    spec: StudySpec
    out_dir: Path
    rows: list[dict[str, Any]]
    groups: dict[GroupKey, Group]
    latency: dict[str, Any] | None
    verdicts: list[Verdict]
    base_reference: dict[str, Any] | None = None

    @property
    def fig_dir(self) -> Path:
        return self.out_dir / "figures"

    def link(self, path: Path, alt: str) -> str:
        """A markdown image link relative to the report."""
        return f"![{alt}]({path.relative_to(self.out_dir)})"


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _knobs(g: Group) -> str:
    f = g.first
    return f"{f.get('activation')}, {f.get('granularity')}, dropout {f.get('dropout'):g}"


def _datasets(spec: StudySpec) -> list[str]:
    return [d.name for d in spec.datasets]


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------
def header_section(inp: ReportInputs) -> list[str]:
    """Title, description and the study's settings."""
    spec, methods = inp.spec, list(inp.spec.methods)
    md = [f"# Study `{spec.name}`", ""]
    if spec.description:
        md += [spec.description.strip(), ""]
    md += [
        f"- base model: `{spec.model or 'embedded default base'}`; datasets: "
        + ", ".join(f"`{d.name}` ({d.data})" for d in spec.datasets),
        f"- methods {methods}, ranks {spec.ranks}, seeds {spec.seeds}, lr grids "
        + ", ".join(f"{m}: {spec.lr[m]}" for m in methods),
        "- budget (identical for every cell): " + ", ".join(f"{k}={v}" for k, v in sorted(spec.train.items())),
        f"- {len(inp.rows)} cells; lr chosen per (dataset, method, rank, variant) on the **validation** split; test "
        "numbers at that lr; ± = 95% Student-t CI over seeds"
        + (" (a single seed has no CI)" if len(spec.seeds) < 2 else ""),
    ]
    md += [f"- {n}" for n in spec.notes]
    return md + [""]


def verdicts_section(inp: ReportInputs) -> list[str]:
    """The verdict table, then per dataset whether adapter capacity matters at all."""
    spec = inp.spec
    nora_r, lora_rs = spec.verdict_ranks()[0], spec.verdict_lora_ranks()
    at = " and ".join(f"r={r}" for r in lora_rs)
    factors = " and ".join(str(r // max(nora_r, 1)) for r in lora_rs)
    md = [
        "## Verdicts",
        "",
        f"Claim 1 compares NoRA at r={nora_r} with LoRA/rsLoRA at {at} "
        f"(the paper: NoRA r=64 vs LoRA r=512, a factor {factors} here vs 8 there).",
        "",
        _table(
            ["claim", "dataset", "verdict", "evidence"],
            [[v.claim, v.dataset or "-", f"**{v.verdict}**", v.evidence] for v in inp.verdicts],
        ),
        "",
    ]
    lo, hi = min(spec.ranks), max(spec.ranks)
    for ds in _datasets(spec):
        ok, full = capacity_matters(inp.groups, ds, spec.ranks, "lora")
        if not ok:
            md += [
                f"> **{ds}: this study cannot test a linear ceiling** -- LoRA's test PPL does not improve measurably "
                f"from r={lo} to r={hi} (gain {full.fmt() if full else 'n/a'}), so adapter capacity is not what "
                "limits it here.",
                "",
            ]
        else:
            md += [
                f"> {ds}: adapter capacity matters here -- LoRA's test PPL improves from r={lo} to r={hi} by "
                f"{full.fmt()} (95% CI), so the rank question can be asked.",
                "",
            ]
    return md


def scaling_section(inp: ReportInputs, ds: str) -> list[str]:
    """Figs 2/3: test PPL against rank, and the table of every method and rank at its selected lr."""
    spec = inp.spec
    p = plot_by_rank(
        inp.groups,
        ds,
        spec.methods,
        spec.ranks,
        "test_ppl",
        inp.fig_dir / f"scaling_{ds}.png",
        "test perplexity",
        f"{ds}: test PPL vs rank (mean, 95% CI over seeds)",
    )
    rows = []
    for m in spec.methods:
        for r in sorted(spec.ranks):
            if (g := find_group(inp.groups, ds, m, r)) is not None:
                rows.append(
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
    reference = ((inp.base_reference or {}).get("datasets") or {}).get(ds)
    if reference is not None:  # the base model without an adapter, evaluated on the same test records
        scores = [_f(reference.get("ppl")), _f(reference.get("accuracy"))]
        rows.insert(0, ["base (no adapter)", "-", "-", 0, "-", *scores, "-"])
    header = ["method", "r", "lr (val-selected)", "trainable params", "val PPL", "test PPL", "test exact-match acc."]
    return [
        f"## {ds}: scaling with rank (Figs 2/3)",
        "",
        inp.link(p, "scaling"),
        "",
        _table(header + ["seeds"], rows),
        "",
    ]


SPECTRAL_KEYS = ("er_update", "auc90_update", "er_latent", "auc90_latent", "er_output", "auc90_output")


def spectra_section(inp: ReportInputs, ds: str) -> list[str]:
    """Figs 4-9: effective rank against rank, spectra at the largest rank, and the ER / AUC-90 table."""
    spec = inp.spec
    md = [f"### {ds}: spectra, effective rank, AUC-90 (Figs 4-9)", ""]
    for key, name in (("er_output", "output"), ("er_latent", "latent")):
        p = plot_by_rank(
            inp.groups,
            ds,
            spec.methods,
            spec.ranks,
            key,
            inp.fig_dir / f"effective_rank_{name}_{ds}.png",
            f"effective rank ({name})",
            f"{ds}: ER of adapter {name} activations",
        )
        md.append(inp.link(p, f"ER {name}"))
    md += [
        inp.link(p, "spectrum") for p in spectral_figures(inp.groups, ds, spec.methods, max(spec.ranks), inp.fig_dir)
    ]
    md.append("")
    rows = []
    for m in spec.methods:
        for r in sorted(spec.ranks):
            g = find_group(inp.groups, ds, m, r)
            if g is not None and g.values("er_update"):
                rows.append([m, r] + [g.stat(k).fmt(2) for k in SPECTRAL_KEYS])
    if not rows:
        return md
    header = ["method", "r", "ER(ΔW)", "AUC-90(ΔW)", "ER(latent)", "AUC-90(latent)", "ER(output)", "AUC-90(output)"]
    return md + [
        _table(header, rows),
        "",
        "ER = exp(entropy of s_i/Σs) (Roy & Vetterli); AUC-90 = components holding 90% of Σs_i² "
        "(mean over adapted layers). Output ER ≤ r for every method (the output lies in the column space "
        "of W_down / B); LoRA's latent A x is linear in x.",
        "",
    ]


def ablations_section(inp: ReportInputs, ds: str) -> list[str]:
    """Table 2: every NoRA variant at the ablation rank."""
    if not inp.spec.ablations.variants:
        return []
    ra = int(inp.spec.ablations.rank)
    rows = [
        [variant, _knobs(g), _f(g.first.get("params")), f"{g.lr:g}", g.stat("val_ppl").fmt(), g.stat("test_ppl").fmt()]
        + [len(g.rows)]
        for (gds, m, r, variant), g in sorted(inp.groups.items(), key=lambda kv: kv[0][3])
        if gds == ds and m == "nora" and r == ra
    ]
    header = ["variant", "activation, granularity, dropout", "trainable params", "lr", "val PPL", "test PPL", "seeds"]
    return [f"### {ds}: ablations at r={ra} (Table 2)", "", _table(header, rows), ""]


def logistic_section(inp: ReportInputs, ds: str) -> list[str]:
    """Table 1: the logistic-map metrics, when the dataset has them."""
    keys = sorted({k for r in inp.rows if r["dataset"] == ds for k in r.get("test", {}) if "logistic" in k})
    if not keys:
        return []
    rows = [
        [m, r] + [g.stat(f"test.{k}").fmt(3) for k in keys]
        for m in inp.spec.methods
        for r in sorted(inp.spec.ranks)
        if (g := find_group(inp.groups, ds, m, r)) is not None
    ]
    return [f"### {ds}: logistic-map iteration (Table 1)", "", _table(["method", "r"] + keys, rows), ""]


def _latency_table(inp: ReportInputs, rounds: list[list[dict]], rate: str) -> str:
    """One row per variant: params and test PPL of its group (if trained), rel. latency and rate, mean ± CI."""
    r_lat = int(inp.latency.get("rank", inp.spec.verdict_ranks()[0]))
    ds0 = inp.spec.datasets[0].name
    by_label: dict[str, list[dict]] = defaultdict(list)
    for rnd in rounds:
        for row in rnd:
            by_label[row["label"]].append(row)
    rows = []
    for label, rs in by_label.items():
        m = rs[0].get("method")
        same_model = inp.latency.get("cells_model", True)  # measured on another model: its cells were not trained
        g = find_group(inp.groups, ds0, m, r_lat) if m and same_model else None
        rows.append(
            [
                label,
                _f(g.first.get("params")) if g else "-",
                g.stat("test_ppl").fmt() if g else "-",
                mean_ci(x["rel_latency"] for x in rs).fmt(3),
                mean_ci(x[rate] for x in rs).fmt(0),
            ]
        )
    rate_name = "tokens/s" if rate == "tokens_per_s" else "generated tokens/s"
    return _table(["variant", "trainable params", f"test PPL ({ds0})", "rel. latency", rate_name], rows)


def _overhead_line(rounds: list[list[dict]]) -> list[str]:
    ov = latency_overheads(rounds)
    if not ov:
        return []
    return [
        f"NoRA overhead vs merged LoRA: {ov['vs_merged_lora'].fmt(3)}; vs unmerged LoRA: "
        f"{ov['vs_unmerged_lora'].fmt(3)} (fractions, 95% CI over rounds).",
        "",
    ]


def efficiency_section(inp: ReportInputs) -> list[str]:
    """Table 3 from ``latency.json``: prefill (and decode, when measured) of base, merged/unmerged LoRA, NoRA."""
    lat = inp.latency
    if not lat:
        return []
    model = f" on `{lat['model']}`" if lat.get("model") else ""
    md = [
        "## Efficiency (Table 3)",
        "",
        f"Prefill latency{model}, {lat.get('setting', '')}, median of repeats, "
        "LoRA and NoRA measured alternately in one process; rel. latency vs the base model.",
        "",
        _latency_table(inp, lat["rounds"], "tokens_per_s"),
        "",
    ]
    md += _overhead_line(lat["rounds"])
    if lat.get("decode_rounds"):
        md += [f"Decode{model}: {lat.get('decode_setting', '')}, measured alternately.", ""]
        md += [_latency_table(inp, lat["decode_rounds"], "decode_tokens_per_s"), ""]
        md += _overhead_line(lat["decode_rounds"])
    return md


def cells_section(inp: ReportInputs) -> list[str]:
    """Every row of results.jsonl (selected lr or not)."""
    rows = [
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
        for r in sorted(inp.rows, key=lambda x: x["cell_id"])
    ]
    header = ["cell", "lr", "seed", "val PPL", "test PPL", "acc.", "params", "ER(out)", "wall s"]
    walls = sorted(float(r["cell_wall_s"]) for r in inp.rows if isinstance(r.get("cell_wall_s"), (int, float)))
    cost = []
    if walls:
        cost = [
            f"Cell wall times (each cell in one process; --jobs runs several at once): {len(walls)} cells, "
            f"{sum(walls) / 3600:.2f} h in all, median {walls[len(walls) // 2] / 60:.1f} min. A cell finished after a "
            "resume counts only its last run.",
            "",
        ]
    intro = ["## All cells", "", "Every row of results.jsonl (selected lr or not).", ""]
    return [*intro, _table(header, rows), "", *cost]


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
def load_inputs(spec: StudySpec, out_dir: str | Path) -> ReportInputs:
    """Read the spec's rows (rows of cells no longer in the spec are ignored) and latency; select groups; judge."""
    out_dir = Path(out_dir)
    wanted = {c.cell_id for c in expand_cells(spec)}
    rows = [r for r in read_results(out_dir) if r["cell_id"] in wanted]
    groups = select_groups(rows)
    latency = read_latency(out_dir)
    verdicts = all_verdicts(spec, groups, latency)
    return ReportInputs(spec, out_dir, rows, groups, latency, verdicts, read_base_reference(out_dir))


def render(inp: ReportInputs) -> str:
    """The whole markdown, section by section (figures are written as their sections are rendered)."""
    inp.fig_dir.mkdir(parents=True, exist_ok=True)
    md = header_section(inp) + verdicts_section(inp)
    for ds in _datasets(inp.spec):
        md += scaling_section(inp, ds) + spectra_section(inp, ds)
        md += ablations_section(inp, ds) + logistic_section(inp, ds)
    md += efficiency_section(inp) + cells_section(inp)
    return "\n".join(md)


def write_report(spec: StudySpec, out_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """Write ``report.md``, ``figures/*.png`` and ``verdicts.json`` from the stored results (nothing is measured:
    the latency table appears when the study's latency step has stored ``latency.json``)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    inp = load_inputs(spec, out_dir)
    if inp.latency is None and not spec.latency.get("skip"):
        log(f"report: no latency.json in {inp.out_dir}; claim (5) is not tested (the study's latency step stores it)")
    path = inp.out_dir / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(render(inp))
    tmp.replace(path)
    write_json_atomic(inp.out_dir / "verdicts.json", [v.__dict__ for v in inp.verdicts])
    return path
