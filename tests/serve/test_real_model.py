"""``nora serve`` on the real named base smollm2-135m: greedy chat answers through the server, with a NoRA and a LoRA
adapter, equal peft's offline ``generate`` on the same chat-templated prompt."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch
from peft import PeftModel

from nora_peft.methods import AdapterSpec
from nora_peft.serve import Engine, ServeConfig
from tests.serve.conftest import save_adapter, serve

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
MAX_TOKENS = 28
ADAPTERS = {
    "gsm8k-nora-r8": AdapterSpec(method="nora", r=8, target_modules=["q_proj", "v_proj"]),
    "gsm8k-lora-r8": AdapterSpec(method="lora", r=8, target_modules=["q_proj", "v_proj"]),
}


def offline_chat(base, tokenizer, adapter_dir, messages) -> str:
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def real_server(smollm2_path, tmp_path_factory):
    from nora_peft.bases.named import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer("smollm2-135m")
    adapters_dir = tmp_path_factory.mktemp("real-adapters")
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        save_adapter(base, spec, adapters_dir / name, seed=7 + i)  # random init: each adapter changes the output
    config = ServeConfig(adapters_dir=str(adapters_dir), base_name="smollm2-135m")
    srv = serve(Engine(copy.deepcopy(base), tokenizer, config))
    yield srv, base, tokenizer, adapters_dir
    srv.stop()


@pytest.mark.parametrize("model", ["smollm2-135m", *ADAPTERS])
def test_real_model_chat_equals_offline_peft(real_server, model):
    srv, base, tokenizer, adapters_dir = real_server
    messages = [{"role": "user", "content": QUESTION}]
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    adapter_dir = None if model == "smollm2-135m" else adapters_dir / model
    expected = offline_chat(base, tokenizer, adapter_dir, messages)
    assert r.json()["choices"][0]["message"]["content"] == expected
    if model == "smollm2-135m":
        assert "7" in expected, expected  # the base model really answers


def test_nora_serve_takes_the_named_base_and_bf16_where_fast(smollm2_path):
    from nora_peft.kernels.device import cpu_has_bf16
    from nora_peft.serve.cli import load_base

    model, tokenizer, name = load_base("smollm2-135m", device="cpu")
    assert name == "smollm2-135m" and tokenizer.chat_template
    assert next(model.parameters()).dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    with pytest.raises(SystemExit, match="neither a folder nor a named base.*smollm2-135m"):
        load_base("no-such-model")
