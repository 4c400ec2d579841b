"""Spectral statistics against hand-computed cases; hooks against a manual forward on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nora_peft.lab.analysis import (
    ActivationRecorder,
    adapter_factors,
    analyze_model,
    collect_activation_spectra,
    components_for_energy,
    cumulative_energy,
    effective_rank,
    lowrank_singular_values,
    plot_run,
    spectrum_stats,
)
from nora_peft.methods import AdapterSpec, build_peft_model
from nora_peft.tuner.ops import activation_fn


def _matrix_with_singular_values(s: list[float], m: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = np.zeros((m, n))
    d[: len(s), : len(s)] = np.diag(s)
    return u @ d @ v.T


def test_effective_rank_hand_computed():
    # rank 1 -> 1; c * I_n -> n
    assert effective_rank(np.linalg.svd(np.outer(np.arange(1, 6), np.arange(2, 9)), compute_uv=False)) == (
        pytest.approx(1.0, abs=1e-6)
    )
    assert effective_rank(np.linalg.svd(3.5 * np.eye(7), compute_uv=False)) == pytest.approx(7.0)
    # s = (3, 1): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    a = _matrix_with_singular_values([3.0, 1.0], 6, 5)
    assert effective_rank(np.linalg.svd(a, compute_uv=False)) == pytest.approx(math.exp(h), rel=1e-9)
    assert effective_rank([0.0, 0.0]) == 0.0


def test_energy_and_auc90_hand_computed():
    # energies 16, 9, 4, 1 (total 30): cumulative 16/30=.533, 25/30=.833, 29/30=.967, 1 -> 3 components for 90%
    a = _matrix_with_singular_values([4.0, 3.0, 2.0, 1.0], 8, 6, seed=1)
    s = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(cumulative_energy(s)[:4], [16 / 30, 25 / 30, 29 / 30, 1.0], rtol=1e-9)
    assert components_for_energy(s) == 3
    assert components_for_energy(s, 0.5) == 1
    assert components_for_energy([1.0] * 10) == 9  # exactly 90% at k = 9
    assert components_for_energy([5.0]) == 1
    st = spectrum_stats([1.0, 3.0])  # order does not matter
    assert st["singular_values"] == [3.0, 1.0]
    assert st["energy_auc"] == pytest.approx((0.9 + 1.0) / 2)


def test_lowrank_singular_values_match_full_svd():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    ours = lowrank_singular_values(down, up, scaling=0.5)
    ref = np.linalg.svd(0.5 * down.double().numpy() @ up.double().numpy(), compute_uv=False)[:6]
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def _tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _spec(method: str, **kw) -> AdapterSpec:
    init = {"init_weights": False} if method == "nora" else {"init_lora_weights": False}
    return AdapterSpec(method=method, r=4, dropout=0.0, extra=init, **kw)


@pytest.mark.parametrize(
    "spec",
    [_spec("nora"), _spec("nora", activation="relu"), _spec("lora"), _spec("nora", granularity="module")],
    ids=["nora-silu", "nora-relu", "lora", "nora-module"],
)
def test_hooks_capture_the_adapter_branch(spec):
    model = build_peft_model(_tiny_llama(), spec).eval()
    factors = adapter_factors(model)
    assert factors and all(f.r == 4 for f in factors)
    f = factors[0]
    # independent capture: the base layer's input and output, and the adapted layer's output
    seen: dict[str, list[torch.Tensor]] = {"x": [], "base": [], "full": []}
    base = f.module.get_base_layer()

    def first(t):
        return t[0] if isinstance(t, tuple) else t

    def on_base(m, a, kw, o) -> None:  # a forward hook returning something would replace the output
        seen["x"].append(first(a) if a else kw["hidden_states"])
        seen["base"].append(first(o))

    def on_full(m, a, o) -> None:
        seen["full"].append(first(o))

    h1 = base.register_forward_hook(on_base, with_kwargs=True)
    h2 = f.module.register_forward_hook(on_full)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding tokens must be excluded
    rec = ActivationRecorder(factors, keep_latents=True)
    with rec, torch.no_grad():
        rec.token_mask = mask
        model(input_ids=ids, attention_mask=mask)
    h1.remove()
    h2.remove()
    keep = mask.bool()
    x = seen["x"][0][keep]
    latent_manual = (
        activation_fn(spec.activation if spec.method == "nora" else "identity")(x @ f.up.t()).double().detach()
    )
    torch.testing.assert_close(rec.latents[f.name][0], latent_manual, rtol=1e-6, atol=1e-6)
    assert rec.tokens[f.name] == int(mask.sum())
    # the output singular values equal those of (adapted layer output - base layer output)
    delta = (seen["full"][0] - seen["base"][0])[keep].double()
    latent_sv, output_sv = rec.singular_values(f)
    np.testing.assert_allclose(output_sv, np.linalg.svd(delta.numpy(), compute_uv=False)[:4], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(latent_sv, np.linalg.svd(latent_manual.numpy(), compute_uv=False), rtol=1e-6)


def test_analyze_model_and_figures(tmp_path):
    model = build_peft_model(_tiny_llama(), _spec("nora"))
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(2)]
    res = analyze_model(model, batches)
    assert len(res["layers"]) == 4  # q_proj, v_proj x 2 layers
    for lay in res["layers"]:
        assert 1.0 <= lay["output"]["effective_rank"] <= lay["r"] + 1e-9  # output lives in col(W_down)
        assert 1 <= lay["update"]["auc90"] <= lay["r"]
        assert lay["tokens"] == 4 * 12 * 2
    agg = res["aggregate"]["latent"]
    assert agg["effective_rank_mean"] == pytest.approx(
        np.mean([la["latent"]["effective_rank"] for la in res["layers"]])
    )
    paths = plot_run(res, tmp_path, label="nora")
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
    # the spectra of every layer agree with a direct computation from collect_activation_spectra
    spectra = collect_activation_spectra(model, batches)
    name = next(iter(spectra))
    assert effective_rank(spectra[name]["latent"]) == pytest.approx(res["layers"][0]["latent"]["effective_rank"])


def test_lora_update_rank_one_has_effective_rank_one():
    model = build_peft_model(_tiny_llama(), AdapterSpec(method="lora", r=1, extra={"init_lora_weights": False}))
    res = analyze_model(model)
    assert all(lay["update"]["effective_rank"] == pytest.approx(1.0) for lay in res["layers"])
    assert "latent" not in res["layers"][0]
