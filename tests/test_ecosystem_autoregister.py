"""Opt-in auto-registration (issue 9, finding 6): with the ``.pth`` file enabled, a process that never imports
nora_peft loads NoRA adapters through peft and transformers; a broken nora-peft never breaks ``import peft``.

The ``.pth`` file goes into a temporary directory added with ``site.addsitedir`` (as site-packages is at start-up),
never into this environment's real site-packages, which other processes share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import get_peft_model

from nora_peft import NoraConfig, autoregister

from .tiny_models import tiny_causal_lm

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


def _probe(site_dir: Path, *args: str, pythonpath: str | None = None, **env: str) -> dict:
    full_env = {**os.environ, **env}
    full_env.pop("PYTHONPATH", None)
    if pythonpath:
        full_env["PYTHONPATH"] = pythonpath
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(site_dir), *args],
        capture_output=True,
        text=True,
        cwd=site_dir,  # not the checkout: only the installed (or the broken) nora_peft can be found
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
