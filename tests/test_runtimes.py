"""Speed in the runtime a model is deployed with (pruning/runtimes.py): each runtime runs the
model as PyTorch does, latency tables and speed reports time there and record where, the
int8 paths, tools.speed_report's top-1 side by side, and the refusals in one line."""
from __future__ import annotations

import json
import re
import shlex
from argparse import Namespace

import pytest
import torch

import checkpoints
import models
from datasets import build_dataset
from engine import evaluate
from errors import UserError
from helpers import FAST, PRUNE_FLAGS, assert_user_error, run, run_here, \
    write_dense_model
from models import Dims
from pruning import runtimes
from pruning.cost import LatencyTable
from pruning.latency import Timer, measure_table, report_lines, speed_report
from tools import build_latency_table

ort = pytest.importorskip("onnxruntime")
CPU = torch.device("cpu")
FRAME = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, distilled=False)
GRID = {"embed_dims": [32], "heads": [1, 2], "qk_dims": [8], "v_dims": [8], "mlp_dims": [32]}


def tiny(seed: int = 0) -> models.ReViT:
    torch.manual_seed(seed)
    return models.ReViT(Dims(32, [2, 4], [8, 16], [16, 8], [64, 32], **FRAME)).eval()


@pytest.mark.parametrize("runtime", ["torch", "torch-compile", "onnxruntime"])
def test_each_runtime_runs_the_model_as_pytorch_does(runtime):
    """fp32 in every CPU runtime gives PyTorch's logits (to float rounding), at another batch
    than the one it was prepared with (the batch axis is dynamic)."""
    model = tiny()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    run = runtimes.prepare(model, runtime, CPU, None, x[:2])
    assert torch.allclose(run(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_int8_quantizes_and_stays_close(runtime):
    """int8 changes the logits (it is quantized), keeps them near fp32's and the ranking of
    a confident model."""
    model = tiny()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    got = runtimes.prepare(model, runtime, CPU, None, x, int8=True)(x)
    diff = float((got - expected).abs().max())
    assert 0 < diff < 0.1 * float(expected.abs().max())
    if runtime == "torch":  # every Linear became torch's dynamic int8 Linear, in a copy
        q = runtimes.int8_torch(model)
        assert type(q.blocks[0].attn.qkv).__module__.startswith("torch.ao.nn.quantized")
        assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)


def test_timer_prepares_a_module_once(monkeypatch):
    """An export per module, not per timing: the prepared runner is reused."""
    calls = []
    real = runtimes.prepare

    def counting(module, *a, **k):
        calls.append(module)
        return real(module, *a, **k)
    import pruning.latency
    monkeypatch.setattr(pruning.latency, "prepare", counting)
    timer = Timer(CPU, warmup=1, repeats=2, amp_dtype=None, runtime="onnxruntime")
    model, x = tiny(), torch.randn(2, 3, 32, 32)
    assert timer(model, x) > 0 and timer(model, x) > 0
    assert calls == [model]


@pytest.mark.parametrize("runtime,amp,int8,words", [
    ("tensorrt", None, False, ["TensorRT execution provider"]),
    ("onnxruntime", torch.bfloat16, False, ["fp32", "autocast"]),
    ("torch", torch.bfloat16, True, ["int8", "autocast"]),
    ("torch-compile", None, True, ["int8", "torch or onnxruntime"]),
    ("tvm", None, False, ["'tvm'", "onnxruntime"]),
])
def test_runtime_refusals_are_one_line(runtime, amp, int8, words):
    if runtime == "tensorrt" and "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is present here (tests/gpu runs it)")
    with pytest.raises(UserError) as e:
        Timer(CPU, 1, 1, amp, runtime=runtime, int8=int8)
    assert e.value.field == "runtime" and "\n" not in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_table_timed_in_onnxruntime_records_where():
    """A table timed in ONNX Runtime says so (runtime, its version, provider, threads) and
    reads back with that runtime; a table from before runtimes were recorded is torch's."""
    data = measure_table(GRID, CPU, 2, 17, warmup=0, repeats=1, runtime="onnxruntime")
    meta = data["meta"]
    assert meta["runtime"] == "onnxruntime" and meta["onnxruntime"] == ort.__version__
    assert meta["provider"] == "CPUExecutionProvider" and meta["threads"] == torch.get_num_threads()
    table = LatencyTable.from_dict(data)
    assert table.runtime == "onnxruntime" and table.total(Dims(32, [2], [8], [8], [32], **FRAME)) > 0
    del data["meta"]["runtime"]
    assert LatencyTable.from_dict(data).runtime == "torch"


def test_speed_report_times_int8_in_the_same_rounds():
    dense, compact = models.ReViT(Dims(64, [4, 4], [16, 16], [16, 16], [128, 128], **FRAME)), tiny()
    r = speed_report(dense, compact, CPU, 4, None, pairs=2, repeats=1, runtime="onnxruntime",
                     int8=True)
    assert r["runtime"] == "onnxruntime" and r["provider"] == "CPUExecutionProvider"
    assert r["dense_ms"] > 0 and r["compact_ms"] > 0 and r["int8_ms"] > 0
    assert r["int8_speedup_p25"] <= r["int8_speedup"] <= r["int8_speedup_p75"]
    lines = report_lines(r)
    assert "in onnxruntime" in lines[0] and "compact int8" in lines[0]
    assert any(line.startswith("compact int8 speedup over dense") for line in lines)
    plain = speed_report(dense, compact, CPU, 4, None, pairs=1, repeats=1)
    assert "int8_ms" not in plain and plain["runtime"] == "torch"


