"""``lab/rundir.py``: the run dir contract depends on no particular config class (the train room depends on it, not
the other way round)."""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

import nora_peft.lab.rundir as rundir
from nora_peft.lab.rundir import check_run_dir


@dataclass
class OtherConfig:
    """A config that is not TrainConfig: the contract needs only resume / overwrite / identity / from_dict."""

    size: int = 1
    resume: bool = False
    overwrite: bool = False

    def identity(self) -> dict:
        return {"size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> OtherConfig:
        return cls(**d)


def test_rundir_imports_nothing_from_the_train_room():
    tree = ast.parse(Path(rundir.__file__).read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if "train" in m], modules


def test_check_run_dir_with_any_run_config(tmp_path):
    run = tmp_path / "run"
    assert check_run_dir(OtherConfig(), run) == "fresh"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(asdict(OtherConfig())))
    assert check_run_dir(OtherConfig(), run) == "fresh"  # same run, nothing trained yet
    with pytest.raises(FileExistsError, match="size: 1 -> 2"):
        check_run_dir(OtherConfig(size=2), run)
    assert check_run_dir(OtherConfig(size=2, overwrite=True), run) == "overwrite"
    (run / "train_summary.json").write_text("{}")
    assert check_run_dir(OtherConfig(resume=True), run) == "done"
