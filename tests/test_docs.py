"""The user guides name only files and modules that exist.

README.md and docs/*.md point readers at source files (``nora_peft/tuner/ops.py``), modules and their functions
(``nora_peft.bases.named.load_model_and_tokenizer``), tests and examples. A folder move leaves such names stale
without any other test noticing, so this reads every such name and resolves it against the checkout, statically
(no imports: the check costs milliseconds and needs none of the extras).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

#: a repository path as the guides write it (``nora_peft/kernels/mixed.py``, ``tests/serve/test_hostile.py``)
PATH_RE = re.compile(r"(?<![\w/.<>-])((?:nora_peft|tests|docs|examples|benchmarks|scripts)/[\w./-]*[\w/])")
#: a dotted name inside the package (``nora_peft.lab.bench.latency.measure_latency``)
DOTTED_RE = re.compile(r"(?<![\w./])(nora_peft(?:\.\w+)+)")


def _names(pattern: re.Pattern[str], text: str) -> set[str]:
    return set(pattern.findall(text))


def _top_level_names(source: Path) -> set[str]:
    """What a module defines or imports at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "_PUBLIC" for t in targets) and isinstance(node.value, ast.Dict):
                # nora_peft/__init__.py's lazy public names (loaded on first access by its __getattr__)
                names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def resolve_dotted(name: str, root: Path = ROOT) -> str | None:
    """None if ``name`` is a module of the checkout or a top-level name of one; else why it is not."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module or package
        base = root.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            if not rest or rest[0] in _top_level_names(module):
                return None
            return f"{'.'.join(parts[:cut])} has no top-level {rest[0]!r}"
    return "no such module"


def test_resolve_dotted_tells_modules_names_and_misses_apart(tmp_path: Path) -> None:
    pkg = tmp_path / "nora_peft" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "nora_peft" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .mod import thing as alias\n")
    (pkg / "mod.py").write_text("import os\nX: int = 1\ndef f():\n    pass\nclass C:\n    pass\n")
    for ok in (
        "nora_peft.sub",
        "nora_peft.sub.mod",
        "nora_peft.sub.mod.f",
        "nora_peft.sub.mod.C.method",
        "nora_peft.sub.mod.X",
        "nora_peft.sub.mod.os",
        "nora_peft.sub.alias",
    ):
        assert resolve_dotted(ok, tmp_path) is None, ok
    assert resolve_dotted("nora_peft.sub.mod.missing", tmp_path) == "nora_peft.sub.mod has no top-level 'missing'"
    assert resolve_dotted("nora_peft.gone.mod", tmp_path) == "nora_peft has no top-level 'gone'"
    assert resolve_dotted("other.mod", tmp_path) == "no such module"


def test_path_pattern_reads_paths_as_the_guides_write_them() -> None:
    text = "see `nora_peft/tuner/ops.py`, (docs/study.md#the-demo), nora_peft/lab/study/ and <out>/tests/x.py."
    assert _names(PATH_RE, text) == {"nora_peft/tuner/ops.py", "docs/study.md", "nora_peft/lab/study/"}


#: guides whose stale names their owners are updating (tests/test_model.py, tests/test_evaluate.py,
#: nora_peft/attention.py, ...); non-strict, so the check passes as soon as they are fixed: then drop the entry
PENDING: set[str] = set()


def _guide_param(path: Path):
    rel = path.relative_to(ROOT).as_posix()
    marks = [pytest.mark.xfail(reason=f"{rel} still names pre-layout paths", strict=False)] if rel in PENDING else []
    return pytest.param(path, id=rel, marks=marks)


@pytest.mark.parametrize("guide", [_guide_param(g) for g in GUIDES])
def test_guide_names_only_paths_and_modules_that_exist(guide: Path) -> None:
    text = guide.read_text()
    missing = [p for p in sorted(_names(PATH_RE, text)) if not (ROOT / p).exists()]
    stale = [f"{n} ({why})" for n in sorted(_names(DOTTED_RE, text)) if (why := resolve_dotted(n))]
    assert not missing and not stale, (
        f"{guide.relative_to(ROOT)} names what the checkout does not have; update the guide to the current layout "
        f"(DESIGN.md): paths {missing}, modules {stale}"
    )
