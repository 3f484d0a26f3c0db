"""Shipping a pruned model: the timm / Hugging Face hub folder (config.json, model.safetensors,
a model card) that timm.create_model('local-dir:...') and 'hf-hub:...' load, every route that
takes a checkpoint taking the folder too, --push-to-hub (with huggingface_hub's API replaced:
never the network), int8 ONNX, torch.export and the dynamo ONNX exporter."""
from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import timm
import torch
import yaml

import checkpoints
import hub_folder
import models
from errors import UserError
from helpers import DENSE_DIMS, FAST, PRUNE_FLAGS, run_here
from models import Dims
from tools import export as export_tool

FRAME = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, distilled=True)
SPEED = {"device": "cpu", "batch_size": 32, "precision": "float32", "pairs": 10,
         "speedup": 1.41, "speedup_p25": 1.38, "speedup_p75": 1.45, "macs_ratio": 0.49,
         "macs_speedup": 2.04, "table_speedup": 1.62, "timing": "wall clock", "dense_ms": 3.0,
         "compact_ms": 2.1}
TABLE = {"device": "cpu", "device_name": "x86_64", "batch_size": 32, "dtype": "float32",
         "threads": 2, "num_tokens": 18, "token_scale": True, "runtime": "torch"}


def pruned_file(tmp_path: Path) -> tuple[Path, models.ReViT, Dims]:
    """A compact model as nvit_prune.py writes it: original dims, top-1, speed report, the
    latency table's settings, the run's flags."""
    torch.manual_seed(0)
    dense = Dims(64, [4, 4], [16, 16], [16, 16], [128, 128], **FRAME)
    compact = models.ReViT(Dims(32, [2, 4], [8, 16], [16, 8], [64, 32], **FRAME)).eval()
    args = Namespace(model="deit_tiny_distilled_patch16_224", data_set="CIFAR10", cost="latency",
                     latency_target=0.5, prune_per_iter=32, kl_loss_coeff=1e5)
    path = tmp_path / "pruned_checkpoint.pth"
    checkpoints.save_model_file(path, compact, args, original_dims=dense.to_dict(),
                                cost="latency", cost_ratio=0.4891, top1_dense=81.25,
                                top1_pruned=79.5, speed=SPEED, latency_table=TABLE)
    return path, compact, dense


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_hub_folder_round_trips_through_timm(tmp_path):
    """--format hf writes timm's hub layout; timm.create_model('local-dir:DIR', pretrained=True)
    gives the checkpoint's logits bitwise, and so does build_model on the folder."""
    path, compact, _ = pruned_file(tmp_path)
    out = tmp_path / "hub"
    assert export_tool.main([str(path), "--format", "hf", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "revit" and config["num_classes"] == 10
    assert Dims.from_dict(config["model_args"]["dims"]) == compact.dims
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] and config["pretrained_cfg"]["interpolation"]
    x = torch.randn(3, 3, 32, 32)
    want = logits(compact, x)
    assert torch.equal(logits(timm.create_model(f"local-dir:{out}", pretrained=True), x), want)
    assert torch.equal(logits(models.build_model("vit_small_patch16_224", checkpoint=out), x), want)


def test_a_pruned_rotary_model_travels_as_a_hub_folder(tmp_path):
    """A compact EVA-02-style model (Eva's names, rotary pairs pruned: per-block rope_dims)
    written as a hub folder loads through timm with the same logits, rotating by the same
    kept frequencies."""
    from pruning import Gates, compact as compact_of
    torch.manual_seed(0)
    dense = models.build_model("eva02_tiny_patch14_224", dims=Dims.uniform(32, 2, 4, 48),
                               img_size=32, patch_size=8, num_classes=10).eval()
    gates = Gates.attach(dense)
    gates.remove("qk", 0, [1, 3])
    gates.remove("emb", 0, [2, 9])
    small = compact_of(dense).eval()
    assert small.dims.rope_dims == [[0, 1, 4, 5], list(range(8))]
    path = tmp_path / "pruned_checkpoint.pth"
    checkpoints.save_model_file(path, small, Namespace(model="eva02_tiny_patch14_224"),
                                original_dims=dense.dims.to_dict())
    out = tmp_path / "hub"
    assert export_tool.main([str(path), "--format", "hf", "--output-dir", str(out)]) == 0
    x = torch.randn(2, 3, 32, 32)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert loaded.dims == small.dims
    assert torch.equal(logits(loaded, x), logits(small, x))


def test_hf_hub_name_loads_a_pushed_folder(tmp_path, monkeypatch):
    """'hf-hub:ORG/NAME' reads the same files from the hub: here from the folder, through
    huggingface_hub's download function replaced (no network)."""
    path, compact, _ = pruned_file(tmp_path)
    out = tmp_path / "hub"
    assert export_tool.main([str(path), "--format", "hf", "--output-dir", str(out)]) == 0
    import timm.models._hub as timm_hub
    asked = []

    def from_folder(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        return str(out / filename)
    monkeypatch.setattr(timm_hub, "hf_hub_download", from_folder)
    model = timm.create_model("hf-hub:someone/pruned-deit", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(model, x), logits(compact, x))
    assert ("someone/pruned-deit", "config.json") in asked


def test_model_card_says_what_the_model_is(tmp_path):
    path, compact, dense = pruned_file(tmp_path)
    out = tmp_path / "hub"
    assert export_tool.main([str(path), "--format", "hf", "--output-dir", str(out),
                             "--license", "apache-2.0"]) == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and front["license"] == "apache-2.0"
    assert front["datasets"] == ["cifar10"] and "image-classification" in front["tags"]
    body = card.split("---", 2)[2]
    assert "deit_tiny_distilled_patch16_224" in body  # the origin model
    dense_params = sum(p.numel() for p in models.ReViT(dense).parameters())
    params = sum(p.numel() for p in compact.parameters())
    assert f"| params | {dense_params:,} | {params:,} |" in body
    assert "| top-1 (%) on CIFAR10 | 81.25 | 79.50 |" in body
    assert "| 1 | 4 | 16 | 8 | 32 |" in body  # block 1: heads, QK, V, MLP
    assert "**1.41x**" in body and "the MACs promised 2.04x" in body and "1.62x" in body
    assert "runtime torch" in body and "batch_size 32" in body  # the latency table
    assert "`--prune_per_iter` | `32`" in body


@pytest.mark.slow
def test_every_route_takes_a_hub_folder(tmp_path, capsys):
    """--pretrained-path, --finetune (with --eval) and tools.model_info take a hub folder as
    they take a checkpoint file."""
    torch.manual_seed(0)
    dense = models.build_model("deit_tiny_distilled_patch16_224", dims=Dims(**DENSE_DIMS),
                               img_size=32, patch_size=8, num_classes=10)
    ckpt = tmp_path / "dense.pth"
    torch.save({"model": dense.state_dict(), "dims": dense.dims.to_dict()}, ckpt)
    folder = tmp_path / "hub"
    assert export_tool.main([str(ckpt), "--format", "hf", "--output-dir", str(folder)]) == 0
    proc = run_here("revit_scratch.py", *FAST, "--eval", "--finetune", folder)
    assert proc.returncode == 0 and "top-1" in proc.stdout, proc.stderr[-2000:]
    out = tmp_path / "p"
    prune = [PRUNE_FLAGS[0], "--cost", "macs", *PRUNE_FLAGS[1:]]
    proc = run_here("nvit_prune.py", *FAST, *prune, "--pretrained-path", folder, "--epochs", "1",
                    "--latency_target", "0.9", "--pruning_exit", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from tools import model_info
    capsys.readouterr()
    assert model_info.main(["--checkpoint", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dims"]["embed_dim"] == DENSE_DIMS["embed_dim"]


class FakeHub:
    """huggingface_hub.HfApi with the network replaced: it records what it was asked."""
    calls: list = []

    def __init__(self, token=None, **kw):
        self.token = token

    def create_repo(self, repo_id, exist_ok=False, **kw):
        FakeHub.calls.append(("create_repo", repo_id, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kw):
        FakeHub.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


def test_push_to_hub_uploads_the_folder_or_says_why_not(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    path, _, _ = pruned_file(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    FakeHub.calls = []
    out = tmp_path / "hub"
    assert export_tool.main([str(path), "--format", "hf", "--output-dir", str(out),
                             "--push-to-hub", "someone/pruned-deit"]) == 0
    assert FakeHub.calls == [
        ("create_repo", "someone/pruned-deit", "hf_test_token"),
        ("upload_folder", "someone/pruned-deit", ["README.md", "config.json", "model.safetensors"])]
    assert "uploaded" in capsys.readouterr().out
    # offline, or no token: one line, nothing sent
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        hub_folder.push(out, "someone/pruned-deit")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match="no Hugging Face token"):
        hub_folder.push(out, "someone/pruned-deit")
    assert len(FakeHub.calls) == 2
    capsys.readouterr()
    assert export_tool.main([str(path), "--format", "hf", "--output-dir", str(tmp_path / "h2"),
                             "--push-to-hub", "someone/pruned-deit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hugging Face token" in err[0]


@pytest.mark.parametrize("case", ["unknown_format", "existing_folder", "not_a_checkpoint",
                                  "push_without_hf"])
def test_export_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    path, _, _ = pruned_file(tmp_path)
    out = tmp_path / "out"
    argv = [str(path), "--output-dir", str(out)]
    if case == "unknown_format":
        argv += ["--format", "hf,tflite"]
        words = ["--format", "hf,tflite"]
    elif case == "existing_folder":
        out.mkdir()
        (out / "config.json").write_text("{}")
        argv += ["--format", "hf"]
        words = ["config.json", "--force"]
    elif case == "not_a_checkpoint":
        (tmp_path / "notes.pth").write_text("not a checkpoint")
        argv = [str(tmp_path / "notes.pth"), "--output-dir", str(out), "--format", "hf"]
        words = ["notes.pth"]
    else:
        argv += ["--format", "onnx", "--push-to-hub", "a/b"]
        words = ["--push-to-hub", "hf"]
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert export_tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], err[0]
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_int8_pt2_and_dynamo_exports_match_pytorch(tmp_path):
    """onnx-int8 (dynamic, and static calibrated on DIGITS images) keeps the classes of the
    fp32 model on a random batch; the torch.export program and the dynamo exporter's ONNX
    give PyTorch's logits at another batch size than they were made with."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path, compact, _ = pruned_file(tmp_path)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = logits(compact, x)
    for name, extra in (("dyn", []), ("static", ["--calibration-data-set", "DIGITS",
                                                 "--calibration-images", "16"])):
        out = tmp_path / name
        assert export_tool.main([str(path), "--format", "onnx-int8", "--output-dir", str(out),
                                 "--name", "m", *extra]) == 0
        session = ort.InferenceSession(str(out / "m.int8.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        assert got.shape == want.shape and (got - want).abs().max() < 0.5
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    out = tmp_path / "other"
    assert export_tool.main([str(path), "--format", "pt2,onnx", "--onnx-exporter", "dynamo",
                             "--output-dir", str(out), "--name", "m"]) == 0
    program = torch.export.load(str(out / "m.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want, rtol=0, atol=1e-5)
    session = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
