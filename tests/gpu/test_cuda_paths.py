"""CUDA paths that cannot run on the project's CPU machines; skipped cleanly without CUDA.

    python -m pytest tests/gpu

The end-to-end runs take the device from NVIT_GPU_TESTS_DEVICE (default cuda): set it to
cpu to try the tests' own code on a machine without a GPU (the kernel and NCCL tests still
skip there).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import models
from helpers import FAST, PRUNE_FLAGS, ROOT, env, free_port, run, write_dense_model

DEVICE = os.environ.get("NVIT_GPU_TESTS_DEVICE", "cuda")
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not CUDA, reason="needs CUDA")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA itself")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
ON_DEVICE = [a if a != "cpu" else DEVICE for a in FAST]  # FAST with --device DEVICE
TINY_REVIT = {"embed_dim": 64, "num_heads": [4, 2], "qk_dim": [8, 16], "v_dim": [16, 16],
              "mlp_dim": [128, 96]}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_dense_model(tmp_path_factory.mktemp("dense") / "dense.pth")


# ----------------------------------------------------------------------- attention kernels
WIDTHS = [(16, 64), (8, 64), (32, 64), (64, 64),  # ReViT-T and ReViT-S blocks, DeiT
          (24, 40), (40, 24), (5, 12), (56, 8), (264, 136)]  # pruned pairs, odd, > 256


@needs_cuda
@pytest.mark.parametrize("dq,dv", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attention_reaches_a_fused_kernel_and_matches_math(dq, dv, dtype):
    """With only the fused backends allowed (flash, memory-efficient, cuDNN), the model's
    attention runs for every width pair (SDPA raises when no allowed kernel fits), and its
    forward and backward match the math backend computed in fp32 on the unpadded tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from models.revit import attention
    torch.manual_seed(0)
    B, H, N = 4, 3, 198
    leaves = [torch.randn(B, H, N, d, device="cuda", dtype=dtype, requires_grad=True)
              for d in (dq, dq, dv)]
    weight = torch.randn(B, H, N, dv, device="cuda", dtype=dtype)
    scale = dq ** -0.5
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.CUDNN_ATTENTION]):
        out = attention(*leaves, 0.0, scale)
        grads = torch.autograd.grad((out * weight).sum(), leaves)
    exact = [t.detach().float().requires_grad_() for t in leaves]
    with sdpa_kernel([SDPBackend.MATH]):
        ref = attention(*exact, 0.0, scale, pad=False)
        ref_grads = torch.autograd.grad((ref * weight.float()).sum(), exact)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=10 * tol, rtol=10 * tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_revit_trains_on_fused_kernels_under_autocast(dtype):
    """A whole ReViT (unequal QK/V widths in every block) trains a step under autocast with
    the math backend disabled, and its logits match the fp32 math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = models.build_model("revit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                               num_classes=10).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.CUDNN_ATTENTION]), torch.autocast("cuda", dtype=dtype):
        cls, dist_ = model(x)
        (cls.float().sum() + dist_.float().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = model(x)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        fused = model(x)
    torch.testing.assert_close(fused.float(), ref, atol=5e-2, rtol=5e-2)


def _sdpa_kernels(fn) -> list[str]:
    """The fused or math SDPA kernels (as bench_gpu names them) the profiler sees in fn()."""
    from torch.profiler import ProfilerActivity, profile
    from benchmarks.bench_gpu import SDPA_OPS
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return [SDPA_OPS[e.name.removeprefix("aten::")] for e in p.events()
            if e.name.removeprefix("aten::") in SDPA_OPS]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_token_scale_model_reaches_the_equal_width_kernel_under_autocast(dtype):
    """A ReViT (fp32 token scale, QK width 16 against V width 64 in some blocks) under
    autocast runs every block's attention on the kernel SDPA picks for equal 16-bit widths on
    this GPU (flash where it has it), as the profiler sees it: with the token scale promoting
    q, k, v to fp32 only the memory-efficient kernel took them."""
    torch.manual_seed(0)
    model = models.build_model("revit_tiny_distilled_patch16_224", num_classes=10).cuda().eval()
    assert model.blocks[0].attn.token_scale is not None
    assert any(q != v for q, v in zip(model.dims.qk_dim, model.dims.v_dim))
    q = torch.randn(2, 3, 197, 64, device="cuda", dtype=dtype)
    (best,) = set(_sdpa_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)))
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        kernels = _sdpa_kernels(lambda: model(x))
    assert kernels == [best] * model.dims.depth, (best, kernels)


# ------------------------------------------------------------------------------ timing
@needs_cuda
def test_cuda_timing_on_the_last_gpu():
    """A latency table's timer on the last visible GPU times that GPU (CUDA events record on
    the current device's stream, which was GPU 0): its median agrees with the wall clock of
    synchronised forwards there instead of reading near zero."""
    import time
    from pruning.latency import Timer
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])
    x = torch.randn(1024, 2048, device=device)
    ms = Timer(device, warmup=3, repeats=5, amp_dtype=None)(module, x)
    with torch.inference_mode():
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(10):
            module(x)
        torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 100
    assert 0.5 * wall_ms < ms < 2.0 * wall_ms, (ms, wall_ms)
    assert torch.cuda.current_device() == 0  # the caller's device is left as it was


@needs_cuda
@pytest.mark.parametrize("runtime,provider", [("onnxruntime", "CUDAExecutionProvider"),
                                              ("tensorrt", "TensorrtExecutionProvider")])
def test_onnx_runtimes_on_the_gpu(runtime, provider):
    """ONNX Runtime's CUDA and TensorRT providers run the model as PyTorch does (TensorRT may
    use TF32: within 1% of the logits' scale), time it, and a table timed there says so."""
    ort = pytest.importorskip("onnxruntime")
    if provider not in ort.get_available_providers():
        pytest.skip(f"{runtime} needs ONNX Runtime's {provider} (onnxruntime-gpu"
                    f"{' built with TensorRT' if runtime == 'tensorrt' else ''})")
    from pruning import runtimes
    from pruning.latency import Timer, measure_table
    device = torch.device("cuda")
    model = models.ReViT(models.Dims(**TINY_REVIT, img_size=32, patch_size=8, in_chans=3,
                                     num_classes=10)).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad():
        expected = model(x)
    got = runtimes.prepare(model, runtime, device, None, x)(x)
    assert got.device == x.device
    assert float((got - expected).abs().max()) <= 0.01 * float(expected.abs().max())
    assert Timer(device, 1, 2, None, runtime=runtime)(model, x) > 0
    grid = {"embed_dims": [64], "heads": [1, 2], "qk_dims": [8], "v_dims": [8], "mlp_dims": [64]}
    meta = measure_table(grid, device, 8, 17, warmup=1, repeats=2, runtime=runtime)["meta"]
    assert meta["runtime"] == runtime and meta["provider"] == provider


