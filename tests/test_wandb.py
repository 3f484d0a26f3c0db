"""--log-wandb: the scalars of log.txt go to Weights & Biases, each series on its own axis;
without wandb installed the flag is one line of error, and wandb is never required."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest

from helpers import FAST, PRUNE_FLAGS, TRAIN, run_script, write_dense_model, write_dims

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts


class FakeRun:
    """Records what the scripts ask of a wandb run (the calls of wandb's public API)."""

    def __init__(self, **init):
        self.init, self.metrics, self.rows, self.finished = init, {}, [], False

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, data):
        self.rows.append(dict(data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_training_logs_each_epoch_to_wandb(tmp_path, fake_wandb):
    out = tmp_path / "run"
    run_script("revit_scratch", [*TRAIN, "--dims", write_dims(tmp_path / "d.yaml"), "--epochs",
                                 "2", "--output_dir", out, "--log-wandb", "--wandb-project", "p"])
    (run,) = fake_wandb
    assert run.init["project"] == "p" and run.init["name"] == "run" and run.finished
    assert run.init["config"]["epochs"] == 2 and run.init["config"]["log_wandb"] is True
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in run.rows] == [r["epoch"] for r in log] == [0, 1]
    for row, rec in zip(run.rows, log):
        assert row["test_acc1"] == rec["test_acc1"] and row["train_loss"] == rec["train_loss"]
    assert run.metrics["test_acc1"] == "epoch" and run.metrics["epoch"] is None


def test_pruning_logs_prune_steps_and_epochs_on_their_axes(tmp_path, fake_wandb):
    dense = write_dense_model(tmp_path / "dense.pth")
    out = tmp_path / "p"
    run_script("nvit_prune", [*FAST, *PRUNE_FLAGS, "--cost", "macs", "--pretrained-path", dense,
                              "--epochs", "1", "--latency_target", "0", "--speed-report-pairs",
                              "0", "--output_dir", out, "--log-wandb"])
    (run,) = fake_wandb
    steps = json.loads((out / "dims_history.json").read_text())["steps"]
    prune_rows = [r for r in run.rows if "prune/step" in r]
    assert [r["prune/step"] for r in prune_rows] == [s["step"] for s in steps]
    assert [r["prune/ratio"] for r in prune_rows] == [s["ratio"] for s in steps]
    assert run.metrics["prune/loss_kl"] == "prune/step"
    assert [r["epoch/epoch"] for r in run.rows if "epoch/epoch" in r] == [0]
    assert run.metrics["epoch/test_acc1"] == "epoch/epoch" and run.finished


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_flag_without_wandb_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_script("revit_scratch", [*TRAIN, "--dims", write_dims(tmp_path / "d.yaml"),
                                     "--epochs", "1", "--output_dir", out, "--log-wandb"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err == "error: --log-wandb needs the wandb package " \
                                        "(pip install wandb)\n"
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_real_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_script("revit_scratch", [*TRAIN, "--dims", write_dims(tmp_path / "d.yaml"), "--epochs",
                                 "1", "--output_dir", out, "--log-wandb"])
    assert list((out / "wandb").glob("offline-run-*"))
