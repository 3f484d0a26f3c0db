"""Every bad input a user can give is refused in one line before any work and any file.

One row per bad input, across both scripts and the tools: the run exits non-zero with exactly
one `error:` line that names the flag or file at fault, raises nothing else (an exception
other than the user error would fail the test with its traceback), and leaves the output
folder as it was: never created for a fresh run, byte-for-byte unchanged for an earlier one.
Rows run in-process (the scripts' own `main` through `utils.run_main`) to stay fast.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import models
import run_folder
import utils
from helpers import FAST, TRAIN, TINY_DIMS, run_script, write_dims
from pruning.cost import LatencyTable

PRUNE = ["--pruning", "--cost", "macs", "--kl_loss_coeff", "1", "--interval_prune", "4",
         "--prune_per_iter", "48", "--latency_target", "0.5"]
DENSE_DIMS = models.Dims(embed_dim=64, num_heads=[4, 4], qk_dim=[16, 16], v_dim=[16, 16],
                         mlp_dim=[128, 128])


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the rows refer to: two finished training runs, a dense model to prune, an image
    folder with a corrupt and a truncated JPEG, dims and table files."""
    root = tmp_path_factory.mktemp("world")
    dims = write_dims(root / "tiny.yaml")
    for name in ("runA", "runB"):
        run_script("revit_scratch", [*TRAIN, "--dims", dims, "--epochs", "1",
                                     "--output_dir", root / name])
    torch.manual_seed(0)
    dense = models.build_model("deit_tiny_distilled_patch16_224", dims=DENSE_DIMS, img_size=32,
                               patch_size=8, num_classes=10)
    torch.save({"model": dense.state_dict(), "dims": dense.dims.to_dict()}, root / "dense.pth")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = root / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                    folder / f"{i}.jpg")
    good = (root / "images" / "train" / "a" / "0.jpg").read_bytes()
    shutil.copytree(root / "images", root / "corrupt_images")
    (root / "corrupt_images" / "train" / "a" / "corrupt.jpg").write_bytes(b"not an image")
    shutil.copytree(root / "images", root / "truncated_images")
    (root / "truncated_images" / "train" / "b" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "history.json").write_text(json.dumps({"original": {}, "steps": []}))
    (root / "existing.json").write_text("{}")
    (root / "existing.onnx").write_text("")
    return root


def latency_table(path: Path, embed: list[int], num_tokens: int) -> Path:
    """A smooth monotone table over the given embedding widths."""
    att_axes = {"embed_dim": embed, "num_heads": [1, 4], "qk_dim": [8, 16], "v_dim": [8, 16]}
    att = [[[[e * h * (q + v) * 1e-4 for v in att_axes["v_dim"]] for q in att_axes["qk_dim"]]
            for h in att_axes["num_heads"]] for e in embed]
    mlp_axes = {"embed_dim": embed, "mlp_dim": [16, 128]}
    mlp = [[e * m * 1e-5 for m in mlp_axes["mlp_dim"]] for e in embed]
    data = LatencyTable.make_dict({"device": "cpu", "num_tokens": num_tokens}, att_axes, att,
                                  mlp_axes, mlp)
    path.write_text(json.dumps(data))
    return path


def dims_file(world: Path, name: str, **changes) -> Path:
    data = {**TINY_DIMS, **changes}
    path = world / name
    path.write_text(yaml.safe_dump(data))
    return path


