"""Reading and validating peft adapter folders (NoRA and LoRA): safetensors only, no layers imported.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (what ``save_pretrained`` writes).
:func:`read_checkpoint` turns one into a method-neutral :class:`AdapterCheckpoint` -- per targeted linear layer
``(W_up (r, k), W_down (d, r), scaling)`` and one activation (LoRA: ``lora_A``/``lora_B``, the identity) -- after
checking, in this order:

1. the folder has both files (a pickle-only folder is named as such: pickle is never loaded), each a regular file
   opened without blocking (a FIFO or device is refused, not waited on) and, with ``within``, resolving inside that
   folder (a link that leaves it is refused before it is read);
2. the config is a JSON object (at most :data:`MAX_CONFIG_BYTES`; nesting too deep to parse is a clean error)
   that passes ``NoraConfig``'s or peft ``LoraConfig``'s validation, with positive
   integer ranks and finite alphas, and uses nothing a per-row mixed pass cannot apply;
3. the weights file is a complete safetensors file whose keys are LoRA or NoRA weights, each a 2-D floating tensor
   with finite values (also after the cast to the compute ``dtype``), of the shape the config's rank and the
   expected layer give;
4. each layer's rank is at most ``max_rank`` and its scaling is finite and at most :data:`MAX_ABS_SCALING`.

:func:`check_shapes` is the one place that compares what an adapter holds with what a model expects (also used by
``NoraModel`` when peft loads a state dict, and by the lab before ``PeftModel.from_pretrained``).
Messages name the adapter by ``label`` (the caller decides whether that is a path or a name) and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from .adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_adapter_weights_file,
    descriptor_path,
    open_adapter_file,
)
from .tuner.config import NORA_PEFT_TYPE, NoraConfig, compute_scaling

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|nora_up|nora_down)\.weight$")
#: LoRA options a per-row mixed pass (``kernels.mixed``) cannot apply.
LORA_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
)


#: The largest ``adapter_config.json`` read (bytes); ``save_pretrained`` writes a few KiB.
MAX_CONFIG_BYTES = 1 << 20
#: safetensors dtype names of the floating types an adapter may store.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
#: The largest |scaling| accepted: LoRA/rsLoRA/NoRA scalings (alpha/r, alpha/sqrt(r)) of trained adapters are O(1..100).
MAX_ABS_SCALING = 1e4


@dataclass
class AdapterCheckpoint:
    """One adapter in a method-neutral form: ``modules[name] = (W_up (r, k), W_down (d, r), scaling)``."""

    name: str
    method: str  # "nora" or "lora"
    activation: str
    config: Any  # NoraConfig or peft LoraConfig
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        """The largest rank over the adapter's layers."""
        return max(up.shape[0] for up, _, _ in self.modules.values())


def check_shapes(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    label: str,
    *,
    require_all: bool = True,
    model: str = "this base model",
) -> None:
    """Raise :class:`CheckpointError` naming every key whose shape differs, is unexpected or (``require_all``) missing.

    Both maps go from a weight's name to its shape; the message lists the first ten problems and says where the
    adapter belongs (the base model it was trained on).
    """
    problems = []
    for key, shape in found.items():
        if key not in expected:
            problems.append(f"{key}: in the adapter but the model has no such layer")
        elif tuple(shape) != tuple(expected[key]):
            problems.append(f"{key}: adapter has shape {tuple(shape)}, the model needs {tuple(expected[key])}")
    if require_all:
        missing = sorted(set(expected) - set(found))
        problems += [f"{k}: expected by the config but missing from the adapter file" for k in missing]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointError(
            f"Adapter {label} does not fit {model}:\n  {shown}\n"
            "Load it onto the base model it was trained on (see base_model_name_or_path in adapter_config.json)."
        )


