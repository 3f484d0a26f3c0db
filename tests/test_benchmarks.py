"""The benchmark studies run (--quick) and write their results with the expected keys.

The quick runs write into a temporary directory (--out), never over benchmarks/results/; they
run in this process (the data-skip rows run the command line itself).
Studies on the real photo sets skip when /work/shared/data is absent.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from helpers import ROOT, command, env

DATA = ROOT.parent / "shared" / "data"
HAVE_DATA = (DATA / "imagenette_224_subset" / "train").is_dir() and (DATA / "cifar10").is_dir()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"real image sets not in {DATA}")
STATS = {"median", "p25", "p75", "n"}


def bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*command(f"benchmarks/{script}"), *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def study_here(script: str, *args: str) -> str:
    """A study's `main` in this process, as `python -m benchmarks.NAME ARGS` runs it (without
    the ~6 s torch import of a new process); its stdout."""
    module = importlib.import_module(f"benchmarks.{script.removesuffix('.py')}")
    out = io.StringIO()
    with mock.patch.object(sys, "argv", [script, *args]), contextlib.redirect_stdout(out):
        try:
            code = module.main()
        except SystemExit as e:
            code = e.code
    assert not code, f"{script} failed ({code}):\n{out.getvalue()[-3000:]}"
    return out.getvalue()


def quick(script: str, study: str, out: Path) -> dict:
    stdout = study_here(script, "--quick", "--out", str(out))
    assert stdout.lstrip().startswith("|"), stdout[:500]  # the Markdown table
    data = json.loads((out / f"{study}_quick.json").read_text())
    assert (out / f"{study}_quick.md").is_file()
    assert data["study"] == f"{study}_quick" and data["quick"] is True
    assert {"date", "torch", "timm", "cpu", "threads"} <= set(data["environment"])
    return data


def is_stats(s: dict) -> bool:
    return STATS <= set(s) and s["p25"] <= s["median"] <= s["p75"] and s["median"] > 0


@pytest.mark.slow
def test_speed_vs_timm_quick(tmp_path):
    data = quick("bench_speed_vs_timm.py", "speed_vs_timm", tmp_path)
    modes = {(r["case"].split()[0], r["mode"]) for r in data["rows"]}
    assert modes == {("cpu-sized", "inference b64"), ("cpu-sized", "training step b64"),
                     ("DeiT-Ti/224", "inference b1"), ("DeiT-Ti/224", "inference b16"),
                     ("DeiT-Ti/224", "training step b8"), ("Swin,", "inference b4"),
                     ("Swin,", "training step b4")}
    for r in data["rows"]:
        assert is_stats(r["throughput_ratio"])
        assert r["max_logit_diff"] < 1e-4
        assert r["ours_img_s"] > 0 and r["timm_img_s"] > 0


@pytest.mark.slow
def test_revit_shapes_quick(tmp_path):
    data = quick("bench_revit_shapes.py", "revit_shapes", tmp_path)
    (r,) = data["rows"]
    assert r["pair"] == "ReViT-T vs DeiT-Ti" and is_stats(r["speed_ratio"])
    assert r["macs_ratio"] == pytest.approx(1.261 / 1.135, abs=2e-3)  # the paper's GMACs
    for model in ("revit", "deit"):
        assert [b["block"] for b in r["blocks"][model]] == list(range(12))
        assert all(b["ms"] > 0 and b["gmacs"] > 0 for b in r["blocks"][model])
        assert r["ops"][model] and all(0 < o["share"] <= 1 for o in r["ops"][model])


@pytest.mark.slow
def test_prune_overhead_quick(tmp_path):
    data = quick("bench_prune_overhead.py", "prune_overhead", tmp_path)
    assert data["interval_prune"] == 100
    assert [r["amp"] for r in data["rows"]] == ["fp32", "bfloat16"] * 3
    assert [r["case"].startswith("Swin") for r in data["rows"]] == [False] * 4 + [True] * 2
    for r in data["rows"]:
        swin = r["case"].startswith("Swin")  # no synthetic Swin latency table: MACs only
        for key in ("loop_over_plain", "gates_only_over_plain", "pruner_step_macs_amortised",
                    *(() if swin else ("pruner_step_latency_amortised",))):
            assert is_stats(r[key]), key
        assert sum(r["pruner_step_macs_removed"].values()) == 32 // 16  # groups
        assert 0 < r["saved_bytes_plain"] <= r["saved_bytes_gated"]


@pytest.mark.slow
def test_compaction_quick(tmp_path, monkeypatch):
    """Also: the malloc thresholds the process runs with are recorded (they move CPU
    latencies, benchmarks/README.md finding 1)."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    data = quick("bench_compaction.py", "compaction", tmp_path)
    assert data["environment"]["malloc"] == "MALLOC_TRIM_THRESHOLD_=1073741824"
    md = (tmp_path / "compaction_quick.md").read_text()
    assert "malloc: MALLOC_TRIM_THRESHOLD_=1073741824;" in md
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    from benchmarks.passive import machine_note
    assert "malloc: glibc defaults;" in machine_note((0.0,))
    names = [r["model"] for r in data["rows"]]
    assert len(names) == 6 and sum(n.startswith("pruned shape") for n in names) == 3
    for r, target in zip(data["rows"], (0.75, 0.75, 0.5, 0.5, 0.25, 0.25)):
        assert target - 0.1 < r["macs_ratio"] <= target + 1e-9, (r["model"], r["macs_ratio"])
        for b in (1, 32):
            assert is_stats(r[f"speedup_b{b}"])
            assert r[f"efficiency_b{b}"] == pytest.approx(
                r[f"speedup_b{b}"]["median"] * r["macs_ratio"])


