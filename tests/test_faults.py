"""Faults a run must survive: kill -9 between any two writes of an epoch, a full disk, a
second run started into the same folder, temporary files of killed runs, a diverged loss."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import atomic
import checkpoints
import run_folder
import utils
from helpers import ROOT, TRAIN, env, run, write_dims

# a recipe whose top-1 improves every epoch, so that each epoch writes a new best checkpoint
LEARNS = [*TRAIN, "--lr", "3e-3", "--batch-size", "32", "--no-repeated-aug", "--sched", "constant"]
TIME_KEYS = ("train_epoch_time",)  # the only values of a log line that may differ between runs


def records(folder):
    """log.txt as parsed records without wall-clock times (strict JSON: NaN would fail)."""
    lines = (folder / "log.txt").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.txt"))
              for line in lines]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in parsed]


def best_of(folder):
    ckpt = torch.load(folder / "best_checkpoint.pth", map_location="cpu", weights_only=True)
    return ckpt["epoch"], ckpt["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    dims = write_dims(root / "dims.yaml")
    out = root / "whole"
    run("revit_scratch.py", *LEARNS, "--dims", dims, "--epochs", "3", "--output_dir", out)
    history = records(out)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    accs = [r["test_acc1"] for r in history]
    assert accs[1] > accs[0] and accs[2] > accs[1], accs  # every epoch writes a best copy
    return dims, out


@pytest.mark.slow
@pytest.mark.parametrize("point,epoch", [("checkpoint", 1), ("checkpoint", 2), ("best", 2),
                                         ("log", 2)])
def test_kill_between_writes_then_resume_equals_uninterrupted(tmp_path, uninterrupted, point,
                                                              epoch):
    """SIGKILL right after an epoch's checkpoint, best copy or log.txt (in the middle of the
    run, or in its last epoch, where nothing later would repair them); --resume then rebuilds
    the log and the best checkpoint exactly as a run that was never killed has them."""
    dims, whole = uninterrupted
    out = tmp_path / "killed"
    args = [*LEARNS, "--dims", dims, "--epochs", "3", "--output_dir", out]
    e = env()
    e["NVIT_TEST_KILL_AT"] = f"{point}:{epoch}"
    proc = subprocess.run([sys.executable, str(ROOT / "revit_scratch.py"), *map(str, args)],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / run_folder.LOCK_FILE).exists()  # a dead run's lock, taken over below
    if point == "checkpoint":  # the kill left the epoch without its best copy and log line
        assert [r["epoch"] for r in records(out)] == list(range(epoch))
        assert best_of(out)[0] == epoch - 1
    resumed = run("revit_scratch.py", *args, "--resume")
    assert "taking over the lock" in resumed.stdout
    assert records(out) == records(whole)
    epoch, weights = best_of(out)
    whole_epoch, whole_weights = best_of(whole)
    assert epoch == whole_epoch == 2
    assert weights.keys() == whole_weights.keys()
    assert all(torch.equal(weights[k], whole_weights[k]) for k in weights)
    assert not (out / run_folder.LOCK_FILE).exists()  # released at the end


def test_full_disk_leaves_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """A checkpoint write that hits ENOSPC (a real one: the file is /dev/full) ends the run in
    one line naming the file and "No space left on device"; the previous checkpoint stays
    loadable and no temporary file is left behind."""
    import revit_scratch
    dims = write_dims(tmp_path / "dims.yaml")
    out = tmp_path / "o"
    argv = [*TRAIN, "--dims", dims, "--output_dir", out]
    parser = revit_scratch.get_args_parser()
    utils.run_main(revit_scratch.main, parser.parse_args([*map(str, argv), "--epochs", "1"]))
    before = (out / "checkpoint.pth").read_bytes()
    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".pth"):
            return real_open("/dev/full", mode, *a, **k)
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(atomic, "open", full_disk_open, raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        utils.run_main(revit_scratch.main,
                       parser.parse_args([*map(str, argv), "--epochs", "2", "--resume"]))
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "checkpoint.pth" in err[0] and "No space left on device" in err[0], err
    assert "previous checkpoint.pth is unchanged" in err[0]
    assert (out / "checkpoint.pth").read_bytes() == before
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["args.yaml", "best_checkpoint.pth",
                                                     "checkpoint.pth", "log.txt", "tb"]


@pytest.mark.slow
def test_second_live_run_into_one_folder_is_refused(tmp_path):
    """Two runs started into one folder: the second is refused while the first is alive, and
    takes over (removing the killed run's temporary files) once it is dead."""
    dims = write_dims(tmp_path / "dims.yaml")
    out = tmp_path / "o"
    args = [*TRAIN, "--dims", dims, "--epochs", "200", "--output_dir", out]
    first = subprocess.Popen([sys.executable, str(ROOT / "revit_scratch.py"), *map(str, args)],
                             cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "log.txt").exists():  # the first epoch is written
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        second = run("revit_scratch.py", *args, "--resume", check=False)
        assert second.returncode == 2
        assert f"in use by another run: process {first.pid}" in second.stderr
        # evaluating the live run's checkpoint writes nothing there, so it is allowed
        evaluated = run("revit_scratch.py", *TRAIN, "--dims", dims, "--eval", "--resume",
                        "--output_dir", out)
        assert "Accuracy of the network" in evaluated.stdout
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()
        first.wait()
    stale = out / f".checkpoint.tmp{first.pid}.pth"
    stale.write_bytes(b"half a checkpoint")  # as a kill in the middle of a save leaves it
    # --epochs 1: resume and stop at once, whichever epoch the first run had reached
    third = run("revit_scratch.py", *TRAIN, "--dims", dims, "--epochs", "1", "--output_dir", out,
                "--resume")
    assert "taking over the lock" in third.stdout and "removed 1 temporary file" in third.stdout
    assert not stale.exists()


def test_log_lines_are_strict_json():
    """A diverged loss is written as null, never as a bare NaN that JSON readers reject."""
    text = utils.json_lines([{"epoch": 0, "train_loss": math.nan, "x": [math.inf, 1.0]}])
    assert json.loads(text) == {"epoch": 0, "train_loss": None, "x": [None, 1.0]}


def test_resume_of_old_checkpoint_trims_log_to_its_epoch(tmp_path):
    """A checkpoint written before checkpoints carried the log: log.txt keeps the lines up to
    the checkpoint's epoch (later ones belong to epochs that will run again)."""
    (tmp_path / "log.txt").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(4))
                                      + '{"epoch": 4, "trunc')
    history = checkpoints.restore_epoch_records({"epoch": 1}, "unused", tmp_path)
    assert [r["epoch"] for r in history] == [0, 1]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1]


