"""revit_scratch.py end to end on DIGITS: train, --eval, --resume, torchrun, and bad input."""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from helpers import TRAIN, ROOT, assert_user_error, env, free_port, run, run_here, write_dims

pytestmark = pytest.mark.slow


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    dims = write_dims(out / "dims.yaml")
    proc = run("revit_scratch.py", *TRAIN, "--dims", dims, "--epochs", "2", "--output_dir", out)
    return out, proc


def test_short_run_writes_checkpoints_and_log(trained):
    out, proc = trained
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert ckpt["dims"]["mlp_dim"] == [48, 48] and ckpt["dims"]["patch_size"] == 8
    assert ckpt["args"]["data_set"] == "DIGITS"
    assert {"optimizer", "lr_scheduler", "max_accuracy"} <= set(ckpt)
    assert (out / "best_checkpoint.pth").is_file()
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(0 <= r["test_acc1"] <= 100 for r in log)
    assert re.search(r"Epoch 1: top-1 [\d.]+%  top-5 [\d.]+%  \(best top-1", proc.stdout)
    assert "img/s" in proc.stdout and "eta" in proc.stdout
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_eval_of_checkpoint_reports_its_accuracy(trained):
    out, _ = trained
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    for flag in ("--resume", "--finetune"):
        # --model names another shape on purpose: the dims come from the checkpoint
        proc = run("revit_scratch.py", *TRAIN, flag, out / "checkpoint.pth", "--eval")
        m = re.search(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%", proc.stdout)
        assert m, proc.stdout
        assert float(m.group(1)) == pytest.approx(last["test_acc1"], abs=0.006)
        assert "Epoch" not in proc.stdout  # nothing trained


def test_ema_weights_for_best_eval_and_finetune(tmp_path):
    """--best-on-ema picks best_checkpoint.pth by the EMA's top-1; --use-ema evaluates (and
    finetunes from) a checkpoint's EMA weights (refusals: tests/test_bad_inputs.py)."""
    from helpers import FAST
    dims = write_dims(tmp_path / "dims.yaml")
    out = tmp_path / "o"
    proc = run_here("revit_scratch.py", *FAST, "--dims", dims, "--epochs", "2",
                    "--model-ema-decay", "0.9", "--best-on-ema", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    best = max(range(2), key=lambda e: (log[e]["test_ema_acc1"], -e))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["best_epoch"] == best and ckpt["max_accuracy"] == log[best]["test_ema_acc1"]
    assert not torch.equal(ckpt["model"]["head.weight"], ckpt["model_ema"]["head.weight"])
    for extra, key in (([], "test_acc1"), (["--use-ema"], "test_ema_acc1")):
        proc = run_here("revit_scratch.py", *FAST, "--eval", "--resume", out / "checkpoint.pth",
                        *extra)
        m = re.search(r"top-1 ([\d.]+)%", proc.stdout)
        assert float(m.group(1)) == pytest.approx(log[-1][key], abs=0.006), (extra, proc.stdout)
    import models  # what --finetune CKPT --use-ema starts from
    start = models.build_model("deit_tiny_patch16_224", checkpoint=out / "checkpoint.pth", ema=True)
    assert all(torch.equal(v, ckpt["model_ema"][k]) for k, v in start.state_dict().items())


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    dims = write_dims(tmp_path / "dims.yaml")
    full, part = tmp_path / "full", tmp_path / "part"
    common = [*TRAIN, "--dims", dims, "--epochs", "4", "--drop-path", "0.1", "--smoothing", "0.1",
              "--mixup", "0.5", "--num_workers", "1"]
    run("revit_scratch.py", *common, "--output_dir", full)
    # the same run, killed as soon as its first epoch is logged, then resumed
    proc = subprocess.Popen([sys.executable, str(ROOT / "revit_scratch.py"), *map(str, common),
                             "--output_dir", str(part)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = part / "log.txt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    killed_at = torch.load(part / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < 3, "the run finished before it could be killed"
    run("revit_scratch.py", *common, "--output_dir", part, "--resume")
    a, b = weights(full / "checkpoint.pth"), weights(part / "checkpoint.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("loss", [[], ["--base-loss-head", "cls"]])
def test_torchrun_two_processes_end_identical(tmp_path, loss):
    """Two gloo ranks end with identical weights; with the label loss on the class head only
    (DeiT's) the distillation head gets no gradient, which DDP must be told of (it stopped
    on the second step: "Expected to have finished reduction")."""
    dims = write_dims(tmp_path / "dims.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "revit_scratch.py"), *TRAIN,
           "--dims", str(dims), "--epochs", "1", "--batch-size", "32", "--dist-eval",
           *loss, "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all 2 processes hold identical weights" in proc.stdout
    assert "total batch of 64" in proc.stdout
    m = re.search(r"Epoch 0: top-1 [\d.]+%", proc.stdout)
    assert m and proc.stdout.count("Epoch 0: top-1") == 1  # printed by rank 0 only


def test_fp16_autocast_with_a_grad_scaler(tmp_path):
    """--amp-dtype float16 on the CPU runs the grad-scaler path CUDA's --amp takes."""
    dims = write_dims(tmp_path / "dims.yaml")
    out = tmp_path / "o"
    proc = run("revit_scratch.py", *TRAIN, "--dims", dims, "--epochs", "1",
               "--amp-dtype", "float16", "--output_dir", out)
    assert "Epoch 0: top-1" in proc.stdout
    (record,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert math.isfinite(record["train_loss"])
    assert torch.load(out / "checkpoint.pth", weights_only=True)["scaler"] is not None


def test_hard_distillation_with_teacher_file(tmp_path):
    teacher = timm.create_model("test_resnet", num_classes=10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    dims = write_dims(tmp_path / "dims.yaml")
    proc = run("revit_scratch.py", *TRAIN, "--dims", dims, "--epochs", "1", "--amp",
               "--distillation-type", "hard", "--teacher-model", "test_resnet",
               "--teacher-path", tmp_path / "teacher.pth", "--output_dir", tmp_path / "o")
    assert "Epoch 0: top-1" in proc.stdout


# ---------------------------------------------------------------------------- bad input
@pytest.fixture()
def earlier(tmp_path, trained):
    """An output dir holding a previous run's files, which no failing run may touch."""
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    return out, before


def unchanged(out, before):
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


@pytest.mark.parametrize("case", ["no_data_path", "bad_data_set", "impossible_dims", "emb0",
                                  "emb50", "other_shape", "corrupt", "no_teacher", "overwrite",
                                  "eval_nothing"])
def test_bad_input_fails_cleanly(tmp_path, earlier, case):
    out, before = earlier
    fresh = tmp_path / "fresh"
    base = [*TRAIN, "--epochs", "1", "--output_dir", fresh]
    if case == "no_data_path":
        args, words = [*base, "--data-set", "IMNET"], ["--data-path"]
    elif case == "bad_data_set":
        args, words = [*base, "--data-set", "MNISTX"], ["--data-set", "MNISTX"]
    elif case == "impossible_dims":
        dims = write_dims(tmp_path / "bad.yaml", {"embed_dim": 32, "num_heads": [2, 0],
                                                  "qk_dim": [8, 8], "v_dim": [8, 8],
                                                  "mlp_dim": [48, 48]})
        args, words = [*base, "--dims", dims], ["num_heads", "block 1"]
    elif case == "emb0":
        args, words = [*base, "--EMB", "0"], ["--EMB", "got 0"]
    elif case == "emb50":
        args, words = [*base, "--EMB", "50"], ["--EMB", "EMB 50", "EMB >="]
    elif case == "other_shape":
        other = write_dims(tmp_path / "other.yaml", {"embed_dim": 64, "num_heads": [2],
                                                     "qk_dim": [8], "v_dim": [8], "mlp_dim": [8]})
        args = [*base, "--dims", other, "--finetune", out / "checkpoint.pth"]
        words = ["checkpoint.pth", "other dims"]
    elif case == "corrupt":
        bad = tmp_path / "corrupt.pth"
        bad.write_bytes((out / "checkpoint.pth").read_bytes()[:1000])
        args, words = [*base, "--resume", bad], ["corrupt.pth", "corrupt or truncated"]
    elif case == "no_teacher":
        args = [*base, "--distillation-type", "hard", "--teacher-path", tmp_path / "nope.pth"]
        words = ["--teacher-path", "nope.pth"]
    elif case == "overwrite":  # a fresh run into a used output dir
        args = [*TRAIN, "--epochs", "1", "--output_dir", out, "--dims", out / "dims.yaml"]
        words = ["already holds a run", "--resume"]
    else:
        (tmp_path / "empty").mkdir()
        args = [*TRAIN, "--eval", "--resume", "--output_dir", tmp_path / "empty"]
        words = ["--eval", "no checkpoint"]
    assert_user_error(run_here("revit_scratch.py", *args), *words)
    unchanged(out, before)
    assert not fresh.exists()  # nothing is created before the inputs pass


@pytest.mark.parametrize("script,flag,value", [
    ("revit_scratch.py", "--clip-grad", "-1"), ("revit_scratch.py", "--patch-size", "0"),
    ("revit_scratch.py", "--smoothing", "2"), ("revit_scratch.py", "--reprob", "2"),
    ("revit_scratch.py", "--color-jitter", "-1"), ("revit_scratch.py", "--warmup-epochs", "-1"),
    ("revit_scratch.py", "--eval-crop-ratio", "0"), ("revit_scratch.py", "--drop-path", "1.5"),
    ("revit_scratch.py", "--num_workers", "-1"), ("revit_scratch.py", "--batch-size", "0"),
    ("revit_scratch.py", "--lr", "nan"), ("revit_scratch.py", "--mixup-prob", "x"),
    ("nvit_prune.py", "--latency_target", "1.5"), ("nvit_prune.py", "--interval_prune", "0"),
    ("nvit_prune.py", "--kl-tau", "0"), ("nvit_prune.py", "--prune_per_iter", "-4"),
])
def test_out_of_range_flags_are_refused_when_parsed(script, flag, value):
    """A value outside a flag's range is a one-line error at parse time: nothing loads or runs
    (before, --clip-grad -1 ran gradient ascent and --patch-size 0 silently meant 16)."""
    module = __import__(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as e:
        module.get_args_parser().parse_args([flag, value])
    assert e.value.code == 2


def test_in_range_flag_values_parse_to_numbers():
    import revit_scratch
    args = revit_scratch.get_args_parser().parse_args(
        ["--clip-grad", "1.5", "--patch-size", "8", "--smoothing", "0", "--drop-path", "0.3"])
    assert (args.clip_grad, args.patch_size, args.smoothing, args.drop_path) == (1.5, 8, 0.0, 0.3)
