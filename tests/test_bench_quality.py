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
                                     depth=1, num_heads=2, act_layer="gelu_tanh")
    with pytest.raises(ValueError, match="MLP activation"):
        timm_vit_to_nvit(vit)


@pytest.mark.slow
def test_quick_study_reports_every_method_budget_and_seed(tmp_path: Path) -> None:
    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
    results = tmp_path / "results"
    # (g) trains 20 epochs instead of the study's 153 to keep CI short
    out = run("benchmarks/bench_quality.py", "--quick", "--seeds", "0,1", "--uniform-epochs", "20",
              "--work-dir", tmp_path / "work", "--results-dir", results, timeout=400)
    assert "dense model (committed)" in out.stdout  # the committed DIGITS model, not retrained
    data = json.loads((results / "quality_quick.json").read_text())
    assert data["data"] == "digits" and data["seeds"] == [0, 1]
    rows = {(r["method"], r["budget"], r["seed"]): r for r in data["rows"]}
    for m in bq.METHODS:
        for b in (0.5, 0.25):
            for seed in (0, 1):
                r = rows.get((m, b, seed))
                assert r is not None, f"{m} at {b}, seed {seed} missing"
                ratio = r["macs_ratio"]
                # every method stops at or below its budget; our pruner removes small groups
                # and lands close, Torch-Pruning's steps and uniform scaling's width grid are
                # coarser, and the reference pace's larger late steps can overshoot
                slack = 0.06 if m not in ("uniform_scratch", "torch_pruning") else 0.1
                assert b - slack <= ratio <= b + 1e-6, (m, b, ratio)
                assert 0 <= r["top1_finetuned"] <= 100
                if m != "uniform_scratch":
                    assert 0 <= r["top1_pruned"] <= 100
                for batch in ("b1", "b32"):
                    assert r["latency"][batch]["median"] > 0
                assert set(r["dims"]) == {"embed_dim", "num_heads", "qk_dim", "v_dim", "mlp_dim"}
    assert data["config"]["uniform_epochs"] == 20
    assert all(rows[("uniform_scratch", b, s)]["epochs"] == 20 for b in (0.5, 0.25) for s in (0, 1))
    summary = {(s["method"], s["budget"]): s for s in data["summary"]}
    assert len(summary) == 2 * len(bq.METHODS)
    for (m, b), s in summary.items():
        finals = [rows[(m, b, seed)]["top1_finetuned"] for seed in (0, 1)]
        assert s["top1_finetuned"]["mean"] == pytest.approx(sum(finals) / 2)
        if m == bq.REFERENCE:
            assert "top1_finetuned_vs_reference" not in s
            continue
        ref = [rows[(bq.REFERENCE, b, seed)]["top1_finetuned"] for seed in (0, 1)]
        iv = s["top1_finetuned_vs_reference"]
        assert iv["n"] == 2 and iv["mean"] == pytest.approx((finals[0] - ref[0] + finals[1] - ref[1]) / 2)
        assert iv["lo"] <= iv["mean"] <= iv["hi"]
    assert data["dense"]["top1"] > 90  # the committed converged model
    manifest = json.loads((qm.COMMITTED / "manifest.json").read_text())
    assert data["dense"]["sha256"] == manifest["quality_quick_dense_digits.pth"]["sha256"]
    assert data["dense"]["plateau_gain"] < qm.PLATEAU_POINTS
    env = data["environment"]  # every row says where and when it was measured
    assert all(r["environment"]["cpu"] == env["cpu"] for r in data["rows"])
    md = (results / "quality_quick.md").read_text()
    assert md.startswith(f"# quality_quick\n\nMeasured on {env['cpu']}, {env['date'][:10]} "
                         f"({len(data['rows'])} rows).")
    assert "## Findings" in md and "best mean is" in md and "## Every run" in md
    for name in ("quality_quick_macs.png", "quality_quick_latency.png"):
        assert (results / name).stat().st_size > 1000
    assert data["times_s"]["total_s"] > 0