def read_config(
    folder: str | os.PathLike, label: str | None = None, *, within: str | os.PathLike | None = None
) -> NoraConfig | LoraConfig:
    """The validated ``NoraConfig`` or ``LoraConfig`` of an adapter folder (weights file checked to be complete).

    Both files must be regular files (a FIFO or device is refused, never opened for a blocking read); with
    ``within``, both must also resolve inside that folder (a link that leaves it is refused before it is read).
    """
    folder = Path(folder)
    label = label or str(folder)
    cfg_path = folder / CONFIG_NAME
    if not os.path.lexists(cfg_path):
        raise CheckpointError(
            f"Adapter {label} is not a peft adapter folder: it has no {CONFIG_NAME} (what `model.save_pretrained(...)` "
            "writes; `nora train` puts it in RUN_DIR/adapter)."
        )
    data = _read_small_file(folder, CONFIG_NAME, label, within, MAX_CONFIG_BYTES)
    try:  # regular, inside ``within``, a complete header; names a pickle-only folder, never loads pickle
        check_adapter_weights_file(str(folder), within)
    except ValueError as e:
        raise CheckpointError(str(e).replace(str(folder), label)) from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(f"Adapter {label}: {CONFIG_NAME} is not readable JSON ({e}).") from None
    except RecursionError:
        raise CheckpointError(
            f"Adapter {label}: {CONFIG_NAME} is nested too deeply to read; a peft config is a flat JSON object."
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"Adapter {label}: {CONFIG_NAME} must be a JSON object; got a {type(raw).__name__}.")
    return _build_config(raw, label)


def _read_small_file(folder: Path, name: str, label: str, within: str | os.PathLike | None, limit: int) -> bytes:
    """The bytes of ``folder/name`` (a regular file, see :func:`open_adapter_file`), refused over ``limit`` bytes."""
    with os.fdopen(open_adapter_file(folder, name, label, within), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"Adapter {label}: {name} is over {limit // 1024} KiB; a peft config is a few KiB.")
    return data


def _build_config(raw: dict, label: str) -> NoraConfig | LoraConfig:
    peft_type = raw.get("peft_type")
    if peft_type == NORA_PEFT_TYPE:
        cls = NoraConfig
    elif peft_type == "LORA":
        cls = LoraConfig
    else:
        raise CheckpointError(
            f"Adapter {label} has peft_type {_short(repr(peft_type))}; only 'NORA' and 'LORA' adapters are read."
        )
    names = {f.name for f in dataclasses.fields(cls)} - {"peft_type"}
    try:
        config = cls(**{k: v for k, v in raw.items() if k in names})
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointError(
            f"Adapter {label}: {CONFIG_NAME} is not a valid {cls.__name__}: {_short(str(e))}"
        ) from None
    if cls is LoraConfig:
        _validate_lora(config, label)
    return config


