"""``NoraConfig``: the dataclass that describes one NoRA adapter (saved as ``adapter_config.json``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, get_args

from peft.config import PeftConfig

from ..adapter_files import check_adapter_weights_file
from ..kernels.activations import ACTIVATIONS


class NoraPeftType(str):
    """The string peft type ``"NORA"``, with the ``.value`` that code written for peft's ``PeftType`` enum reads.

    peft's ``PeftType`` is a closed ``str`` enum, so NoRA registers under a string (see ``registry``). Code such as
    transformers' ``integrations/peft.py`` (``load_adapter``, ``from_pretrained`` of an adapter folder, ``pipeline``)
    and peft's ``PeftMixedModel`` read ``peft_config.peft_type.value`` as they would on an enum member. This subclass
    equals and hashes like the plain ``"NORA"`` (peft's tables find it), and json writes it as ``"NORA"``.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        """The plain string, as ``PeftType.LORA.value`` is ``"LORA"``."""
        return str.__str__(self)


#: peft type under which NoRA is registered and saved (``"peft_type": "NORA"`` in adapter_config.json).
NORA_PEFT_TYPE = NoraPeftType("NORA")
Activation = Literal["silu", "identity", "relu", "gelu", "tanh"]
Granularity = Literal["weight", "module"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
SCALINGS = ("alpha/r", "rslora")


def compute_scaling(scaling: str | float, alpha: float, r: int) -> float:
    """The scalar ``s`` of Eq. 2: ``alpha/r`` (LoRA's rule), ``alpha/sqrt(r)`` (rsLoRA's rule) or a fixed number."""
    if scaling == "alpha/r":
        return alpha / r
    if scaling == "rslora":
        return alpha / math.sqrt(r)
    return float(scaling)


@dataclass
class NoraConfig(PeftConfig):
    """Configuration of a NoRA adapter: ``h = W0 x + s * W_down(Dropout(act(W_up x)))``.

    Args:
        r (`int`): Rank: the width of the latent ``W_up x``. ``W_up`` is ``(r, in_features)``, ``W_down`` is
            ``(out_features, r)``.
        alpha (`float`): Numerator of the scaling ``s``.
        scaling (`str` or `float`): How ``s`` is computed: ``"alpha/r"`` (default, LoRA's rule), ``"rslora"``
            (``alpha/sqrt(r)``) or a fixed float used as ``s`` directly.
        dropout (`float`): Dropout probability on the r-dim latent after the activation, training only; in [0, 1).
        activation (`Literal["silu", "identity", "relu", "gelu", "tanh"]`):
            The non-linearity between the projections: ``"silu"`` (default), ``"identity"`` (a LoRA-shaped adapter
            with latent dropout; the only mergeable choice), ``"relu"``, ``"gelu"`` (exact erf form) or ``"tanh"``.
        granularity (`Literal["weight", "module"]`):
            ``"weight"`` (default): one adapter per targeted linear layer (``nn.Linear``, transformers ``Conv1D``,
            fused projections such as Phi-3's ``qkv_proj``). ``"module"``: the paper's ablation (a), one parallel
            adapter around a whole block (an attention or MLP module), reading the block's input and adding to its
            output.
        target_modules (`list[str]` or `str`): Names (suffix match) or a regex of the modules to adapt, or
            ``"all-linear"``. Default: per architecture, peft's LoRA default read from peft at run time (q/v
            projections; a regex where peft has one); for ``granularity="module"`` the attention and MLP blocks.
        exclude_modules (`list[str]` or `str`): Names or a regex of modules never to adapt.
        layers_to_transform (`list[int]` or `int`): Only adapt these layer indices.
        layers_pattern (`list[str]` or `str`): Name of the ``nn.ModuleList`` holding the layers (e.g. ``"layers"``).
        rank_pattern (`dict`): Per-module rank overrides, ``{regex or name: r}``.
        alpha_pattern (`dict`): Per-module alpha overrides, ``{regex or name: alpha}``.
        modules_to_save (`list[str]`): Other modules to train fully and save with the adapter.
        init_weights (`bool`): ``True`` (default): ``W_down = 0`` so training starts at the base model, ``W_up`` as
            LoRA's ``A`` (Kaiming-uniform). ``False``: both random (non-zero update from the start; for tests).
    """

    r: int = field(default=8, metadata={"help": "NoRA rank (latent width)."})
    alpha: float = field(default=8, metadata={"help": "Scaling numerator."})
    scaling: str | float = field(
        default="alpha/r", metadata={"help": "'alpha/r' (default), 'rslora' (alpha/sqrt(r)) or a fixed float."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the r-dim latent (training only)."})
    activation: Activation = field(default="silu", metadata={"help": f"One of {ACTIVATIONS}."})
    granularity: Granularity = field(
        default="weight", metadata={"help": "'weight' (per linear layer) or 'module' (block)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to adapt; default per architecture."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to exclude."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer ModuleList, used with layers_to_transform."}
    )
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module rank overrides."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha overrides."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save in full."}
    )
    init_weights: bool = field(default=True, metadata={"help": "W_down = 0 at start (True) or random (False)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = NORA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix if any value is out of range."""
        for name, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ValueError(f"NoraConfig.{name} must be a positive integer (the latent width); got {r!r}.")
        for name, a in [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                raise ValueError(f"NoraConfig.{name} must be a finite number; got {a!r}.")
        if isinstance(self.scaling, str):
            if self.scaling not in SCALINGS:
                raise ValueError(f"NoraConfig.scaling must be one of {SCALINGS} or a number; got {self.scaling!r}.")
        elif (
            isinstance(self.scaling, bool)
            or not isinstance(self.scaling, (int, float))
            or not math.isfinite(self.scaling)
        ):
            raise ValueError(f"NoraConfig.scaling must be one of {SCALINGS} or a finite number; got {self.scaling!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"NoraConfig.dropout must be in [0, 1) (a probability); got {self.dropout!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"NoraConfig.activation must be one of {ACTIVATIONS}; got {self.activation!r}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"NoraConfig.granularity must be one of {GRANULARITIES}; got {self.granularity!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config, and check a local adapter's weights file before peft reads it.

        peft's loader reads the config first; checking the safetensors header here turns a truncated or corrupt
        weights file into a clear error instead of a deserialisation failure deep inside the load.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            check_adapter_weights_file(folder)
        return config
