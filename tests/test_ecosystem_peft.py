"""NoRA behaves as peft's own methods do where peft defines the behaviour (issue 9, findings 1-3 and the module test).

Each test puts NoRA where peft's test suite puts LoRA: the same toy models, the same calls, and peft's own sentences
for the errors peft defines.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel

from nora_peft import NoraConfig, NoraModel
from nora_peft.tuner.layer import NoraLayer, ParallelBlock
from nora_peft.tuner.model import default_target_modules

from .tiny_models import MLP, input_ids, tiny_causal_lm

X = torch.arange(90, dtype=torch.float32).view(9, 10) / 90


def _two_adapters_with_modules_to_save(config_cls, **kw):
    model = get_peft_model(MLP(), config_cls(target_modules=["lin0"], modules_to_save=["lin1"], **kw), "a0")
    model.add_adapter("a1", config_cls(target_modules=["lin0"], modules_to_save=["lin1"], **kw))
    with torch.no_grad():
        model.base_model.model.lin1.modules_to_save["a0"].weight += 1
        model.base_model.model.lin1.modules_to_save["a1"].weight -= 1
    return model.eval()


@pytest.mark.parametrize(
    ("config_cls", "kw"),
    [(NoraConfig, {"init_weights": False}), (LoraConfig, {"init_lora_weights": False})],
    ids=["nora", "lora"],
)
def test_mixed_batch_routes_modules_to_save_per_row(config_cls, kw):
    """Finding 1: each row uses its own adapter's copy of a modules_to_save layer, as LoRA does."""
    model = _two_adapters_with_modules_to_save(config_cls, **kw)
    with torch.no_grad():
        model.set_adapter("a0")
        out0 = model(X)
        model.set_adapter("a1")  # the active adapter differs from the rows' adapter: routing must not use it
        out1 = model(X)
        with model.disable_adapter():
            base = model(X)
        torch.testing.assert_close(model(X, adapter_names=["a0"] * len(X)), out0)
        names = ["a0", "a1", "__base__"] * 3
        mixed = model(X, adapter_names=names)
    expected = torch.stack([{"a0": out0, "a1": out1, "__base__": base}[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, expected)
    assert not torch.allclose(out0, out1)  # the copies really differ


# --- finding 2: default target modules come from peft at run time ----------------------------------------------------
def _adapted(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, NoraLayer)}


def _lora_adapted(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize(
    "peft_value",
    [r".*\.(q_proj|v_proj)", r".*layers\.1\..*\.(k_proj|o_proj)", ["k_proj", "down_proj"]],
    ids=["regex", "regex-one-layer", "list"],
)
def test_default_targets_follow_peft_map_including_regex(monkeypatch, peft_value):
    """A string in peft's map is a regex (gemma4's is), not a set of characters; a patched map reaches NoRA."""
    monkeypatch.setitem(LoraModel.target_module_mapping, "llama", peft_value)
    lora = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2))
    nora = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2))
    assert _adapted(nora) == _lora_adapted(lora) and _adapted(nora)
    if isinstance(peft_value, str):
        assert nora.peft_config["default"].target_modules == peft_value


def test_default_targets_for_an_architecture_peft_learns_later(monkeypatch):
    assert default_target_modules("brand_new_arch") is None
    monkeypatch.setitem(LoraModel.target_module_mapping, "brand_new_arch", ["q_proj"])
    assert default_target_modules("brand_new_arch") == ["q_proj"]


def test_peft_entry_wins_over_noras_extras(monkeypatch):
    assert default_target_modules("phi3") == ["qkv_proj"]  # peft has no phi3 entry (yet): NoRA's fused default
    monkeypatch.setitem(LoraModel.target_module_mapping, "phi3", ["o_proj"])
    assert default_target_modules("phi3") == ["o_proj"]


def test_gemma4_regex_default_matches_lora():
    """The real case of the finding: gemma4's default is a regex over the language model's q/v projections."""
    value = LoraModel.target_module_mapping.get("gemma4")
    if not isinstance(value, str):
        pytest.skip(f"peft's gemma4 default is no longer a regex string: {value!r}")
    assert default_target_modules("gemma4") == value
    tuner = NoraModel.__new__(NoraModel)  # _prepare_adapter_config reads only the config
    assert tuner._prepare_adapter_config(NoraConfig(r=2), {"model_type": "gemma4"}).target_modules == value


