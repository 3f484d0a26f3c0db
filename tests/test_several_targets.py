"""nvit_prune.py --latency_target 0.8,0.6: one run, a compact model scored at each target,
pareto.png, and a resume between targets that replays the uninterrupted run."""
from __future__ import annotations

import json
import signal

import pytest
import torch

import flags
import models
from helpers import FAST, PRUNE_FLAGS, run_script, write_dense_model
from models.flops import count_macs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_dense_model(tmp_path_factory.mktemp("dense") / "dense.pth")


def prune(dense, out, *extra):
    run_script("nvit_prune", [
        *FAST, *PRUNE_FLAGS, "--cost", "macs", "--pretrained-path", dense, "--epochs", "3",
        "--latency_target", "0.6,0.8", "--interval_prune", "3", "--speed-report-pairs", "0",
        "--output_dir", out, *extra])
    return json.loads((out / "dims_history.json").read_text())["steps"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dense):
    out = tmp_path_factory.mktemp("several")
    return out, prune(dense, out)


def test_one_compact_model_per_target_with_its_top1_and_cost(uninterrupted, dense, capsys):
    out, steps = uninterrupted
    reached = [r for r in steps if r.get("targets_reached")]
    assert [t for r in reached for t in r["targets_reached"]] == [0.8, 0.6]  # largest first
    entries = [e for r in reached for e in r["target_models"]]
    assert [e["file"] for e in entries] == ["pruned_0.8.pth", "pruned_0.6.pth"]
    dense_macs = count_macs(models.build_model("deit_base_patch16_224", checkpoint=dense))[0]
    ratios = []
    for e in entries:
        ckpt = torch.load(out / e["file"], map_location="cpu", weights_only=True)
        assert ckpt["target"] == e["target"] and ckpt["top1_pruned"] == e["test_acc1"]
        assert ckpt["cost_ratio"] == e["ratio"] <= e["target"]
        compact = models.build_model("deit_base_patch16_224", checkpoint=out / e["file"])
        assert count_macs(compact)[0] / dense_macs == pytest.approx(ckpt["cost_ratio"], rel=1e-9)
        ratios.append(ckpt["cost_ratio"])
    assert ratios[0] > ratios[1]
    # the run went on after the first target and ended at the last
    assert steps.index(reached[0]) < len(steps) - 1 and steps[-1] is reached[-1]
    final = torch.load(out / "pruned_checkpoint.pth", weights_only=True)
    assert final["cost_ratio"] == ratios[-1]
    assert (out / "pareto.png").stat().st_size > 1000
    # the top-1 stored is what --eval of the file measures
    capsys.readouterr()
    run_script("revit_scratch", [*FAST, "--eval", "--finetune", out / "pruned_0.8.pth"])
    assert f"top-1 {entries[0]['test_acc1']:.2f}%" in capsys.readouterr().out


def test_resume_between_targets_replays_the_run(uninterrupted, dense, tmp_path, monkeypatch):
    import prune_recorder
    full, full_steps = uninterrupted
    line = prune_recorder.prune_step_line

    def stop_at_first_target(record, loop, cost):  # Ctrl-C as the first target is reached
        if record.get("targets_reached"):
            signal.raise_signal(signal.SIGINT)
        return line(record, loop, cost)
    monkeypatch.setattr(prune_recorder, "prune_step_line", stop_at_first_target)
    part = tmp_path / "part"
    with pytest.raises(SystemExit) as stopped:
        prune(dense, part)
    assert stopped.value.code == 130 and (part / "pruned_0.8.pth").is_file()
    assert not (part / "pruned_0.6.pth").exists()
    state = torch.load(part / "pruning_state.pth", weights_only=True)
    assert state["targets"] == [0.6]  # what is left to reach
    monkeypatch.setattr(prune_recorder, "prune_step_line", line)
    steps = prune(dense, part, "--resume")
    timing = ("seconds", "img_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in steps] == \
        [{k: v for k, v in r.items() if k not in timing} for r in full_steps]
    for name in ("pruned_0.8.pth", "pruned_0.6.pth"):
        a = torch.load(full / name, weights_only=True)["model"]
        b = torch.load(part / name, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_later_target_equals_a_run_with_that_target_alone(uninterrupted, dense, tmp_path):
    """Decisions do not depend on the target, and scoring at 0.8 mid-run changes nothing that
    follows: pruned_0.6.pth is bitwise what a run with --latency_target 0.6 ends with."""
    full, _ = uninterrupted
    alone = tmp_path / "alone"
    prune(dense, alone, "--latency_target", "0.6")
    assert not list(alone.glob("pruned_0*.pth")) and not (alone / "pareto.png").exists()
    a = torch.load(full / "pruned_0.6.pth", weights_only=True)
    b = torch.load(alone / "pruned_checkpoint.pth", weights_only=True)
    assert a["dims"] == b["dims"] and a["top1_pruned"] == b["top1_pruned"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_targets_flag_parsing():
    assert flags.cost_targets("0.19,0.54, 0.39") == (0.54, 0.39, 0.19)
    assert flags.cost_targets("0") == (0.0,)
    for bad in ("0.5,0", "1", "0.5,,0.3", "x"):
        with pytest.raises(Exception, match="cannot be one of several|must be in|expected"):
            flags.cost_targets(bad)
