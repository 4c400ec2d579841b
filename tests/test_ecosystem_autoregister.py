"""Opt-in auto-registration (issue 9, finding 6; issue 19, item 1): with the ``.pth`` file enabled, a process that
never imports nora_peft loads NoRA adapters through peft, transformers and lm-eval, also when the tool probes for peft
with ``importlib.util.find_spec`` first (transformers' ``is_peft_available``); a broken nora-peft never breaks
``import peft``.

The ``.pth`` file goes into a temporary directory added with ``site.addsitedir`` (as site-packages is at start-up),
never into this environment's real site-packages, which other processes share.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from nora_peft import NoraConfig, _peft_hook, autoregister

from .test_ecosystem_transformers import saved, tiny_tokenizer  # noqa: F401  (saved: a fixture)
from .tiny_models import input_ids, tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, site, sys, warnings
warnings.simplefilter("always")
site.addsitedir(sys.argv[1])
hooked = "nora_peft" in sys.modules
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft
    from peft import mapping
out = {"nora_loaded_at_start": hooked, "registered": "NORA" in mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
       "warnings": [str(w.message) for w in caught if "auto-registration" in str(w.message)]}
if len(sys.argv) > 2:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
    out["nora_layers"] = sum(type(m).__name__ == "Linear" and hasattr(m, "nora_up") for m in model.modules())
print(json.dumps(out))
"""