def test_swin_arm_quick(tmp_path: Path) -> None:
    """--family swin: a two-stage Swin on DIGITS through NViT, magnitude, uniform scaling and
    Torch-Pruning (its MLP units only: the one scope that leaves a Swin that runs), each
    pruned model read back as our ReSwin."""
    from benchmarks.quality_config import SWIN_METHODS
    results = tmp_path / "results"
    run("benchmarks/bench_quality.py", "--family", "swin", "--quick", "--seeds", "0",
        "--uniform-epochs", "2", "--work-dir", tmp_path / "work", "--results-dir", results,
        timeout=400)
    data = json.loads((results / "quality_swin_quick.json").read_text())
    assert data["config"]["family"] == "swin" and data["dense"]["dims"]["depths"] == [1, 1]
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    for m in SWIN_METHODS:
        for b in (0.5, 0.25):
            if (m, b) == ("torch_pruning", 0.25):  # the MLPs alone cannot remove 75%
                assert (m, b) not in rows
                continue
            r = rows[(m, b)]
            assert b - 0.1 <= r["macs_ratio"] <= b + 1e-6, (m, b, r["macs_ratio"])
            assert len(r["dims"]["embed_dim"]) == 2 and 0 <= r["top1_finetuned"] <= 100
    tp = rows[("torch_pruning", 0.5)]["dims"]  # Torch-Pruning's scope: the MLPs, nothing else
    assert tp["embed_dim"] == data["dense"]["dims"]["embed_dim"]
    assert tp["num_heads"] == [2, 4] and tp["qk_dim"] == [16, 16]
    assert sum(tp["mlp_dim"]) < (128 + 256) / 2
    md = (results / "quality_swin_quick.md").read_text()
    assert "Torch-Pruning (group Taylor, MLP units only)" in md and "a Swin of 2 stages" in md


def test_paired_interval_and_summary_by_seed() -> None:
    """Seed-paired differences to (a) with a Student t interval: diffs 1, 2, 3 give mean 2,
    sd 1 and a half-width t(0.975, 2) / sqrt(3) = 2.484."""
    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
    from benchmarks.common import paired_interval
    iv = paired_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == pytest.approx(2.0) and iv["n"] == 3
    assert iv["hi"] - iv["mean"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert paired_interval([1.5])["lo"] is None and paired_interval([]) is None

    def row(method, seed, top1):
        return {"method": method, "budget": 0.5, "seed": seed, "top1_pruned": top1 - 10,
                "top1_finetuned": top1, "macs_ratio": 0.49, "params": 100,
                "latency": {"b1": {"median": 0.8}, "b32": {"median": 0.6}}, "dims": {}}
    rows = [row("hessian_macs", 0, 70.0), row("hessian_macs", 1, 72.0),
            row("taylor_macs", 1, 71.0), row("taylor_macs", 0, 68.0)]  # order does not matter
    s = {x["method"]: x for x in bq.summarise(rows)}
    assert s["hessian_macs"]["top1_finetuned"]["mean"] == pytest.approx(71.0)
    assert s["hessian_macs"]["top1_finetuned"]["sd"] == pytest.approx(2 ** 0.5)
    iv = s["taylor_macs"]["top1_finetuned_vs_reference"]  # pairs by seed: -2 and -1
    assert iv["mean"] == pytest.approx(-1.5) and iv["n"] == 2
    assert s["taylor_macs"]["top1_pruned_vs_reference"]["mean"] == pytest.approx(-1.5)
    # (g) shares only a seed number with (a): compared by Welch's unpaired interval, which
    # scipy's own Welch test gives too
    from scipy.stats import ttest_ind
    rows += [row("uniform_scratch", 0, 74.0), row("uniform_scratch", 1, 73.0)]
    g = {x["method"]: x for x in bq.summarise(rows)}["uniform_scratch"]
    iv = g["top1_finetuned_vs_reference"]
    ci = ttest_ind([74.0, 73.0], [70.0, 72.0], equal_var=False).confidence_interval(0.95)
    assert not iv["paired"] and iv["mean"] == pytest.approx(2.5)
    assert (iv["lo"], iv["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert g["top1_pruned_vs_reference"] is None


def test_cached_loss_equals_the_shipped_loss_with_the_full_model() -> None:
    """The study's loss looks the dense logits up instead of running the dense model; with
    the KL on and off it equals losses.FullModelKLLoss run on the dense model itself."""
    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
    from losses import DistillationLoss, FullModelKLLoss
    cfg = bq.Config(data="digits", **bq.QUICK)
    torch.manual_seed(0)
    dense, student = models.ReViT(cfg.dims()).eval(), models.ReViT(cfg.dims()).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    with torch.no_grad():
        packed = torch.cat([y[:, None].float(), dense(x)], 1)
    for tau, per_head in ((cfg.kl_tau, False), (cfg.ft_kl_tau, True)):
        cached = qt.CachedFullModelKL(cfg, 10, tau, per_head)
        label = DistillationLoss(torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                                 None, "none", 0.0, 1.0)
        shipped = FullModelKLLoss(label, dense, 1000.0, 1.0, tau, per_head=per_head)
        for on in (True, False):
            cached.kl_enabled = shipped.kl_enabled = on
            out = student(x)
            assert cached(x, out, packed).item() == pytest.approx(shipped(x, out, y).item(),
                                                                   rel=1e-6)
    assert cfg.kl_coeff(10) == 1000.0 and cfg.kl_coeff(1000) == 1e5  # the reference's, scaled


def test_committed_dense_model_matches_its_manifest(tmp_path, monkeypatch) -> None:
    """The committed DIGITS model loads for the quick recipe, and a file whose sha256 is not
    the manifest's is refused in one line."""
    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
    cfg = bq.Config(data="digits", **bq.QUICK)
    ck = qm.committed_dense("quality_quick_dense_digits.pth")
    assert ck is not None and ck["key"] == cfg.dense_key()
    assert ck["plateau_gain"] < qm.PLATEAU_POINTS
    manifest = json.loads((qm.COMMITTED / "manifest.json").read_text())
    assert "--quick" in manifest["quality_quick_dense_digits.pth"]["command"]
    for name, entry in manifest.items():  # every committed model is at most ~2 MB
        assert entry["bytes"] == (qm.COMMITTED / name).stat().st_size <= 2_300_000
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"m.pth": {"sha256": "0" * 64}}))
    torch.save({"key": {}}, fake / "m.pth")
    monkeypatch.setattr(qm, "COMMITTED", fake)
    with pytest.raises(SystemExit, match="sha256"):
        qm.committed_dense("m.pth")
    assert qm.committed_dense("other.pth") is None