# --- finding 3: peft's own error sentences come first -----------------------------------------------------------
def test_no_default_targets_error_starts_with_peft_sentence():
    with pytest.raises(ValueError, match=r"^Please specify `target_modules` in `peft_config`.*'custom'"):
        get_peft_model(MLP(), NoraConfig())


def test_adapter_names_length_mismatch_uses_peft_sentence():
    model = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2, init_weights=False)).eval()
    with pytest.raises(ValueError, match=r"^Length of `adapter_names` should be the same as the number of inputs"):
        model(input_ids(batch=3), adapter_names=["default", "__base__"])


def test_adapter_names_while_merged_uses_peft_sentence():
    model = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2, activation="identity", init_weights=False))
    model.eval().merge_adapter()
    msg = r"^Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first\."
    with pytest.raises(ValueError, match=msg):
        model(input_ids(batch=2), adapter_names=["default", "__base__"])


# --- granularity="module" on a block-structured toy model, peft's battery ------------------------------------------
class Block(nn.Module):
    """A residual block whose ``mlp`` is a whole sub-network (what granularity="module" wraps)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class BlockModel(nn.Module):
    def __init__(self, width: int = 12, depth: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(10, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def _module_cfg(**kw) -> NoraConfig:
    return NoraConfig(r=3, alpha=6, granularity="module", target_modules=["mlp"], init_weights=False, **kw)


def test_module_granularity_on_blocks_equals_float64_reference():
    model = get_peft_model(BlockModel().double(), _module_cfg(activation="tanh")).eval()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, ParallelBlock)}
    assert wrapped == {f"base_model.model.blocks.{i}.mlp" for i in range(3)}
    plain = BlockModel().double().eval()
    for i, block in enumerate(plain.blocks):
        layer = model.base_model.model.blocks[i].mlp
        up, down = layer.nora_up["default"].weight, layer.nora_down["default"].weight

        def hook(mod, args, out, up=up, down=down):
            return out + 2.0 * torch.tanh(args[0] @ up.T) @ down.T  # s = alpha / r = 2

        block.mlp.register_forward_hook(hook)
    xd = X.double()
    with torch.no_grad():
        torch.testing.assert_close(model(xd), plain(xd), rtol=1e-10, atol=1e-10)
        assert (model(xd) - BlockModel().double()(xd)).abs().max() > 1e-3


def test_module_granularity_on_blocks_peft_battery(tmp_path):
    model = get_peft_model(BlockModel(), _module_cfg(), "one").eval()
    model.add_adapter("two", _module_cfg(activation="relu", layers_to_transform=[1], layers_pattern="blocks"))
    with torch.no_grad():
        out_one = model(X)
        with model.disable_adapter():
            torch.testing.assert_close(model(X), BlockModel()(X))
        model.set_adapter("two")
        out_two = model(X)
        names = ["one", "two", "__base__"] * 3
        mixed = model(X, adapter_names=names)
    base = BlockModel()(X)
    expected = torch.stack([{"one": out_one, "two": out_two, "__base__": base}[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no weight to merge"):
        model.merge_adapter()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BlockModel(), tmp_path / "one", adapter_name="one")
    loaded.load_adapter(tmp_path / "two", adapter_name="two")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(X), out_one)
        loaded.set_adapter("two")
        torch.testing.assert_close(loaded(X), out_two)
    unloaded = copy.deepcopy(model).unload()
    assert not any(isinstance(m, NoraLayer) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(X), base)


def test_module_granularity_on_blocks_trains_only_the_adapter():
    model = get_peft_model(BlockModel(), _module_cfg(dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(X).pow(2).mean()
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".nora_up." in k or ".nora_down." in k for k in changed)


# --- deliberate differences from LoRA (docs/ecosystem.md's table) --------------------------------------------------
def test_pickle_adapter_is_refused_where_lora_loads_it(tmp_path):
    """peft's LoRA loads ``adapter_model.bin`` (torch.load); NoRA loads weights through safetensors only."""
    from safetensors.torch import load_file

    for name, cfg in [
        ("lora", LoraConfig(r=2, target_modules=["lin0"])),
        ("nora", NoraConfig(r=2, target_modules=["lin0"])),
    ]:
        get_peft_model(MLP(), cfg).save_pretrained(tmp_path / name)
        weights = tmp_path / name / "adapter_model.safetensors"
        torch.save(load_file(weights), tmp_path / name / "adapter_model.bin")
        weights.unlink()
    PeftModel.from_pretrained(MLP(), tmp_path / "lora")
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*never pickle"):
        PeftModel.from_pretrained(MLP(), tmp_path / "nora")
