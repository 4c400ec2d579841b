"""The import rules of DESIGN.md, checked on the source and in fresh interpreters: ``import nora_peft`` loads none
of the lab's or the server's dependencies (nor torch or peft); imports run from application to core (core: the root
modules except ``cli.py``, ``tuner/``, ``kernels/``; then ``bases/``; then ``lab/`` and ``serve/``, which never import
each other); no module imports another module's private (``_x``) name; every module imports on its own."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import nora_peft
from nora_peft import cli

ROOT = Path(nora_peft.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source path, is a package ``__init__``), for every module of nora_peft."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("nora_peft", *path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return modules


def _imports(name: str, path: Path, is_pkg: bool) -> list[tuple[str, list[str], int]]:
    """Each import statement of a module (top-level and lazy alike): (absolute module, imported names, line)."""
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.append(
                (".".join(base + ([node.module] if node.module else [])), [a.name for a in node.names], node.lineno)
            )
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
    return found


def _room(name: str) -> str:
    """core / bases / lab / serve, as DESIGN.md's layers (cli.py sits above them all)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in ("bases", "lab", "serve"):
        return parts[1]
    return "cli" if name == "nora_peft.cli" else "core"


#: room -> the rooms it must not import
FORBIDDEN = {"core": {"bases", "lab", "serve"}, "bases": {"lab", "serve"}, "serve": {"lab"}, "lab": {"serve"}}

# accelerate and pyyaml are exempt: peft itself imports them.
HEAVY = ["datasets", "matplotlib", "fastapi", "uvicorn", "httpx", "nora_peft.lab", "nora_peft.serve"]


def _fresh(code: str):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_core_import_loads_no_lab_or_server_dependency():
    code = f"import sys, json; import nora_peft; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    assert _fresh(code) == []
    # peft's own import brings the lab's dependencies it needs (accelerate, yaml), never the rest
    code = code.replace("import nora_peft;", "import nora_peft, peft; from nora_peft import NoraConfig;")
    assert _fresh(code) == []


def test_import_is_light_and_registers_when_peft_comes():
    """``import nora_peft`` imports neither torch nor peft; NoRA is registered once peft is imported, whichever
    way (peft first, peft after, a NoRA class first, a submodule first), so peft's own API loads NoRA."""
    check = "from peft import mapping; registered = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get('NORA')"
    code = (
        "import sys, json; import nora_peft; heavy = [m for m in ('torch', 'peft') if m in sys.modules]\n"
        f"{check}\nprint(json.dumps([heavy, registered is nora_peft.NoraConfig]))"
    )
    assert _fresh(code) == [[], True]
    for first in ("import peft; import nora_peft", "import nora_peft.tuner.config", "from nora_peft import NoraConfig"):
        assert _fresh(
            f"import json; {first}; import nora_peft; {check}; print(json.dumps(registered is nora_peft.NoraConfig))"
        )


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
    """core imports no bases/lab/serve, bases no lab/serve, serve no lab, lab no serve (checked on the source,
    lazy imports included)."""
    offenders = []
    for name, (path, is_pkg) in _modules().items():
        for target, _, line in _imports(name, path, is_pkg):
            if target.startswith("nora_peft") and _room(target) in FORBIDDEN.get(_room(name), ()):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{line} ({_room(name)}) imports {target}")
    assert offenders == []


def test_the_room_rules_see_an_offender(tmp_path):
    """The source check above finds what it looks for (a fake serve module importing the lab, absolutely and
    relatively)."""
    fake = tmp_path / "m.py"
    fake.write_text("from ..lab.stats import mean\nimport nora_peft.lab.rundir\n")
    targets = [t for t, _, _ in _imports("nora_peft.serve.m", fake, False)]
    assert targets == ["nora_peft.lab.stats", "nora_peft.lab.rundir"]
    assert all(_room(t) in FORBIDDEN[_room("nora_peft.serve.m")] for t in targets)
    assert _room("nora_peft.tuner.model") == _room("nora_peft.checkpoint") == "core" and _room("nora_peft.cli") == "cli"


def _private_imports() -> list[str]:
    modules = _modules()
    found = []
    for name, (path, is_pkg) in modules.items():
        for target, names, line in _imports(name, path, is_pkg):
            if target not in modules or target == name:
                continue
            private = [
                n for n in names if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in modules
            ]
            found.extend(f"{path.relative_to(ROOT.parent)} imports {n} from {target} (line {line})" for n in private)
    return found


def test_no_module_imports_another_modules_private_name():
    """A ``_name`` is its module's own: another module needing it means it should be public (or live elsewhere)."""
    assert _private_imports() == []


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


@pytest.mark.slow
def test_every_core_module_imports_alone_in_a_fresh_process():
    """Each core module imported first, in a fresh process (torch and transformers preloaded, peft not: the import
    order a lazy ``import nora_peft`` leaves to its submodules), imports and leaves NoRA registered."""
    names = [n for n in _modules() if _room(n) == "core"]
    code = f"""
import json, os, sys, traceback
import torch, transformers  # the slow part, shared by every fork
failures = {{}}
for name in {names!r}:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        try:
            __import__(name)
            from peft import mapping
            assert "NORA" in mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "NoRA not registered"
            os._exit(0)
        except BaseException as err:
            os.write(write, f"{{type(err).__name__}}: {{err}}".encode()[:2000])
            os._exit(1)
    os.close(write)
    os.wait()
    message = os.read(read, 4000).decode()
    if message:
        failures[name] = message
print(json.dumps(failures))
"""
    assert _fresh(code) == {}
