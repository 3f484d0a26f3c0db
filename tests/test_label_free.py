"""Label-free pruning and finetuning: the feature distance, unlabeled image folders, and
both scripts with --distill-target features on a backbone."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import models
import pruning
from datasets import IMAGES_VAL_EVERY, build_dataset
from errors import UserError
from helpers import (DENSE_DIMS, FAST, ROOT, assert_same_pruning_state, assert_user_error, env,
                     free_port,
                     kill_at_first_state, run, run_here, write_dense_model)
from losses import FeatureDistillLoss, feature_distance


def tiny_vit(seed: int = 0, **frame) -> models.ReViT:
    torch.manual_seed(seed)
    return models.build_model("deit_tiny_patch16_224", dims=models.Dims(**DENSE_DIMS),
                              img_size=32, patch_size=8, num_classes=0, **frame).eval()


def test_feature_distance_by_hand():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    by_hand = sum(1 - float(s[i] @ t[i]) / float(s[i].norm() * t[i].norm()) for i in range(5)) / 5
    assert feature_distance(s, t, "cosine").item() == pytest.approx(by_hand, rel=1e-5)
    assert feature_distance(s, t, "mse").item() == pytest.approx(
        float(((s - t) ** 2).sum()) / 35, rel=1e-6)
    # tokens: one vector per (image, token)
    s3, t3 = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert feature_distance(s3, t3, "cosine").item() == pytest.approx(
        feature_distance(s3.reshape(6, 7), t3.reshape(6, 7), "cosine").item(), rel=1e-6)


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_loss_is_coeff_times_pooled_plus_tokens(distance):
    full, student = tiny_vit(0), tiny_vit(1)
    student.return_features = True
    x = torch.randn(3, 3, 32, 32)
    loss = FeatureDistillLoss(full, 2.5, distance, tokens="all")
    got = loss(x, student(x))
    full_pooled = full.forward_head(full.forward_features(x), pre_logits=True)
    full_tokens = full.forward_features(x)[:, 1:]
    s = student.forward_features(x)
    want = 2.5 * (feature_distance(s[:, 0], full_pooled, distance)
                  + feature_distance(s[:, 1:], full_tokens, distance))
    torch.testing.assert_close(got, want)
    assert set(loss.last_parts) == {"loss_pooled", "loss_tokens"}
    pooled_only = FeatureDistillLoss(full, 2.5, distance)(x, student(x))
    torch.testing.assert_close(pooled_only, 2.5 * feature_distance(s[:, 0], full_pooled, distance))
    # the student equal to the full model: no distance
    full_copy = tiny_vit(0)
    full_copy.return_features = True
    assert FeatureDistillLoss(full, 1.0, distance, "all")(x, full_copy(x)).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_no_gradient_reaches_the_full_model_and_labels_are_not_read():
    full, student = tiny_vit(0), tiny_vit(1)
    student.return_features = True
    loss = FeatureDistillLoss(full, 1.0)
    loss(torch.randn(2, 3, 32, 32), student(torch.randn(2, 3, 32, 32)), None).backward()
    assert all(p.grad is None and not p.requires_grad for p in full.parameters())
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("tokens", ["pooled", "all"])
def test_masked_student_and_its_compact_model_score_the_same(tokens):
    """Embedding channels pruned: the compact student's features, placed back at the
    channels it kept, give the masked student's loss (what finetuning continues from)."""
    full, student = tiny_vit(0), tiny_vit(1)
    gates = pruning.Gates.attach(student)
    gates.remove("emb", 0, [1, 5, 6, 40])
    gates.remove("mlp", 2, list(range(10)))
    compact = pruning.compact(student)
    channels = pruning.feature_channels(student)
    assert channels == [c for c in range(64) if c not in (1, 5, 6, 40)]
    assert compact.dims.embed_dim == 60
    student.return_features = compact.return_features = True
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        masked = FeatureDistillLoss(full, 1.0, tokens=tokens)(x, student(x))
        small = FeatureDistillLoss(full, 1.0, tokens=tokens, channels=channels)(x, compact(x))
    torch.testing.assert_close(small, masked, rtol=1e-5, atol=1e-6)
    assert masked > 0
    with pytest.raises(UserError, match="which of the full model's channels"):
        FeatureDistillLoss(full, 1.0)(x, compact(x))


