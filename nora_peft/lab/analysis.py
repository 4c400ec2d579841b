"""Spectral analysis of trained adapters: update spectra, effective rank, AUC-90 (paper Figs 4-9); ``nora analyze``.

For every adapted layer (NoRA ``Linear`` / module-granularity ``ParallelBlock``, peft LoRA / rsLoRA / DoRA):

* **Update spectrum** -- the singular values of the learned update ``Delta W = s * B A`` (LoRA) or
  ``s * W_down W_up`` (NoRA; for a non-identity activation this is the linear part of the branch, the matrix the
  paper plots). It has rank <= r; we compute the r singular values exactly from two thin QR factorisations
  (``B = Q_b R_b``, ``A^T = Q_a R_a`` => ``sigma(B A) = sigma(R_b R_a^T)``), so an 8B model's 4096x4096 updates cost an
  r x r SVD each. (For DoRA only the direction update ``s B A`` is analysed; its magnitude vector is not.)
* **Effective rank of the activations** (Roy & Vetterli, 2007) of the r-dim latent (NoRA: ``act(W_up x)``, after the
  activation and before ``W_down``; LoRA: ``A x``) and of the d-dim adapter output (``s W_down latent``), over all
  non-padding tokens of N held-out samples, captured with forward hooks on the adapted layers. For a matrix ``M``
  (tokens x features) with singular values ``s_i``: ``p_i = s_i / sum_j s_j`` and ``ER = exp(-sum_i p_i log p_i)``.
  Activations are *not* centred. Two facts worth keeping in mind when reading the numbers:

  - the output lies in the column space of ``W_down`` (r columns), so ``ER(output) <= r`` for every method;
  - LoRA's latent ``A x`` is a linear function of ``x``, so its ER is that of the inputs projected onto ``A``'s rows;
    only a non-linear activation can spread the latent over more directions than the inputs occupy.

  Only the r x r Gram matrix ``L^T L`` of the latent ``L`` is accumulated (in float64), which is exact for both:
  ``sigma(L)^2 = eig(L^T L)`` and ``sigma(s L W_down^T) = sigma(s Lambda^{1/2} V^T W_down^T)`` with
  ``L^T L = V Lambda V^T``.
* **Cumulative spectral energy and AUC-90** -- energy is ``s_i^2`` (squared singular values, i.e. variance captured
  by the i-th component, as in PCA); the cumulative curve is ``c_k = sum_{i<=k} s_i^2 / sum_i s_i^2`` and **AUC-90** is
  the number of components ``k`` needed for ``c_k >= 0.9`` (smaller = energy concentrated in fewer directions). We
  also store the normalised area under the cumulative curve, ``mean_k c_k`` over the r components.

``analyze_run(run_dir)`` writes ``analysis.json`` (atomically) and PNG figures into the run dir.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..io import write_json_atomic
from ..tuner.ops import activation_fn
from .plotting import pyplot, save
from .torch_utils import eval_mode

ENERGY_THRESHOLD = 0.9


# ---------------------------------------------------------------------------------------------------------------
# Spectral statistics (numpy, exact definitions)
# ---------------------------------------------------------------------------------------------------------------
def effective_rank(singular_values: Iterable[float]) -> float:
    """Roy & Vetterli's effective rank: ``exp(H(p))`` with ``p_i = s_i / sum s`` (zeros contribute nothing).

    ``ER`` of a rank-1 matrix is 1; of ``c * I_n`` it is ``n``; of the zero matrix we return 0.
    """
    s = np.abs(np.asarray(list(singular_values), dtype=np.float64))
    total = s.sum()
    if total <= 0 or not np.isfinite(total):
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def cumulative_energy(singular_values: Iterable[float]) -> np.ndarray:
    """``c_k = sum_{i<=k} s_i^2 / sum_i s_i^2`` for k = 1..n, with ``s`` sorted in decreasing order."""
    s = np.sort(np.abs(np.asarray(list(singular_values), dtype=np.float64)))[::-1]
    e = s**2
    total = e.sum()
    if total <= 0:
        return np.zeros_like(e)
    return np.cumsum(e) / total


def components_for_energy(singular_values: Iterable[float], threshold: float = ENERGY_THRESHOLD) -> int:
    """AUC-90 (with the default threshold): the fewest leading components holding ``threshold`` of the energy."""
    c = cumulative_energy(singular_values)
    if len(c) == 0 or c[-1] <= 0:
        return 0
    return int(np.searchsorted(c, threshold - 1e-12) + 1)


def spectrum_stats(singular_values: Iterable[float]) -> dict[str, Any]:
    """Singular values (decreasing), effective rank, AUC-90, the cumulative-energy curve and its normalised area."""
    s = np.sort(np.abs(np.asarray(list(singular_values), dtype=np.float64)))[::-1]
    c = cumulative_energy(s)
    return {
        "singular_values": s.tolist(),
        "effective_rank": effective_rank(s),
        "auc90": components_for_energy(s),
        "energy_auc": float(c.mean()) if len(c) else 0.0,
        "cumulative_energy": c.tolist(),
    }


def lowrank_singular_values(down: torch.Tensor, up: torch.Tensor, scaling: float = 1.0) -> np.ndarray:
    """Singular values of ``scaling * down @ up`` (``down``: (d, r), ``up``: (r, k)) without forming the d x k
    product: ``down = Q_b R_b``, ``up^T = Q_a R_a`` give ``down @ up = Q_b (R_b R_a^T) Q_a^T``."""
    down = down.detach().to(torch.float64).cpu()
    up = up.detach().to(torch.float64).cpu()
    _, rb = torch.linalg.qr(down)
    _, ra = torch.linalg.qr(up.t())
    return (torch.linalg.svdvals(rb @ ra.t()) * abs(float(scaling))).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Finding the adapter factors in a model (one description for NoRA and LoRA)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AdapterFactors:
    """One adapted layer: ``branch(x) = scaling * down @ act(up @ x)``; ``module`` is the tuner layer."""

    name: str
    kind: str  # "nora", "nora-module" or "lora"
    module: nn.Module
    up: torch.Tensor  # (r, k)
    down: torch.Tensor  # (d, r)
    scaling: float
    activation: str

    @property
    def r(self) -> int:
        return int(self.up.shape[0])


def adapter_factors(model: nn.Module, adapter_name: str = "default") -> list[AdapterFactors]:
    """Every NoRA and peft-LoRA layer of ``model`` holding ``adapter_name``, in module order."""
    from peft.tuners.lora import LoraLayer

    from ..tuner.layer import NoraLayer, ParallelBlock

    found = []
    for name, m in model.named_modules():
        if isinstance(m, NoraLayer) and adapter_name in m.nora_up:
            found.append(
                AdapterFactors(
                    name=name,
                    kind="nora-module" if isinstance(m, ParallelBlock) else "nora",
                    module=m,
                    up=m.nora_up[adapter_name].weight,
                    down=m.nora_down[adapter_name].weight,
                    scaling=float(m.scaling[adapter_name]),
                    activation=m.nora_activation[adapter_name],
                )
            )
        elif isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {}):
            found.append(
                AdapterFactors(
                    name=name,
                    kind="lora",
                    module=m,
                    up=m.lora_A[adapter_name].weight,
                    down=m.lora_B[adapter_name].weight,
                    scaling=float(m.scaling[adapter_name]),
                    activation="identity",
                )
            )
    return found


def _short(name: str) -> str:
    return name.removeprefix("base_model.model.")


# ---------------------------------------------------------------------------------------------------------------
# Activation statistics via forward hooks
# ---------------------------------------------------------------------------------------------------------------
class ActivationRecorder:
    """Forward hooks that accumulate, per adapted layer, the Gram matrix ``L^T L`` of the r-dim latent over the
    non-padding tokens (set :attr:`token_mask` to the batch's attention mask before each forward).

    The hook reads the tensor the adapter itself reads (the layer input; for module granularity the block's hidden
    states) and recomputes the latent ``act(up x)`` from the layer's weights: in eval mode this is exactly what the
    layer computes. ``keep_latents=True`` also stores the latents (for tests on tiny models).
    """

    def __init__(self, factors: list[AdapterFactors], keep_latents: bool = False) -> None:
        self.factors = factors
        self.gram: dict[str, torch.Tensor] = {f.name: torch.zeros(f.r, f.r, dtype=torch.float64) for f in factors}
        self.tokens: dict[str, int] = {f.name: 0 for f in factors}
        self.latents: dict[str, list[torch.Tensor]] | None = {f.name: [] for f in factors} if keep_latents else None
        self.token_mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def _hook(self, f: AdapterFactors):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = module._adapter_input(args, kwargs) if hasattr(module, "_adapter_input") else args[0]
            if self.token_mask is not None and x.dim() == 3 and tuple(self.token_mask.shape) == tuple(x.shape[:2]):
                x = x[self.token_mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1])
            with torch.no_grad():
                latent = activation_fn(f.activation)(x.to(f.up.dtype) @ f.up.t()).to(torch.float64).cpu()
            self.gram[f.name] += latent.t() @ latent
            self.tokens[f.name] += latent.shape[0]
            if self.latents is not None:
                self.latents[f.name].append(latent)

        return hook

    def __enter__(self) -> ActivationRecorder:
        for f in self.factors:
            self._handles.append(f.module.register_forward_pre_hook(self._hook(f), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def singular_values(self, f: AdapterFactors) -> tuple[np.ndarray, np.ndarray]:
        """Singular values of the stacked latent ``L`` (tokens x r) and of the output ``s L W_down^T``."""
        lam, v = torch.linalg.eigh(self.gram[f.name])
        lam = lam.clamp_min(0)
        latent_sv = lam.sqrt().flip(0).numpy()
        # s L W_down^T has the same singular values as s Lambda^{1/2} V^T W_down^T (r x d).
        m = (lam.sqrt()[:, None] * v.t()) @ f.down.detach().to(torch.float64).cpu().t() * abs(f.scaling)
        return latent_sv, torch.linalg.svdvals(m).numpy()


def collect_activation_spectra(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    factors: list[AdapterFactors] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Run ``model`` over ``batches`` (dicts with ``input_ids`` and optionally ``attention_mask``) and return, per
    layer, the singular values of the latent and output activations over all non-padding tokens."""
    factors = adapter_factors(model) if factors is None else factors
    if not factors:
        raise ValueError("The model has no NoRA or LoRA adapter layers to analyse (is it a PeftModel?).")
    device = next(model.parameters()).device
    rec = ActivationRecorder(factors)
    with rec, eval_mode(model), torch.no_grad():
        for batch in batches:
            mask = batch.get("attention_mask")
            rec.token_mask = None if mask is None else mask.to(device)
            kwargs = {"input_ids": batch["input_ids"].to(device)}
            if mask is not None:
                kwargs["attention_mask"] = mask.to(device)
            model(**kwargs)
    out = {}
    for f in factors:
        latent, output = rec.singular_values(f)
        out[f.name] = {"latent": latent, "output": output, "tokens": rec.tokens[f.name]}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole analysis of one model
# ---------------------------------------------------------------------------------------------------------------
def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return np.mean([c[:n] for c in curves], axis=0).tolist() if n else []


def _aggregate(layers: list[dict[str, Any]], key: str) -> dict[str, Any]:
    stats = [lay[key] for lay in layers if key in lay]
    if not stats:
        return {}
    norm_sv = [(np.asarray(s["singular_values"]) / max(s["singular_values"][0], 1e-30)).tolist() for s in stats]
    return {
        "effective_rank_mean": float(np.mean([s["effective_rank"] for s in stats])),
        "effective_rank_std": float(np.std([s["effective_rank"] for s in stats])),
        "auc90_mean": float(np.mean([s["auc90"] for s in stats])),
        "energy_auc_mean": float(np.mean([s["energy_auc"] for s in stats])),
        "normalized_singular_values_mean": _mean_curve(norm_sv),
        "cumulative_energy_mean": _mean_curve([s["cumulative_energy"] for s in stats]),
    }


def analyze_model(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    adapter_name: str = "default",
) -> dict[str, Any]:
    """Per-layer and aggregated spectra of ``model``'s adapter ``adapter_name``.

    Returns ``{"layers": [{"name", "kind", "r", "activation", "update": stats, "latent": stats, "output": stats}],
    "aggregate": {"update": ..., "latent": ..., "output": ...}, "tokens": n}`` where each ``stats`` is
    :func:`spectrum_stats`. Activation entries are present only when ``batches`` is given.
    """
    factors = adapter_factors(model, adapter_name)
    if not factors:
        raise ValueError(
            f"No NoRA or LoRA layers holding adapter {adapter_name!r} were found; pass a PeftModel with that adapter."
        )
    acts = collect_activation_spectra(model, batches, factors) if batches is not None else {}
    layers = []
    for f in factors:
        entry: dict[str, Any] = {
            "name": _short(f.name),
            "kind": f.kind,
            "r": f.r,
            "activation": f.activation,
            "scaling": f.scaling,
            "update": spectrum_stats(lowrank_singular_values(f.down, f.up, f.scaling)),
        }
        if f.name in acts:
            entry["latent"] = spectrum_stats(acts[f.name]["latent"])
            entry["output"] = spectrum_stats(acts[f.name]["output"])
            entry["tokens"] = int(acts[f.name]["tokens"])
        layers.append(entry)
    result: dict[str, Any] = {
        "layers": layers,
        "aggregate": {k: _aggregate(layers, k) for k in ("update", "latent", "output")},
        "energy_threshold": ENERGY_THRESHOLD,
    }
    if acts:
        result["tokens"] = int(next(iter(acts.values()))["tokens"])
    return result


def summary(analysis: dict[str, Any]) -> dict[str, float]:
    """The flat numbers the study keeps per cell: mean ER and AUC-90 of update, latent and output."""
    out = {}
    for key in ("update", "latent", "output"):
        agg = analysis.get("aggregate", {}).get(key) or {}
        if agg:
            out[f"er_{key}"] = agg["effective_rank_mean"]
            out[f"auc90_{key}"] = agg["auc90_mean"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend)
# ---------------------------------------------------------------------------------------------------------------
def plot_spectra(curves: dict[str, list[float]], path: Path, *, title: str, ylabel: str, log: bool = True) -> Path:
    """One line per label (e.g. method) of a decreasing curve indexed by component 1..n; log y when ``log``."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for label, ys in curves.items():
        if len(ys):
            ax.plot(range(1, len(ys) + 1), ys, marker="o" if len(ys) <= 16 else None, ms=3, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("component index i")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_run(analysis: dict[str, Any], out_dir: Path, label: str = "adapter") -> list[Path]:
    """Figures of one run: mean normalised update spectrum (log y), cumulative energy, per-layer effective ranks."""
    agg = analysis["aggregate"]
    paths = [
        plot_spectra(
            {label: agg["update"]["normalized_singular_values_mean"]},
            out_dir / "spectrum_update.png",
            title="Singular values of Delta W (mean over layers)",
            ylabel="s_i / s_1",
        ),
        plot_spectra(
            {f"{label} {k}": agg[k]["cumulative_energy_mean"] for k in ("update", "latent", "output") if agg.get(k)},
            out_dir / "cumulative_energy.png",
            title=f"Cumulative spectral energy ({ENERGY_THRESHOLD:.0%} line = AUC-90)",
            ylabel="sum_{j<=i} s_j^2 / sum s^2",
            log=False,
        ),
    ]
    layers = analysis["layers"]
    if layers and "latent" in layers[0]:
        fig, ax = pyplot().subplots(figsize=(max(5.0, 0.25 * len(layers)), 3.5))
        x = np.arange(len(layers))
        ax.bar(x - 0.2, [lay["latent"]["effective_rank"] for lay in layers], 0.4, label="latent")
        ax.bar(x + 0.2, [lay["output"]["effective_rank"] for lay in layers], 0.4, label="output")
        ax.axhline(layers[0]["r"], color="k", ls="--", lw=0.8, label="r")
        ax.set_xlabel("adapted layer")
        ax.set_ylabel("effective rank")
        ax.set_title(f"Effective rank of adapter activations ({label})")
        ax.legend(fontsize=8)
        paths.append(save(fig, out_dir / "effective_rank.png"))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Run dirs and the CLI
# ---------------------------------------------------------------------------------------------------------------
def _batches(tokenizer, texts: list[str], *, max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _held_out_records(run_dir: Path, splits: Any, samples: int) -> list[dict[str, Any]]:
    """Up to ``samples`` validation records of the run (test when it has no validation split)."""
    for key in ("validation", "val", "test"):
        recs = splits.get(key) if isinstance(splits, dict) else None
        if recs:
            return list(recs)[:samples]
    raise ValueError(
        f"Run {run_dir} has no held-out records (validation/test) to collect activations on; "
        "pass --samples 0 to analyse weight spectra only."
    )


def analyze_run(
    run_dir: str | Path,
    *,
    samples: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Analyse a finished run dir (``adapter/`` + ``config.json`` + ``splits.json``): spectra of every adapted layer,
    activation effective ranks over ``samples`` held-out records (0: weight spectra only), ``analysis.json`` and
    PNG figures in the run dir. Returns the analysis dict."""
    from .eval import load_run

    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(
            f"{run_dir} has no adapter/ folder: analyse a finished run dir (from `nora train`), or an adapter dir "
            "with `nora analyze ADAPTER_DIR --model BASE`."
        )
    model, tokenizer, cfg, splits = load_run(run_dir)
    batches = None
    if samples > 0:
        recs = _held_out_records(run_dir, splits, samples)
        texts = [r["prompt"] + r["response"] for r in recs]
        ml = max_length or int(getattr(cfg, "max_length", None) or 256)
        batches = _batches(tokenizer, texts, max_length=ml, batch_size=batch_size)
    result = analyze_model(model, batches)
    result["run_dir"] = str(run_dir)
    result["samples"] = samples
    write_json_atomic(run_dir / "analysis.json", result)
    if figures:
        plot_run(result, run_dir / "figures", label=run_dir.name)
    return result


def analyze_adapter_dir(
    adapter_dir: str | Path, *, model: str | None = None, texts: list[str] | None = None, max_length: int = 256
) -> dict[str, Any]:
    """Analyse a bare peft adapter folder on base ``model`` (default: the embedded base); activations only when
    ``texts`` are given. Writes ``analysis.json`` next to the adapter files."""
    from peft import PeftModel

    from ..bases.named import load_model_and_tokenizer

    adapter_dir = Path(adapter_dir)
    base, tokenizer = load_model_and_tokenizer(model)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    batches = _batches(tokenizer, texts, max_length=max_length, batch_size=8) if texts else None
    result = analyze_model(peft_model, batches)
    result["adapter_dir"] = str(adapter_dir)
    write_json_atomic(adapter_dir / "analysis.json", result)
    plot_run(result, adapter_dir / "figures", label=adapter_dir.name)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A short table of the per-layer numbers, for the terminal."""
    lines = [f"{'layer':50s} {'r':>4s} {'ER(dW)':>7s} {'AUC90':>5s} {'ER(lat)':>7s} {'ER(out)':>7s}"]
    for lay in result["layers"]:
        lat = lay.get("latent", {}).get("effective_rank", math.nan)
        out = lay.get("output", {}).get("effective_rank", math.nan)
        lines.append(
            f"{lay['name'][-50:]:50s} {lay['r']:4d} {lay['update']['effective_rank']:7.2f} "
            f"{lay['update']['auc90']:5d} {lat:7.2f} {out:7.2f}"
        )
    s = summary(result)
    lines.append("mean: " + ", ".join(f"{k}={v:.2f}" for k, v in s.items()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a run dir (from `nora train`) or a peft adapter dir")
    parser.add_argument("--model", default=None, help="base model for a bare adapter dir (default: embedded base)")
    parser.add_argument("--samples", type=int, default=64, help="held-out samples for activation ranks (0: none)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")


def main(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise SystemExit(f"nora analyze: {path} does not exist; pass a run dir or an adapter dir.")
    if (path / "adapter").is_dir():
        result = analyze_run(
            path,
            samples=args.samples,
            batch_size=args.batch_size,
            max_length=args.max_length,
            figures=not args.no_figures,
        )
        where = path
    elif (path / "adapter_config.json").exists():
        texts = None
        if args.samples > 0:
            from .data import load_source

            recs = next(iter(load_source("reasoning", n=args.samples).values()))
            texts = [r["prompt"] + r["response"] for r in recs[: args.samples]]
        result = analyze_adapter_dir(path, model=args.model, texts=texts, max_length=args.max_length or 256)
        where = path
    else:
        raise SystemExit(
            f"nora analyze: {path} is neither a run dir (with adapter/) nor an adapter dir (with adapter_config.json)."
        )
    print(format_summary(result))
    print(f"wrote {where / 'analysis.json'} and figures in {where / 'figures'}")
    return 0
