"""``nora study`` command-line defaults."""

from __future__ import annotations

import torch

from nora_peft.lab.study import cli


def test_default_jobs_one_process_per_core_on_cpu_capped_at_4(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cores, jobs in ((1, 1), (2, 2), (3, 3), (16, 4), (None, 1)):
        monkeypatch.setattr(cli.os, "cpu_count", lambda cores=cores: cores)
        assert cli.default_jobs() == jobs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPU: cells use the devices, one process
    assert cli.default_jobs() == 1
