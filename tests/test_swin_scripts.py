"""A Swin through the scripts, as a ViT goes: revit_scratch.py --dims (stages) trains it,
nvit_prune.py prunes it (several targets, a latency table timed per stage, the speed
report), a kill and --resume replays the run bitwise, two torchrun ranks agree, and the
compact model evaluates, finetunes, exports and prints its per-stage table."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

import models
from helpers import (FAST, PRUNE_FLAGS, ROOT, assert_same_pruning_state, assert_user_error,
                     env, free_port, kill_at_first_state, run, run_here)
from models.flops import count_macs

pytestmark = pytest.mark.slow

SWIN_DIMS = {"embed_dim": [32, 64], "depths": [2, 2], "window_size": [4, 4],
             "num_heads": [[2, 2], [4, 4]], "qk_dim": 16, "v_dim": 16,
             "mlp_dim": [[64, 64], [128, 128]], "patch_size": 4}
SWIN_FAST = [a for a in FAST]
SWIN_FAST[SWIN_FAST.index("deit_tiny_distilled_patch16_224")] = "reswin"
SWIN_FAST[SWIN_FAST.index("--patch-size") + 1] = "4"
PRUNE = [*PRUNE_FLAGS, "--cost", "macs", "--interval_prune", "3", "--prune_per_iter", "32"]


def tool(name: str, *args) -> subprocess.CompletedProcess:
    """tools.NAME's main in this process, its exit code and output as a subprocess's."""
    import contextlib
    import importlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = importlib.import_module(f"tools.{name}").main([str(a) for a in args])
    return subprocess.CompletedProcess([name], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A Swin trained from scratch for one epoch by revit_scratch.py from a dims file."""
    out = tmp_path_factory.mktemp("swin")
    spec = out / "swin.yaml"
    spec.write_text(yaml.safe_dump(SWIN_DIMS))
    proc = run_here("revit_scratch.py", *SWIN_FAST, "--dims", spec, "--epochs", "1",
                    "--no-model-ema", "--output_dir", out / "train")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Epoch 0: top-1" in proc.stdout
    return out / "train" / "checkpoint.pth"


def test_scratch_training_keeps_the_stages(dense):
    ckpt = torch.load(dense, map_location="cpu", weights_only=True)
    dims = models.SwinDims.from_dict(ckpt["dims"])
    assert dims.embed_dim == [32, 64] and dims.depths == [2, 2] and dims.num_heads == [2, 2, 4, 4]
    assert dims.img_size == 32 and dims.num_classes == 10
    model = models.build_model("reswin", checkpoint=dense)
    assert isinstance(model, models.ReSwin)


def test_prune_several_targets_then_evaluate_finetune_export(tmp_path, dense):
    out = tmp_path / "p"
    proc = run_here("nvit_prune.py", *SWIN_FAST, *PRUNE, "--pretrained-path", dense,
                    "--epochs", "4", "--latency_target", "0.8,0.6", "--pruning_exit",
                    "--speed-report-pairs", "3", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((out / "dims_history.json").read_text())["steps"]
    # the history records each stage's embedding width, and the run ended narrower
    assert steps[0]["dims"]["embed_dim"] == [32, 64]
    assert sum(steps[-1]["dims"]["mlp_dim"]) < sum(steps[0]["dims"]["mlp_dim"])
    dense_model = models.build_model("reswin", checkpoint=dense)
    dense_macs = count_macs(dense_model)[0]
    for target in ("0.8", "0.6"):
        ckpt = torch.load(out / f"pruned_{target}.pth", map_location="cpu", weights_only=True)
        compact = models.build_model("reswin", checkpoint=out / f"pruned_{target}.pth")
        assert isinstance(compact, models.ReSwin)
        ratio = count_macs(compact)[0] / dense_macs
        assert ratio == pytest.approx(ckpt["cost_ratio"], rel=1e-9) and ratio <= float(target)
    # the speed report ran at the end
    assert re.search(r"measured speedup [\d.]+x .* promised by MACs", proc.stdout), proc.stdout[-2000:]
    final = torch.load(out / "pruned_checkpoint.pth", map_location="cpu", weights_only=True)
    assert final["speed"]["pairs"] == 3
    # the compact model scores what the masked student scored
    top1 = float(re.search(r"pruned model: .* top-1 ([\d.]+)%", proc.stdout).group(1))
    ev = run_here("revit_scratch.py", *SWIN_FAST, "--finetune", out / "pruned_checkpoint.pth",
                  "--eval")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert float(re.search(r"top-1 ([\d.]+)%", ev.stdout).group(1)) == pytest.approx(top1, abs=0.006)
    ft = run_here("revit_scratch.py", *SWIN_FAST, "--finetune", out / "pruned_checkpoint.pth",
                  "--epochs", "1", "--kl_loss_coeff", "1", "--pretrained-path", dense,
                  "--no-model-ema", "--output_dir", tmp_path / "ft")
    assert ft.returncode == 0 and "Epoch 0: top-1" in ft.stdout, ft.stderr[-2000:]
    tuned = torch.load(tmp_path / "ft" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert tuned["dims"] == final["dims"]
    # model_info: the per-stage table, MACs as the flop counter's
    info = tool("model_info", "--checkpoint", out / "pruned_checkpoint.pth", "--json")
    data = json.loads(info.stdout)
    assert [b["stage"] for b in data["blocks"]] == [0, 0, 1, 1]
    assert data["blocks"][1]["shift"] == 2 and data["blocks"][2]["shift"] == 0  # 4x4: one window
    assert data["macs"] == count_macs(models.build_model("reswin", checkpoint=out / "pruned_checkpoint.pth"))[0]
    table = tool("model_info", "--checkpoint", out / "pruned_checkpoint.pth")
    assert "patch merging" in table.stdout and "Swin v1" in table.stdout
    # export: ONNX checked in onnxruntime, and a hub folder timm builds
    pytest.importorskip("onnxruntime")
    ex = tool("export", out / "pruned_checkpoint.pth", "--output-dir", tmp_path / "x")
    assert ex.returncode == 0, ex.stderr[-2000:]
    assert float(re.search(r"max abs diff vs PyTorch on a batch of 2: ([\d.e+-]+)", ex.stdout).group(1)) < 1e-4
    hub = tool("export", out / "pruned_checkpoint.pth", "--format", "hf",
                   "--output-dir", tmp_path / "hub")
    assert hub.returncode == 0, hub.stderr[-2000:]
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "reswin"
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "| stage | embedding | window | block |" in card
    import timm
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    compact = models.build_model("reswin", checkpoint=out / "pruned_checkpoint.pth").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), compact(x))