# ------------------------------------------------------------------------------ memory
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gated_step_memory_within_a_quarter_of_a_plain_step(dtype):
    """A pruning step (gates attached, a quarter of the units removed) needs at most 1.25x
    the activation memory of a plain step, by torch.cuda.max_memory_allocated."""
    from benchmarks.bench_step_memory import step_peak_bytes, variants
    torch.manual_seed(0)
    dense = models.build_model("deit_tiny_distilled_patch16_224", num_classes=100).cuda()
    x = torch.randn(32, 3, 224, 224, device="cuda")
    y = torch.randint(0, 100, (32,), device="cuda")
    peaks = {}
    for name, model in variants(dense).items():
        def step():
            with torch.autocast("cuda", dtype=dtype):
                cls, dist_ = model(x)
                loss = torch.nn.functional.cross_entropy(cls, y) + \
                    torch.nn.functional.cross_entropy(dist_, y)
            loss.backward()
        step()
        peaks[name] = step_peak_bytes(step, torch.device("cuda"))
    plain = peaks.pop("plain")
    for name, peak in peaks.items():
        assert peak <= 1.25 * plain, (name, peak / plain)


# ------------------------------------------------------------------- runs on one device
def test_checkpoint_written_from_gpu_loads_on_cpu(tmp_path):
    import checkpoints
    model = torch.nn.Linear(4, 2).to(DEVICE)
    path = tmp_path / "c.pth"
    checkpoints._save({"model": model.state_dict()}, path)
    state = torch.load(path, weights_only=True)  # no map_location: must not need a GPU
    assert all(t.device.type == "cpu" for t in state["model"].values())


def test_train_with_amp(tmp_path):
    """revit_scratch.py with --amp (fp16 and a grad scaler on CUDA): an epoch with a finite
    loss, a checkpoint that loads without a GPU, --eval of it."""
    from helpers import TRAIN, write_dims
    dims = write_dims(tmp_path / "dims.yaml", TINY_REVIT)
    out = tmp_path / "o"
    train = [a if a != "cpu" else DEVICE for a in TRAIN]
    run("revit_scratch.py", *train, "--dims", dims, "--epochs", "2", "--amp", "--output_dir", out)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 2 and all(r["train_loss"] is not None for r in log)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    proc = run("revit_scratch.py", *train, "--dims", dims, "--eval", "--amp",
               "--resume", out / "checkpoint.pth")
    assert re.search(r"top-1 [\d.]+%", proc.stdout)


