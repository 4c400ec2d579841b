"""The battery peft runs on its own methods, written for NoRA, on tiny Llama/Mistral/Qwen2/Phi-3/GPT-2 and an MLP."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from peft import PeftConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import nora_peft  # noqa: F401  (registers NoRA)
from nora_peft import NoraConfig
from nora_peft.tuner.layer import NoraLayer

from ..tiny_models import DEFAULT_TARGETS, LAYER_LISTS, MLP, input_ids, mixed_and_alone_logits, tiny_causal_lm

ARCHS = ["llama", "mistral", "qwen2", "phi3", "gpt2"]
REF_ACTS = {
    "silu": lambda z: z * torch.sigmoid(z),
    "identity": lambda z: z,
    "relu": torch.relu,
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5)),
    "tanh": torch.tanh,
}


def nora(**kw) -> NoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8)
    kw.setdefault("init_weights", False)
    return NoraConfig(**kw)


def reference_logits(peft_model, ids, adapter="default"):
    """Eq. 2 in float64, independently of NoRA's layer code: a plain copy of the base model whose targeted modules
    get a forward hook adding s * W_down act(W_up x), with the weights read from the adapter's state dict."""
    cfg = peft_model.peft_config[adapter]
    state = {k: v.double() for k, v in peft_model.state_dict().items() if f".{adapter}." in k and "nora_" in k}
    plain = copy.deepcopy(peft_model).unload().double().eval()
    act = REF_ACTS[cfg.activation]
    for name in {k.split(".nora_up.")[0] for k in state if ".nora_up." in k}:
        w_up = state[f"{name}.nora_up.{adapter}.weight"]
        w_down = state[f"{name}.nora_down.{adapter}.weight"]
        s = cfg.alpha / w_up.shape[0]
        module = plain.get_submodule(name.removeprefix("base_model.model."))

        def hook(mod, args, kwargs, out, w_up=w_up, w_down=w_down, s=s):
            x = args[0] if args else kwargs["hidden_states"]
            delta = s * act(x @ w_up.T) @ w_down.T
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

        module.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        return plain(ids).logits if hasattr(plain, "config") else plain(ids)


# --- forward: Eq. 2, initial identity, dtypes -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_forward_equals_float64_reference(arch, activation):
    model = get_peft_model(tiny_causal_lm(arch).double(), nora(activation=activation, dropout=0.3)).eval()
    ids = input_ids()
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, reference_logits(model, ids), rtol=1e-9, atol=1e-9)
    base = tiny_causal_lm(arch).double()
    with torch.no_grad():
        assert (out - base(ids).logits).abs().max() > 1e-4  # the adapter really contributes


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_module_granularity_equals_reference(arch):
    model = get_peft_model(tiny_causal_lm(arch).double(), nora(granularity="module")).eval()
    wrapped = [n for n, m in model.named_modules() if isinstance(m, NoraLayer)]
    assert wrapped and all(n.endswith(("self_attn", "mlp", "attn")) for n in wrapped)
    ids = input_ids()
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, reference_logits(model, ids), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_output_equals_base_model(arch):
    ids = input_ids()
    with torch.no_grad():
        ref = tiny_causal_lm(arch)(ids).logits
        out = get_peft_model(tiny_causal_lm(arch), NoraConfig(r=4)).eval()(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_finite_in_each_dtype(arch, dtype):
    model = get_peft_model(tiny_causal_lm(arch, dtype=dtype), nora())
    up = next(p for n, p in model.named_parameters() if "nora_up" in n)
    assert up.dtype == torch.float32  # adapter weights fp32 by default (peft's autocast_adapter_dtype)
    with torch.no_grad():
        logits = model(input_ids()).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    model.train()
    model(input_ids(), labels=input_ids()).loss.backward()
    assert up.grad is not None and torch.isfinite(up.grad).all()


def test_plain_torch_mlp():
    x = torch.randn(5, 10, dtype=torch.float64)
    model = get_peft_model(MLP().double(), nora(target_modules=["lin0", "lin1"])).eval()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, reference_logits(model, x), rtol=1e-10, atol=1e-10)


def test_fused_qkv_shapes():
    model = get_peft_model(tiny_causal_lm("phi3"), nora(r=3))
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, NoraLayer)
    k, d = layer.get_base_layer().in_features, layer.get_base_layer().out_features
    assert d == 3 * k  # fused q, k, v (num_kv_heads == num_heads)
    assert layer.nora_up["default"].weight.shape == (3, k) and layer.nora_down["default"].weight.shape == (d, 3)


def test_conv1d_shapes():
    model = get_peft_model(tiny_causal_lm("gpt2"), nora(r=3))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer.get_base_layer(), Conv1D)
    assert layer.nora_up["default"].weight.shape == (3, 32) and layer.nora_down["default"].weight.shape == (96, 3)


