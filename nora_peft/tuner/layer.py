"""NoRA layers: the adapter state held next to a frozen base module, and the forward pass of Eq. 2.

``Linear`` adapts one linear map (``nn.Linear``, transformers ``Conv1D``, fused projections).
``ParallelBlock`` (``granularity="module"``) adapts a whole block: it reads the block's input and adds the NoRA
branch to the block's (first) output. Both are ``NoraModule`` s (one forward: training through the autograd function,
inference through the kernel seam ``nora_peft.kernels``); they differ only in how the input is found, which output
tensor the branch adds to, and whether merging is possible (``Linear.get_delta_weight``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from ..kernels.mixed import StackedAdapters, stack_adapters
from ..kernels.reference import nora_delta
from ..kernels.select import ENV as KERNELS_ENV
from ..kernels.select import Backend, compute_dtype, select
from .config import compute_scaling


def _block_in_out_features(block: nn.Module) -> tuple[int, int]:
    """Width of a block's input and output: the first linear map's input and the last one's output."""
    linears = [m for m in block.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not linears:
        raise TypeError(
            f"granularity='module' needs a block containing linear layers to infer its width; {type(block).__name__} "
            "has none. Target attention/MLP blocks (e.g. 'self_attn', 'mlp')."
        )
    in_features = _get_in_out_features(linears[0])[0]
    out_features = _get_in_out_features(linears[-1])[1]
    return in_features, out_features


class NoraLayer(BaseTunerLayer):
    """State shared by NoRA layers: per adapter ``W_up`` (``nora_up``), ``W_down`` (``nora_down``) and settings."""

    adapter_layer_names: tuple[str, ...] = ("nora_up", "nora_down")
    other_param_names: tuple[str, ...] = ("r", "alpha", "scaling", "nora_dropout", "nora_activation")
    mergeable: bool = True

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.nora_dropout: dict[str, float] = {}
        self.nora_activation: dict[str, str] = {}
        self.nora_up = nn.ModuleDict()
        self.nora_down = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features = self._in_out_features(self.get_base_layer())

    @staticmethod
    def _in_out_features(base: nn.Module) -> tuple[int, int]:
        return _get_in_out_features(base)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        scaling: str | float,
        dropout: float,
        activation: str,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create (or replace) adapter ``adapter_name`` on this layer."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = compute_scaling(scaling, alpha, r)
        self.nora_dropout[adapter_name] = float(dropout)
        self.nora_activation[adapter_name] = activation
        self.nora_up[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.nora_down[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.reset_nora_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_nora_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """``W_up`` as LoRA's ``A`` (Kaiming-uniform, a=sqrt(5)); ``W_down`` zero unless ``init_weights`` is False."""
        if adapter_name not in self.nora_up:
            return
        nn.init.kaiming_uniform_(self.nora_up[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.nora_down[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.nora_down[adapter_name].weight, a=math.sqrt(5))

    # -- merging ----------------------------------------------------------------------------------------------
    def _check_mergeable(self, adapter_names: list[str]) -> None:
        for name in adapter_names:
            act = self.nora_activation[name]
            if not self.mergeable:
                raise ValueError(
                    f"NoRA adapter {name!r} has granularity='module': it runs beside a whole block, not a single "
                    "weight, so there is no weight to merge it into. Serve it unmerged (plain PeftModel forward or "
                    "`nora serve`)."
                )
            if act != "identity":
                raise ValueError(
                    f"NoRA adapter {name!r} uses activation {act!r}: W_down {act}(W_up x) is not a linear map of x, "
                    "so it cannot be folded into W0 exactly. Serve it unmerged (plain PeftModel forward, "
                    "`adapter_names=` mixed batches, or `nora serve`), or train with activation='identity' to merge."
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold identity-activation adapters into the base weight: ``W0 += s * W_down W_up``."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._check_mergeable([n for n in adapter_names if n in self.nora_up])
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.nora_up:
                continue
            merged = base.weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.nora_up:
                base.weight.data -= self.get_delta_weight(name)


class NoraModule(nn.Module, NoraLayer):
    """The forward pass both NoRA layers share: Eq. 2's branch added to the base module's output.

    Subclasses say how the input is found (:meth:`_adapter_input`) and which tensor of the output the branch adds
    to (:meth:`_output`). Two paths, picked per call:

    * **autograd** (training, or whenever a gradient must flow): ``reference.nora_delta`` per adapter, with dropout;
    * **inference** (no gradient needed): no autograd function; each active adapter's ``W_up`` and ``s * W_down^T``
      cached in the compute dtype and added into the base output in place through the backend
      ``kernels.select`` picks (``addmm_`` in torch, one fused launch in Triton). The cache is keyed on the active
      adapters, the weight tensors and their in-place version counters, the scalings, activations, dtype, device and
      ``$NORA_KERNELS``, so it is rebuilt when any of them changes.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        NoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def _adapter_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The tensor the adapter reads: the base layer's input."""
        return args[0]

    @staticmethod
    def _output(result: Any) -> torch.Tensor:
        """The tensor of the base module's output that the branch is added to."""
        return result

    @staticmethod
    def _with_output(result: Any, out: torch.Tensor) -> Any:
        """``result`` with its :meth:`_output` tensor replaced by ``out``."""
        return out

    def _add(self, result: Any, delta: torch.Tensor) -> Any:
        """``result`` with ``delta`` added (out of place) to its :meth:`_output` tensor."""
        out = self._output(result)
        return self._with_output(result, out + delta.to(out.dtype))

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if adapter_names is not None:
            if self.merged:  # peft's sentence (its tests match on it)
                raise ValueError(
                    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
                )
            return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(*args, **kwargs)
        if self.merged:
            return result
        x = self._adapter_input(args, kwargs)
        names = tuple(n for n in self.active_adapters if n in self.nora_up)
        out = self._output(result)
        if not names:
            return result
        if self._needs_autograd(names, x, out):
            for name in names:
                result = self._add(result, self._branch(name, x))
            return result
        if not self._can_write(out, x):
            out = out.clone()
            result = self._with_output(result, out)
        backend, weights = self._inference_weights(names, out)
        for up, down_t, act in weights:
            backend.add_(out, x, up, down_t, act)
        return result

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s branch through the training autograd function (dropout when training)."""
        up = self.nora_up[name].weight
        x = self._cast_input_dtype(x, up.dtype)
        return nora_delta(
            x,
            up,
            self.nora_down[name].weight,
            self.scaling[name],
            self.nora_activation[name],
            self.nora_dropout[name],
            self.training,
        )

    def _needs_autograd(self, names: tuple[str, ...], x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether this call needs the autograd function: dropout is active, or a gradient must flow."""
        if self.training and any(self.nora_dropout[n] > 0 for n in names):
            return True
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or out.requires_grad:
            return True
        ups, downs = self.nora_up._modules, self.nora_down._modules
        return any(ups[n].weight.requires_grad or downs[n].weight.requires_grad for n in names)

    def _can_write(self, out: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether the branch may be added into the base output itself: not when the output shares memory with the
        input, nor when a forward hook on the base layer may have kept a reference to it (it would see the sum), nor
        when it is part of an autograd graph."""
        hooked = self.base_layer._forward_hooks or torch.nn.modules.module._global_forward_hooks
        if out.data_ptr() == x.data_ptr() or hooked:
            return False
        return not (torch.is_grad_enabled() and out.requires_grad)

    def _weights_key(self, names: tuple[str, ...]) -> tuple:
        """What the cached inference weights depend on, cheap enough to check on every forward (decode calls this
        once per token and layer): per adapter the same weight objects and storages (replaced / moved / re-typed
        weights) at the same in-place version counters, the same scaling and activation; and the backend choice."""
        ups, downs = self.nora_up._modules, self.nora_down._modules
        key = [names, os.environ.get(KERNELS_ENV)]
        for n in names:
            up, down = ups[n]._parameters["weight"], downs[n]._parameters["weight"]
            key += (id(up), up.data_ptr(), up._version, id(down), down.data_ptr(), down._version)
            key += (self.scaling[n], self.nora_activation[n])
        return tuple(key)

    def _inference_weights(self, names: tuple[str, ...], out: torch.Tensor) -> tuple[Backend, list[tuple]]:
        """The backend and ``(W_up, s * W_down^T, activation)`` per adapter, in the compute dtype (cached)."""
        key = (self._weights_key(names), out.dtype, out.device)
        cached = self.__dict__.get("_nora_inference_cache")
        if cached is None or cached[0] != key:
            dtype = compute_dtype(out.device, out.dtype)
            weights = []
            for n in names:
                up, down = self.nora_up[n].weight.detach(), self.nora_down[n].weight.detach()
                scaled = down.t() * self.scaling[n]  # scaled in the adapter's dtype, rounded once
                weights.append(
                    (up.to(out.device, dtype), scaled.to(out.device, dtype).contiguous(), self.nora_activation[n])
                )
            cached = (key, (select(out.device, dtype), weights))
            self.__dict__["_nora_inference_cache"] = cached
        return cached[1]

    def _mixed_batch_forward(self, *args: Any, adapter_names: list[str], **kwargs: Any) -> Any:
        """Rows of one batch use different adapters (``"__base__"``: none); inference only.

        All of this layer's adapters run in one gathered pass (``kernels.mixed`` stacks, run by the backend
        ``kernels.select`` picks); the stacked weights are cached in the compute dtype and rebuilt when an adapter
        is added, deleted, moved or its weights change (the key of :meth:`_weights_key`).
        """
        result = self.base_layer(*args, **kwargs)
        x = self._adapter_input(args, kwargs)
        if len(adapter_names) != x.shape[0]:  # peft's sentence first, then which layer
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0]} respectively (NoRA layer around "
                f"{type(self.base_layer).__name__}: one adapter name per batch row, '__base__' for none)."
            )
        merged = self.merged_adapters
        names = tuple(n for n in self.nora_up._modules if n not in merged)
        if not names:
            return result
        out = self._output(result)
        backend, stacked = self._mixed_stack(names, out)
        index = stacked.index(adapter_names, device=x.device)
        if not self._can_write(out, x):
            out = out.clone()
            result = self._with_output(result, out)
        backend.mixed_add_(out, x, stacked, index)
        return result

    def _mixed_stack(self, names: tuple[str, ...], out: torch.Tensor) -> tuple[Backend, StackedAdapters]:
        """The backend and every adapter of this layer stacked in the compute dtype (cached)."""
        key = (self._weights_key(names), out.dtype, out.device)
        cached = self.__dict__.get("_nora_mixed_cache")
        if cached is None or cached[0] != key:
            dtype = compute_dtype(out.device, out.dtype)
            ups, downs = self.nora_up._modules, self.nora_down._modules
            stacked = stack_adapters(
                [(n, ups[n].weight, downs[n].weight, self.scaling[n], self.nora_activation[n]) for n in names],
                dtype=dtype,
            )
            cached = (key, (select(out.device, dtype), stacked))
            self.__dict__["_nora_mixed_cache"] = cached
        return cached[1]

    def __repr__(self) -> str:
        return "nora." + super().__repr__()


class Linear(NoraModule):
    """NoRA around one linear map: ``nn.Linear``, transformers ``Conv1D`` (GPT-2) or a fused projection."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * W_down @ W_up`` in the layout of the base weight; exact only for the identity activation."""
        up = self.nora_up[adapter_name].weight
        down = self.nora_down[adapter_name].weight
        base_w = self.get_base_layer().weight
        compute = torch.promote_types(base_w.dtype, torch.float32)  # never merge in less than fp32
        delta = (down.to(compute) @ up.to(compute)) * self.scaling[adapter_name]
        if isinstance(self.get_base_layer(), Conv1D):
            delta = delta.t()
        return delta.to(base_w.dtype)


class ParallelBlock(NoraModule):
    """``granularity="module"``: a parallel NoRA adapter around a whole block (attention or MLP).

    ``out = block(x, ...) + s * W_down D(act(W_up x))`` with ``x`` the block's hidden-states input; for blocks that
    return tuples (attention returns ``(output, weights)``) the branch is added to the first element. A block has no
    single weight to fold the branch into, so it cannot be merged (``merge`` says so).
    """

    mergeable = False

    @staticmethod
    def _in_out_features(base: nn.Module) -> tuple[int, int]:
        return _block_in_out_features(base)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # a block has no single `weight`: follow its first parameter, as peft does for a Linear's weight
        param = next(base_layer.parameters(), None)
        return (None, None) if param is None else (param.device, param.dtype)

    def _adapter_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if args:
            return args[0]
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"]
        for value in kwargs.values():
            if isinstance(value, torch.Tensor) and value.shape[-1] == self.in_features:
                return value
        raise ValueError(f"Could not find the hidden-states input of {type(self.base_layer).__name__}.")

    @staticmethod
    def _output(result: Any) -> torch.Tensor:
        return result[0] if isinstance(result, tuple) else result

    @staticmethod
    def _with_output(result: Any, out: torch.Tensor) -> Any:
        return (out, *result[1:]) if isinstance(result, tuple) else out