def test_deterministic_runs_repeat_bitwise(tmp_path):
    """--deterministic: two runs of the same seed end with identical weights."""
    from helpers import TRAIN, write_dims
    dims = write_dims(tmp_path / "dims.yaml", TINY_REVIT)
    train = [a if a != "cpu" else DEVICE for a in TRAIN]
    states = []
    for name in ("a", "b"):
        run("revit_scratch.py", *train, "--dims", dims, "--epochs", "1", "--amp",
            "--deterministic", "--output_dir", tmp_path / name)
        states.append(torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_prune_with_amp_and_a_table_timed_here(tmp_path, dense):
    """A latency table built on this device with its defaults (on CUDA: batch 256, fp16
    autocast, CUDA events) steers an --amp pruning run without a settings warning; a table
    timed elsewhere is warned about; the compact model is written."""
    table = tmp_path / "table.json"
    run("tools/build_latency_table.py", "--device", DEVICE, "--output", table,
        "--num-tokens", "18", "--embed-dims", "32,64", "--heads", "1,2,4", "--qk-dims", "8,16",
        "--v-dims", "8,16", "--mlp-dims", "32,128", "--warmup", "2", "--repeats", "5")
    meta = json.loads(table.read_text())["meta"]
    if DEVICE == "cuda":
        assert meta["amp"] is True and meta["batch_size"] == 256
        assert meta["timing"].startswith("CUDA events") and meta["cudnn"]
        assert meta["device_name"] == torch.cuda.get_device_name(0)
    prune = ["nvit_prune.py", *ON_DEVICE, *PRUNE_FLAGS, "--cost", "latency",
             "--pretrained-path", dense, "--epochs", "3", "--latency_target", "0.9",
             "--latency_look_up_table", table, "--latency_regularization", "5e-4",
             "--pruning_exit"]
    amp = ["--amp"] if DEVICE == "cuda" else []  # the CPU table above was timed in fp32
    proc = run(*prune, *amp, "--output_dir", tmp_path / "p")
    assert "warning: the latency table" not in proc.stdout
    ckpt = torch.load(tmp_path / "p" / "pruned_checkpoint.pth", weights_only=True)
    assert ckpt["cost_ratio"] <= 0.9
    compact = models.build_model("deit_tiny_patch16_224",
                                 checkpoint=tmp_path / "p" / "pruned_checkpoint.pth")
    assert compact.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    meta.update(device="cpu", amp=False, dtype="float32")
    data = json.loads(table.read_text())
    data["meta"] = meta
    table.write_text(json.dumps(data))
    proc = run(*prune, "--amp", "--output_dir", tmp_path / "q")
    assert "warning: the latency table was timed on cpu in float32" in proc.stdout


def _torchrun(nproc: int, script: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


TWO_PROCESSES = DEVICE == "cpu" or torch.cuda.device_count() >= 2
needs_two_processes = pytest.mark.skipif(
    not TWO_PROCESSES, reason="one GPU: a single process has no process group, so the "
                              "sharded path this test is named for would not run")


@needs_two_processes
def test_ema_on_the_cpu_with_sharded_eval(tmp_path):
    """--model-ema-force-cpu --dist-eval under torchrun with two processes (NCCL on CUDA):
    the EMA is scored on the CPU and its counts reduced on the group's device (this crashed
    at the end of epoch 1)."""
    from helpers import write_dims
    dims = write_dims(tmp_path / "dims.yaml", TINY_REVIT)
    proc = _torchrun(2, "revit_scratch.py", *ON_DEVICE, "--dims", dims, "--epochs", "2",
                     "--batch-size", "32", "--model-ema", "--model-ema-force-cpu", "--dist-eval",
                     "--amp", "--output_dir", tmp_path / "o")
    assert proc.stdout.count("EMA") >= 2, proc.stdout[-2000:]
    assert "all 2 processes hold identical weights" in proc.stdout


# -------------------------------------------------------------------------- two GPUs
@needs_cuda
def test_nccl_reduces_on_the_current_gpu(tmp_path):
    import utils
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert utils.collective_device().type == "cuda"
        assert utils.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
    finally:
        dist.destroy_process_group()


@needs_cuda
@needs_two_gpus
def test_two_gpus_prune_with_identical_masks(tmp_path, dense):
    proc = _torchrun(2, "nvit_prune.py", *ON_DEVICE, *PRUNE_FLAGS, "--cost", "macs",
                     "--pretrained-path", dense, "--epochs", "3", "--batch-size", "32",
                     "--latency_target", "0.6", "--pruning_exit", "--dist-eval", "--amp",
                     "--output_dir", tmp_path / "o")
    assert re.search(r"all 2 processes hold identical masks and weights after \d+ prune steps", proc.stdout)


@needs_cuda
@needs_two_gpus
def test_two_gpus_train_end_identical(tmp_path):
    from helpers import TRAIN, write_dims
    dims = write_dims(tmp_path / "dims.yaml", TINY_REVIT)
    train = [a if a != "cpu" else "cuda" for a in TRAIN]
    proc = _torchrun(2, "revit_scratch.py", *train, "--dims", dims, "--epochs", "1",
                     "--batch-size", "32", "--dist-eval", "--amp", "--output_dir", tmp_path / "o")
    assert "all 2 processes hold identical weights" in proc.stdout
