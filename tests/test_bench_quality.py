"""models/timm_vit.py (the converter the Torch-Pruning baseline needs) and the quality study's quick run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run

tp = pytest.importorskip("torch_pruning")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

import models  # noqa: E402
from models.timm_vit import load_nvit, nvit_to_timm_vit, timm_vit_to_nvit  # noqa: E402


def _small_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vit = timm_vit.VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                                     depth=3, num_heads=4, mlp_ratio=2.0, qkv_bias=True)
    with torch.no_grad():  # weights large enough that a wrong mapping shows in the logits
        for p in vit.parameters():
            p.normal_(0, 0.1)
    return vit.eval()


def _prune(vit: torch.nn.Module, heads: bool, head_dims: bool) -> None:
    """Global Torch-Pruning of heads (or head dims), MLP and embedding, as the study does."""
    Attention = timm_vit.Attention
    num_heads = {m.qkv: m.num_heads for m in vit.modules() if isinstance(m, Attention)}
    pruner = tp.pruner.MetaPruner(
        vit, torch.randn(1, 3, 32, 32), importance=tp.importance.GroupMagnitudeImportance(),
        global_pruning=True, pruning_ratio=0.25, ignored_layers=[vit.head], num_heads=num_heads,
        prune_num_heads=heads, prune_head_dims=head_dims, head_pruning_ratio=0.25 if heads else 0.0)
    pruner.step()
    for m in vit.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim


@pytest.mark.parametrize("heads,head_dims", [(True, False), (False, True)])
def test_timm_vit_to_nvit_round_trip(heads: bool, head_dims: bool) -> None:
    vit = _small_vit()
    _prune(vit, heads, head_dims)
    dims, state = timm_vit_to_nvit(vit)
    ours = load_nvit(dims, state).eval()
    assert dims.embed_dim < 64  # the embedding was pruned too
    if heads:
        assert sum(dims.num_heads) < 12 and len(set(dims.num_heads)) > 1, dims.num_heads
    else:
        assert min(dims.qk_dim) < 16 and dims.qk_dim == dims.v_dim, dims.qk_dim
    assert len(set(dims.mlp_dim)) > 1 and max(dims.mlp_dim) < 128, dims.mlp_dim
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, got = vit(x), ours(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", [dict(init_values=1e-5),  # LayerScale (DeiT III, DINOv2)
                                    dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),
                                    dict(global_pool="avg", class_token=False, fc_norm=True,
                                         reg_tokens=2),
                                    dict(qkv_bias=False)])
def test_torch_pruning_results_convert_for_every_family(family: dict) -> None:
    """Torch-Pruning's head pruning of LayerScale, register, avg-pooled and bias-free ViTs
    converts exactly (Torch-Pruning prunes LayerScale gammas and register tokens as plain
    parameters along their last axis)."""
    torch.manual_seed(0)
    vit = timm_vit.VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                                     depth=3, num_heads=4, mlp_ratio=2.0, **family)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    vit.eval()
    _prune(vit, heads=True, head_dims=False)
    dims, state = timm_vit_to_nvit(vit)
    assert sum(dims.num_heads) < 12, dims.num_heads
    ours = load_nvit(dims, state).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), vit(x), rtol=0, atol=1e-5)


def test_nvit_to_timm_vit_round_trip() -> None:
    torch.manual_seed(0)
    dims = models.Dims.uniform(64, 2, 4, 96, img_size=32, patch_size=8, in_chans=3,
                               num_classes=10, distilled=False)
    ours = models.ReViT(dims).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.1)
    vit = nvit_to_timm_vit(ours).eval()
    back = load_nvit(*timm_vit_to_nvit(vit)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ours(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=1e-5)


def test_timm_vit_to_nvit_refuses_unsupported() -> None:
    vit = timm_vit.VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32,
                                     depth=1, num_heads=2, qk_norm=True)
    with pytest.raises(ValueError, match="qk-norm"):
        timm_vit_to_nvit(vit)


@pytest.mark.slow
def test_quick_study_reports_every_method_and_budget(tmp_path: Path) -> None:
    results = tmp_path / "results"
    run("benchmarks/bench_quality.py", "--quick", "--work-dir", tmp_path / "work",
        "--results-dir", results, timeout=300)
    data = json.loads((results / "quality_quick.json").read_text())
    assert data["data"] == "digits"
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    methods = ["hessian_macs", "hessian_latency", "taylor_macs", "magnitude_macs", "random_macs",
               "uniform_scratch", "torch_pruning", "hessian_unit_macs"]
    for m in methods:
        for b in (0.5, 0.25):
            r = rows.get((m, b))
            assert r is not None, f"{m} at {b} missing"
            ratio = r["macs_ratio"]
            # every method stops at or below its budget; our pruner removes small groups and
            # lands close, Torch-Pruning's steps and uniform scaling's width grid are coarser,
            # and (b) ranks by a latency table timed during the run: on a busy machine its
            # shapes, and the reference pace's larger late steps, vary (0.419 seen for 0.5)
            slack = 0.06 if m not in ("uniform_scratch", "torch_pruning", "hessian_latency") \
                else 0.1
            assert b - slack <= ratio <= b + 1e-6, (m, b, ratio)
            assert 0 <= r["top1_finetuned"] <= 100
            if m != "uniform_scratch":
                assert 0 <= r["top1_pruned"] <= 100
            for batch in ("b1", "b32"):
                assert r["latency"][batch]["median"] > 0
            assert set(r["dims"]) == {"embed_dim", "num_heads", "qk_dim", "v_dim", "mlp_dim"}
    assert 0 < data["dense"]["top1"] <= 100
    md = (results / "quality_quick.md").read_text()
    assert "## Findings" in md and "best is" in md
    for name in ("quality_quick_macs.png", "quality_quick_latency.png"):
        assert (results / name).stat().st_size > 1000
    assert data["times_s"]["total_s"] > 0


def test_dense_training_resumes_exactly_and_reports_its_plateau(tmp_path, monkeypatch):
    """The quality study's dense model: stopped after its second epoch and continued from
    the per-epoch checkpoint, it ends with the weights and top-1 curve of an uninterrupted
    run, and the finished file says how much the last fifth of the epochs gained."""
    from benchmarks import bench_quality as bq
    cfg = bq.Config(data="digits", **{**bq.QUICK, "dense_epochs": 3, "train_subset": 256})
    data = bq.load_data("digits", cfg.img_size, cfg.train_subset)
    whole = tmp_path / "whole"
    whole.mkdir()
    bq.dense_model(cfg, data, whole, {})
    ref = torch.load(whole / "dense_digits.pth", weights_only=True)
    assert len(ref["curve"]) == 3 and ref["plateau_gain"] == ref["curve"][2] - ref["curve"][1]

    part = tmp_path / "part"
    part.mkdir()
    real, calls = bq.accuracy, []

    def stop_after_two(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(bq, "accuracy", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        bq.dense_model(cfg, data, part, {})
    assert torch.load(part / "dense_digits.partial.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(bq, "accuracy", real)
    bq.dense_model(cfg, data, part, {})
    got = torch.load(part / "dense_digits.pth", weights_only=True)
    assert got["curve"] == ref["curve"] and not (part / "dense_digits.partial.pth").exists()
    assert all(torch.equal(got["model"][k], ref["model"][k]) for k in ref["model"])
    assert bq.plateau_gain([50.0, 60.0, 70.0, 70.2, 70.3]) == pytest.approx(0.1)
