"""``NoraModel``: injects NoRA layers into a model (peft ``BaseTuner``)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, NoMatchingPeftModuleError
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from transformers.pytorch_utils import Conv1D

from .config import NoraConfig
from .layer import Linear, NoraLayer, ParallelBlock

#: Defaults NoRA adds for ``granularity="weight"`` where peft's LoRA map has no entry (peft's entry wins once it has
#: one): Phi-3 fuses q/k/v into one projection.
NORA_EXTRA_TARGETS: dict[str, list[str]] = {"phi3": ["qkv_proj"]}

#: Default blocks for ``granularity="module"``: each decoder layer's attention and MLP.
NORA_MODULE_TARGETS = {
    **{t: ["self_attn", "mlp"] for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "phi")},
    "gpt2": ["attn", "mlp"],
}


def default_target_modules(model_type: str | None, granularity: str = "weight") -> list[str] | str | None:
    """What NoRA adapts when ``target_modules`` is unset: for ``"weight"``, what peft's LoRA adapts.

    peft's map is read from ``LoraModel`` on every call, not copied, so architectures peft learns later (and tests
    that patch its map) reach NoRA too. A value may be a list of names or a regex string (e.g. gemma4's), exactly as
    peft stores it. ``None``: no default.
    """
    if granularity == "module":
        return NORA_MODULE_TARGETS.get(model_type)
    lora_targets = LoraModel.target_module_mapping.get(model_type)
    return lora_targets if lora_targets is not None else NORA_EXTRA_TARGETS.get(model_type)


def _adapter_names_pre_forward_hook(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class NoraModel(BaseTuner):
    """Creates a NoRA model from a base model (use it through ``peft.get_peft_model`` with a ``NoraConfig``).

    NoRA (Non-linear Rank Adaptation) adds ``s * W_down(Dropout(act(W_up x)))`` beside each targeted frozen
    layer; see ``nora_peft.tuner.layer`` for the math and ``nora_peft.tuner.ops`` for the autograd function.
    """

    prefix: str = "nora_"
    tuner_layer_cls = NoraLayer

    @property
    def target_module_mapping(self) -> dict[str, list[str] | str]:
        """peft's LoRA defaults as they are now, plus NoRA's extras where peft has none."""
        return {**NORA_EXTRA_TARGETS, **LoraModel.target_module_mapping}

    def _prepare_adapter_config(self, peft_config: NoraConfig, model_config: dict) -> NoraConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = default_target_modules(model_type, peft_config.granularity)
            if targets is None:
                # peft's own sentence first (its tests match on it), then what NoRA knows
                raise ValueError(
                    "Please specify `target_modules` in `peft_config`: NoRA has no default target modules for model "
                    f"type {model_type!r} (granularity={peft_config.granularity!r}); pass e.g. "
                    "`NoraConfig(target_modules=['q_proj', 'v_proj'])`."
                )
            peft_config.target_modules = targets if isinstance(targets, str) else set(targets)
        return peft_config

    def _create_and_replace(
        self,
        nora_config: NoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r_key = get_pattern_key(nora_config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(nora_config.alpha_pattern.keys(), current_key)
        kwargs = {
            "r": nora_config.rank_pattern.get(r_key, nora_config.r),
            "alpha": nora_config.alpha_pattern.get(alpha_key, nora_config.alpha),
            "scaling": nora_config.scaling,
            "dropout": nora_config.dropout,
            "activation": nora_config.activation,
            "init_weights": nora_config.init_weights,
            "inference_mode": nora_config.inference_mode,
        }
        if isinstance(target, NoraLayer):
            if isinstance(target, ParallelBlock) != (nora_config.granularity == "module"):
                raise ValueError(
                    f"Module {current_key} already holds a NoRA adapter of another granularity; adapters of one "
                    "module must share a granularity."
                )
            target.update_layer(adapter_name, **kwargs)
        else:
            new_module = self._create_new_module(nora_config, adapter_name, target, current_key, **kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        nora_config: NoraConfig, adapter_name: str, target: nn.Module, current_key: str = "", **kwargs
    ) -> NoraLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if nora_config.granularity == "module":
            return ParallelBlock(target, adapter_name, **kwargs)
        if isinstance(base, (nn.Linear, Conv1D)):
            return Linear(target, adapter_name, **kwargs)
        raise TypeError(
            f"Target module {current_key} ({type(base).__name__}) is not supported by NoRA with "
            "granularity='weight': only torch.nn.Linear and transformers Conv1D are. Target linear layers by name "
            "(e.g. 'q_proj'), or use granularity='module' to wrap a whole block."
        )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, ParallelBlock) and not isinstance(new_module, NoraLayer):
            # unloading a block adapter: put the block back as it was (peft's version assumes a weight to re-tie)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as e:
            raise NoMatchingPeftModuleError(f"{e} {_describe_targets(model)}") from None

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, NoraLayer):
                module._check_mergeable([n for n in module.active_adapters if n in module.nora_up])

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Route peft's ``adapter_names=`` (one adapter name per batch row, ``"__base__"`` for none)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        nora_layers = self._nora_layers()
        known = {name for layer in nora_layers for name in layer.nora_up.keys()}
        unknown = {n for n in adapter_names if n != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        handles = [
            m.register_forward_pre_hook(
                partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names), with_kwargs=True
            )
            for m in [*nora_layers, *self._modules_to_save_wrappers()]  # like LoRA: routed per row too
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _nora_layers(self) -> list[NoraLayer]:
        # peft records every module it replaced; looking those up is much cheaper than walking every module on
        # each forward (decode steps call this once per token).
        modules = map(self._submodule_or_none, dict.fromkeys(self.targeted_module_names))
        return [m for m in modules if isinstance(m, NoraLayer)]

    def _modules_to_save_wrappers(self) -> list[nn.Module]:
        # peft's modules_to_save copies route ``adapter_names`` per row themselves; only walk when any exist
        if not any(getattr(c, "modules_to_save", None) for c in self.peft_config.values()):
            return []
        return [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]

    def _submodule_or_none(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_state_dict_fits(model, adapter_name, remapped)
        return remapped


def _describe_targets(model: nn.Module) -> str:
    """Name the module suffixes a user could target, so a typo in target_modules is easy to fix."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
    blocks = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and any(True for _ in m.children())}
        & {"self_attn", "attn", "attention", "mlp", "feed_forward"}
    )
    text = f"Linear layers in this model: {linear}."
    if blocks:
        text += f" Blocks for granularity='module': {blocks}."
    return text


def _check_state_dict_fits(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the layer and both shapes when an adapter does not fit the base model."""

    def bare(key: str) -> str:  # peft adds or strips this prefix depending on how the model is wrapped
        return key.removeprefix("base_model.model.")

    suffixes = (f".nora_up.{adapter_name}.weight", f".nora_down.{adapter_name}.weight")
    expected = {bare(k): tuple(p.shape) for k, p in model.named_parameters() if k.endswith(suffixes)}
    loaded = {bare(k): tuple(v.shape) for k, v in state_dict.items() if ".nora_up." in k or ".nora_down." in k}
    from ..checkpoint import check_shapes  # checkpoint imports tuner.config: at the top this would be a cycle

    check_shapes(loaded, expected, f"NoRA adapter {adapter_name!r}")  # one comparison for the library and server
