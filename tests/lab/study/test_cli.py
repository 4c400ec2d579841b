"""``nora study`` command-line defaults."""

from __future__ import annotations

import pytest
import torch

from nora_peft.lab.study import cli


def test_default_jobs_one_process_per_core_on_cpu_capped_at_4(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cores, jobs in ((1, 1), (2, 2), (3, 3), (16, 4), (None, 1)):
        monkeypatch.setattr(cli.os, "cpu_count", lambda cores=cores: cores)
        assert cli.default_jobs() == jobs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPU: cells use the devices, one process
    assert cli.default_jobs() == 1


GIB = cli.GIB


class FakeGPU:
    """A clock, a GPU of ``total`` GiB and shard processes that take ``per`` GiB ``alloc_s`` after they start and give
    it back when they exit ``run_s`` after their start."""

    def __init__(self, total: float, per: float = 16, alloc_s: float = 5, run_s: float = 100):
        self.t, self.total, self.per, self.alloc_s, self.run_s = 0.0, total, per, alloc_s, run_s
        self.procs: list[FakeGPU.Proc] = []

    class Proc:
        def __init__(self, gpu: FakeGPU, cmd):
            self.gpu, self.cmd, self.start = gpu, cmd, gpu.t

        def poll(self):
            return 0 if self.gpu.t >= self.start + self.gpu.run_s else None

        def wait(self):
            self.gpu.t = max(self.gpu.t, self.start + self.gpu.run_s)
            return 0

    def popen(self, cmd, env):
        self.procs.append(self.Proc(self, cmd))
        return self.procs[-1]

    def free_bytes(self) -> int:
        held = sum(self.per for p in self.procs if p.poll() is None and self.t >= p.start + self.alloc_s)
        return int((self.total - held) * GIB)

    def sleep(self, s: float) -> None:
        self.t += s

    def launch(self, n: int, gpu: bool = True, log=None) -> list[float]:
        codes = cli.launch([[str(i)] for i in range(n)], {}, free_bytes=self.free_bytes if gpu else None,
                           need_bytes=int(self.per * GIB), settle_s=60, poll_s=1, popen=self.popen,
                           clock=lambda: self.t, sleep=self.sleep, log=log or (lambda m: None))  # fmt: skip
        assert codes == [0] * n and [p.cmd for p in self.procs] == [[str(i)] for i in range(n)]
        return [p.start for p in self.procs]


def test_jobs_on_a_gpu_with_room_for_all_start_at_once():
    assert FakeGPU(total=139).launch(8) == [0.0] * 8  # 8 x 16 GiB fit in 139 GiB


def test_jobs_on_a_gpu_start_only_while_their_memory_is_free():
    """Room for two: the third waits, although the first two have not allocated yet when it is considered (their
    memory is reserved for settle_s), and starts when the first exits and frees its memory."""
    starts = FakeGPU(total=40).launch(4)
    assert starts[:2] == [0.0, 0.0] and starts[2] == 100.0 and starts[3] == 100.0


def test_jobs_start_when_nothing_of_ours_runs_even_if_the_gpu_is_full():
    said = []
    starts = FakeGPU(total=10).launch(2, log=said.append)  # another tenant holds all but 10 GiB
    assert starts == [0.0, 100.0] and len(said) == 2 and "less than --job-memory 16" in said[0]


def test_jobs_on_a_cpu_start_at_once_without_asking_about_memory():
    gpu = FakeGPU(total=0)
    assert gpu.launch(3, gpu=False) == [0.0] * 3


def test_spec_overrides_are_applied_before_validation():
    from nora_peft.lab.study.spec import apply_overrides, load_spec

    spec = load_spec("gsm8k-gpu", ["seeds=[0]", "train.max_steps=2", "model=null", "eval.max_generate=2"])
    assert spec.seeds == [0] and spec.train["max_steps"] == 2 and spec.model is None
    assert spec.eval["max_generate"] == 2 and spec.fingerprint() != load_spec("gsm8k-gpu").fingerprint()
    assert apply_overrides({"a": 1}, ["b.c.d=x"]) == {"a": 1, "b": {"c": {"d": "x"}}}
    for bad, match in (("seeds", "KEY=VALUE"), ("a.b=1", "not a mapping"), ("x=[1", "not valid YAML")):
        with pytest.raises(ValueError, match=match):
            apply_overrides({"a": 1}, [bad])
    with pytest.raises(ValueError, match=r"ranks .* must be distinct"):  # the override is validated like the file
        load_spec("gsm8k-gpu", ["ranks=[4, 4]"])


def test_max_steps_caps_the_probe_and_gguf_reaches_the_shard_processes(monkeypatch, tmp_path):
    import argparse

    from nora_peft.bases.named import SMOLLM2_GGUF_ENV

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    monkeypatch.setenv(SMOLLM2_GGUF_ENV, "unset after the test")  # main sets it; monkeypatch restores the original
    gguf = tmp_path / "m.gguf"
    args = parser.parse_args(["gsm8k-gpu", "--max-steps", "2", "--set", "seeds=[0]", "--gguf", str(gguf), "--list",
                              "--out", str(tmp_path / "out")])  # fmt: skip
    spec = cli.load_study(args)
    assert spec.train["max_steps"] == 2 and spec.probe["max_steps"] == 2 and spec.seeds == [0]
    assert cli.main(args) == 0 and cli.os.environ[SMOLLM2_GGUF_ENV] == str(gguf)
    cmd = cli._shard_command(args, tmp_path, "1/4", 2, ())
    assert cmd[cmd.index("--shard") + 1] == "1/4" and ["--set", "seeds=[0]"] == cmd[-4:-2]
    assert cmd[-2:] == ["--max-steps", "2"]


def test_latency_step_measures_on_the_cells_device_in_their_dtype(monkeypatch, tmp_path, default_base_path):
    """On a GPU the cells' base is bf16 on the device: the latency step measures that model, not an fp32 CPU copy."""
    from nora_peft.lab.bench import harness
    from nora_peft.lab.bench import latency as bench_latency
    from nora_peft.lab.study.latency import latency_step
    from nora_peft.lab.study.spec import parse_spec

    spec = parse_spec({"name": "t", "datasets": ["arith"], "methods": ["lora", "nora"], "ranks": [2], "lr": 1e-3,
                       "train": {"precision": "bf16"}, "latency": {"rank": 2}})  # fmt: skip
    seen = {}

    def fake_measure(model, adapter, **kwargs):
        p = next(model.parameters())
        seen.update(device=p.device, dtype=p.dtype, rank=kwargs["rank"])
        return {"rank": kwargs["rank"], "rounds": []}

    monkeypatch.setattr(bench_latency, "measure_latency", fake_measure)
    monkeypatch.setattr(harness, "pick_device", lambda name="auto": torch.device("cpu"))  # stands in for cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    latency_step(spec, tmp_path, lambda m: None)
    assert seen == {"device": torch.device("cpu"), "dtype": torch.bfloat16, "rank": 2}
    assert (tmp_path / "latency.json").exists()


@pytest.mark.parametrize("probe_only", [False, True])
def test_a_failed_shard_fails_the_command_also_under_probe_only(monkeypatch, tmp_path, probe_only):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    monkeypatch.setattr("nora_peft.bases.named.resolve_model", lambda name: name)  # no base conversion here
    monkeypatch.setattr(cli, "_run_jobs", lambda *a, **k: 3)  # the shard processes exit 3
    args = parser.parse_args(["gsm8k", "--jobs", "2", "--out", str(tmp_path / "out"), *(["--probe-only"] * probe_only)])
    assert cli.main(args) == 3