def test_folder_lock_of_dead_or_foreign_process(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    lock = out / run_folder.LOCK_FILE
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename}))
    run_folder.check_output_dir(out)  # dead: no refusal
    lock.write_text(json.dumps({"pid": os.getppid(), "host": "elsewhere"}))
    with pytest.raises(Exception, match="on elsewhere .*remove .*run.lock"):
        run_folder.check_output_dir(out)


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 600 KB tmpfs (room for two tiny checkpoints, not three), where mounting is allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_real_full_disk_then_resume_after_freeing_space(uninterrupted, small_tmpfs):
    """The whole script on a disk that fills up in epoch 1: one line naming the file and "No
    space left on device", epoch 0's files intact; with room again, --resume ends where an
    uninterrupted run ends."""
    dims, whole = uninterrupted
    args = [*LEARNS, "--dims", dims, "--epochs", "3"]
    out = small_tmpfs / "run"
    full = run("revit_scratch.py", *args, "--output_dir", out, check=False)
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert (f"error: could not write {out / 'checkpoint.pth'}: No space left on device; the "
            f"previous checkpoint.pth is unchanged") in full.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["args.yaml", "best_checkpoint.pth",
                                                     "checkpoint.pth", "log.txt", "tb"]
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    run("revit_scratch.py", *args, "--output_dir", out, "--resume")
    assert records(out) == records(whole)
