"""Training defaults a named base recommends: explicit value (flag or config file) > the base's default > the global
default, for the CLI and the Python API alike; the run's header says where the lr came from."""

from __future__ import annotations

import argparse

import pytest

from nora_peft.bases import named
from nora_peft.lab.train import TrainConfig, add_arguments, config_from_args, train
from nora_peft.lab.train.config import GLOBAL_DEFAULTS
from tests.lab.test_train import small_config, tiny_model  # noqa: F401  (a fixture)

EMBEDDED_LR = 1e-2  # the demo study's validation-chosen lr on the embedded base (docs/study.md)


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_the_embedded_base_recommends_the_demo_studys_lr_and_real_models_keep_the_global_one():
    assert named.training_defaults(None) == named.training_defaults("default") == {"lr": EMBEDDED_LR}
    assert named.training_defaults(named.SMOLLM2_NAME) == {} and named.training_defaults("/some/folder") == {}
    assert GLOBAL_DEFAULTS["lr"] == 2e-4
    for name, defaults in named.TRAINING_DEFAULTS.items():  # a base may only recommend a field that can take it
        assert set(defaults) <= set(GLOBAL_DEFAULTS), name


@pytest.mark.parametrize(
    ("argv", "lr", "from_base"),
    [
        ((), EMBEDDED_LR, {"lr": EMBEDDED_LR}),  # no flags: the embedded base's default
        (("--lr", "3e-4"), 3e-4, {}),  # an explicit flag wins over the base's default
        (("--model", "smollm2-135m"), 2e-4, {}),  # a base with no recommendation: the global default
        (("--model", "smollm2-135m", "--lr", "5e-5"), 5e-5, {}),
        (("--model", "default", "--lr", str(EMBEDDED_LR)), EMBEDDED_LR, {}),  # given, even if equal: not the base's
    ],
)
def test_cli_precedence_flag_over_base_default_over_global_default(argv, lr, from_base):
    cfg = parse(*argv)
    assert cfg.lr == lr and cfg.defaults_from_base == from_base


def test_a_config_file_counts_as_given_and_a_flag_overrides_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.003\n")
    assert parse("--config", str(path)).lr == 0.003  # the file's lr wins over the base's
    assert parse("--config", str(path), "--lr", "0.004").lr == 0.004  # the flag wins over the file
    path.write_text("model: smollm2-135m\n")  # the file names a base with no recommendation and no lr
    assert parse("--config", str(path)).lr == GLOBAL_DEFAULTS["lr"]


def test_python_api_precedence_and_a_named_base_that_says_otherwise(monkeypatch):
    assert TrainConfig().lr == EMBEDDED_LR and TrainConfig(lr=1e-3).lr == 1e-3
    assert TrainConfig(model="smollm2-135m").lr == GLOBAL_DEFAULTS["lr"]
    monkeypatch.setitem(named.TRAINING_DEFAULTS, named.SMOLLM2_NAME, {"lr": 5e-5})
    cfg = TrainConfig(model="smollm2-135m")
    assert cfg.lr == 5e-5 and cfg.defaults_from_base == {"lr": 5e-5}
    assert TrainConfig(model="smollm2-135m", lr=1e-4).lr == 1e-4


def test_a_saved_config_reads_back_the_lr_it_ran_with(tmp_path):
    """config.json holds the resolved lr: a later change of a base's default does not change a finished run."""
    saved = TrainConfig().to_dict()
    assert saved["lr"] == EMBEDDED_LR
    assert TrainConfig.from_dict({**saved, "model": "smollm2-135m"}).lr == EMBEDDED_LR


def test_help_names_the_base_default(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    assert "the base's recommended one, else 0.0002" in helps["--lr"] and helps["--lr"].endswith("(default: 0.01)")


def test_the_header_says_the_lr_came_from_the_base(tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(named.TRAINING_DEFAULTS, tiny_model, {"lr": 1e-3})
    cfg = small_config(tiny_model, tmp_path / "run", max_steps=1, lr=None)
    assert cfg.lr == 1e-3 and cfg.defaults_from_base == {"lr": 1e-3}
    train(cfg)
    err = capsys.readouterr().err
    header = next(line for line in err.splitlines() if line.startswith("nora train:"))
    assert "lr 0.001 (the base's default; --lr overrides)" in header
    explicit = small_config(tiny_model, tmp_path / "run2", max_steps=1, lr=2e-3)
    train(explicit)
    header = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("nora train:"))
    assert "| lr 0.002 |" in header