def _short(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: a message quotes a field, never a whole file."""
    return text if len(text) <= limit else text[:limit] + "..."


def _check_mixable(config: NoraConfig | LoraConfig, label: str) -> None:
    """What a per-row mixed pass (``kernels.mixed``) cannot apply: refused for serving, fine for ``PeftModel``."""
    if config.modules_to_save:
        raise CheckpointError(
            f"Adapter {label} also trains full modules {config.modules_to_save} (modules_to_save); those cannot be "
            "mixed per row. Use it with PeftModel instead."
        )
    if isinstance(config, NoraConfig) and config.granularity != "weight":
        raise CheckpointError(
            f"Adapter {label} has granularity={config.granularity!r}; only per-weight adapters are read here. "
            "Use block-level adapters with PeftModel (adapter_names=) instead."
        )
    unsupported = [k for k in LORA_UNSUPPORTED if isinstance(config, LoraConfig) and getattr(config, k, None)]
    if unsupported:
        raise CheckpointError(
            f"LoRA adapter {label} uses {unsupported}, which a per-row mixed pass cannot apply; use plain "
            "LoRA/rsLoRA adapters, or merge this one into the base."
        )


def _validate_lora(config: LoraConfig, label: str) -> None:
    """What ``NoraConfig.validate`` checks for NoRA, for the LoRA fields a reader uses (peft checks these late)."""
    ranks = [("r", config.r), *((f"rank_pattern[{k!r}]", v) for k, v in (config.rank_pattern or {}).items())]
    for name, r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise CheckpointError(f"Adapter {label}: LoraConfig.{name} must be a positive integer; got {r!r}.")
    alphas = [
        ("lora_alpha", config.lora_alpha),
        *((f"alpha_pattern[{k!r}]", v) for k, v in (config.alpha_pattern or {}).items()),
    ]
    for name, a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise CheckpointError(f"Adapter {label}: LoraConfig.{name} must be a finite number; got {a!r}.")


def layer_rank_and_scaling(config: NoraConfig | LoraConfig, module: str) -> tuple[int, float]:
    """The rank and scaling ``s`` the config gives layer ``module`` (its rank/alpha patterns, then its defaults).

    The scaling rule is the config's own: NoRA's ``scaling`` field, LoRA's ``use_rslora`` (``alpha/sqrt(r)``) or
    ``alpha/r`` -- both through :func:`nora_peft.tuner.config.compute_scaling`.
    """
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
    if isinstance(config, NoraConfig):
        alpha, rule = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.alpha), config.scaling
    else:
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
        rule = "rslora" if config.use_rslora else "alpha/r"
    return r, compute_scaling(rule, alpha, r)


def read_checkpoint(
    folder: str | os.PathLike,
    *,
    name: str | None = None,
    expected: dict[str, tuple[int, int]] | None = None,
    max_rank: int | None = None,
    label: str | None = None,
    within: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> AdapterCheckpoint:
    """Read and validate an adapter folder; raise :class:`CheckpointError` naming the problem.

    Names, dtypes, shapes and ranks are checked on the safetensors header before any tensor is loaded, so a
    hostile file (a huge rank, integer weights) costs no memory.

    Args:
        folder: the adapter folder.
        name: the adapter's name in the result (default: the folder's name).
        expected: ``{module: (out_features, in_features)}`` of the linear layers the adapter may target; every
            layer it holds must be one of them, with ``W_up (r, k)`` and ``W_down (d, r)``.
            ``None``: only the adapter's own consistency is checked.
        max_rank: the largest rank accepted on any layer (``None``: ``min(d, k)`` of each layer when ``expected``
            is given, else no limit).
        label: how messages name the adapter (default: the folder path).
        within: a folder every file must resolve inside (links that leave it are refused); ``None``: anywhere.
        dtype: the dtype the weights will be computed in: their values must be finite after the cast to it
            (1e300 is finite in float64 but infinite in float32).
    """
    folder = Path(folder)
    label = label or str(folder)
    config = read_config(folder, label, within=within)
    _check_mixable(config, label)
    nora = isinstance(config, NoraConfig)
    checkpoint = AdapterCheckpoint(
        name=name or folder.name,
        method="nora" if nora else "lora",
        activation=config.activation if nora else "identity",
        config=config,
    )
    fd = open_adapter_file(folder, WEIGHTS_NAME, label, within)
    try:  # safetensors opens by name: the descriptor's own path keeps it on the file just checked
        with safe_open(descriptor_path(fd) or str(folder / WEIGHTS_NAME), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            layers = _plan_layers(config, header, expected, max_rank, label)
            for module, (up_key, down_key, scaling) in layers.items():
                up, down = f.get_tensor(up_key), f.get_tensor(down_key)
                _check_finite(up, up_key, label, dtype)
                _check_finite(down, down_key, label, dtype, scaling)  # the server folds the scaling into W_down
                checkpoint.modules[module] = (up, down, scaling)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for a malformed file (also RecursionError)
        raise CheckpointError(f"Adapter {label}: {WEIGHTS_NAME} could not be read ({type(e).__name__}).") from None
    finally:
        os.close(fd)
    return checkpoint


def _check_finite(t: torch.Tensor, key: str, label: str, dtype: torch.dtype | None, scale: float = 1.0) -> None:
    """Refuse NaN / inf values, and values that (times ``scale``) become infinite in the compute ``dtype``."""
    largest = float(t.abs().amax()) if t.numel() else 0.0  # one pass; amax carries NaN through
    if not math.isfinite(largest):
        raise CheckpointError(f"Adapter {label} has NaN or infinite values in {key}; retrain or re-save it.")
    if dtype is None:
        return
    largest *= abs(scale)  # a Python float: float64, where 1e300 stays finite
    if largest > torch.finfo(dtype).max:
        times = "" if scale == 1.0 else f" times the scaling {scale:.3g}"
        raise CheckpointError(
            f"Adapter {label} has values in {key} too large for {str(dtype).removeprefix('torch.')}, the dtype this "
            f"model computes in (largest |value|{times}: {largest:.3g}, at most {torch.finfo(dtype).max:.3g}); "
            "retrain or re-save it."
        )


def _plan_layers(
    config: NoraConfig | LoraConfig,
    header: dict[str, tuple[str, tuple[int, ...]]],
    expected: dict[str, tuple[int, int]] | None,
    max_rank: int | None,
    label: str,
) -> dict[str, tuple[str, str, float]]:
    """``{module: (up key, down key, scaling)}`` after checking every key's name, dtype, shape and rank."""
    up_part, down_part = ("nora_up", "nora_down") if isinstance(config, NoraConfig) else ("lora_A", "lora_B")
    keys: dict[str, dict[str, str]] = {}
    for key, (dtype, shape) in header.items():
        m = _KEY_RE.match(key)
        if m is None or m["part"] not in (up_part, down_part):
            raise CheckpointError(
                f"Adapter {label} holds tensor {key!r}, which is not a {up_part}/{down_part} weight of a linear layer "
                f"(its config says peft_type {config.peft_type!s})."
            )
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"Adapter {label} stores {key} as {dtype}; adapter weights must be floating point ({FLOAT_DTYPES})."
            )
        if len(shape) != 2 or min(shape) == 0:
            raise CheckpointError(f"Adapter {label} stores {key} with shape {shape}; a weight is 2-D with r >= 1.")
        keys.setdefault(m["module"], {})[m["part"]] = key
    if not keys:
        raise CheckpointError(f"Adapter {label} holds no weights.")
    found: dict[str, tuple[int, ...]] = {}
    wanted: dict[str, tuple[int, ...]] = {}
    layers = {}
    for module, p in keys.items():
        if up_part not in p or down_part not in p:
            raise CheckpointError(
                f"Adapter {label} has only half of layer {module} (it needs {up_part} and {down_part})."
            )
        r, scaling = layer_rank_and_scaling(config, module)
        up_shape, down_shape = header[p[up_part]][1], header[p[down_part]][1]
        d, k = expected[module] if expected is not None and module in expected else (down_shape[0], up_shape[1])
        found[p[up_part]], found[p[down_part]] = up_shape, down_shape
        if expected is None or module in expected:
            wanted[p[up_part]], wanted[p[down_part]] = (r, k), (d, r)
        limit = max_rank if max_rank is not None else min(d, k) if expected is not None else None
        if limit is not None and r > limit:
            why = f"max rank {max_rank}" if max_rank is not None else f"min(out, in) of that layer, {min(d, k)}"
            raise CheckpointError(
                f"Adapter {label} has rank {r} on {module}, over the limit ({why}); retrain it at a lower rank."
            )
        if not math.isfinite(scaling) or abs(scaling) > MAX_ABS_SCALING:
            raise CheckpointError(
                f"Adapter {label} has scaling {scaling:.3g} on {module}; a trained adapter's alpha/r or alpha/sqrt(r) "
                f"is far below {MAX_ABS_SCALING:.0e} (larger ones overflow in half precision). Fix alpha/scaling."
            )
        layers[module] = (p[up_part], p[down_part], float(scaling))
    check_shapes(found, wanted, label, require_all=False)
    return layers


