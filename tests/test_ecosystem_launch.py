"""``nora train`` says so when a launcher asked for several processes but the run has world size 1 (issue 9,
finding 8): ``accelerate launch --num_processes 2 --cpu`` starts accelerate's single-process launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nora_peft.lab.launch import requested_processes, warn_if_single_process

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([*ACCELERATE, "--num_processes", "2", "--cpu", "-m", "nora_peft.cli", "train"], {}, 2),
        ([*ACCELERATE, "--cpu", "--num-processes=4", "train.py"], {}, 4),
        (["python", "-m", "torch.distributed.run", "--nproc_per_node", "3", "x.py"], {}, 3),
        (["/usr/bin/torchrun", "--standalone", "--nproc-per-node=2", "x.py"], {}, 2),
        (["python", "my_sweep.py", "--num_processes", "8"], {}, None),  # not a launcher: its options mean nothing
        (["bash"], {"WORLD_SIZE": "2"}, 2),
        (["bash"], {}, None),
    ],
)
def test_requested_processes(argv, env, expected):
    asked = requested_processes(argv, env)
    assert (asked[0] if asked else None) == expected


def test_warns_only_when_world_size_is_one_but_more_were_asked():
    argv = [*ACCELERATE, "--num_processes", "2", "--cpu", "-m", "nora_peft.cli", "train"]
    with pytest.warns(RuntimeWarning, match=r"asked for 2 processes, but this run has world size 1.*--multi_gpu"):
        assert warn_if_single_process(1, argv=argv, env={}) is not None
    assert warn_if_single_process(2, argv=argv, env={}) is None
    assert warn_if_single_process(1, argv=["python", "-m", "nora_peft.cli", "train"], env={}) is None
    assert warn_if_single_process(1, argv=[*ACCELERATE, "--num_processes", "1", "x.py"], env={}) is None


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from nora_peft.lab.train import train
from tests.lab.test_train import small_config
train(small_config({model!r}, {run!r}, max_steps=1, save_steps=1))
"""


@pytest.mark.slow
def test_nora_train_under_accelerate_cpu_launcher_warns(tmp_path):
    """The real launcher, the real train(): one process runs, and it says that two were asked for."""
    from tests.lab.test_train import make_tiny_model_dir

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip(f"accelerate's launcher not found beside {sys.executable}")
    script = tmp_path / "train_once.py"
    model = make_tiny_model_dir(tmp_path / "tiny")
    script.write_text(textwrap.dedent(SCRIPT).format(root=str(ROOT), model=model, run=str(tmp_path / "run")))
    cmd = [str(accelerate), "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "asked for 2 processes, but this run has world size 1" in result.stderr
    assert (tmp_path / "run" / "train_summary.json").exists()