def test_a_finished_method_is_reused_not_rerun(tmp_path) -> None:
    """A stopped study resumes per (method, seed): saved rows with the same recipe are
    returned without running anything (the Study below could not run a method)."""
    from dataclasses import asdict

    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
    cfg = bq.Config(data="digits", **bq.QUICK)
    s = bq.Study(cfg, None, None, 97.0, 1.0, None, None, tmp_path)
    key = {"config": asdict(cfg), "dense_top1": 97.0, "threads": 1, "seed": 2}
    saved = [{"method": "taylor_macs", "seed": 2}]
    (tmp_path / "rows_digits_taylor_macs_s2.json").write_text(
        json.dumps({"key": key, "rows": saved, "seconds": 12.5}))
    assert bq.run_method(s, "taylor_macs", 2, threads=1) == (saved, 12.5)  # and its time
    with pytest.raises(AttributeError):  # another recipe (threads) is not reused: it runs
        bq.run_method(s, "taylor_macs", 2, threads=2)


def test_keep_adds_to_a_result_and_runs_g_without_the_dense_weights(tmp_path,
                                                                   monkeypatch) -> None:
    """A study split over machines (--keep): the written result's rows are kept, only the
    asked-for rows it lacks run, and when only (g) runs no dense model is loaded or trained
    (--train-only trains (g) first and writes nothing). Nothing missing: nothing is written.
    Another recipe, thread count or dense top-1 is refused before anything runs."""
    from dataclasses import asdict

    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
    from benchmarks import common
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(common, "RESULTS", results)

    def no_dense(*a, **k):
        raise AssertionError("the dense model was asked for")
    monkeypatch.setattr(bq, "dense_model", no_dense)
    cfg = bq.Config(data="digits", **{**bq.QUICK, "uniform_epochs": 1})
    dense_macs = bq.count_macs(models.ReViT(cfg.dims()))[0]
    old_rows = []
    for budget in bq.BUDGETS:
        shape = models.ReViT(bq.uniform_dims(cfg.dims(), budget))
        old_rows.append({"method": "hessian_macs", "label": "(a)", "budget": budget, "seed": 0,
                         "top1_pruned": 50.0, "top1_finetuned": 90.0 - budget,
                         **bq.describe(shape, dense_macs),
                         "latency": {b: {"median": budget} for b in ("b1", "b32")}})
    written = results / "quality_quick.json"
    common_args = ["--quick", "--uniform-epochs", "1", "--work-dir", str(tmp_path / "w"),
                   "--results-dir", str(results)]
    g_only = ["--methods", "uniform_scratch", "--seeds", "0", "--budgets", "0.25", *common_args]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="no result"):
            bq.main([*g_only, "--keep"])
        written.write_text(json.dumps(
            {"config": asdict(cfg), "environment": {"threads": 1}, "dense": {"top1": 96.5},
             "rows": old_rows, "times_s": {"hessian_macs_s": 7.0, "total_s": 9.0}}))
        before = written.read_text()
        bq.main([*g_only, "--train-only"])  # (g)'s model trained, nothing measured or written
        assert written.read_text() == before
        trained = torch.load(tmp_path / "w" / "uniform_digits_0.25_s0.pth", weights_only=True)
        bq.main([*g_only, "--keep"])
        data = json.loads(written.read_text())
        rows = {(r["method"], r["budget"], r["seed"]): r for r in data["rows"]}
        assert set(rows) == {("hessian_macs", 0.5, 0), ("hessian_macs", 0.25, 0),
                             ("uniform_scratch", 0.25, 0)}
        assert [rows[("hessian_macs", b, 0)] for b in bq.BUDGETS] == old_rows
        g = rows[("uniform_scratch", 0.25, 0)]
        assert g["epochs"] == 1 and 0 < g["macs_ratio"] <= 0.25
        assert g["top1_finetuned"] == pytest.approx(trained["top1"])  # the trained model, measured
        assert data["dense"]["top1"] == 96.5 and data["seeds"] == [0]
        assert data["earlier_runs"] == [{"environment": {"threads": 1},
                                         "times_s": {"hessian_macs_s": 7.0, "total_s": 9.0}}]
        assert "hessian_macs_s" not in data["times_s"]  # this run's times only
        assert "| (g)" in (results / "quality_quick.md").read_text()

        def nothing_to_run(*a, **k):
            raise AssertionError("a row on record was run again")
        monkeypatch.setattr(bq, "run_method", nothing_to_run)
        before = written.read_text()
        bq.main(["--methods", "hessian_macs,uniform_scratch", "--seeds", "0", "--budgets",
                 "0.25", "--keep", *common_args])
        assert written.read_text() == before  # nothing missing: not even rewritten
        with pytest.raises(AssertionError, match="dense model was asked for"):  # (a) seed 1
            bq.main(["--methods", "hessian_macs", "--seeds", "0,1", "--keep", *common_args])
        monkeypatch.setattr(bq, "dense_model",
                            lambda *a, **k: (models.ReViT(cfg.dims()).eval(), 90.0, {}))
        refused = (([], "top-1 96.5%, this one 90.0%"), (["--threads", "2"], "--threads 1"),
                   (["--uniform-epochs", "2"], "differs in uniform_epochs"))
        for extra, match in refused:
            with pytest.raises(SystemExit, match=match):
                bq.main(["--methods", "hessian_macs", "--seeds", "1", "--keep", *common_args,
                         *extra])
        assert written.read_text() == before
    finally:
        torch.set_num_threads(threads)


