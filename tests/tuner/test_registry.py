"""Registration: idempotent, no files written, peft's own LoRA exactly as it was, a clear failure without import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peft import mapping

import nora_peft
from nora_peft import NoraConfig, NoraModel
from nora_peft.tuner.registry import is_registered, register

ROOT = Path(__file__).resolve().parent.parent

# A LoRA workflow whose every observable (outputs, saved bytes, configs, peft's tables) is printed as JSON.
LORA_PROBE = r"""
import hashlib, json, sys, tempfile, os
if sys.argv[1] == "with":
    import nora_peft  # noqa
import torch
from peft import LoraConfig, PeftModel, get_peft_model, mapping
from transformers import AutoModelForCausalLM, LlamaConfig
def base():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
torch.manual_seed(1)
ids = torch.randint(0, 50, (2, 6))
m = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
m.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
out = {}
with torch.no_grad():
    out["a"] = m(ids).logits.sum().item(); m.set_adapter("second"); out["b"] = m(ids).logits.sum().item()
d = tempfile.mkdtemp()
m.save_pretrained(d)
files = {}
for root, _, names in os.walk(d):
    for n in names:
        p = os.path.join(root, n)
        if n.endswith(".safetensors"):
            files[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        elif n.endswith(".json"):
            files[os.path.relpath(p, d)] = json.load(open(p))
l = PeftModel.from_pretrained(base(), d)
l.load_adapter(os.path.join(d, "second"), adapter_name="second")
with torch.no_grad():
    out["load_a"] = l(ids).logits.sum().item(); l.set_adapter("second"); out["load_b"] = l(ids).logits.sum().item()
names = ["PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING",
         "PEFT_TYPE_TO_MIXED_MODEL_MAPPING"]
tables = {name: sorted(str(k) for k in getattr(mapping, name) if str(k) != "NORA") for name in names}
print(json.dumps({"out": out, "files": files, "tables": tables}, sort_keys=True))
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    # fixed hash seed: peft saves target_modules from a set, whose order would otherwise differ between processes
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env
    )


def test_registered_and_idempotent():
    assert is_registered()
    sizes = [len(mapping.PEFT_TYPE_TO_CONFIG_MAPPING), len(mapping.PEFT_TYPE_TO_TUNER_MAPPING)]
    register()
    register()
    assert is_registered()
    assert [len(mapping.PEFT_TYPE_TO_CONFIG_MAPPING), len(mapping.PEFT_TYPE_TO_TUNER_MAPPING)] == sizes
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["NORA"] is NoraConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["NORA"] is NoraModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["NORA"] == "nora_"
    assert "NORA" not in mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING


def test_a_foreign_registration_is_not_overwritten(monkeypatch):
    monkeypatch.setitem(mapping.PEFT_TYPE_TO_TUNER_MAPPING, "NORA", object)
    try:
        register()
    except RuntimeError as e:
        assert "different method registered as 'NORA'" in str(e)
    else:
        raise AssertionError("register() silently replaced another package's 'NORA'")


def test_importing_nora_peft_leaves_peft_lora_exactly_as_it_was():
    without, with_ = _run(LORA_PROBE, "without"), _run(LORA_PROBE, "with")
    assert without.returncode == 0, without.stderr[-2000:]
    assert with_.returncode == 0, with_.stderr[-2000:]
    a, b = json.loads(without.stdout.splitlines()[-1]), json.loads(with_.stdout.splitlines()[-1])
    assert a == b
    assert a["out"]["a"] == a["out"]["load_a"] and a["out"]["b"] == a["out"]["load_b"]


def test_import_writes_no_files(tmp_path):
    code = "import nora_peft, sys; print(nora_peft.__file__)"
    before = {p for p in Path(nora_peft.__file__).parent.rglob("*") if "__pycache__" not in p.parts}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    after = {p for p in Path(nora_peft.__file__).parent.rglob("*") if "__pycache__" not in p.parts}
    assert before == after and list(tmp_path.iterdir()) == []


def test_loading_without_import_fails_naming_nora(tmp_path):
    from peft import get_peft_model

    from ..tiny_models import tiny_causal_lm

    get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2)).save_pretrained(tmp_path)
    code = (
        "import sys\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, LlamaConfig\n"
        "m = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, "
        "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))\n"
        f"PeftModel.from_pretrained(m, {str(tmp_path)!r})\n"
    )
    result = _run(code)
    assert result.returncode != 0
    assert "NORA" in result.stderr.splitlines()[-1]  # peft's KeyError: 'NORA' -- the README says: import nora_peft
