"""``torchrun --nproc_per_node 2`` runs the same ``train()`` under DDP (gloo on CPU): both ranks end with identical
adapter weights, equal to one process training on the same global batches, and only rank 0 writes the run dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from nora_peft.io import read_json, read_jsonl
from nora_peft.lab.train import train
from tests.lab.test_train import make_tiny_model_dir, small_config

SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from transformers import TrainerCallback
from nora_peft.lab.train import train
from tests.lab.test_train import small_config

class DumpWeights(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = {{n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}}
        torch.save(weights, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))

train(small_config({model!r}, {run!r}, **{kwargs!r}), callbacks=[DumpWeights()])
"""


@pytest.mark.parametrize("method", ["nora", "lora"])
def test_two_process_ddp_matches_single_process(tmp_path, method):
    torch.set_num_threads(1)
    model = make_tiny_model_dir(tmp_path / "tiny")
    # dropout 0: the only randomness left is the data order, which DDP shards from the same global permutation
    kwargs = dict(max_steps=3, save_steps=3, adapter={"method": method, "r": 4, "dropout": 0.0}, batch_size=2)
    script = tmp_path / "ddp_train.py"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
    script.write_text(
        textwrap.dedent(SCRIPT).format(
            root=root, out=str(tmp_path), model=model, run=str(tmp_path / "ddp"), kwargs=kwargs
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # DDP keeps the replicas identical

    # one process with the global batch (2 ranks x 2) sees the same examples per step -> the same update
    single = train(small_config(model, tmp_path / "single", **{**kwargs, "batch_size": 4}))
    ddp_adapter = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    single_adapter = load_file(single / "adapter" / "adapter_model.safetensors")
    for k in single_adapter:
        torch.testing.assert_close(ddp_adapter[k], single_adapter[k], rtol=1e-4, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in ddp_adapter.items() if "down" in k or "lora_B" in k)  # it trained

    # rank 0 alone wrote the run dir: one log line per step, world size recorded
    summary = read_json(tmp_path / "ddp" / "train_summary.json")
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert [r["step"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert summary["tokens_seen"] == read_json(single / "train_summary.json")["tokens_seen"]  # gathered over ranks
