"""The one place where adapter methods differ: an ``AdapterSpec`` becomes a peft config.

``nora`` -> ``NoraConfig``; ``lora`` / ``rslora`` / ``dora`` -> peft's own ``LoraConfig`` (``use_rslora`` /
``use_dora``), never a copy. Training, evaluation, the study and the benchmarks all build adapters through here, so
every method sees the same ranks, alphas, dropout and target modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from .tuner.config import Activation, Granularity, NoraConfig, compute_scaling

METHODS = ("nora", "lora", "rslora", "dora")


@dataclass
class AdapterSpec:
    """What adapter to train: method, size, and (for NoRA) the ablation knobs.

    ``dropout`` is each method's own dropout: on the r-dim latent for NoRA, on the input for LoRA (peft's design).
    ``alpha`` defaults to ``2 * r`` (the paper's r=64, alpha=128).
    """

    method: str = "nora"
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.05
    activation: Activation = "silu"
    granularity: Granularity = "weight"
    scaling: str | float = "alpha/r"
    target_modules: list[str] | str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown adapter method {self.method!r}; choose one of {METHODS}.")
        if self.method != "nora" and (self.activation != "silu" or self.granularity != "weight"):
            raise ValueError(
                f"activation/granularity are NoRA options; method {self.method!r} is peft's LoRA and has neither."
            )
        if self.method != "nora" and self.scaling != "alpha/r":
            raise ValueError("scaling is a NoRA option; for LoRA's alpha/sqrt(r) use method='rslora'.")

    @property
    def resolved_alpha(self) -> float:
        return float(2 * self.r if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """The branch's scale ``s``: ``alpha/r``, ``alpha/sqrt(r)`` for rsLoRA (and NoRA's ``"rslora"``), or NoRA's
        fixed float."""
        scaling = "rslora" if self.method == "rslora" else self.scaling
        return compute_scaling(scaling, self.resolved_alpha, self.r)

    def label(self) -> str:
        """Short human name, e.g. ``nora-r64``, ``nora-r64-relu``, ``rslora-r16``."""
        parts = [self.method, f"r{self.r}"]
        if self.method == "nora":
            if self.activation != "silu":
                parts.append(self.activation)
            if self.granularity != "weight":
                parts.append(self.granularity)
            if self.scaling != "alpha/r":
                parts.append(f"s-{self.scaling}".replace("/", ""))
        return "-".join(parts)

    def to_peft_config(self, task_type: str | None = "CAUSAL_LM") -> PeftConfig:
        """The peft config for this spec (NoraConfig or peft's LoraConfig)."""
        targets = (
            list(self.target_modules) if isinstance(self.target_modules, (list, tuple, set)) else (self.target_modules)
        )
        common: dict[str, Any] = {"r": self.r, "target_modules": targets, "task_type": task_type, **self.extra}
        if self.method == "nora":
            return NoraConfig(
                alpha=self.resolved_alpha,
                dropout=self.dropout,
                activation=self.activation,
                granularity=self.granularity,
                scaling=self.scaling,
                **common,
            )
        return LoraConfig(
            lora_alpha=self.resolved_alpha,
            lora_dropout=self.dropout,
            use_rslora=self.method == "rslora",
            use_dora=self.method == "dora",
            **common,
        )


def build_peft_model(model: nn.Module, spec: AdapterSpec, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with the adapter ``spec`` describes (base weights frozen)."""
    return get_peft_model(model, spec.to_peft_config(), adapter_name=adapter_name)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (the paper's "params" column)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}
