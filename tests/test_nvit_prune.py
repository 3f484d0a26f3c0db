"""nvit_prune.py end to end on DIGITS: prune, finetune, --eval, resume, torchrun, bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import models
from models.flops import count_macs
from helpers import DENSE_DIMS as DENSE
from helpers import FAST, PRUNE_FLAGS, TRAIN, ROOT, assert_user_error, env, run, run_here
from helpers import assert_same_pruning_state, free_port, kill_at_first_state, write_dense_model

pytestmark = pytest.mark.slow

DENSE_DIMS = models.Dims(**DENSE)
PRUNE = [PRUNE_FLAGS[0], "--cost", "macs", *PRUNE_FLAGS[1:]]
STEP_LINE = (r"prune step 1: macs ratio [\d.]+ \(target 0.6\)  removed groups: [a-z]+ 1  emb \d+  "
             r"heads \d+  qk \[[\d, ]+\]  v \[[\d, ]+\]  mlp \d+  loss [\d.]+ \(kl 0, deit [\d.]+\)"
             r"  img/s [\d.]+  eta")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_dense_model(tmp_path_factory.mktemp("dense") / "dense.pth")


def masks_of(out):
    return json.loads((out / "dims_history.json").read_text())["steps"][-1]["dims"]


def test_prune_finetune_eval(tmp_path, dense):
    out = tmp_path / "p"
    # --deterministic: every op of pruning (live-channel LayerNorm included) has a
    # deterministic version (PyTorch raises otherwise)
    proc = run("nvit_prune.py", *FAST, *PRUNE, "--pretrained-path", dense, "--epochs", "3",
               "--latency_target", "0.6", "--pruning_exit", "--deterministic", "--output_dir", out)
    assert re.search(STEP_LINE, proc.stdout), proc.stdout[:2000]
    ckpt = torch.load(out / "pruned_checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["cost_ratio"] <= 0.6
    compact = models.build_model("deit_base_patch16_224", checkpoint=out / "pruned_checkpoint.pth")
    # the cost model's ratio is the compact model's MAC ratio by torch's flop counter
    original = models.build_model("deit_base_patch16_224", checkpoint=dense)
    ratio = count_macs(compact)[0] / count_macs(original)[0]
    assert ratio == pytest.approx(ckpt["cost_ratio"], rel=1e-9)
    hist = json.loads((out / "dims_history.json").read_text())
    assert hist["original"]["embed_dim"] == 64 and len(hist["steps"]) >= 2
    # the KL term is off until the first prune step, on after it; the parts add up
    first, second = hist["steps"][:2]
    assert first["loss_kl"] == 0 and second["loss_kl"] > 0
    assert second["loss"] == pytest.approx(second["loss_kl"] + second["loss_deit"], rel=1e-6)
    # the pace: 1 group, then up to 48 // 16 = 3 in all (a layer's last group keeps its place)
    assert sum(first["removed_groups"].values()) == 1
    assert 1 <= sum(second["removed_groups"].values()) <= 2
    assert hist["steps"][-1]["dims"]["mlp_dim"] == compact.dims.mlp_dim
    assert (out / "widths.png").stat().st_size > 1000
    # log.txt: the dense top-1, one line per prune step (as dims_history.json), one per epoch
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[0] == {"kind": "dense", "test_acc1": pytest.approx(log[0]["test_acc1"])}
    steps = [r for r in log if r["kind"] == "prune_step"]
    assert [r["step"] for r in steps] == [r["step"] for r in hist["steps"]] == \
        list(range(1, len(steps) + 1))
    assert all({"ratio", "dims", "loss_kl", "loss_deit", "lr", "img_s"} <= set(r) for r in steps)
    epochs = [r for r in log if r["kind"] == "epoch"]
    assert epochs and all({"test_acc1", "ratio", "train_loss", "train_loss_kl"} <= set(r)
                          for r in epochs)
    order = [(r["epoch"], r["kind"] == "epoch") for r in log[1:-1]]  # the last: speed
    assert order == sorted(order)
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    # promised against delivered, timed at the end: in the output, the file and log.txt
    assert re.search(r"measured speedup [\d.]+x \(p25-p75 [\d.]+-[\d.]+\)  promised by MACs "
                     r"[\d.]+x \(ratio ([\d.]+)\)", proc.stdout), proc.stdout[-2000:]
    assert ckpt["speed"]["macs_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert ckpt["speed"]["pairs"] == 10 and ckpt["speed"]["batch_size"] == 64
    assert log[-1]["kind"] == "speed" and log[-1]["speedup"] == ckpt["speed"]["speedup"]
    # the compact model scores what the masked student scored
    top1 = float(re.search(r"pruned model: .* top-1 ([\d.]+)%", proc.stdout).group(1))
    ev = run("revit_scratch.py", *TRAIN, "--finetune", out / "pruned_checkpoint.pth", "--eval")
    assert float(re.search(r"top-1 ([\d.]+)%", ev.stdout).group(1)) == pytest.approx(top1, abs=0.006)
    # the paper's finetuning stage: KL from the full model plus the DeiT loss, eval mode
    ft = run("revit_scratch.py", *TRAIN, "--finetune", out / "pruned_checkpoint.pth", "--epochs", "1",
             "--kl_loss_coeff", "1", "--pretrained-path", dense, "--output_dir", tmp_path / "ft")
    assert "Epoch 0: top-1" in ft.stdout and "student in eval mode" in ft.stdout
    assert re.search(r"loss_kl [\d.e-]+ \([\d.e-]+\)  loss_deit", ft.stdout)
    tuned = torch.load(tmp_path / "ft" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert tuned["dims"] == ckpt["dims"]


def test_latency_table_cost(tmp_path, dense):
    table = tmp_path / "table.json"
    run("tools/build_latency_table.py", "--output", table, "--num-tokens", "18", "--batch-size", "64",
        "--embed-dims", "32,64", "--heads", "1,2,4", "--qk-dims", "8,16", "--v-dims", "8,16",
        "--mlp-dims", "32,128", "--warmup", "1", "--repeats", "3")
    out = tmp_path / "p"
    # with our variants of the units and the embedding score, the paper's lambda
    proc = run_here("nvit_prune.py", *FAST, *PRUNE[:2], "latency", *PRUNE[3:], "--pretrained-path",
                    dense, "--epochs", "3", "--latency_target", "0.9", "--latency_look_up_table",
                    table, "--latency_regularization", "5e-4", "--qk-v-units", "per-head",
                    "--emb-saliency", "reference", "--pruning_exit", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latency ratio" in proc.stdout
    assert "warning: the latency table" not in proc.stdout  # timed here, in fp32, as the run
    assert torch.load(out / "pruned_checkpoint.pth", weights_only=True)["cost_ratio"] <= 0.9
    # a table timed on a GPU with autocast steers this CPU fp32 run: said before pruning
    data = json.loads(table.read_text())
    data["meta"].update(device="cuda:0", amp=True, dtype="autocast float16")
    table.write_text(json.dumps(data))
    proc = run_here("nvit_prune.py", *FAST, *PRUNE[:2], "latency", *PRUNE[3:], "--pretrained-path",
                    dense, "--epochs", "1", "--latency_target", "0.9", "--latency_look_up_table",
                    table, "--pruning_exit", "--output_dir", tmp_path / "q")
    assert ("warning: the latency table was timed on cuda in autocast float16 (batch 64), this run "
            "prunes on cpu in float32") in proc.stdout, proc.stdout[-2000:]


def test_resume_after_kill_reaches_same_masks(tmp_path, dense):
    common = [*FAST, *PRUNE, "--pretrained-path", dense, "--epochs", "3", "--num_workers", "1",
              "--latency_target", "0.7", "--prune_per_iter", "32", "--drop-path", "0.1",
              "--mixup", "0.5", "--pruning_exit", "--student_eval", "false"]
    full, part = tmp_path / "full", tmp_path / "part"
    run("nvit_prune.py", *common, "--output_dir", full)
    # a state at every prune step, so the kill comes in mid-epoch: the resumed epoch's means
    # must still cover the whole epoch (they covered the batches after the resume only)
    killed = kill_at_first_state("nvit_prune.py", *common, output_dir=part)
    assert killed["iteration"] > 0 and killed["epoch_means"]["counts"]["loss"] > 0  # mid-epoch
    run("nvit_prune.py", *common, "--output_dir", part, "--resume")
    assert masks_of(part) == masks_of(full)

    def logged(folder):  # log.txt without its timings
        timing = {"seconds", "img_s", "train_epoch_time"}
        records = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in timing} for r in records
                if r["kind"] != "speed"]
    assert logged(part) == logged(full)
    dense_top1 = torch.load(full / "pruned_checkpoint.pth", weights_only=True)["top1_dense"]
    assert dense_top1 is not None
    assert torch.load(part / "pruned_checkpoint.pth", weights_only=True)["top1_dense"] == dense_top1
    # --resume of a finished run writes the same result again, with the dense model's top-1
    run("nvit_prune.py", *common, "--output_dir", full, "--resume")
    assert torch.load(full / "pruned_checkpoint.pth", weights_only=True)["top1_dense"] == dense_top1
    # resuming with other settings would not replay the run: refused
    changed = run("nvit_prune.py", *common, "--prune_per_iter", "8", "--output_dir", part,
                  "--resume", check=False)
    assert_user_error(changed, "other settings", "prune_per_iter")
    assert_same_pruning_state(full, part)

    # Ctrl-C: the step finishes, the state is saved (whatever --save-every says), exit 130,
    # and --resume still replays the uninterrupted run
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, str(ROOT / "nvit_prune.py"), *map(str, common),
                             "--output_dir", str(stop), "--save-every", "0"], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("prune step 2:"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "stopped on request" in err and "Traceback" not in err, err
    stopped = torch.load(stop / "pruning_state.pth", map_location="cpu", weights_only=True)
    assert not stopped["done"] and stopped["pruner"]["steps"] >= 2
    assert not (stop / "pruned_checkpoint.pth").exists()
    run("nvit_prune.py", *common, "--output_dir", stop, "--resume")
    assert masks_of(stop) == masks_of(full)


@pytest.mark.parametrize("family", ["deit_tiny_distilled_patch16_224",
                                    "vit_small_patch14_reg4_dinov2"])
def test_torchrun_ranks_agree(tmp_path, dense, family):
    """Two ranks prune identically, on DeiT and on a DINOv2-style model (LayerScale, four
    register tokens, position embedding over the patches only)."""
    if family != "deit_tiny_distilled_patch16_224":
        torch.manual_seed(0)
        m = models.build_model(family, dims=DENSE_DIMS, img_size=32, patch_size=8, num_classes=10)
        assert m.dims.reg_tokens == 4 and m.dims.layer_scale
        dense = tmp_path / "dense.pth"
        torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, dense)
    fast = [a if a != "deit_tiny_distilled_patch16_224" else family for a in FAST]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "nvit_prune.py"), *fast, *PRUNE,
           "--pretrained-path", str(dense), "--epochs", "3", "--batch-size", "16",
           "--grad-accum-steps", "2", "--latency_target", "0.6", "--pruning_exit", "--dist-eval",
           "--output_dir", str(tmp_path / "o")]  # accumulation: DDP's no_sync on real ranks
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"all 2 processes hold identical masks and weights after (\d+) prune steps", proc.stdout)
    assert m, proc.stdout[-3000:]
    assert (tmp_path / "o" / "pruned_checkpoint.pth").is_file()


def test_a_kill_between_an_epochs_last_step_and_its_end_loses_no_record(tmp_path, dense,
                                                                         monkeypatch):
    """A prune step in an epoch's last iteration saves the state (at epoch 1, iteration 0);
    a kill before the epoch's evaluation left that epoch without its log line for good. The
    resumed run ends the epoch first (its running sums are in the state), so its log.txt
    equals an uninterrupted run's but for timings."""
    import prune_recorder
    common = [*FAST, *PRUNE, "--pretrained-path", dense, "--epochs", "2", "--interval_prune",
              "19", "--latency_target", "0", "--save-every", "1",
              "--student_eval", "false"]  # 20 steps an epoch: a prune step in its last one
    assert run_here("nvit_prune.py", *common, "--output_dir", tmp_path / "full").returncode == 0
    ended = prune_recorder.PruneRecorder.epoch_ended

    def killed(self, *a, **k):
        raise KeyboardInterrupt  # the process dies before the epoch's end is recorded
    monkeypatch.setattr(prune_recorder.PruneRecorder, "epoch_ended", killed)
    part = tmp_path / "part"
    assert run_here("nvit_prune.py", *common, "--output_dir", part).returncode == 130
    state = torch.load(part / "pruning_state.pth", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (1, 0) and not state["epoch_log"]
    monkeypatch.setattr(prune_recorder.PruneRecorder, "epoch_ended", ended)
    assert run_here("nvit_prune.py", *common, "--output_dir", part, "--resume").returncode == 0

    def logged(folder):
        timing = {"seconds", "img_s", "train_epoch_time"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (folder / "log.txt").read_text().splitlines()
                if json.loads(line)["kind"] != "speed"]
    assert [r["kind"] for r in logged(part)].count("epoch") == 2
    assert logged(part) == logged(tmp_path / "full")


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of this RANK (a child of the launcher)."""
    from pathlib import Path
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_sigterm_on_one_rank_saves_within_a_step(tmp_path, dense):
    """SIGTERM to rank 1 alone, mid-interval (no prune step for 1000 iterations): every rank
    stops after the next step and rank 0 saves the state there, not at the epoch's end (or
    the next prune step), which the launcher's SIGKILL 30 s after SIGTERM could pre-empt."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "nvit_prune.py"), *FAST, *PRUNE,
           "--pretrained-path", str(dense), "--epochs", "2", "--batch-size", "16",
           "--interval_prune", "1000", "--latency_target", "0.6", "--print-freq", "1",
           "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    asked_at = None
    for line in proc.stdout:
        m = re.match(r"Epoch \[0\] \[(\d+)/(\d+)\]", line)
        if m and int(m.group(1)) >= 3:
            pid = _worker_pid(proc.pid, 1)
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            asked_at, total = int(m.group(1)), int(m.group(2))
            break
    _, err = proc.communicate(timeout=300)
    assert asked_at is not None, err[-3000:]
    assert "stopped on request after 0 prune steps" in err, err[-3000:]
    state = torch.load(out / "pruning_state.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and asked_at <= state["iteration"] <= asked_at + 3 < total


# ---------------------------------------------------------------------------- bad input
def test_unreachable_target_is_refused_before_pruning(tmp_path, dense):
    """A target below what the minimum widths give would prune everything to the minimum and
    still fail: refused before any work, and nothing is written."""
    out = tmp_path / "p"
    proc = run_here("nvit_prune.py", *FAST, *PRUNE, "--pretrained-path", dense, "--epochs", "6",
                    "--latency_target", "0.02", "--prune_per_iter", "100000", "--pruning_exit",
                    "--prune_dict", '{"Global": 1000000}',
                    "--student_eval", "false", "--output_dir", out)
    assert_user_error(proc, "--latency_target 0.02", "cannot be reached", "minimum widths")
    assert "prune step" not in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize("case", ["target_negative", "target_big", "no_table", "bad_table", "bad_config",
                                  "missing_config", "offline_pretrained", "other_model",
                                  "overwrite", "eval_flag", "no_output_dir"])
def test_bad_input_fails_cleanly(tmp_path, dense, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pruned_checkpoint.pth").write_bytes(b"earlier result")
    base = [*FAST, *PRUNE, "--pretrained-path", dense, "--epochs", "1", "--output_dir", out,
            "--latency_target", "0.5"]
    if case == "target_negative":
        args, words = [*base, "--latency_target", "-0.1"], ["--latency_target"]
    elif case == "target_big":
        args, words = [*base, "--latency_target", "1.5"], ["--latency_target"]
    elif case == "no_table":
        args, words = [*base, "--cost", "latency", "--latency_look_up_table", tmp_path / "t.json"], \
            ["--latency_look_up_table", "t.json"]
    elif case == "bad_table":
        (tmp_path / "t.json").write_text('{"EMB_64": {"QK_oops": 3}}')
        args, words = [*base, "--cost", "latency", "--latency_look_up_table", tmp_path / "t.json"], \
            ["--latency_look_up_table"]
    elif case == "bad_config":
        (tmp_path / "c.json").write_text('{"criterion": "hessian", "group_size": {"emb": 16}}')
        args, words = [*base, "--pruning_config", tmp_path / "c.json"], ["--pruning_config"]
    elif case == "missing_config":
        args, words = [*base, "--pruning_config", tmp_path / "c.json"], ["--pruning_config", "c.json"]
    elif case == "offline_pretrained":
        args = [a for a in base if a not in ("--pretrained-path", str(dense), dense)] + ["--pretrained"]
        words = ["--pretrained", "local file"]
    elif case == "overwrite":
        args, words = base, ["already holds a run", "--resume"]
    elif case == "eval_flag":
        args, words = [*base, "--eval"], ["unrecognized arguments: --eval"]
    elif case == "no_output_dir":
        args, words = [*base, "--output_dir", ""], ["--output_dir"]
    else:
        other = models.build_model("deit_tiny_distilled_patch16_224", dims=DENSE_DIMS, img_size=32,
                                   patch_size=8, num_classes=7)
        torch.save({"model": other.state_dict(), "dims": other.dims.to_dict()}, tmp_path / "o.pth")
        args = [a if a != dense else tmp_path / "o.pth" for a in base]
        words = ["o.pth", "num_classes=7"]
    if case == "offline_pretrained":  # the hub reads HF_HUB_OFFLINE when imported
        e = env()
        e["HF_HUB_OFFLINE"] = "1"
        proc = subprocess.run([sys.executable, str(ROOT / "nvit_prune.py"), *map(str, args)],
                              cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    else:
        proc = run_here("nvit_prune.py", *args)
    assert_user_error(proc, *words)
    assert (out / "pruned_checkpoint.pth").read_bytes() == b"earlier result"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("nvit_*.json")),
                         ids=lambda p: p.name)
def test_shipped_pruning_configs_are_accepted(path):
    """Every pruning config we ship passes the checks --pruning_config applies."""
    import argparse

    import nvit_prune
    import pruning
    config = nvit_prune.pruning_config(argparse.Namespace(pruning_config=str(path)))
    assert config.criterion in ("hessian", "taylor", "magnitude", "random")
    assert set(config.scales) == set(pruning.KINDS)


# ------------------------------------------------- the reference's phases, in process
def spy_run(monkeypatch, tmp_path, dense, *extra):
    """Run nvit_prune.main in this process, recording after every iteration the student's
    mode, whether the KL term is on and the learning rate, and the saliency's EMA."""
    import nvit_prune
    import pruning
    from pruning import Saliency

    records, emas, resets = [], [], []
    real_train = nvit_prune.train_one_epoch

    def spy_train(model, criterion, loader, optimizer, *a, after_step=None, **kw):
        def spy_after(i, losses):
            stop = after_step(i, losses)
            records.append((model.training, criterion.kl_enabled, optimizer.param_groups[0]["lr"]))
            return stop
        return real_train(model, criterion, loader, optimizer, *a, after_step=spy_after, **kw)

    class SpySaliency(Saliency):
        def step(self, model=None):
            out = super().step(model)
            emas.append([e.clone() for e in self.ema])
            return out

        def reset_ema(self):
            super().reset_ema()
            resets.append((len(emas), [e.clone() for e in self.ema]))

    monkeypatch.setattr(nvit_prune, "train_one_epoch", spy_train)
    monkeypatch.setattr(pruning, "Saliency", SpySaliency)
    args = nvit_prune.get_args_parser().parse_args(
        [*map(str, FAST), *PRUNE, "--pretrained-path", str(dense), "--epochs", "2",
         "--drop-path", "0.2", "--output_dir", str(tmp_path / "o"), *extra])
    nvit_prune.main(args)
    return records, emas, resets


@pytest.mark.parametrize("student_eval", [True, False])
def test_phases_switch_at_the_first_prune_step(monkeypatch, tmp_path, dense, student_eval):
    """Until the first prune step (iteration interval + 1): train mode, no KL term. From it
    on: KL on whatever --student_eval says, eval mode with --student_eval, and the saliency
    EMA restarted from zero. The learning rate stays constant."""
    records, emas, resets = spy_run(monkeypatch, tmp_path, dense, "--latency_target", "0.6",
                                    "--student_eval", str(student_eval), "--lr", "1e-3",
                                    "--sched", "cosine", "--min-lr", "1e-6")
    interval = 4
    before, after = records[:interval], records[interval:]
    assert all(training and not kl for training, kl, _ in before)
    assert all(kl and training != student_eval for training, kl, _ in after)
    assert len({lr for _, _, lr in records}) == 1 and records[0][2] == 1e-3
    assert resets[0][0] == 1 and len(resets) == 1  # right after the first step, once
    assert all(float(e.abs().max()) == 0 for e in resets[0][1])
    # the second step's EMA is (1 - momentum) times that interval's average: from zero
    assert len(emas) >= 2 and float(emas[1][0].abs().max()) > 0


def test_pruning_lr_schedule_is_opt_in(monkeypatch, tmp_path, dense):
    records, _, _ = spy_run(monkeypatch, tmp_path, dense, "--latency_target", "0",  # no target
                            "--lr", "1e-3", "--sched", "cosine", "--min-lr", "1e-6",
                            "--pruning-lr", "schedule", "--epochs", "2")
    assert len({lr for _, _, lr in records}) == 2  # one per epoch


def test_reference_pruning_config_is_read(tmp_path, dense):
    """A config in the reference's format (its keys, written here): method 23 and the
    momentum are used, the keys its pruning run ignored are named, others refused."""
    ref = {"method": 23, "frequency": 100, "prune_per_iteration": 50,
           "maximum_pruning_iterations": 192, "starting_neuron": 0, "fixed_layer": -1,
           "l2_normalization_per_layer": False, "rank_neurons_equally": False,
           "prune_neurons_max": 6144, "use_momentum": False, "pruning_silent": False,
           "group_size": 2, "pruning_threshold": 1e7, "start_pruning_after_n_iterations": 0,
           "push_group_down": False, "do_iterative_pruning": True, "fixed_criteria": False,
           "seed": 0, "pruning_momentum": 0.9}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    args = [*FAST, *PRUNE, "--pretrained-path", dense, "--epochs", "2", "--latency_target", "0.8",
            "--pruning_config", tmp_path / "ref.json"]
    proc = run_here("nvit_prune.py", *args, "--output_dir", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"keys without effect.*frequency, prune_per_iteration", proc.stdout)
    state = torch.load(tmp_path / "a" / "pruning_state.pth", weights_only=True)
    assert state["settings"]["config"]["momentum"] == 0.9
    assert state["settings"]["config"]["criterion"] == "hessian"
    for bad, words in (({**ref, "method": 22}, ["method 22", "not supported"]),
                       ({**ref, "fixed_layer": 3}, ["fixed_layer"]),
                       ({**ref, "bogus": 1}, ["bogus"])):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        proc = run_here("nvit_prune.py", *args[:-1], tmp_path / "bad.json", "--output_dir",
                        tmp_path / "b")
        assert_user_error(proc, "--pruning_config", *words)


DIMS_SPEC = {"embed_dim": 32, "num_heads": [2, 2], "qk_dim": [8, 8], "v_dim": [8, 8],
             "mlp_dim": [64, 64]}


def test_a_state_from_before_the_new_fields_still_resumes():
    """A pruning state written before the dims grew (no Eva, rotary, norm or projection
    fields) and before the pool MLP's unit kind (no "pool_mlp" in its config) is the same
    model with the same settings; another model or setting is still refused."""
    import nvit_prune
    import pruning
    from errors import UserError
    original = models.build_model("deit_tiny_patch16_224", dims=models.Dims(**DIMS_SPEC),
                                  img_size=32, patch_size=8, num_classes=10).dims
    config = pruning.PruningConfig().as_dict()
    settings = {"config": config, "seed": 0}
    added = ("mlp_norm", "attn_norm", "qkv_fused", "layout", "k_bias", "abs_pos_embed",
             "rope_dim", "rope_temperature", "rope_grid_indexing", "rope_ref_grid", "rope_half",
             "rope_dims")
    old_dims = {k: v for k, v in original.to_dict().items() if k not in added}
    old_config = {**config, **{key: {k: v for k, v in config[key].items() if k != "pool_mlp"}
                               for key in ("group_sizes", "scales")}}
    state = {"pruner": {}, "model": {}, "original_dims": old_dims,
             "settings": {"config": old_config, "seed": 0}}
    nvit_prune.check_resumable(state, "old.pth", original, settings)
    with pytest.raises(UserError, match="another model"):
        nvit_prune.check_resumable({**state, "original_dims": {**old_dims, "embed_dim": 48}},
                                   "old.pth", original, settings)
    with pytest.raises(UserError, match="other settings"):
        nvit_prune.check_resumable(state, "old.pth", original, {**settings, "seed": 1})