def test_dense_training_resumes_exactly_and_reports_its_plateau(tmp_path, monkeypatch):
    """The quality study's dense model: stopped after its second epoch and continued from
    the per-epoch checkpoint, it ends with the weights and top-1 curve of an uninterrupted
    run, and the finished file says how much the last fifth of the epochs gained."""
    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
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
    monkeypatch.setattr(qm, "accuracy", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        bq.dense_model(cfg, data, part, {})
    assert torch.load(part / "dense_digits.partial.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(qm, "accuracy", real)
    bq.dense_model(cfg, data, part, {})
    got = torch.load(part / "dense_digits.pth", weights_only=True)
    assert got["curve"] == ref["curve"] and not (part / "dense_digits.partial.pth").exists()
    assert all(torch.equal(got["model"][k], ref["model"][k]) for k in ref["model"])
    assert qm.plateau_gain([50.0, 60.0, 70.0, 70.2, 70.3]) == pytest.approx(0.1)


@pytest.mark.slow
def test_lambda_sweep_weight_zero_is_the_reference_method(tmp_path: Path) -> None:
    """The lambda sweep's weight 0 ranks by saliency alone: for the same seed it prunes to
    exactly (a)'s shapes and top-1; a positive weight gets a positive lambda and the table's
    predicted latency of every shape; the default weight (1) is the study's own (b) runs,
    reused from its rows file, not pruned again."""
    work, results = tmp_path / "work", tmp_path / "results"
    common = ("--quick", "--seeds", "1", "--work-dir", work, "--results-dir", results)
    run("benchmarks/bench_quality.py", "--methods", "hessian_macs,hessian_latency", *common,
        timeout=300)
    study = json.loads((results / "quality_quick.json").read_text())["rows"]
    ref = {r["budget"]: r for r in study if r["method"] == "hessian_macs"}
    b_rows = work / "rows_digits_hessian_latency_s1.json"
    b_written = b_rows.stat().st_mtime_ns
    run("benchmarks/bench_quality.py", "--lambda-sweep", "0,1,100", *common, timeout=300)
    data = json.loads((results / "quality_lambda_quick.json").read_text())
    assert data["weights"] == [0.0, 1.0, 100.0]
    rows = {(r["latency_weight"], r["budget"]): r for r in data["rows"]}
    assert set(rows) == {(w, b) for w in (0.0, 1.0, 100.0) for b in (0.5, 0.25)}
    assert b_rows.stat().st_mtime_ns == b_written and not list(work.glob("rows_*_w1_*"))
    for r in study:
        if r["method"] == "hessian_latency":
            swept = rows[(1.0, r["budget"])]
            assert {k: swept[k] for k in r} == r
    for b in (0.5, 0.25):
        assert rows[(0.0, b)]["lambda"] == 0.0
        assert rows[(0.0, b)]["dims"] == ref[b]["dims"]
        assert rows[(0.0, b)]["top1_finetuned"] == ref[b]["top1_finetuned"]
        assert rows[(100.0, b)]["lambda"] > 0
        for w in (0.0, 100.0):
            assert 0 < rows[(w, b)]["table_latency_ratio"] < 1
    md = (results / "quality_lambda_quick.md").read_text()
    assert {(r["budget"], r["dims"] == ref[r["budget"]]["dims"])
            for r in data["reference_rows"]} == {(0.5, True), (0.25, True)}
    assert "shape differs from (a)" in md and "| 100 | 0.25 |" in md and "| (a) | 0.50 |" in md
    weight0 = [line for line in md.splitlines() if line.startswith("| 0 |")]
    assert len(weight0) == 2 and all("| 0/1 | +0.00 (1 seed) |" in line for line in weight0)


def test_user_errors_end_in_one_line(tmp_path, monkeypatch) -> None:
    """Repeated seeds, no methods, budgets the study has not, flags that do not combine, an
    EMB the ReViT rule cannot use and a dense model too large to commit are refused with a
    message, before anything is written."""
    from benchmarks import bench_quality as bq
    from benchmarks import quality_models as qm, quality_training as qt  # noqa: F401
    from benchmarks import bench_revit_scratch as rs
    for argv, match in ((["--seeds", "0,0"], "repeats"), (["--methods", ","], "no method"),
                        (["--budgets", "0.5,0.3"], "subset of 0.5,0.25"),
                        (["--budgets", "half"], "subset"),
                        (["--train-only"], "--methods uniform_scratch"),
                        (["--dense-only", "--keep"], "do not combine"),
                        (["--lambda-sweep", "1", "--budgets", "0.5"], "drop --budgets")):
        with pytest.raises(SystemExit, match=match):
            bq.main(["--quick", "--work-dir", str(tmp_path / "w"), *argv])
    with pytest.raises(SystemExit, match="--emb: EMB 50"):
        rs.main(["--quick", "--emb", "50", "--out", str(tmp_path / "o"),
                 "--work-dir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
    cfg = bq.Config(data="digits", **bq.QUICK)
    big = tmp_path / "big.pth"
    torch.save({"key": cfg.dense_key(), "model": {"w": torch.zeros(300_000)}}, big)
    monkeypatch.setattr(qm, "COMMITTED", tmp_path / "models")
    with pytest.raises(SystemExit, match="more than"):
        bq.commit_dense(big, "big.pth", "cmd", cfg.dense_key())
    assert not (tmp_path / "models" / "big.pth").exists()