def _probe(site_dir: Path, *args: str, pythonpath: str = str(ROOT), script: str = PROBE, **env: str) -> dict:
    full_env = {**os.environ, **env, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(site_dir), *args],
        capture_output=True,
        text=True,
        cwd=site_dir,  # not the checkout: only the nora_peft on PYTHONPATH (this checkout, or a broken one) is found
        env=full_env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def enabled(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    path = autoregister.enable(site_dir)
    assert path.exists() and autoregister.status(site_dir).startswith("enabled")
    return site_dir


def test_enabled_registers_on_import_peft_only(enabled, tmp_path):
    """Nothing is imported at interpreter start; peft's import brings NoRA; transformers then loads an adapter
    folder without any ``import nora_peft`` in the program."""
    base = tiny_causal_lm("llama")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = get_peft_model(tiny_causal_lm("llama"), NoraConfig(r=2))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    out = _probe(enabled, str(tmp_path / "adapter"))
    assert out == {"nora_loaded_at_start": False, "registered": True, "warnings": [], "nora_layers": 4}


def test_broken_nora_peft_never_breaks_peft(enabled, tmp_path):
    broken = tmp_path / "broken" / "nora_peft"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('simulated broken install')\n")
    out = _probe(enabled, pythonpath=str(broken.parent))
    assert out["registered"] is False and not out["nora_loaded_at_start"]
    assert len(out["warnings"]) == 1 and "simulated broken install" in out["warnings"][0]


def test_env_switch_and_disable(enabled):
    assert _probe(enabled, NORA_PEFT_AUTOREGISTER="0")["registered"] is False
    assert autoregister.disable(enabled) and not autoregister.disable(enabled)
    assert autoregister.status(enabled).startswith("disabled") and not list(enabled.iterdir())


def test_pth_is_one_import_line_and_a_removed_hook_is_a_no_op(tmp_path):
    line = autoregister.pth_line(tmp_path / "gone.py")
    assert line.startswith("import ") and line.count("\n") == 1  # site.py executes only lines starting with import
    exec(line, {})  # the hook file does not exist: nothing happens, nothing raises


def test_cli_prints_the_line_and_never_writes_site_packages(capsys, tmp_path):
    before = sorted(p.name for p in autoregister.site_dir().iterdir())
    assert autoregister.main(["pth"]) == 0
    assert capsys.readouterr().out == autoregister.pth_line()
    assert autoregister.main(["site-dir"]) == 0 and capsys.readouterr().out.strip() == str(autoregister.site_dir())
    assert autoregister.main(["status", "--site-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("disabled")
    assert sorted(p.name for p in autoregister.site_dir().iterdir()) == before


#: issue 19's repro: a probe for peft (transformers' is_peft_available) must not use up the hook
FIND_SPEC_FIRST = """
import importlib.util, json, site, sys
site.addsitedir(sys.argv[1])
probed = importlib.util.find_spec("peft") is not None and "nora_peft" not in sys.modules
import peft
from peft import mapping
print(json.dumps([probed, "nora_peft" in sys.modules, "NORA" in mapping.PEFT_TYPE_TO_CONFIG_MAPPING]))
"""

#: transformers first (it probes for peft), then its own adapter loading; the program never names nora_peft or peft
TRANSFORMERS_ONLY = """
import json, site, sys
site.addsitedir(sys.argv[1])
import torch
from transformers import AutoModelForCausalLM, pipeline
adapter, ids = sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
model = AutoModelForCausalLM.from_pretrained(adapter).eval()
with torch.no_grad():
    logits = model(ids).logits.tolist()
pipe = pipeline("text-generation", model=adapter)
tokens = pipe("abc", max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
print(json.dumps({"logits": logits, "pipeline": [int(t) for t in tokens]}))
"""

LM_EVAL_HFLM = """
import json, site, sys
site.addsitedir(sys.argv[1])
from lm_eval.models.huggingface import HFLM
lm = HFLM(pretrained=sys.argv[2], peft=sys.argv[3], device="cpu", batch_size=1)
print(json.dumps({"nora_layers": sum(hasattr(m, "nora_up") for m in lm.model.modules())}))
"""


def test_probe_for_peft_does_not_use_up_the_hook(enabled):
    assert _probe(enabled, script=FIND_SPEC_FIRST) == [True, True, True]


def test_transformers_from_pretrained_and_pipeline_without_import_nora_peft(enabled, saved):  # noqa: F811
    base_dir, adapter_dir, expected = saved
    out = _probe(enabled, str(adapter_dir), json.dumps(input_ids().tolist()), script=TRANSFORMERS_ONLY)
    torch.testing.assert_close(torch.tensor(out["logits"]), expected)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    ids = tiny_tokenizer()("abc", return_tensors="pt").input_ids
    greedy = peft_model.eval().generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out["pipeline"] == greedy[0].tolist()


def test_lm_eval_hflm_peft_without_import_nora_peft(enabled, saved):  # noqa: F811
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed: pip install 'nora-peft[lm-eval]'")
    base_dir, adapter_dir, _ = saved
    assert _probe(enabled, str(base_dir), str(adapter_dir), script=LM_EVAL_HFLM) == {"nora_layers": 4}


class _Loader:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def create_module(self, spec) -> None:
        return None  # the default module

    def exec_module(self, module) -> None:
        self.log.append("exec")


class _Finder:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, _Loader(self.log)) if fullname == "nora_fake_mod" else None


def test_after_import_waits_for_execution_not_lookup(monkeypatch):
    """Lookups alone (any number) run nothing and keep the finder; the first execution runs the callback once."""
    log: list[str] = []
    monkeypatch.setattr(sys, "meta_path", [_Finder(log), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "nora_fake_mod", raising=False)
    _peft_hook.after_import("nora_fake_mod", lambda: log.append("callback"))
    _peft_hook.after_import("nora_fake_mod", lambda: log.append("second callback"))
    hooks = [f for f in sys.meta_path if isinstance(f, _peft_hook.AfterImportFinder)]
    assert len(hooks) == 1  # one finder per module name
    for _ in range(3):
        assert importlib.util.find_spec("nora_fake_mod") is not None
    assert log == [] and hooks[0] in sys.meta_path
    import nora_fake_mod  # noqa: F401

    assert log == ["exec", "callback", "second callback"] and hooks[0] not in sys.meta_path
    monkeypatch.delitem(sys.modules, "nora_fake_mod")
    import nora_fake_mod  # noqa: F401, F811  (a re-import runs the module, not the callbacks)

    assert log == ["exec", "callback", "second callback", "exec"]
    _peft_hook.after_import("nora_fake_mod", lambda: log.append("now"))  # already imported: runs at once
    assert log[-1] == "now"


def test_two_copies_of_the_hook_share_one_wrapped_loader(monkeypatch):
    """The ``.pth`` line's copy of the hook and the package's own (``import nora_peft`` before peft) both fire, once."""
    log: list[str] = []
    monkeypatch.setattr(sys, "meta_path", [_Finder(log), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "nora_fake_mod", raising=False)
    source = Path(_peft_hook.__file__).read_text()
    copies = [{"__name__": "copy"}, {"__name__": "copy"}]
    for i, namespace in enumerate(copies):
        exec(compile(source, _peft_hook.__file__, "exec"), namespace)
        namespace["after_import"]("nora_fake_mod", lambda i=i: log.append(f"copy {i}"))
    assert importlib.util.find_spec("nora_fake_mod") is not None and log == []
    import nora_fake_mod  # noqa: F401

    assert log == ["exec", "copy 0", "copy 1"] or log == ["exec", "copy 1", "copy 0"]
    assert not [f for f in sys.meta_path if type(f).__name__ == "AfterImportFinder" and f.name == "nora_fake_mod"]


def test_messages_name_only_real_commands():
    """The docs and the warning name the autoregister CLI's real actions (pth, site-dir, status), nothing else."""
    actions = {"pth", "site-dir", "status"}
    texts = [Path(p).read_text() for p in (_peft_hook.__file__, autoregister.__file__, ROOT / "nora_peft/__init__.py")]
    texts.append((ROOT / "docs/ecosystem.md").read_text())
    named = {m for text in texts for m in re.findall(r"nora_peft\.autoregister ([a-z][a-z-]*)", text)}
    assert named and named <= actions, named - actions
    with pytest.raises(SystemExit):
        autoregister.main(["enable"])


def test_a_loader_shared_by_several_modules_fires_only_for_the_awaited_one():
    """zipimport hands one loader to every module of an archive: executing another module through the wrapped loader
    must not run the callbacks waiting for ``peft``."""
    import types

    from nora_peft import _peft_hook

    class SharedLoader:
        def exec_module(self, module):
            pass

    loader, fired = SharedLoader(), []
    finder = _peft_hook.AfterImportFinder("peft_awaited")
    finder.callbacks.append(lambda: fired.append(True))
    _peft_hook._wrap_exec_module(loader, finder)
    loader.exec_module(types.ModuleType("some_other_module_of_the_archive"))
    assert fired == []
    loader.exec_module(types.ModuleType("peft_awaited"))
    assert fired == [True]
