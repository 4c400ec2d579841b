"""The lab's shared helpers: one eval-mode context and one matplotlib setup, used by every room that needs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import nora_peft
from nora_peft.lab.plotting import pyplot, save
from nora_peft.lab.torch_utils import eval_mode

LAB = Path(nora_peft.__file__).parent / "lab"


def test_eval_mode_restores_the_previous_mode_even_on_error():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model[0].training
        raise RuntimeError("boom")
    assert model.training and model[0].training
    with eval_mode(model.eval()):
        pass
    assert not model.training  # an eval model stays in eval mode


def test_save_writes_the_figure_and_closes_it(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    path = save(fig, tmp_path / "sub" / "f.png")
    assert path.stat().st_size > 500 and not plt.fignum_exists(fig.number)


@pytest.mark.parametrize("pattern", [r"matplotlib\.use\(", r"\bmodel\.training\b"])
def test_each_helper_is_written_once(pattern):
    """The eval-mode helper and the matplotlib backend setup live in one module each (they were written twice)."""
    owners = [p.relative_to(LAB).as_posix() for p in LAB.rglob("*.py") if re.search(pattern, p.read_text())]
    assert len(owners) == 1, owners