def test_latency_table_timed_per_stage(tmp_path, dense):
    table = tmp_path / "t.json"
    proc = tool("build_latency_table", "--output", table, "--checkpoint", dense,
                    "--batch-size", "8", "--warmup", "1", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(table.read_text())
    assert data["format"] == "nvit-swin-latency-table"
    assert data["meta"]["stages"] == [{"grid": 8, "window": 4, "shift": 2},
                                      {"grid": 4, "window": 4, "shift": 0}]
    assert set(data["stages"][0]) == {"attention", "attention_shifted", "mlp"}
    assert set(data["stages"][1]) == {"attention", "mlp"}
    assert data["stages"][1]["attention"]["axes"]["embed_dim"][-1] == 64
    out = tmp_path / "p"
    pruned = run_here("nvit_prune.py", *SWIN_FAST, *PRUNE[:-6], "--cost", "latency",
                      "--latency_look_up_table", table, "--pretrained-path", dense,
                      "--epochs", "2", "--latency_target", "0.95", "--speed-report-pairs", "0",
                      "--output_dir", out)
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    assert re.search(r"prune step 1: latency ratio", pruned.stdout)
    # a table of other stages (another image size), or a ViT's, is refused in one line
    other = tmp_path / "t64.json"
    assert tool("build_latency_table", "--output", other, "--checkpoint", dense,
                    "--input-size", "64", "--warmup", "0", "--repeats", "1").returncode == 0
    refused = run_here("nvit_prune.py", *SWIN_FAST, *PRUNE[:-6], "--cost", "latency",
                       "--latency_look_up_table", other, "--pretrained-path", dense,
                       "--output_dir", tmp_path / "q")
    assert_user_error(refused, "16x16 tokens", "--checkpoint")
    vit = tmp_path / "vit.json"
    assert tool("build_latency_table", "--output", vit, "--embed-dims", "32",
                    "--heads", "2", "--qk-dims", "8", "--v-dims", "8", "--mlp-dims", "32",
                    "--num-tokens", "4", "--warmup", "0", "--repeats", "1").returncode == 0
    refused = run_here("nvit_prune.py", *SWIN_FAST, *PRUNE[:-6], "--cost", "latency",
                       "--latency_look_up_table", vit, "--pretrained-path", dense,
                       "--output_dir", tmp_path / "r")
    assert_user_error(refused, "a ViT's blocks")
    flag = tool("build_latency_table", "--output", tmp_path / "f.json",
                    "--checkpoint", dense, "--heads", "1,2")
    assert_user_error(flag, "--heads", "per stage")


def test_resume_after_kill_is_bitwise(tmp_path, dense):
    common = [*SWIN_FAST, *PRUNE, "--pretrained-path", dense, "--epochs", "3",
              "--num_workers", "1", "--latency_target", "0.6", "--drop-path", "0.1",
              "--pruning_exit", "--speed-report-pairs", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    run("nvit_prune.py", *common, "--output_dir", full)
    kill_at_first_state("nvit_prune.py", *common, output_dir=part)
    run("nvit_prune.py", *common, "--output_dir", part, "--resume")
    assert_same_pruning_state(full, part)


def test_torchrun_ranks_agree(tmp_path, dense):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "nvit_prune.py"), *SWIN_FAST, *PRUNE,
           "--pretrained-path", str(dense), "--epochs", "2", "--batch-size", "16",
           "--latency_target", "0.7", "--pruning_exit", "--dist-eval",
           "--speed-report-pairs", "0", "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"all 2 processes hold identical masks and weights after \d+ prune steps",
                     proc.stdout), proc.stdout[-3000:]
    assert (tmp_path / "o" / "pruned_checkpoint.pth").is_file()