def live_lock(folder: Path) -> subprocess.Popen:
    """A live process holding `folder`'s lock, as a second run would find it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run_folder.LOCK_FILE).write_text(json.dumps(
        {"pid": proc.pid, "host": socket.gethostname(),
         "started": run_folder._start_time(proc.pid)}))
    return proc


# --------------------------------------------------------------------------------- rows
# (id, script, arguments, words the error line must hold, output folder: "fresh" or "runA")
# {W} is the fixture folder, {OUT} the output folder of the row.
T = [*TRAIN, "--epochs", "1", "--output_dir", "{OUT}"]
P = [*FAST, *PRUNE, "--pretrained-path", "{W}/dense.pth", "--epochs", "1", "--output_dir", "{OUT}"]
ROWS = [
    # ---- revit_scratch.py: flags out of range or unknown, refused when parsed
    ("clip_grad_negative", "revit_scratch", [*T, "--clip-grad", "-1"], ["--clip-grad"], "fresh"),
    ("patch_size_0", "revit_scratch", [*T, "--patch-size", "0"], ["--patch-size"], "fresh"),
    ("smoothing_2", "revit_scratch", [*T, "--smoothing", "2"], ["--smoothing"], "fresh"),
    ("reprob_2", "revit_scratch", [*T, "--reprob", "2"], ["--reprob"], "fresh"),
    ("color_jitter_negative", "revit_scratch", [*T, "--color-jitter", "-1"], ["--color-jitter"], "fresh"),
    ("warmup_negative", "revit_scratch", [*T, "--warmup-epochs", "-1"], ["--warmup-epochs"], "fresh"),
    ("crop_ratio_0", "revit_scratch", [*T, "--eval-crop-ratio", "0"], ["--eval-crop-ratio"], "fresh"),
    ("drop_path_1_5", "revit_scratch", [*T, "--drop-path", "1.5"], ["--drop-path"], "fresh"),
    ("workers_negative", "revit_scratch", [*T, "--num_workers", "-1"], ["--num_workers"], "fresh"),
    ("aa_bogus", "revit_scratch", [*T, "--aa", "bogus"], ["--aa", "bogus"], "fresh"),
    ("opt_bogus", "revit_scratch", [*T, "--opt", "bogus"], ["--opt", "bogus"], "fresh"),
    ("sched_bogus", "revit_scratch", [*T, "--sched", "bogus"], ["--sched", "bogus"], "fresh"),
    ("remode_bogus", "revit_scratch", [*T, "--remode", "bogus"], ["--remode"], "fresh"),
    ("interpolation_bogus", "revit_scratch", [*T, "--train-interpolation", "cubic"],
     ["--train-interpolation"], "fresh"),
    ("emb_0", "revit_scratch", [*T, "--EMB", "0"], ["--EMB"], "fresh"),
    ("lr_nan", "revit_scratch", [*T, "--lr", "nan"], ["--lr"], "fresh"),
    ("momentum_1_5", "revit_scratch", [*T, "--momentum", "1.5"], ["--momentum"], "fresh"),
    ("cutmix_minmax_one_value", "revit_scratch", [*T, "--cutmix-minmax", "0.3"],
     ["--cutmix-minmax"], "fresh"),
    ("inat_category_bogus", "revit_scratch", [*T, "--inat-category", "species"],
     ["--inat-category"], "fresh"),
    # ---- revit_scratch.py: dims files
    ("dims_float", "revit_scratch", [*T, "--dims", "{W}/float.yaml"],
     ["float.yaml", "qk_dim of block 1", "12.5"], "fresh"),
    ("dims_bool", "revit_scratch", [*T, "--dims", "{W}/bool.yaml"],
     ["bool.yaml", "num_heads of block 0", "True"], "fresh"),
    ("dims_string", "revit_scratch", [*T, "--dims", "{W}/string.yaml"],
     ["string.yaml", "mlp_dim of block 1", "'16'"], "fresh"),
    ("dims_unknown_key", "revit_scratch", [*T, "--dims", "{W}/unknown.yaml"],
     ["unknown.yaml", "heads_per_block"], "fresh"),
    ("dims_classes_vs_data", "revit_scratch", [*T, "--dims", "{W}/classes.yaml"],
     ["classes.yaml", "num_classes 3", "10 classes"], "fresh"),
    ("dims_binary", "revit_scratch", [*T, "--dims", "{W}/binary.yaml"],
     ["binary.yaml", "not a text file"], "fresh"),
    ("dims_missing", "revit_scratch", [*T, "--dims", "{W}/nope.yaml"], ["nope.yaml"], "fresh"),
    ("dims_and_emb", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml", "--EMB", "176"],
     ["--dims", "--EMB"], "fresh"),
    ("emb_too_big_for_memory", "revit_scratch", [*T, "--EMB", "200000"],
     ["--dims/--EMB", "GiB", "free memory"], "fresh"),
    ("img_not_multiple_of_patch", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml",
                                                    "--input-size", "36"], ["36"], "fresh"),
    # ---- revit_scratch.py: combinations, data, devices
    ("teacher_without_distillation", "revit_scratch",
     [*T, "--dims", "{W}/tiny.yaml", "--teacher-path", "{W}/dense.pth"],
     ["--teacher-path", "--distillation-type"], "fresh"),
    ("teacher_name_offline", "revit_scratch",
     [*T, "--dims", "{W}/tiny.yaml", "--distillation-type", "hard"],
     ["--teacher-path FILE", "HF_HUB_OFFLINE"], "fresh"),
    ("pretrained_offline", "revit_scratch", [*T, "--pretrained"],
     ["--pretrained-path", "HF_HUB_OFFLINE"], "fresh"),
    ("kl_without_full_model", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml",
                                                "--kl_loss_coeff", "1"], ["--kl_loss_coeff"], "fresh"),
    ("unknown_data_set", "revit_scratch", [*T, "--data-set", "MNISTX"], ["--data-set", "MNISTX"], "fresh"),
    ("no_data_path", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml", "--data-set", "IMNET"],
     ["--data-path"], "fresh"),
    ("missing_data_path", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml", "--data-set", "FOLDER",
                                            "--data-path", "{W}/none"], ["--data-path", "none"], "fresh"),
    ("batch_larger_than_data", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml",
                                                 "--batch-size", "5000"], ["--batch-size"], "fresh"),
    ("accumulation_larger_than_data", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml",
                                                        "--batch-size", "500", "--grad-accum-steps",
                                                        "3"], ["--grad-accum-steps 3", "images each process gets"],
     "fresh"),
    ("corrupt_image", "revit_scratch",
     [*TRAIN, "--epochs", "1", "--dims", "{W}/tiny.yaml", "--data-set", "FOLDER", "--batch-size", "8",
      "--data-path", "{W}/corrupt_images", "--no-repeated-aug"], ["corrupt.jpg", "--data-path"], None),
    ("truncated_image", "revit_scratch",
     [*TRAIN, "--epochs", "1", "--dims", "{W}/tiny.yaml", "--data-set", "FOLDER", "--batch-size", "8",
      "--data-path", "{W}/truncated_images", "--no-repeated-aug"], ["trunc.jpg", "truncated"], None),
    ("truncated_image_in_a_worker", "revit_scratch",
     [*TRAIN, "--epochs", "1", "--dims", "{W}/tiny.yaml", "--data-set", "FOLDER", "--batch-size", "8",
      "--data-path", "{W}/truncated_images", "--no-repeated-aug", "--num_workers", "1"],
     ["trunc.jpg", "truncated"], None),
    # ---- revit_scratch.py: checkpoints and output folders
    ("resume_missing", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml", "--resume", "{W}/nope.pth"],
     ["--resume", "nope.pth"], "fresh"),
    ("resume_corrupt", "revit_scratch", [*T, "--resume", "{W}/corrupt.pth"],
     ["corrupt.pth", "corrupt or truncated"], "fresh"),
    ("resume_other_run", "revit_scratch", [*T, "--epochs", "2", "--resume", "{W}/runB/checkpoint.pth"],
     ["--resume", "runB", "--output_dir", "another run"], "runA"),
    ("fresh_run_into_used_folder", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml"],
     ["already holds a run", "--resume"], "runA"),
    ("folder_in_use", "revit_scratch", [*T, "--epochs", "2", "--resume"],
     ["in use by another run", "process"], "runA"),
    ("output_dir_is_a_file", "revit_scratch", [*TRAIN, "--epochs", "1", "--dims", "{W}/tiny.yaml",
                                               "--output_dir", "{W}/existing.json"],
     ["--output_dir", "is a file"], None),
    ("finetune_missing", "revit_scratch", [*T, "--finetune", "{W}/nope.pth"],
     ["--finetune", "nope.pth"], "fresh"),
    ("eval_without_checkpoint", "revit_scratch", [*TRAIN, "--eval"], ["--eval"], None),
    ("use_ema_without_ema", "revit_scratch",
     [*TRAIN, "--eval", "--resume", "{W}/runA/checkpoint.pth", "--use-ema"],
     ["--use-ema", "runA", "holds no EMA weights", "without a weight EMA"], None),
    ("use_ema_when_training", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml", "--use-ema"],
     ["--use-ema", "--eval or --finetune"], "fresh"),
    ("best_on_ema_without_ema", "revit_scratch", [*T, "--dims", "{W}/tiny.yaml", "--best-on-ema"],
     ["--best-on-ema", "--no-model-ema"], "fresh"),
    ("resume_with_another_best_rule", "revit_scratch",
     [*FAST, "--epochs", "2", "--output_dir", "{OUT}", "--resume", "--best-on-ema"],
     ["--best-on-ema", "resume it the same way"], "runA"),
    # ---- nvit_prune.py
    ("prune_unreachable_target", "nvit_prune", [*P, "--latency_target", "0.02"],
     ["--latency_target 0.02", "cannot be reached", "minimum widths"], "fresh"),
    ("prune_table_not_covering", "nvit_prune",
     [*P, "--cost", "latency", "--latency_look_up_table", "{W}/wide_table.json"],
     ["does not cover", "embed_dim"], "fresh"),
    ("prune_table_other_tokens", "nvit_prune",
     [*P, "--cost", "latency", "--latency_look_up_table", "{W}/tokens_table.json"],
     ["--latency_look_up_table", "198 tokens", "18"], "fresh"),
    ("prune_table_missing", "nvit_prune",
     [*P, "--cost", "latency", "--latency_look_up_table", "{W}/nope.json"],
     ["--latency_look_up_table", "nope.json"], "fresh"),
    ("prune_without_pruning_flag", "nvit_prune", [a for a in P if a != "--pruning"], ["--pruning"], "fresh"),
    ("prune_dict_not_json", "nvit_prune", [*P, "--prune_dict", "{Global: 3}"], ["--prune_dict"], "fresh"),
    ("prune_config_missing", "nvit_prune", [*P, "--pruning_config", "{W}/nope.json"],
     ["--pruning_config", "nope.json"], "fresh"),
    ("prune_resume_training_checkpoint", "nvit_prune",
     [*P, "--resume", "{W}/runB/checkpoint.pth"], ["--resume", "checkpoint.pth"], "fresh"),
    ("prune_teacher_without_distillation", "nvit_prune", [*P, "--teacher-path", "{W}/dense.pth"],
     ["--teacher-path"], "fresh"),
    ("prune_target_above_1", "nvit_prune", [*P, "--latency_target", "1.5"], ["--latency_target"], "fresh"),
    # ---- tools
    ("table_output_exists", "tools.build_latency_table", ["--output", "{W}/existing.json"],
     ["--output", "existing.json", "--force"], None),
    ("table_output_is_folder", "tools.build_latency_table", ["--output", "{W}"], ["--output"], None),
    ("table_batch_0", "tools.build_latency_table", ["--output", "{OUT}/t.json", "--batch-size", "0"],
     ["--batch-size"], "fresh"),
    ("export_output_exists", "tools.export", ["{W}/runA/checkpoint.pth", "--output-dir", "{W}",
                                              "--name", "existing"], ["existing.onnx", "--force"], None),
    ("export_batch_0", "tools.export", ["{W}/runA/checkpoint.pth", "--batch-size", "0"],
     ["--batch-size"], None),
    ("plot_bad_history", "tools.plot_widths", ["{W}/history.json", "--output", "{OUT}/w.png"],
     ["history.json"], "fresh"),
    ("plot_output_exists", "tools.plot_widths", ["{W}/history.json", "--output", "{W}/existing.json"],
     ["existing.json", "--force"], None),
    ("check_data_missing", "tools.check_data", ["--data-set", "FOLDER", "--data-path", "{W}/none"],
     ["--data-path"], None),
    ("model_info_emb_negative", "tools.model_info", ["--EMB", "-5"], ["--EMB"], None),
]


if not torch.cuda.is_available():
    ROWS.append(("cuda_missing", "revit_scratch", [*T, "--device", "cuda"], ["--device", "CUDA"],
                 "fresh"))


def test_at_least_forty_rows():
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def call(module_name: str, argv: list[str], monkeypatch) -> int:
    """Run a script or tool as its __main__ would; returns the exit code."""
    module = importlib.import_module(module_name)
    try:
        if module_name in ("revit_scratch", "nvit_prune", "tools.check_data"):
            utils.run_main(module.main, module.get_args_parser().parse_args(argv))
            return 0
        if module_name == "tools.plot_widths":
            monkeypatch.setattr(sys, "argv", ["plot_widths", *argv])
            module.main()
            return 0
        return module.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_in_one_line(row, world, tmp_path, monkeypatch, capsys):
    name, script, argv, words, folder = row
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    # the files some rows name
    dims_file(world, "float.yaml", qk_dim=[8, 12.5])
    dims_file(world, "bool.yaml", num_heads=[True, 2])
    dims_file(world, "string.yaml", mlp_dim=[48, "16"])
    dims_file(world, "unknown.yaml", heads_per_block=[2, 2])
    dims_file(world, "classes.yaml", num_classes=3)
    (world / "binary.yaml").write_bytes(bytes(range(256)))
    (world / "corrupt.pth").write_bytes((world / "runA" / "checkpoint.pth").read_bytes()[:1000])
    latency_table(world / "wide_table.json", [256, 512], num_tokens=18)
    latency_table(world / "tokens_table.json", [32, 64], num_tokens=198)
    out = world / "runA" if folder == "runA" else tmp_path / "out"
    before = snapshot(world / "runA")
    holder = live_lock(out) if name == "folder_in_use" else None
    if holder:
        before = snapshot(world / "runA")
    try:
        argv = [str(a).replace("{W}", str(world)).replace("{OUT}", str(out)) for a in argv]
        capsys.readouterr()
        code = call(script, argv, monkeypatch)
    finally:
        if holder:
            holder.kill()
            (out / run_folder.LOCK_FILE).unlink()
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    report = os.environ.get("NVIT_BAD_INPUT_REPORT")  # the table of messages, for the docs
    if report:
        with open(report, "a") as f:
            f.write(f"{name}\t{script}\t{lines[0]}\n")
    if folder == "fresh":
        assert not out.exists(), f"{out} was created"
    if holder:
        before.pop(run_folder.LOCK_FILE, None)
    assert snapshot(world / "runA") == before  # an earlier run is never touched


# ------------------------------------------------------------------ bad images, listed or skipped
def test_check_data_lists_every_bad_image(world, capsys):
    import tools.check_data as check_data
    for folder, bad in (("images", []), ("corrupt_images", ["corrupt.jpg"]),
                        ("truncated_images", ["trunc.jpg"])):
        args = check_data.get_args_parser().parse_args(
            ["--data-set", "FOLDER", "--data-path", str(world / folder), "--num_workers", "0"])
        found = check_data.bad_images(args)
        assert [Path(line.split(":")[0]).name for line in found] == bad
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        check_data.main(args)
    assert e.value.code == 1 and "bad image" in capsys.readouterr().out


def test_skip_bad_images_trains_and_counts_them(world, tmp_path, capsys):
    """--skip-bad-images: the run goes on with the next readable image, names the skipped file
    on stderr and counts replacements in log.txt (each of an epoch's draws of the file)."""
    out = tmp_path / "o"
    run_script("revit_scratch", [*TRAIN, "--epochs", "1", "--dims", world / "tiny.yaml",
                                 "--data-set", "FOLDER", "--data-path", world / "corrupt_images",
                                 "--batch-size", "8", "--no-repeated-aug", "--skip-bad-images",
                                 "--output_dir", out])
    assert "skipped unreadable image" in capsys.readouterr().err
    log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert log["skipped_images"] >= 1
