"""The study spec (YAML) and the cells it expands to.

A spec names a base model, one or more datasets, the methods x ranks x seeds x learning-rate grid of the main
sweep, the NoRA ablations (Table 2) at one rank, one training budget shared by every cell, and the evaluation
settings. ``expand_cells(spec)`` turns it into a deterministic list of :class:`Cell`; each cell is one training run
(``<out>/cells/<cell_id>/``). ``shard_cells`` splits that list across processes. See ``docs/study.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nora_peft.methods import METHODS, AdapterSpec

PRESETS = ("demo", "gsm8k", "gsm8k-gpu", "gsm8k-full", "paper")

#: ablation knobs a variant may change (all NoRA options of AdapterSpec)
ABLATION_KNOBS = ("activation", "granularity", "dropout", "scaling", "alpha")


# Evaluation of each cell. generate: exact-match accuracy (and the logistic-map metrics) by greedy generation;
# max_examples caps every metric's records, max_generate only the generated ones (perplexity is cheap, generation is
# not); max_new_tokens caps each generated answer (None: the longest reference response + 16); analysis: spectra /
# effective rank / AUC-90 over analysis_samples held-out records.
EVAL_DEFAULTS: dict[str, Any] = {
    "generate": True,
    "max_examples": None,
    "max_generate": None,
    "max_new_tokens": None,
    "batch_size": 8,
    "analysis": True,
    "analysis_samples": 32,
}

# The learning-rate probe (optional): each method's ``lr`` grid is tried at one rank and seed for a few steps, scored
# by validation perplexity alone, and the best lr per method is then used for every final cell (all ranks, seeds and
# ablation variants). A cheap stand-in for a full grid when cells are expensive (a real model on a CPU).
PROBE_DEFAULTS: dict[str, Any] = {"rank": None, "seed": 0, "max_steps": 30, "max_examples": 128}


@dataclass
class Dataset:
    """One data source of the study: ``data`` is a ``train.TrainConfig.data`` value, ``options`` its data_options."""

    name: str
    data: str
    options: dict = field(default_factory=dict)


@dataclass
class Ablations:
    """NoRA variants trained at ``rank`` next to the default NoRA cell: ``{variant name: {knob: value}}``."""

    rank: int | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StudySpec:
    """A whole study. ``train`` holds ``TrainConfig`` fields shared by every cell (the budget: steps, batch size,
    max_length, ...); ``adapter`` holds AdapterSpec fields shared by every method (dropout, target_modules, alpha)."""

    name: str
    model: str | None = None
    datasets: list[Dataset] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["lora", "rslora", "nora"])
    ranks: list[int] = field(default_factory=lambda: [8])
    method_ranks: dict[str, list[int]] = field(default_factory=dict)  # a method run at only some of `ranks`
    seeds: list[int] = field(default_factory=lambda: [0])
    lr: dict[str, list[float] | dict[int, list[float]]] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    ablations: Ablations = field(default_factory=Ablations)
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    verdict: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)  # empty: the lr grid is swept in full (see PROBE_DEFAULTS)
    notes: list[str] = field(default_factory=list)
    description: str = ""

    # -- derived ------------------------------------------------------------------------------------------------
    def eval_settings(self) -> dict[str, Any]:
        """Evaluation settings with defaults filled in."""
        return {**EVAL_DEFAULTS, **self.eval}

    def ranks_of(self, method: str) -> list[int]:
        """The ranks ``method`` is trained at in the main sweep: ``method_ranks[method]`` if given, else all."""
        return list(self.method_ranks.get(method, self.ranks))

    def lr_grid(self, method: str, r: int) -> list[float]:
        """The learning rates tried for ``method`` at rank ``r``: one grid for every rank, or a grid per rank."""
        grid = self.lr[method]
        return grid[r] if isinstance(grid, dict) else grid

    def verdict_ranks(self) -> tuple[int, int]:
        """(NoRA rank, largest LoRA rank) compared by claim 1 (all LoRA ranks: :meth:`verdict_lora_ranks`).
        Default: LoRA at the largest rank, NoRA at the rank closest (in log scale) to an eighth of it -- the paper's
        64 vs 512; ties go to the smaller rank."""
        lora_r = max(self.verdict_lora_ranks())
        if "nora_rank" in self.verdict:
            return int(self.verdict["nora_rank"]), lora_r
        target = math.log(lora_r / 8)
        nora_r = min(sorted(self.ranks), key=lambda r: (abs(math.log(r) - target), r))
        return nora_r, lora_r

    def verdict_lora_ranks(self) -> list[int]:
        """The LoRA/rsLoRA ranks claim 1 compares NoRA with, ascending: ``verdict.lora_ranks`` (several, e.g. 4x
        and 16x NoRA's rank), else ``verdict.lora_rank``, else the largest rank."""
        if "lora_ranks" in self.verdict:
            return sorted(int(r) for r in self.verdict["lora_ranks"])
        return [int(self.verdict.get("lora_rank", max(self.ranks)))]

    def fingerprint(self) -> str:
        """A hash of everything that changes what a cell with a given id computes (model, data, budget, eval):
        an output dir made with another fingerprint must not be resumed."""
        ev = self.eval_settings()
        if ev["max_new_tokens"] is None:  # added later: studies that leave it unset keep their fingerprint
            del ev["max_new_tokens"]
        key = {
            "model": self.model,
            "datasets": [asdict(d) for d in self.datasets],
            "adapter": self.adapter,
            "train": self.train,
            "eval": ev,
            **({"probe": self.probe} if self.probe else {}),  # studies without a probe keep their old fingerprint
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    dataset: str
    data: str
    data_options: tuple  # sorted (key, value) pairs, hashable
    method: str
    r: int
    variant: str  # "default" or an ablation variant name
    knobs: tuple  # sorted (knob, value) pairs of the AdapterSpec beyond method and r
    lr: float
    seed: int

    @property
    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(method=self.method, r=self.r, **_unfreeze(dict(self.knobs)))

    @property
    def cell_id(self) -> str:
        """Readable and unique: dataset, adapter label, dropout, lr and seed (content-addressed, so the ablation's
        default variant and the main-sweep cell of the same configuration are one cell)."""
        knobs = dict(self.knobs)
        parts = [self.dataset, self.adapter_spec.label(), f"do{knobs.get('dropout', 0):g}"]
        if knobs.get("alpha") is not None:
            parts.append(f"a{knobs['alpha']:g}")
        parts += [f"lr{self.lr:g}", f"s{self.seed}"]
        return "_".join(parts)

    def describe(self) -> dict[str, Any]:
        """Flat description stored with the cell's result row."""
        knobs = dict(self.knobs)
        return {
            "cell_id": self.cell_id,
            "dataset": self.dataset,
            "method": self.method,
            "r": self.r,
            "variant": self.variant,
            "label": self.adapter_spec.label(),
            "activation": knobs.get("activation", "silu") if self.method == "nora" else "identity",
            "granularity": knobs.get("granularity", "weight") if self.method == "nora" else "weight",
            "dropout": knobs.get("dropout"),
            "lr": self.lr,
            "seed": self.seed,
        }


def freeze_options(d: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _unfreeze(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------------------------
_TOP_KEYS = {f for f in StudySpec.__dataclass_fields__}


def _fail(where: str, problem: str, fix: str) -> None:
    raise ValueError(f"Study spec {where}: {problem}. {fix}")


def parse_spec(raw: dict[str, Any], where: str = "<spec>") -> StudySpec:
    """Validate a spec dict (from YAML) and return a :class:`StudySpec`; errors name the key and the fix."""
    if not isinstance(raw, dict):
        _fail(where, f"must be a mapping, got {type(raw).__name__}", "Write the spec as YAML keys (see docs/study.md).")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        _fail(where, f"unknown key(s) {sorted(unknown)}", f"Valid keys: {sorted(_TOP_KEYS)}.")
    if not raw.get("name"):
        _fail(where, "has no 'name'", "Add `name: my-study` (used for the default output dir).")
    datasets = _parse_datasets(raw, where)
    methods, ranks, seeds = _parse_sweep(raw, where)
    adapter = _parse_adapter(raw, where)
    ablations = _parse_ablations(raw, methods, adapter, where)
    spec = StudySpec(
        name=str(raw["name"]),
        model=raw.get("model"),
        datasets=datasets,
        methods=methods,
        ranks=ranks,
        method_ranks=_method_ranks(raw, methods, ranks, where),
        seeds=seeds,
        lr=_parse_lr(raw, methods, ranks, ablations, where),
        adapter=adapter,
        ablations=ablations,
        train=dict(raw.get("train") or {}),
        eval=dict(raw.get("eval") or {}),
        latency=dict(raw.get("latency") or {}),
        verdict=dict(raw.get("verdict") or {}),
        probe=dict(raw.get("probe") or {}),
        notes=list(raw.get("notes") or []),
        description=str(raw.get("description") or ""),
    )
    _check_spec(spec, where)
    return spec


def _parse_datasets(raw: dict[str, Any], where: str) -> list[Dataset]:
    datasets = []
    for i, d in enumerate(raw.get("datasets") or []):
        if isinstance(d, str):
            d = {"name": Path(d).stem if "/" in d else d, "data": d}
        if not isinstance(d, dict) or "data" not in d:
            _fail(where, f"datasets[{i}] = {d!r} has no 'data'", "Use `- {name: gsm8k, data: gsm8k}` or a string.")
        datasets.append(
            Dataset(name=str(d.get("name") or d["data"]), data=str(d["data"]), options=d.get("options") or {})
        )
    if not datasets:
        _fail(where, "lists no datasets", "Add `datasets: [reasoning]` (or gsm8k, slimorca, mathinstruct, a file).")
    if len({d.name for d in datasets}) != len(datasets):
        _fail(where, "has two datasets with the same name", "Give each dataset a distinct `name`.")
    return datasets


def _parse_sweep(raw: dict[str, Any], where: str) -> tuple[list[str], list[int], list[int]]:
    """``(methods, ranks, seeds)`` of the main sweep."""
    methods = list(raw.get("methods") or ["lora", "rslora", "nora"])
    for m in methods:
        if m not in METHODS:
            _fail(where, f"method {m!r} is unknown", f"Choose from {METHODS}.")
    ranks = [int(r) for r in raw.get("ranks") or [8]]
    if any(r <= 0 for r in ranks) or len(set(ranks)) != len(ranks):
        _fail(where, f"ranks {ranks} must be distinct positive integers", "E.g. `ranks: [16, 64, 128, 512]`.")
    seeds = [int(s) for s in raw.get("seeds") or [0]]
    if len(set(seeds)) != len(seeds):
        _fail(where, f"seeds {seeds} repeat", "List each seed once.")
    return methods, ranks, seeds


def _parse_adapter(raw: dict[str, Any], where: str) -> dict[str, Any]:
    adapter = dict(raw.get("adapter") or {})
    bad = set(adapter) - {"dropout", "alpha", "target_modules", "extra"}
    if bad:
        _fail(
            where,
            f"adapter has key(s) {sorted(bad)} that are not shared by every method",
            "Put NoRA-only knobs (activation, granularity, scaling) under ablations.variants.",
        )
    return adapter


def _parse_ablations(raw: dict[str, Any], methods: list[str], adapter: dict[str, Any], where: str) -> Ablations:
    abl_raw = raw.get("ablations") or {}
    ablations = Ablations(rank=abl_raw.get("rank"), variants=dict(abl_raw.get("variants") or {}))
    if ablations.variants:
        if "nora" not in methods:
            _fail(where, "has ablations but 'nora' is not among the methods", "Add nora to methods.")
        if ablations.rank is None:
            _fail(where, "ablations have no 'rank'", "Add `ablations: {rank: 128, ...}`.")
        for name, knobs in ablations.variants.items():
            if not isinstance(knobs, dict) or set(knobs) - set(ABLATION_KNOBS):
                _fail(where, f"ablation variant {name!r} = {knobs!r}", f"Use a mapping of knobs from {ABLATION_KNOBS}.")
            AdapterSpec(method="nora", r=int(ablations.rank), **{**adapter, **knobs})  # validates values
    return ablations


def _parse_lr(
    raw: dict[str, Any], methods: list[str], ranks: list[int], ablations: Ablations, where: str
) -> dict[str, list[float] | dict[int, list[float]]]:
    """One lr grid per method, or a grid per rank (e.g. rsLoRA's alpha/sqrt(r) scale moves its best lr with r)."""
    lr_raw = raw.get("lr") or {}
    if isinstance(lr_raw, (int, float, list)):
        lr_raw = {m: lr_raw for m in methods}

    def _grid(m: str, grid: Any) -> list[float]:
        grid = [float(x) for x in (grid if isinstance(grid, list) else [grid])]
        if not grid or any(not (x > 0) for x in grid):
            _fail(where, f"lr grid of {m!r} is {grid}", "Use positive learning rates.")
        return grid

    lr: dict[str, list[float] | dict[int, list[float]]] = {}
    for m in methods:
        grid = lr_raw.get(m, lr_raw.get("default"))
        if grid is None:
            _fail(where, f"has no learning-rate grid for method {m!r}", f"Add `lr: {{{m}: [1e-4, 3e-4]}}`.")
        if not isinstance(grid, dict):
            lr[m] = _grid(m, grid)
            continue
        per_rank = {int(r): _grid(m, g) for r, g in grid.items()}
        needed = set(ranks) | ({int(ablations.rank)} if m == "nora" and ablations.variants else set())
        if needed - set(per_rank):
            _fail(
                where,
                f"lr grid of {m!r} has no entry for rank(s) {sorted(needed - set(per_rank))}",
                f"Give a list for every rank in {sorted(needed)}, or one list for all ranks.",
            )
        lr[m] = per_rank
    return lr


def _check_spec(spec: StudySpec, where: str) -> None:
    """Checks across keys: per-cell train fields, eval keys, the probe, the verdict's ranks."""
    for key in ("adapter", "output_dir", "lr", "seed", "data", "data_options", "model"):
        if key in spec.train:
            _fail(where, f"train.{key} is set per cell by the study", f"Remove train.{key}; use the spec's top level.")
    unknown_eval = set(spec.eval) - set(EVAL_DEFAULTS)
    if unknown_eval:
        _fail(where, f"unknown eval key(s) {sorted(unknown_eval)}", f"Use keys from {sorted(EVAL_DEFAULTS)}.")
    _check_probe(spec, where)
    if "lora_ranks" in spec.verdict and ("lora_rank" in spec.verdict or not spec.verdict["lora_ranks"]):
        _fail(where, f"verdict = {spec.verdict}", "Give either verdict.lora_rank or a non-empty verdict.lora_ranks.")
    for r in (spec.verdict_ranks()[0], *spec.verdict_lora_ranks()):
        if r not in spec.ranks:
            _fail(where, f"verdict rank {r} is not among ranks {spec.ranks}", "Fix verdict.nora_rank / lora_rank(s).")


def _method_ranks(raw: dict[str, Any], methods: list[str], ranks: list[int], where: str) -> dict[str, list[int]]:
    per_method = raw.get("method_ranks") or {}
    out = {}
    for m, rs in per_method.items():
        if m not in methods or not isinstance(rs, list) or not rs or set(map(int, rs)) - set(ranks):
            _fail(where, f"method_ranks[{m!r}] = {rs!r}", f"Name a method of {methods} and ranks from {ranks}.")
        out[m] = [int(r) for r in rs]
    return out


def _check_probe(spec: StudySpec, where: str) -> None:
    """A probe needs one lr grid per method (not per rank) and known keys; its rank defaults to the largest."""
    if not spec.probe:
        return
    unknown = set(spec.probe) - set(PROBE_DEFAULTS)
    if unknown:
        _fail(where, f"unknown probe key(s) {sorted(unknown)}", f"Use keys from {sorted(PROBE_DEFAULTS)}.")
    for m, grid in spec.lr.items():
        if isinstance(grid, dict):
            _fail(where, f"lr grid of {m!r} is per rank, but a probe picks one lr per method", "Give one list.")
    spec.probe = {**PROBE_DEFAULTS, **spec.probe}
    if spec.probe["rank"] is None:
        spec.probe["rank"] = max(spec.ranks)
    if int(spec.probe["max_steps"]) < 1:
        _fail(where, f"probe.max_steps={spec.probe['max_steps']}", "Use at least one step.")


def preset_path(name: str) -> Path:
    return Path(str(resources.files("nora_peft.lab.study") / "presets" / f"{name}.yaml"))


def load_spec(path_or_preset: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """A spec from a YAML file, or a preset name (``demo``, ``paper``), with ``overrides`` (:func:`apply_overrides`)
    applied before it is validated."""
    p = Path(path_or_preset)
    if str(path_or_preset) in PRESETS and not p.exists():
        p = preset_path(str(path_or_preset))
    if not p.exists():
        raise FileNotFoundError(
            f"No study spec {path_or_preset!r}: pass a YAML file or a preset name ({', '.join(PRESETS)})."
        )
    with open(p) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"Study spec {p} is not valid YAML: {e}") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_spec(raw, where=str(p) + (f" with {' '.join(overrides)}" if overrides else ""))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.max_steps=2", "seeds=[0]", "model=null"]`` applied to a copy of a raw spec: a dotted key path, ``=``,
    a YAML value (so numbers, lists, mappings and null read as such). A copy of the preset at a smaller size, e.g.
    for a dry run on a CPU: the overrides change the fingerprint like any edit of the spec."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        path = [k for k in key.strip().split(".") if k]
        if not sep or not path:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE, e.g. train.max_steps=2 or seeds=[0].")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({e}).") from None
        node = out
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                if node.get(k) is not None:
                    raise ValueError(f"--set {item!r}: {k!r} is {node[k]!r}, not a mapping that {path[-1]!r} is in.")
                node[k] = {}
            node = node[k]
        node[path[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------------
def expand_cells(spec: StudySpec) -> list[Cell]:
    """Every cell of the study in a deterministic order: per dataset, the main sweep (method x rank x lr x seed)
    then the ablation variants (NoRA's lr grid). Duplicates (same cell id) are kept once, first name wins."""
    cells: dict[str, Cell] = {}
    shared = dict(spec.adapter)

    def add(ds: Dataset, method: str, r: int, variant: str, knobs: dict[str, Any]) -> None:
        full = {**shared, **knobs}
        full.setdefault("dropout", AdapterSpec().dropout)
        if method == "nora":  # a knob at its default value does not make a different cell
            defaults = AdapterSpec(method="nora", r=r)
            full = {
                k: v for k, v in full.items() if k == "dropout" or k not in ABLATION_KNOBS or getattr(defaults, k) != v
            }
        for lr in spec.lr_grid(method, r):
            for seed in spec.seeds:
                c = Cell(
                    ds.name, ds.data, freeze_options(ds.options), method, r, variant, freeze_options(full), lr, seed
                )
                cells.setdefault(c.cell_id, c)

    for ds in spec.datasets:
        for method in spec.methods:
            for r in spec.ranks_of(method):
                add(ds, method, r, "default", {})
        for name, knobs in spec.ablations.variants.items():
            add(ds, "nora", int(spec.ablations.rank), name, dict(knobs))
    return list(cells.values())


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n; ``None`` -> ``(0, 1)``."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} must look like i/n, e.g. 0/4 (shard i of n, counting from 0).") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need n >= 1 and 0 <= i < n (e.g. 0/4 .. 3/4).")
    return i, n


def shard_cells(cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
    """The cells of shard ``i`` of ``n``: every n-th cell starting at i (deterministic; each cell in exactly one)."""
    i, n = shard
    return [c for k, c in enumerate(cells) if k % n == i]