@pytest.mark.slow
def test_compaction_of_a_swin_quick(tmp_path):
    """--family swin: a Swin pruned per stage and kind to 50% of its MACs, and its uniform
    counterpart, compacted and timed."""
    study_here("bench_compaction.py", "--family", "swin", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "compaction_swin_quick.json").read_text())
    assert [r["model"].split(",")[0] for r in data["rows"]] == ["pruned shape", "uniform scaling"]
    pruned = data["rows"][0]
    assert 0.4 < pruned["macs_ratio"] <= 0.5 + 1e-9 and len(pruned["dims"]["embed_dim"]) == 2
    flat = lambda d, k: sum(sum(x) for x in d[k])  # noqa: E731  per-stage lists of blocks
    for k in ("num_heads", "qk_dim", "mlp_dim"):  # every block kind lost units somewhere
        assert flat(pruned["dims"], k) < flat(data["dense_dims"], k), k
    assert all(is_stats(r["speedup_b32"]) for r in data["rows"])


def test_compaction_shapes_differ_across_blocks_and_kinds():
    """The synthetic pruned shapes remove all five kinds, unevenly, in group multiples."""
    from benchmarks.bench_compaction import GROUPS, random_widths

    import models
    from pruning.cost import MacsCost
    from pruning.gates import widths_to_dims
    dims = models.build_model("deit_tiny_patch16_224").dims
    cost = MacsCost(dims)
    for target in (0.75, 0.5, 0.25):
        w = random_widths(dims, target, seed=0)
        ratio = cost.total(widths_to_dims(w, dims)) / cost.total(dims)
        assert target - 0.03 < ratio <= target, (target, ratio)
        assert w["embed_dim"] % GROUPS["emb"] == 0
        for k, g in (("qk_dim", "qk"), ("v_dim", "v"), ("mlp_dim", "mlp")):
            assert all(x % GROUPS[g] == 0 for x in w[k])
        if target <= 0.5:
            assert w["embed_dim"] < 192 and min(w["num_heads"]) < 3
            assert min(w["qk_dim"]) < 64 and min(w["v_dim"]) < 64
            assert len(set(w["mlp_dim"])) > 1 and len(set(w["qk_dim"])) > 1
    assert random_widths(dims, 0.5, seed=1) != random_widths(dims, 0.5, seed=0)


@pytest.mark.slow
def test_omp_policy_quick(tmp_path):
    data = quick("bench_omp_policy.py", "omp_policy", tmp_path)
    conds = {r["condition"] for r in data["rows"]}
    assert len(conds) == 2 and "as is" in conds
    works = {r["work"] for r in data["rows"]}
    assert works == {"tiny (quick) inference b1", "tiny (quick) inference b16",
                     "tiny (quick) training step b64"}
    for r in data["rows"]:
        assert is_stats(r["passive_over_default"])
        assert r["default_s"] > 0 and r["passive_s"] > 0