def check_fits_model(
    folder: str | os.PathLike, model: torch.nn.Module, label: str | None = None, model_label: str = "this base model"
) -> None:
    """Raise :class:`CheckpointError` naming every layer whose adapter weights do not fit ``model`` (before peft
    loads them; header only, nothing loaded).

    The expected shapes come from the config's rank per layer and the model's layer: ``(r, in)`` for
    ``lora_A``/``nora_up``, ``(out, r)`` for ``lora_B``/``nora_down``, for ``nn.Linear`` and transformers
    ``Conv1D``. Weights of other kinds (DoRA magnitudes, block-level NoRA) are left to peft.
    """
    from transformers.pytorch_utils import Conv1D

    folder = Path(folder)
    label = label or str(folder)
    config = read_config(folder, label)
    layers = dict(model.named_modules())
    found: dict[str, tuple[int, ...]] = {}
    wanted: dict[str, tuple[int, ...]] = {}
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            m = _KEY_RE.match(key)
            if m is None:
                continue
            module, part = m["module"], m["part"]
            layer = layers.get(module)
            if layer is not None and not isinstance(layer, (torch.nn.Linear, Conv1D)):
                continue  # a block (granularity="module"): peft checks it
            found[key] = tuple(f.get_slice(key).get_shape())
            if layer is None:
                continue  # named in the message as a layer the model does not have
            if isinstance(layer, torch.nn.Linear):
                d, k = layer.out_features, layer.in_features
            else:  # Conv1D stores its weight as (in, out)
                k, d = layer.weight.shape
            r = layer_rank_and_scaling(config, module)[0]
            wanted[key] = (r, k) if part in ("lora_A", "nora_up") else (d, r)
    check_shapes(found, wanted, label, require_all=False, model=model_label)
