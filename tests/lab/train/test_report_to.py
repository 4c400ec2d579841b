"""``--report-to``: Trainer's own integrations (TensorBoard, MLflow, W&B, ...), off unless asked for."""

from __future__ import annotations

import pytest

from nora_peft.lab.train import TrainConfig, train, training_arguments
from tests.lab.test_train import small_config, tiny_model  # noqa: F401  (a fixture)


def test_report_to_parses_to_what_trainer_takes(tmp_path):
    assert TrainConfig().report_to == "none" and TrainConfig().report_targets() == []
    assert TrainConfig(report_to="tensorboard, mlflow").report_targets() == ["tensorboard", "mlflow"]
    args = training_arguments(TrainConfig(), tmp_path, "fp32")
    assert args.report_to == []  # nothing is sent anywhere unasked


def test_an_unknown_integration_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--report-to tensorbored: tensorbored is not supported, only .*tensorboard"):
        training_arguments(TrainConfig(report_to="tensorbored"), tmp_path, "fp32")
    assert not (tmp_path / "checkpoints").exists()


def test_report_to_does_not_change_what_a_run_is():
    """Where the logs go is how a run is watched, not what it trains: resuming with another --report-to is the
    same run."""
    assert TrainConfig(report_to="tensorboard").identity() == TrainConfig().identity()


def test_report_to_tensorboard_writes_event_files(tiny_model, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    run = train(small_config(tiny_model, tmp_path / "run", max_steps=2, report_to="tensorboard"))
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    quiet = train(small_config(tiny_model, tmp_path / "quiet", max_steps=2))
    assert not list(quiet.rglob("events.out.tfevents.*"))