@pytest.mark.slow
def test_step_memory_quick(tmp_path):
    """The memory study's rows, and the bound it exists for: a 16-bit pruning step (gates
    attached, a quarter of the units removed) within 1.25x a plain step's memory per image."""
    data = quick("bench_step_memory.py", "step_memory", tmp_path)
    rows = {(r["precision"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(p, v) for p in ("fp32", "bf16", "fp16")
                         for v in ("plain", "gated", "gated, 25% pruned")}
    for (precision, variant), r in rows.items():
        assert r["mib_per_image"] > 0
        if precision != "fp32":
            assert r["per_image_over_plain"] <= 1.25 and r["peak_over_plain"] <= 1.25, r


@pytest.mark.slow
def test_compile_quick(tmp_path):
    """The compile study's rows; a prune step (gate values changed) recompiles nothing."""
    data = quick("bench_compile.py", "compile", tmp_path)
    assert data["backend"] == "aot_eager"
    assert [(r["variant"], r["amp"]) for r in data["rows"]] == [
        ("training step", "fp32"), ("pruning step", "fp32")]
    for r in data["rows"]:
        assert is_stats(r["compiled_over_eager"]) and r["eager_step_s"] > 0
        assert r["compiled_graphs"] >= 1 and r["eager_graphs"] == 0
        if r["variant"] == "pruning step":
            assert r["recompiled_after_prune_step"] == 0


@pytest.mark.slow
def test_gpu_study_quick_on_the_cpu(tmp_path):
    """The GPU study's code on the CPU with tiny shapes: every section's rows, the logits of
    ours and timm's equal, the compact models under their targets, and the kernel SDPA runs:
    the CPU's fused kernel wherever the model pads unequal widths, math where it does not."""
    stdout = study_here("bench_gpu.py", "--device", "cpu", "--quick", "--out", str(tmp_path))
    assert "## SDPA kernel by head widths" in stdout
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert data["quick"] is True and data["device"]["device"] == "cpu"
    rows = {s: [r for r in data["rows"] if r["section"] == s] for s in
            ("ours vs timm", "pruning step", "compact vs dense", "sdpa kernel")}
    assert {(r["mode"], r["precision"]) for r in rows["ours vs timm"]} == {
        (m, p) for m in ("inference b1", "inference b8", "training step b8")
        for p in ("fp16", "bf16")}
    for r in rows["ours vs timm"]:
        assert is_stats(r["throughput_ratio"]) and r["max_logit_diff"] < 1e-4
        assert ("ours_peak_mib" in r) == r["mode"].startswith("training")
    assert [r["precision"] for r in rows["pruning step"]] == ["fp16", "bf16"]
    assert all(is_stats(r["pruning_over_plain"]) and r["pruning_peak_mib"] > 0
               for r in rows["pruning step"])
    assert {(r["target"], r["batch_size"]) for r in rows["compact vs dense"]} == {
        (t, b) for t in (0.75, 0.5, 0.25) for b in (1, 8)}
    for r in rows["compact vs dense"]:
        assert r["macs_ratio"] <= r["target"] and r["table_speedup"] > 0 and r["speedup"] > 0
    for r in rows["sdpa kernel"]:
        assert r["kernel_padded"] == "flash (CPU)", r
        assert r["kernel_unpadded"] == ("flash (CPU)" if r["qk"] == r["v"] else "math"), r


def test_gpu_study_skips_without_cuda_and_refuses_a_full_cpu_run(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the study would run")
    assert "skipped: no CUDA device" in study_here("bench_gpu.py", "--out", str(tmp_path))
    assert not list(tmp_path.iterdir())
    module = importlib.import_module("benchmarks.bench_gpu")
    with mock.patch.object(sys, "argv", ["bench_gpu.py", "--device", "cpu"]), \
            contextlib.redirect_stderr(io.StringIO()) as err:
        assert module.main() == 2
    assert err.getvalue().startswith("error: the full study times GPUs")


@pytest.mark.slow
@needs_data
def test_input_pipeline_quick(tmp_path):
    data = quick("bench_input_pipeline.py", "input_pipeline", tmp_path)
    assert [s["set"].split()[0] for s in data["sets"]] == ["Imagenette", "CIFAR-10"]
    for s in data["sets"]:
        assert [r["num_workers"] for r in s["rows"]] == [0, 1, 2]
        for r in s["rows"]:
            assert is_stats(r["delivered_over_consumed"]) and is_stats(r["fed_over_resident"])
            assert r["delivered_img_s"] > 0 and r["consumed_img_s"] > 0


@pytest.mark.slow
@needs_data
def test_real_photos_quick(tmp_path):
    data = quick("bench_real_photos.py", "real_photos", tmp_path)
    train, prune = data["train"], data["prune"]
    assert train["ok"] and prune["ok"], (train["stderr_tail"], prune["stderr_tail"])
    assert train["top1"] is not None and train["train_img_s"]
    assert prune["prune_steps"] >= 1 and prune["macs_ratio"] <= 0.5
    assert prune["pruned_checkpoint_written"]


@pytest.mark.parametrize("script", ["bench_input_pipeline.py", "bench_real_photos.py"])
def test_data_studies_skip_without_data(tmp_path, script):
    proc = bench(script, "--quick", "--data-root", str(tmp_path / "absent"), "--out",
                 str(tmp_path / "out"), timeout=120)
    assert "skipped" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_revit_scratch_quick(tmp_path):
    """ReViT's shape against the uniform DeiT of the same MACs, from scratch, per seed."""
    study_here("bench_revit_scratch.py", "--quick", "--out", str(tmp_path), "--work-dir",
               str(tmp_path / "work"))
    data = json.loads((tmp_path / "revit_scratch_quick.json").read_text())
    assert data["quick"] is True and data["seeds"] == [0, 1]
    arms = data["arms"]
    assert set(arms) == {"revit", "uniform"}
    assert abs(arms["uniform"]["macs"] / arms["revit"]["macs"] - 1) < 0.02  # equal cost
    shapes = data["shapes"]
    assert len(set(shapes["uniform"]["num_heads"])) == 1 and len(set(shapes["revit"]["num_heads"])) > 1
    runs = {(r["arm"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {(a, s) for a in ("revit", "uniform") for s in data["seeds"]}
    assert all(len(r["curve"]) == data["recipe"]["epochs"] for r in runs.values())
    diffs = [runs[("revit", s)]["top1"] - runs[("uniform", s)]["top1"] for s in data["seeds"]]
    assert data["revit_minus_uniform"]["mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert is_stats(data["latency_revit_vs_uniform"]["b32"])
    md = (tmp_path / "revit_scratch_quick.md").read_text()
    assert "paired by seed" in md and "MACs promise" in md


def test_revit_scratch_skips_without_cifar(tmp_path):
    from benchmarks import bench_quality
    with mock.patch.object(bench_quality, "cifar_dir", return_value=tmp_path / "absent"):
        out = study_here("bench_revit_scratch.py", "--out", str(tmp_path / "out"))
    assert "skipped" in out and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_deploy_quick(tmp_path):
    """Study 13 end to end on DIGITS: a table per runtime, a pruning run per table, every
    variant timed in ONNX Runtime and eager torch, and int8's top-1 on study 5's model,
    whose fp32 top-1 is the one study 5 recorded for it."""
    data = quick("bench_deploy.py", "deploy", tmp_path)
    rows = {r["table"]: r for r in data["speed"]}
    assert set(rows) == {"onnxruntime", "torch"}
    for rt, r in rows.items():
        assert r["table_meta"]["runtime"] == rt and 0 < r["table_ratio"] <= 0.5
        for where in ("onnxruntime", "torch"):
            assert all(is_stats(r[f"delivered_{where}_b{b}"]) for b in (1, 4))
    assert set(data["times"]["4"]) >= {"dense int8", "ort-table int8", "torch-table"}
    top1 = {r["variant"]: r for r in data["int8_top1"]}
    manifest = json.loads((ROOT / "benchmarks" / "models" / "manifest.json").read_text())
    assert top1["fp32 (eager torch)"]["top1"] == pytest.approx(
        manifest["quality_quick_dense_digits.pth"]["top1"], abs=1e-4)
    assert top1["fp32 ONNX Runtime"]["agreement"] == 100.0
    assert len(top1) == 5 and all(50 < r["top1"] <= 100 for r in top1.values())


@pytest.mark.slow
def test_unit_scales_quick(tmp_path):
    """Study 14 drives the shipped scripts: a backbone pruned label-free with each set of
    unit scales, finetuned and judged by k-NN; one row per scales, the paired column filled."""
    study_here("bench_unit_scales.py", "--quick", "--families", "clip", "--seeds", "0",
               "--out", str(tmp_path), "--work-dir", str(tmp_path / "work"))
    data = json.loads((tmp_path / "unit_scales_quick.json").read_text())
    assert [r["scales"] for r in data["rows"]] == ["reference", "ones", "auto"]
    assert all(0 < r["macs_ratio"] <= 0.5 and 0 <= r["score"] <= 100 for r in data["rows"])
    log = (tmp_path / "work" / "quick" / "prune_vit_base_patch16_clip_quickgelu_224_auto_s0.log")
    assert "unit scales (auto, from the model's macs)" in log.read_text()
    assert "(1 seed)" in (tmp_path / "unit_scales_quick.md").read_text()