# --- training --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_only_adapter_params_change_and_get_grads(arch):
    model = get_peft_model(tiny_causal_lm(arch), NoraConfig(r=4, alpha=8, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("nora_up" in n or "nora_down" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        opt.zero_grad()
        model(input_ids(seed=step), labels=input_ids(seed=step)).loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if n in trainable:
                    # W_down starts at zero so W_up's first gradient is zero; W_down's must not be
                    assert p.grad is not None, n
                    if "nora_down" in n:
                        assert p.grad.abs().sum() > 0, n
                else:
                    assert p.grad is None, n
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n


def test_dropout_active_only_in_train_mode():
    model = get_peft_model(tiny_causal_lm("llama"), nora(dropout=0.5))
    ids = input_ids()
    model.eval()
    with torch.no_grad():
        e1, e2 = model(ids).logits, model(ids).logits
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        t1, t2 = model(ids).logits, model(ids).logits
    assert not torch.equal(t1, t2) and not torch.equal(t1, e1)


def test_gradient_checkpointing_gives_same_grads():
    ids = input_ids()
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_causal_lm("llama"), nora(dropout=0.2))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(7)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


# --- save / load -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load_round_trip(arch, low_cpu_mem_usage, tmp_path):
    model = get_peft_model(tiny_causal_lm(arch), nora(activation="tanh", dropout=0.1)).eval()
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "NORA" and cfg["activation"] == "tanh" and cfg["r"] == 4
    loaded = PeftModel.from_pretrained(tiny_causal_lm(arch), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), NoraConfig)


def test_saved_keys_and_adapter_name_substrings(tmp_path):
    """Adapter names that are substrings of each other and of module names survive save/load."""
    model = get_peft_model(tiny_causal_lm("llama"), nora(), adapter_name="proj")
    model.add_adapter("proj2", nora(r=2))
    ids = input_ids()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "proj" / "adapter_model.safetensors").keys()  # non-default names get a subfolder
    assert keys and all(k.endswith((".nora_up.weight", ".nora_down.weight")) for k in keys)
    base = tiny_causal_lm("llama")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "proj"), adapter_name="proj")
    loaded.load_adapter(str(tmp_path / "proj2"), adapter_name="proj2")
    for name in ("proj", "proj2"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


# --- adapters: enable/disable, several, delete, unload -----------------------------------------------------------
def test_disable_adapter_context_and_layers():
    model = get_peft_model(tiny_causal_lm("llama"), nora()).eval()
    ids = input_ids()
    with torch.no_grad():
        base = tiny_causal_lm("llama")(ids).logits
        adapted = model(ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)  # leaving the context re-enables
        model.base_model.disable_adapter_layers()
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
        model.base_model.enable_adapter_layers()
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)


def test_two_adapters_set_and_delete():
    model = get_peft_model(tiny_causal_lm("llama"), nora(), adapter_name="a")
    model.add_adapter("b", nora(r=2, activation="relu"))
    assert model.active_adapter == "a"
    ids = input_ids()
    model.eval()
    with torch.no_grad():
        out_a = model(ids).logits
        model.set_adapter("b")
        assert model.active_adapter == "b"
        out_b = model(ids).logits
    assert not torch.allclose(out_a, out_b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".b.weight" in n and "nora_" in n
    }
    model.delete_adapter("b")
    assert model.active_adapters == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    for m in model.modules():
        if isinstance(m, NoraLayer):
            assert set(m.r) == set(m.scaling) == set(m.nora_activation) == {"a"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out_a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")


def test_unload_returns_the_base_model():
    ids = input_ids()
    with torch.no_grad():
        ref = tiny_causal_lm("llama")(ids).logits
    plain = get_peft_model(tiny_causal_lm("llama"), nora()).unload()
    assert not any(isinstance(m, NoraLayer) for m in plain.modules())
    assert not any("nora_" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("b_targets", [None, ["v_proj", "o_proj", "down_proj"]], ids=["same", "other-modules"])
def test_mixed_batch_adapter_names(b_targets):
    model = get_peft_model(tiny_causal_lm("llama"), nora(), adapter_name="a").eval()
    b_kw = {"target_modules": b_targets} if b_targets else {}
    model.add_adapter("b", nora(r=2, activation="gelu", **b_kw))
    ids = input_ids(batch=3)
    names = ["a", "__base__", "b"]
    mixed, alone = mixed_and_alone_logits(model, ids, names)
    for row, logits in enumerate(alone):
        torch.testing.assert_close(mixed[row : row + 1], logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(ids, adapter_names=["a", "zz", "b"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(ids, adapter_names=names)


# --- targeting ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_default_target_modules_per_architecture(arch):
    model = get_peft_model(tiny_causal_lm(arch), NoraConfig(r=2))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, NoraLayer)}
    expected = {DEFAULT_TARGETS[arch]} | ({"v_proj"} if arch in ("llama", "mistral", "qwen2") else set())
    assert adapted == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layers_to_transform(arch):
    cfg = NoraConfig(r=2, layers_to_transform=[1], layers_pattern=LAYER_LISTS[arch])
    model = get_peft_model(tiny_causal_lm(arch), cfg)
    adapted = [n for n, m in model.named_modules() if isinstance(m, NoraLayer)]
    assert adapted and all(f".{LAYER_LISTS[arch]}.1." in n for n in adapted)


def test_rank_and_alpha_patterns():
    cfg = NoraConfig(r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    model = get_peft_model(tiny_causal_lm("llama"), cfg)
    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, NoraLayer)}
    assert layers["q_proj"].r["default"] == 4 and layers["q_proj"].scaling["default"] == 2.0
    assert layers["v_proj"].r["default"] == 2 and layers["v_proj"].scaling["default"] == 3.0


@pytest.mark.parametrize(("scaling", "expected"), [("alpha/r", 16 / 4), ("rslora", 16 / 2), (0.25, 0.25)])
def test_scaling_rules(scaling, expected):
    model = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=4, alpha=16, scaling=scaling))
    layer = next(m for m in model.modules() if isinstance(m, NoraLayer))
    assert layer.scaling["default"] == pytest.approx(expected)


