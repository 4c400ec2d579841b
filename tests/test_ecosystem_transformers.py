"""transformers' adapter API with NoRA (issue 9, findings 4 and 5): every entry point, on a tiny local model.

transformers' ``integrations/peft.py`` reads ``peft_config.peft_type.value`` and refuses its adapter methods when peft
is older than its ``MIN_PEFT_VERSION``; these tests load a saved NoRA adapter through each entry point and compare
the logits with the ``PeftModel`` that saved it.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from packaging.version import Version
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import nora_peft  # noqa: F401  (registers NoRA)
from nora_peft import NoraConfig
from nora_peft.tuner.config import NORA_PEFT_TYPE, NoraPeftType
from nora_peft.tuner.layer import NoraLayer

from .tiny_models import VOCAB, input_ids, tiny_causal_lm


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer for the tiny models (no download)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers

    # one token per printable character, exactly the models' vocabulary (lm-eval resizes embeddings otherwise)
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama base folder (with tokenizer), a NoRA adapter folder pointing at it, and the adapter's logits."""
    root = tmp_path_factory.mktemp("nora_hf")
    base_dir, adapter_dir = root / "base", root / "adapter"
    tiny_causal_lm("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=4, init_weights=False)).eval()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    tiny_tokenizer().save_pretrained(adapter_dir)
    with torch.no_grad():
        logits = model(input_ids()).logits
    return base_dir, adapter_dir, logits


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids()).logits


def test_peft_type_has_value_and_stays_the_plain_string(tmp_path):
    assert isinstance(NORA_PEFT_TYPE, str) and isinstance(NORA_PEFT_TYPE, NoraPeftType)
    assert NORA_PEFT_TYPE.value == "NORA" and type(NORA_PEFT_TYPE.value) is str
    assert NORA_PEFT_TYPE == "NORA" and hash(NORA_PEFT_TYPE) == hash("NORA") and {"NORA": 1}[NORA_PEFT_TYPE] == 1
    cfg = NoraConfig(r=2, target_modules=["q_proj"])
    assert cfg.peft_type.value == "NORA"
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):  # DataLoader workers, FSDP, torch.save
        assert clone.peft_type.value == "NORA" and clone.to_dict()["peft_type"].value == "NORA"
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "NORA"
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(tmp_path)).peft_type.value == "NORA"


def test_model_load_adapter(saved):
    _, adapter_dir, expected = saved
    model = tiny_causal_lm("llama")
    model.load_adapter(str(adapter_dir))
    assert any(isinstance(m, NoraLayer) for m in model.modules())
    torch.testing.assert_close(_logits(model), expected)


def test_auto_model_from_adapter_folder(saved):
    _, adapter_dir, expected = saved
    model = AutoModelForCausalLM.from_pretrained(str(adapter_dir))
    assert any(isinstance(m, NoraLayer) for m in model.modules())
    torch.testing.assert_close(_logits(model), expected)


def test_pipeline_from_adapter_folder(saved):
    from transformers import pipeline

    base_dir, adapter_dir, _ = saved
    pipe = pipeline("text-generation", model=str(adapter_dir))
    assert any(isinstance(m, NoraLayer) for m in pipe.model.modules())
    out = pipe("abc", max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    # the same greedy continuation as the PeftModel itself
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    tok = tiny_tokenizer()
    ids = tok("abc", return_tensors="pt").input_ids
    gen = peft_model.eval().generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert list(out) == gen[0].tolist()


def test_add_adapter_enable_disable_and_active_adapters():
    model = tiny_causal_lm("llama")
    base = _logits(tiny_causal_lm("llama"))
    model.add_adapter(NoraConfig(r=4, init_weights=False), adapter_name="first")
    assert model.active_adapters() == ["first"]
    first = _logits(model)
    assert (first - base).abs().max() > 1e-4
    model.add_adapter(NoraConfig(r=2, activation="gelu", init_weights=False), adapter_name="second")
    model.set_adapter("first")
    model.disable_adapters()
    torch.testing.assert_close(_logits(model), base)
    model.enable_adapters()
    torch.testing.assert_close(_logits(model), first)
    model.set_adapter("second")
    assert model.active_adapters() == ["second"]
    assert not torch.allclose(_logits(model), first)


def test_pins_agree_min_peft_version_and_no_deprecation_warning():
    """Finding 5: transformers' adapter methods need peft >= MIN_PEFT_VERSION; peft 0.21 reads an attribute that
    transformers >= 5.23 deprecates (a FutureWarning on every get_peft_model)."""
    import peft
    from transformers.integrations import peft as hf_peft

    assert Version(peft.__version__) >= Version(hf_peft.MIN_PEFT_VERSION)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2))


def test_mixed_peft_model_refuses_with_peft_own_message():
    """peft's PeftMixedModel supports a fixed list of peft's own types: NoRA gets peft's clear refusal, not an
    AttributeError on ``peft_type.value``."""
    with pytest.raises(
        ValueError, match=r"The provided `peft_type` 'NORA' is not compatible with the `PeftMixedModel`"
    ):
        get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2), mixed=True)


def test_auto_peft_model(saved):
    from peft import AutoPeftModelForCausalLM

    _, adapter_dir, expected = saved
    torch.testing.assert_close(_logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))), expected)
