"""``nora``: a command whose extra is missing says which extra and how to install it before any work starts, and the
top-level help never imports torch or peft (issue 19, ecosystem items 3 and 4)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from nora_peft import cli


def _without(monkeypatch, *names: str) -> list[str]:
    """Make ``names`` look uninstalled to ``find_spec``; returns the list of rooms the CLI then tries to import."""
    real_find_spec = importlib.util.find_spec
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)

    def find_spec(name, *args, **kwargs):
        return None if name in names else real_find_spec(name, *args, **kwargs)

    imported: list[str] = []
    monkeypatch.setattr(cli.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(cli, "import_room", lambda module: imported.append(module) or pytest.fail(module))
    return imported


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [
        (["train", "--method", "nora"], "datasets", "lab"),
        (["analyze", "runs/x"], "matplotlib", "lab"),
        (["study", "demo", "--jobs", "2"], "yaml", "lab"),
        (["study", "--help"], "accelerate", "lab"),
        (["serve", "--base", "default"], "fastapi", "serve"),
        (["serve"], "uvicorn", "serve"),
        (["lm-eval", "run", "--tasks", "x"], "lm_eval", "lm-eval"),
    ],
)
def test_missing_extra_stops_before_the_command_starts(monkeypatch, argv, missing, extra):
    imported = _without(monkeypatch, missing)
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    message = str(stop.value.code)
    assert f"'{extra}' extra" in message and f"pip install 'nora-peft[{extra}]'" in message and missing in message
    assert message.startswith(f"nora: nora {argv[0]} needs")
    assert imported == []  # the room (and so any work) never started


def test_every_missing_package_is_named_at_once(monkeypatch):
    _without(monkeypatch, "datasets", "matplotlib")
    with pytest.raises(SystemExit, match=r"datasets, matplotlib not installed"):
        cli.main(["eval", "runs/x"])


def test_core_command_and_installed_extras_pass_the_check(monkeypatch):
    _without(monkeypatch, "fastapi", "uvicorn", "lm_eval")
    cli.check_extra("base")  # the core install is enough for `nora base`
    for command in ("train", "eval", "analyze", "study", "bench"):
        cli.check_extra(command)  # the lab extra is installed here


def test_every_command_has_a_room_and_every_extra_a_package_list():
    assert set(cli.COMMAND_EXTRAS) <= set(cli.COMMANDS)
    assert set(cli.COMMAND_EXTRAS.values()) == set(cli.EXTRA_PACKAGES)


def test_top_level_help_imports_neither_torch_nor_peft():
    code = (
        "import sys, json, contextlib, io\n"
        "from nora_peft import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    code = cli.main([])\n"
        "print(json.dumps([code, 'serve' in out.getvalue(), [m for m in ('torch', 'peft', 'transformers') "
        "if m in sys.modules]]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [2, True, []]
