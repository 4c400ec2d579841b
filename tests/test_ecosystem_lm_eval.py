"""``nora lm-eval`` (issue 9, finding 6): NoRA registered, then lm-eval's own CLI with every argument unchanged.

The end-to-end test runs lm-eval on a tiny local task (no hub access) and checks the log-likelihood lm-eval reports
against the same number computed from the ``PeftModel`` directly, so the adapter really was applied.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from nora_peft import NoraConfig, cli
from nora_peft.tuner.registry import is_registered

from .test_ecosystem_transformers import tiny_tokenizer
from .tiny_models import tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent


def test_hands_every_argument_to_lm_eval_after_registering(monkeypatch):
    seen = {}

    def fake_cli_evaluate():
        seen["argv"] = list(sys.argv)
        seen["registered"] = is_registered()

    fake_main = types.ModuleType("lm_eval.__main__")
    fake_main.cli_evaluate = fake_cli_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", fake_main)
    argv_before = list(sys.argv)
    args = ["--model", "hf", "--model_args", "pretrained=b,peft=a", "-h", "--tasks", "x"]
    assert cli.main(["lm-eval", *args]) == 0
    assert seen == {"argv": ["lm-eval", *args], "registered": True}
    assert sys.argv == argv_before  # restored
    cli.main(["lm-eval", "run", "--limit", "2"])
    assert seen["argv"] == ["lm-eval", "run", "--limit", "2"]


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """lm-eval's CLI replaced by a recorder (lm-eval itself need not be installed)."""
    calls = []
    fake_main = types.ModuleType("lm_eval.__main__")
    fake_main.cli_evaluate = lambda: calls.append(list(sys.argv))
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", fake_main)
    return calls


def _folders(root: Path) -> dict[str, Path]:
    nora, lora, base, odd, broken = (root / n for n in ("nora", "lora", "base", "odd", "broken"))
    get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2)).save_pretrained(nora)
    get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(lora)
    tiny_causal_lm("llama").save_pretrained(base)
    for folder, text in ((odd, '{"peft_type": "NORA2"}'), (broken, "[1, 2")):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(text)
    return {"nora": nora, "lora": lora, "base": base, "odd": odd, "broken": broken, "missing": root / "no" / "such"}


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing", r"no such folder; pass the folder that save_pretrained wrote"),
        ("base", r"has no adapter_config.json \(it looks like a base model: pass it as pretrained=\)"),
        ("odd", r"peft_type 'NORA2', which peft does not know \(NoRA adapters say 'NORA'\)"),
        ("broken", r"is not a JSON object"),
    ],
)
def test_wrong_adapter_folder_names_the_fix_before_lm_eval_runs(fake_lm_eval, tmp_path, which, message):
    folder = _folders(tmp_path)[which]
    args = ["run", "--model", "hf", "--model_args", f"pretrained=b,peft={folder},dtype=float32", "--tasks", "x"]
    with pytest.raises(SystemExit) as stop:
        cli.main(["lm-eval", *args])
    text = str(stop.value.code)
    assert text.startswith("nora lm-eval: ") and re.search(message, text), text
    assert fake_lm_eval == []  # lm-eval never started


def test_good_adapters_and_hub_ids_pass_to_lm_eval(fake_lm_eval, tmp_path):
    folders = _folders(tmp_path)
    for value in (folders["nora"], folders["lora"], "some-owner/some-adapter"):
        assert cli.main(["lm-eval", "--model_args", f"pretrained=b,peft={value}"]) == 0
    assert cli.main(["lm-eval", f"--model_args=peft={folders['nora']}", "--tasks", "x"]) == 0
    assert len(fake_lm_eval) == 4


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    with pytest.raises(SystemExit, match=r"pip install 'nora-peft\[lm-eval\]'"):
        cli.main(["lm-eval", "--tasks", "x"])


TASK = """task: nora_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_nora_lm_eval_end_to_end_applies_the_adapter(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'nora-peft[lm-eval]'")
    base_dir, adapter_dir, tasks = tmp_path / "base", tmp_path / "adapter", tmp_path / "tasks"
    tiny_causal_lm("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=4, init_weights=False)).save_pretrained(adapter_dir)
    tasks.mkdir()
    docs = [{"q": q, "choices": ["a", "b", "c"], "label": i % 3} for i, q in enumerate(["abc", "xyz", "cab"])]
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "nora_tiny.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    out = tmp_path / "out"
    lm_eval_args = [
        *("run", "--model", "hf", "--tasks", "nora_tiny", "--include_path", str(tasks), "--device", "cpu"),
        *("--model_args", f"pretrained={base_dir},peft={adapter_dir}", "--output_path", str(out), "--log_samples"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "nora_peft.cli", "lm-eval", *lm_eval_args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for p in out.rglob("samples_nora_tiny_*.jsonl") for line in p.read_text().splitlines()]
    assert len(samples) == len(docs)

    model = PeftModel.from_pretrained(tiny_causal_lm("llama"), adapter_dir).eval()
    tok = tiny_tokenizer()
    for sample in samples:
        ctx = tok(sample["doc"]["q"]).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ctx])).logits[0, -1].double(), -1)
        expected = [logprobs[tok.convert_tokens_to_ids(c)].item() for c in sample["doc"]["choices"]]
        reported = [float(r[0]) for r in sample["filtered_resps"]]
        assert reported == pytest.approx(expected, abs=1e-4)