def test_swin_feature_pair():
    m = models.build_model("swin_tiny_patch4_window7_224", img_size=32, num_classes=0,
                           embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4).eval()
    x = torch.randn(2, 3, 32, 32)
    m.return_features = True
    pooled, tokens = m(x)
    m.return_features = False
    torch.testing.assert_close(pooled, m(x))
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(pooled, tokens.mean(1))


def write_images(root, n: int, bad: bool = False) -> None:
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i in range(n):
        folder = root / ("deep/er" if i % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        img = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).convert("RGB").resize((32, 32)).save(folder / f"{i:04d}.png")
    if bad:
        (root / "00-broken.jpg").write_text("not an image")  # sorted first: in val
    (root / "notes.txt").write_text("not an image file name: ignored")


def images_args(root, **kw) -> Namespace:
    return Namespace(data_set="IMAGES", data_path=str(root), input_size=32, eval_crop_ratio=1.0,
                     aa="none", reprob=0.0, color_jitter=0.0, **kw)


def test_unlabeled_images_read_recursively_and_split(tmp_path):
    write_images(tmp_path, 120)
    train, classes = build_dataset(True, images_args(tmp_path))
    val, _ = build_dataset(False, images_args(tmp_path))
    assert classes == 0
    assert len(train) + len(val) == 120 and len(val) == -(-120 // IMAGES_VAL_EVERY)
    assert not set(train.paths) & set(val.paths)
    assert any("/deep/er/" in p for p in train.paths)
    img, label = train[0]
    assert img.shape == (3, 32, 32) and label == 0


def test_unlabeled_images_refusals_and_bad_files(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("x")
    with pytest.raises(UserError, match="holds no image files"):
        build_dataset(True, images_args(tmp_path / "empty"))
    with pytest.raises(UserError, match="is not a directory"):
        build_dataset(True, images_args(tmp_path / "nowhere"))
    write_images(tmp_path / "one", 1)
    with pytest.raises(UserError, match="too few"):
        build_dataset(True, images_args(tmp_path / "one"))
    write_images(tmp_path / "bad", 60, bad=True)
    val, _ = build_dataset(False, images_args(tmp_path / "bad"))
    with pytest.raises(UserError, match="cannot read image .*00-broken.jpg"):
        val[0]
    skipping, _ = build_dataset(False, images_args(tmp_path / "bad", skip_bad_images=True))
    assert skipping[0][0].shape == (3, 32, 32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "imgs", 400, bad=True)
    write_dense_model(root / "dense.pth")
    return root


IMAGES = ["--data-set", "IMAGES", "--skip-bad-images"]
LABEL_FREE = ["--distill-target", "features", "--kl_loss_coeff", "1"]
PRUNE = ["--pruning", "--cost", "macs", "--interval_prune", "2", "--prune_per_iter", "64",
         "--student_eval", "true", "--drop-path", "0.1"]


@pytest.mark.slow
def test_prune_and_finetune_without_labels(folder, tmp_path):
    out = tmp_path / "p"
    proc = run("nvit_prune.py", *FAST, *IMAGES, "--data-path", folder / "imgs", *PRUNE,
               *LABEL_FREE, "--distill-tokens", "all", "--drop-path", "0.1",
               "--unit-scales", "auto",
               "--pretrained-path", folder / "dense.pth", "--epochs", "12",
               "--latency_target", "0.5", "--output_dir", out)
    assert "before pruning: feature cosine 1.0000" in proc.stdout, proc.stdout[-3000:]
    assert "(pooled " in proc.stdout and "tokens " in proc.stdout
    assert re.search(r"unit scales \(auto, from the model's macs\): emb [\d.]+, head [\d.]+, "
                     r"qk [\d.]+, v [\d.]+, mlp 1\n", proc.stdout)
    ckpt = torch.load(out / "pruned_checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["cost_ratio"] <= 0.5
    assert ckpt["feature_cos_dense"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < ckpt["feature_cos_pruned"] < 1 and "top1_pruned" not in ckpt
    assert ckpt["dims"]["num_classes"] == 0
    compact = models.build_model("deit_tiny_patch16_224", checkpoint=out / "pruned_checkpoint.pth")
    channels = ckpt["feature_channels"]
    assert channels is None or len(channels) == compact.dims.embed_dim
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[0] == {"kind": "dense", "test_cos": pytest.approx(1.0, abs=1e-6)}
    steps = [r for r in log if r["kind"] == "prune_step"]
    assert all(r["loss"] == pytest.approx(r["loss_pooled"] + r["loss_tokens"], rel=1e-5)
               for r in steps)
    # finetuned label-free against the dense model, then scored with --eval
    ft = tmp_path / "ft"
    proc = run("revit_scratch.py", *FAST, "--no-model-ema", *IMAGES, "--data-path",
               folder / "imgs", *LABEL_FREE, "--pretrained-path", folder / "dense.pth",
               "--finetune", out, "--epochs", "2", "--output_dir", ft)
    first = float(proc.stdout.split("Epoch 0: feature cosine ")[1].split()[0])
    best = float(proc.stdout.rsplit("best feature cosine ", 1)[1].split()[0])
    assert best >= first
    ev = run("revit_scratch.py", *FAST, *IMAGES, "--data-path", folder / "imgs", *LABEL_FREE,
             "--pretrained-path", folder / "dense.pth", "--eval", "--finetune",
             ft / "best_checkpoint.pth")
    assert f"feature cosine {best:.4f}" in ev.stdout, ev.stdout[-2000:]


def test_label_free_refusals(folder, tmp_path):
    common = [*FAST, *IMAGES, "--data-path", folder / "imgs", "--pretrained-path",
              folder / "dense.pth", "--output_dir", tmp_path / "o"]
    assert_user_error(run_here("nvit_prune.py", *common, *PRUNE), "has no labels",
                      "--distill-target features")
    assert_user_error(run_here("nvit_prune.py", *common, *PRUNE, "--distill-target", "features",
                               "--kl_loss_coeff", "0"), "--kl_loss_coeff is 0")
    assert_user_error(run_here("nvit_prune.py", *common, *PRUNE, *LABEL_FREE, "--drop-path", "0"),
                      "--drop-path")
    assert_user_error(run_here("revit_scratch.py", *common, *LABEL_FREE, "--distillation-type",
                               "hard", "--teacher-path", folder / "dense.pth"),
                      "--distillation-type hard")
    assert not (tmp_path / "o").exists()


def test_digits_folder_writes_both_layouts(tmp_path):
    from tools import digits_folder
    assert digits_folder.main([str(tmp_path / "flat")]) == 0
    train, classes = build_dataset(True, images_args(tmp_path / "flat"))
    val, _ = build_dataset(False, images_args(tmp_path / "flat"))
    assert classes == 0 and len(train) + len(val) == 1797
    assert digits_folder.main([str(tmp_path / "cls"), "--with-classes"]) == 0
    folder = Namespace(**{**vars(images_args(tmp_path / "cls")), "data_set": "FOLDER"})
    digits_val, n = build_dataset(False, folder)
    assert n == 10 and len(digits_val) == 359
    # DIGITS' own val split, image for image
    ref, _ = build_dataset(False, Namespace(**{**vars(folder), "data_set": "DIGITS"}))
    path, label = digits_val.samples[7]
    j = list(ref.indices).index(int(path.rsplit("/", 1)[1].removesuffix(".png")))
    assert torch.equal(digits_val[7][0], ref[j][0]) and label == ref[j][1]
    assert digits_folder.main([str(tmp_path / "cls")]) == 2  # not empty: refused
    assert not (tmp_path / "cls.partial").exists()


# the encoder structures the slow runs use: CLIP-style with qk-norm (pre-norm, QuickGELU,
# LayerNorm eps 1e-5); EVA-02-style (Eva's names and Q/V biases, rotary, packed SwiGLU;
# its MLP is larger: a higher MACs target for the same three epochs); SigLIP-style (the
# attention pool, whose MLP neurons are a model-level layer of the gates and masks)
ENCODERS = {"CLIP": ("vit_base_patch16_clip_quickgelu_224", {"qk_norm": True}, "0.6"),
            "EVA-02": ("eva02_tiny_patch14_224", {}, "0.75"),
            "SigLIP": ("vit_base_patch16_siglip_224", {}, "0.65")}


@pytest.fixture(scope="module", params=list(ENCODERS))
def encoder(request, tmp_path_factory):
    """(its flags with --model and --latency_target, a dense model of it with 10 classes)."""
    name, kwargs, target = ENCODERS[request.param]
    path = tmp_path_factory.mktemp("encoder") / "dense.pth"
    torch.manual_seed(0)
    m = models.build_model(name, dims=models.Dims(**DENSE_DIMS), img_size=32, patch_size=8,
                           num_classes=10, **kwargs)
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    flags = [a if a != "deit_tiny_distilled_patch16_224" else name for a in FAST]
    return [*flags, "--latency_target", target], path


@pytest.mark.slow
def test_label_free_resume_after_kill_is_bitwise(folder, encoder, tmp_path):
    flags, dense = encoder
    common = [*flags, *IMAGES, "--data-path", folder / "imgs", *PRUNE, *LABEL_FREE,
              "--distill-tokens", "all", "--unit-scales", "auto", "--pretrained-path",
              dense, "--epochs", "3", "--num_workers", "1", "--pruning_exit",
              "--speed-report-pairs", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    run("nvit_prune.py", *common, "--output_dir", full)
    kill_at_first_state("nvit_prune.py", *common, output_dir=part)
    run("nvit_prune.py", *common, "--output_dir", part, "--resume")
    a, b = assert_same_pruning_state(full, part)
    assert a["feature_cos_dense"] == b["feature_cos_dense"]
    weights = a["model"]
    if "blocks.0.attn.q_norm.weight" in weights:  # CLIP-style with qk-norm
        assert weights["blocks.0.attn.q_norm.weight"].shape == (16,)
    elif "attn_pool.latent" in weights:  # SigLIP: the pool's layer is in the saved masks
        assert a["masks"]["model"]["pool_mlp"].shape == (128,)
    else:  # EVA-02: Eva's Q and V biases, no K bias
        assert "blocks.0.attn.q_bias" in weights and "blocks.0.attn.qkv.bias" not in weights
    # a resumed run with other label-free settings is refused
    other = run_here("nvit_prune.py", *common, "--distill-loss", "mse", "--output_dir", part,
                     "--resume")
    assert_user_error(other, "other settings", "distill_loss")


@pytest.mark.slow
def test_label_free_torchrun_ranks_agree(folder, encoder, tmp_path):
    flags, dense = encoder
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "nvit_prune.py"), *flags, *IMAGES,
           "--data-path", str(folder / "imgs"), *PRUNE, *LABEL_FREE, "--pretrained-path",
           str(dense), "--epochs", "2", "--batch-size", "16", "--pruning_exit", "--dist-eval", "--speed-report-pairs", "0", "--output_dir",
           str(tmp_path / "o")]
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"all 2 processes hold identical masks and weights after \d+ prune steps",
                     proc.stdout), proc.stdout[-3000:]
    assert "feature cosine" in proc.stdout


def test_eval_builds_no_teacher(folder):
    """--eval scores the checkpoint; the losses (and DeiT's teacher, which cannot be fetched
    here) are built only for a label-free run, whose score needs its full model."""
    proc = run_here("revit_scratch.py", *FAST, "--eval", "--finetune", folder / "dense.pth",
                    "--distillation-type", "hard", "--kl_loss_coeff", "1000",
                    "--pretrained-path", folder / "dense.pth")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Accuracy of the network on the 359 test images: top-1" in proc.stdout