# --- merging -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_identity_merge_equals_unmerged_and_is_idempotent(arch):
    model = get_peft_model(tiny_causal_lm(arch).double(), nora(activation="identity")).eval()
    ids = input_ids()
    with torch.no_grad():
        unmerged = model(ids).logits
        model.merge_adapter()
        model.merge_adapter()  # second merge is a no-op (with peft's warning)
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-10, atol=1e-10)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-10, atol=1e-10)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, NoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("granularity", ["weight", "module"])
def test_nonlinear_merge_raises_clear_error(granularity):
    model = get_peft_model(tiny_causal_lm("llama"), nora(granularity=granularity))
    match = "cannot be folded" if granularity == "weight" else "no weight to merge"
    with pytest.raises(ValueError, match=match):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="unmerged"):
        model.merge_adapter()
    assert not any(m.merged for m in model.modules() if isinstance(m, NoraLayer))


# --- generation and Trainer --------------------------------------------------------------------------------------
def test_generate_with_adapter():
    model = get_peft_model(tiny_causal_lm("llama"), nora()).eval()
    ids = input_ids(batch=1, length=4)
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], ids)
    with model.disable_adapter():
        base_out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    base = tiny_causal_lm("llama")
    torch.testing.assert_close(
        base.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0), base_out
    )


def test_trainer_loss_falls_on_a_learnable_task(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    seqs = [[5 + (i % 7)] + [10 + (i % 7) * 3 + j for j in range(8)] for i in range(64)]  # fixed successor chains
    ds = Dataset.from_dict({"input_ids": seqs, "labels": seqs})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # a wider init than the default 0.02 so the frozen lm_head can express confident predictions
    model = get_peft_model(
        tiny_causal_lm("llama", initializer_range=0.3), NoraConfig(r=8, alpha=16, target_modules=targets)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]


# --- bad input ---------------------------------------------------------------------------------------------------
def test_target_modules_matching_nothing_names_the_modules():
    with pytest.raises(ValueError, match=r"not found in the base model.*q_proj"):
        get_peft_model(tiny_causal_lm("llama"), NoraConfig(target_modules=["qproj"]))


def test_unsupported_layer_type():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x):
            return self.emb(x)

    with pytest.raises(TypeError, match=r"emb \(Embedding\) is not supported.*nn.Linear"):
        get_peft_model(WithEmbedding(), NoraConfig(target_modules=["emb"]))


def test_unknown_architecture_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(MLP(), NoraConfig())


def test_adapter_that_does_not_fit_names_layer_and_shapes(tmp_path):
    get_peft_model(tiny_causal_lm("llama"), nora(r=4)).save_pretrained(tmp_path)
    other = tiny_causal_lm("llama")
    cfg = other.config
    cfg.hidden_size = 16
    cfg.intermediate_size = 24
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*q_proj\.nora_up.*shape \(4, 32\).*needs \(4, 16\)"):
        PeftModel.from_pretrained(small, tmp_path)


def test_adapter_file_missing_a_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    get_peft_model(tiny_causal_lm("llama"), nora()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="missing from the adapter file"):
        PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_adapter_file(tmp_path, damage):
    get_peft_model(tiny_causal_lm("llama"), nora()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"\x00\x01" * 50, "empty": b""}[damage])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path)


def test_missing_adapter_file(tmp_path):
    get_peft_model(tiny_causal_lm("llama"), nora()).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_causal_lm("llama"), str(tmp_path))
