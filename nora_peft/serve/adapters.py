"""Reading peft-format adapter folders (NoRA and LoRA) for serving: safetensors only, validated against the base.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (what ``save_pretrained`` writes).
Both methods become the same thing here: per targeted linear layer ``(W_up, W_down, scaling)`` plus one activation
(LoRA: ``lora_A``/``lora_B`` with LoRA's scaling and the identity activation).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from ..config import check_adapter_weights_file, compute_scaling
from .errors import AdapterError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|nora_up|nora_down)\.weight$")


def check_adapter_name(name: object, param: str = "lora_name") -> str:
    """Adapter names are names, not paths: letters, digits, ``.``, ``_``, ``-``; no ``/``, no ``..``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise AdapterError(
            f"{param} must be an adapter name (letters, digits, '.', '_', '-'; at most 128 characters; no '/', "
            f"no '..', not a path); got {name!r}. Load a folder with POST /v1/load_lora_adapter "
            '{"lora_name": NAME, "lora_path": PATH} and then use NAME.',
            param=param,
        )
    return name


@dataclass
class AdapterWeights:
    """One adapter in a method-neutral form: ``modules[name] = (W_up (r, k), W_down (d, r), scaling)``."""

    name: str
    path: str
    method: str  # "nora" or "lora"
    activation: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(up.shape[0] for up, _, _ in self.modules.values())


def read_adapter(path: str | os.PathLike, name: str) -> AdapterWeights:
    """Read a peft adapter folder (NoRA or LoRA) with safetensors; raise :class:`AdapterError` naming the problem."""
    folder = Path(path)
    cfg_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise AdapterError(
            f"{folder} is not a peft adapter folder: it needs adapter_config.json and adapter_model.safetensors "
            "(what `model.save_pretrained(...)` writes; `nora train` puts them in RUN_DIR/adapter).",
            param="lora_path",
        )
    try:
        cfg = json.loads(cfg_path.read_text())
        check_adapter_weights_file(str(folder))
        tensors = load_file(str(weights_path))
    except (ValueError, OSError) as e:
        raise AdapterError(f"Could not read adapter {name!r} from {folder}: {e}", param="lora_path") from e
    peft_type = cfg.get("peft_type")
    if peft_type == "NORA":
        method, activation = "nora", cfg.get("activation", "silu")
        if cfg.get("granularity", "weight") != "weight":
            raise AdapterError(
                f"Adapter {name!r} has granularity={cfg.get('granularity')!r}; nora serve serves per-weight "
                "adapters only. Serve block-level adapters with PeftModel (adapter_names=) instead.",
                param="lora_path",
            )
    elif peft_type == "LORA":
        method, activation = "lora", "identity"
        unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out") if cfg.get(k)]
        if unsupported:
            raise AdapterError(
                f"LoRA adapter {name!r} uses {unsupported}, which nora serve does not support; "
                "serve plain LoRA/rsLoRA adapters or merge this one into the base.",
                param="lora_path",
            )
    else:
        raise AdapterError(
            f"Adapter {name!r} has peft_type {peft_type!r}; nora serve serves 'NORA' and 'LORA' adapters.",
            param="lora_path",
        )
    if cfg.get("modules_to_save"):
        raise AdapterError(
            f"Adapter {name!r} also trains full modules {cfg['modules_to_save']} (modules_to_save); those cannot be "
            "mixed per row. Serve it with PeftModel instead.",
            param="lora_path",
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterError(
                f"Adapter {name!r} holds tensor {key!r}, which is neither a LoRA (lora_A/lora_B) nor a NoRA "
                "(nora_up/nora_down) weight; nora serve cannot apply it.",
                param="lora_path",
            )
        parts.setdefault(m["module"], {})[m["part"]] = value
    if not parts:
        raise AdapterError(f"Adapter {name!r} in {folder} holds no weights.", param="lora_path")
    adapter = AdapterWeights(name=name, path=str(folder), method=method, activation=activation)
    for module, p in parts.items():
        up, down = (p.get("nora_up"), p.get("nora_down")) if method == "nora" else (p.get("lora_A"), p.get("lora_B"))
        if up is None or down is None:
            raise AdapterError(f"Adapter {name!r} misses half of the weights of layer {module}.", param="lora_path")
        r = up.shape[0]
        alpha_key = get_pattern_key(cfg.get("alpha_pattern", {}).keys(), module)
        if method == "nora":
            alpha = cfg.get("alpha_pattern", {}).get(alpha_key, cfg.get("alpha", 8))
            scaling = compute_scaling(cfg.get("scaling", "alpha/r"), alpha, r)
        else:
            alpha = cfg.get("alpha_pattern", {}).get(alpha_key, cfg.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter.modules[module] = (up, down, float(scaling))
    return adapter


def check_fits(adapter: AdapterWeights, linear_shapes: dict[str, tuple[int, int]]) -> None:
    """Raise :class:`AdapterError` (400) naming each layer that is not a base linear layer of matching shape.

    ``linear_shapes`` is ``{module: (out_features, in_features)}`` of the base model's own linear layers.
    """
    problems = []
    for module, (up, down, _) in adapter.modules.items():
        if module not in linear_shapes:
            problems.append(f"{module}: the base model has no linear layer of that name")
            continue
        d, k = linear_shapes[module]
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != k or down.shape[0] != d or down.shape[1] != up.shape[0]:
            problems.append(
                f"{module}: adapter has up {tuple(up.shape)} / down {tuple(down.shape)}, the base layer needs "
                f"(r, {k}) / ({d}, r)"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AdapterError(
            f"Adapter {adapter.name!r} does not fit the served base model: {shown}. Load adapters trained on this "
            "base (see base_model_name_or_path in adapter_config.json).",
            param="lora_path",
        )


def scan_adapters_dir(folder: str | os.PathLike | None) -> dict[str, str]:
    """``{name: path}`` for each sub-folder of ``folder`` holding an ``adapter_config.json`` (also ``*/adapter``)."""
    found: dict[str, str] = {}
    if folder is None:
        return found
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--adapters-dir {root} is not a directory; create it or point at the right one.")
    for sub in sorted(root.iterdir()):
        for candidate in (sub, sub / "adapter"):  # a `nora train` run dir keeps its adapter in RUN_DIR/adapter
            if (candidate / "adapter_config.json").is_file() and NAME_RE.match(sub.name):
                found[sub.name] = str(candidate)
                break
    return found
