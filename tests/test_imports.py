"""The core imports light: ``import nora_peft`` loads none of the lab's or the server's dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nora_peft import cli

# accelerate and pyyaml are exempt: peft itself imports them.
HEAVY = ["datasets", "matplotlib", "fastapi", "uvicorn", "httpx", "nora_peft.lab", "nora_peft.serve"]


def test_core_import_loads_no_lab_or_server_dependency():
    code = f"import sys, json; import nora_peft; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_missing_extra_names_the_extra(monkeypatch):
    def fake_import(name):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with pytest.raises(SystemExit, match=r"pip install 'nora-peft\[serve\]'"):
        cli.import_room("nora_peft.serve.cli")


def test_unrelated_missing_module_is_not_blamed_on_an_extra(monkeypatch):
    def fake_import(name):
        raise ModuleNotFoundError("No module named 'nonexistent_pkg'", name="nonexistent_pkg")

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with pytest.raises(ModuleNotFoundError):
        cli.import_room("nora_peft.lab.train")


def test_import_graph_runs_from_application_to_core():
    """Core modules never import the lab or the server; the lab never imports the server (checked on the source)."""
    from pathlib import Path

    import nora_peft

    root = Path(nora_peft.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        text = path.read_text()
        is_core = len(rel) == 1 and rel[0] != "cli.py"
        if is_core and ("from .lab" in text or "from .serve" in text or "nora_peft.lab" in text):
            offenders.append(str(path))
        if (
            rel[0] == "lab"
            and ("serve" in text.replace("serves", ""))
            and ("from ..serve" in text or "nora_peft.serve" in text)
        ):
            offenders.append(str(path))
    assert offenders == []


def test_no_import_cycles_between_modules():
    """The module import graph of nora_peft (top-level and lazy imports alike) has no cycle."""
    import ast
    from pathlib import Path

    import nora_peft

    root = Path(nora_peft.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("nora_peft", *path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {}
    for name, (path, is_pkg) in modules.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                targets |= {t for t in [target, *names] if t in modules and t != name}
        graph[name] = {t for t in targets if not name.startswith(t + ".")}  # a module's own package __init__ is fine
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node) :] + [node])}")
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for module in sorted(graph):
        visit(module)