def test_speed_report_tool_gives_top1_side_by_side(tmp_path, capsys):
    """tools.speed_report --runtime onnxruntime --int8 --data-set DIGITS: top-1 of dense
    (its weights given), compact fp32 and compact int8, scored in ONNX Runtime; fp32's is
    PyTorch's own top-1. Without dense weights, the run's recorded dense top-1."""
    from tools import speed_report as tool
    dense = models.ReViT(Dims(64, [4, 4], [16, 16], [16, 16], [128, 128], **FRAME))
    compact = tiny()
    path, dense_path = tmp_path / "pruned_checkpoint.pth", tmp_path / "dense.pth"
    checkpoints.save_model_file(path, compact, Namespace(), original_dims=dense.dims.to_dict(),
                                top1_dense=42.0)
    torch.save({"model": dense.state_dict(), "dims": dense.dims.to_dict()}, dense_path)
    common = [str(path), "--runtime", "onnxruntime", "--int8", "--pairs", "1", "--repeats", "1",
              "--batch-size", "4", "--data-set", "DIGITS", "--num-workers", "0", "--json"]
    assert tool.main([*common, "--dense", str(dense_path)]) == 0
    top1 = json.loads(capsys.readouterr().out)["top1"]
    val, _ = build_dataset(False, Namespace(data_set="DIGITS", data_path=None, input_size=32))
    loader = torch.utils.data.DataLoader(val, batch_size=64)
    for name, model in (("dense", dense), ("compact", compact)):
        assert top1[name] == pytest.approx(evaluate(loader, model, CPU)["acc1"], abs=100 / len(val))
    assert 0 <= top1["int8"] <= 100 and top1["images"] == len(val)
    assert tool.main([*common[:-1]]) == 0
    out = capsys.readouterr().out
    assert "dense 42.00 (recorded when pruned)" in out and "compact int8" in out


def test_export_and_the_runtime_share_one_onnx_export(tmp_path):
    """tools.export's ONNX file is what the onnxruntime runtime runs: the same outputs."""
    from tools import export as export_tool
    compact = tiny()
    path = tmp_path / "m.pth"
    checkpoints.save_model_file(path, compact, Namespace())
    export_tool.main([str(path), "--format", "onnx", "--output-dir", str(tmp_path / "o")])
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "o" / "m.onnx"))
    from_file = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    assert torch.equal(from_file, runtimes.prepare(compact, "onnxruntime", CPU, None, x)(x))


@pytest.mark.slow
def test_prune_toward_a_table_timed_in_the_deploy_runtime(tmp_path):
    """nvit_prune.py --runtime onnxruntime ranks by a table timed in ONNX Runtime, times its
    speed report there and records both; a table from another runtime is refused in one line
    before anything is written."""
    dense = write_dense_model(tmp_path / "dense.pth")
    tables = {}
    for rt in ("torch", "onnxruntime"):
        tables[rt] = tmp_path / f"{rt}.json"
        run("tools/build_latency_table.py", "--output", tables[rt], "--num-tokens", "18",
            "--batch-size", "8", "--embed-dims", "32,64", "--heads", "1,2,4", "--qk-dims",
            "8,16", "--v-dims", "8,16", "--mlp-dims", "32,128", "--warmup", "1", "--repeats",
            "2", "--runtime", rt)
    base = [*FAST, *PRUNE_FLAGS, "--cost", "latency", "--pretrained-path", dense, "--epochs",
            "1", "--latency_target", "0.9", "--runtime", "onnxruntime", "--speed-report-pairs",
            "2", "--pruning_exit"]
    out = tmp_path / "refused"
    proc = run_here("nvit_prune.py", *base, "--latency_look_up_table", tables["torch"],
                    "--output_dir", out)
    assert_user_error(proc, "--runtime", "timed in torch", "deploys to onnxruntime",
                      "--runtime onnxruntime")
    assert not out.exists()
    # the advice is a command the table builder takes as it stands
    advice = re.search(r"\(tools/build_latency_table.py ([^)]*)\)", proc.stderr).group(1)
    args = build_latency_table.parse_args([*shlex.split(advice), "--output", "t.json"])
    assert (args.runtime, args.input_size) == ("onnxruntime", 32)
    out = tmp_path / "p"
    proc = run_here("nvit_prune.py", *base, "--latency_look_up_table", tables["onnxruntime"],
                    "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cpu in onnxruntime" in proc.stdout
    ckpt = torch.load(out / "pruned_checkpoint.pth", weights_only=True)
    assert ckpt["speed"]["runtime"] == "onnxruntime"
    assert ckpt["latency_table"]["runtime"] == "onnxruntime"
    assert ckpt["cost_ratio"] <= 0.9
