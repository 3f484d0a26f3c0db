"""tools/model_info.py and tools/export.py: paper shapes, JSON output, ONNX/safetensors round trip."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import models
from errors import UserError
from models import Dims
from tests.helpers import ROOT, assert_user_error, run, write_dims

TINY = dict(embed_dim=32, num_heads=[2, 1], qk_dim=[8, 16], v_dim=[8, 4], mlp_dim=[48, 16])
TINY_FRAME = dict(img_size=32, patch_size=8, num_classes=5)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_info = _load_tool("model_info")
export_tool = _load_tool("export")


def _tiny_model(**dims_overrides) -> models.ReViT:
    torch.manual_seed(0)
    dims = Dims(**{**TINY, **dims_overrides})
    return models.build_model("deit_tiny_distilled_patch16_224", dims=dims, **TINY_FRAME).eval()


@pytest.fixture
def tiny_ckpt(tmp_path):
    # a non-default attention scale in block 1 checks that the exporter keeps SDPA's scale=
    m = _tiny_model(attn_scale=[0.35, 0.05])
    path = tmp_path / "tiny.pth"
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    return path, m


# --------------------------------------------------------------------------- model_info
@pytest.mark.parametrize("emb, params, gmacs", [(176, 5341512, 1.135), (384, 23125656, 4.705)])
def test_model_info_paper_shapes(emb, params, gmacs):
    args = model_info.get_args_parser().parse_args(
        ["--model", "deit_base_distilled_patch16_224", "--EMB", str(emb)])
    info = model_info.model_info(model_info.build_from_args(args))
    assert info["params"] == params
    assert round(info["macs"] / 1e9, 3) == gmacs
    assert len(info["blocks"]) == 12
    # blocks + stem/head add up to the totals
    assert sum(b["params"] for b in info["blocks"]) + info["stem_head"]["params"] == params
    assert sum(b["macs"] for b in info["blocks"]) + info["stem_head"]["macs"] == pytest.approx(info["macs"])
    assert info["tokens"] == 198 and info["embed_dim"] == emb
    table = model_info.format_table(info)
    assert "stem/head" in table and f"{gmacs:.3f} G" in table
    assert f"params {params:,}" in table and "token scale yes" in table and " 0.1250 " in table


def test_model_info_json_tiny_dims(tmp_path, capsys):
    # in-process through main() (a subprocess costs seconds of imports; the CLI contract is
    # exercised by the --EMB 50 and export subprocess tests)
    dims_file = write_dims(tmp_path / "dims.yaml", TINY)
    code = model_info.main(["--model", "deit_tiny_distilled_patch16_224", "--dims", str(dims_file),
                            "--input-size", "32", "--patch-size", "8", "--num-classes", "5", "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    m = _tiny_model()
    assert info["params"] == sum(p.numel() for p in m.parameters())
    assert isinstance(info["params"], int) and isinstance(info["macs"], float)
    assert info["dims"]["num_heads"] == [2, 1] and info["dims"]["img_size"] == 32
    assert [b["mlp_dim"] for b in info["blocks"]] == [48, 16]
    assert info["tokens"] == 16 + 2
    # a block's MACs: q,k,v,proj,fc1,fc2 linears over N tokens plus QK^T and AV
    n = 18
    b1 = info["blocks"][1]
    linear = n * 32 * (2 * 1 * 16 + 1 * 4) + n * 4 * 32 + 2 * n * 32 * 16
    assert b1["macs"] == linear + n * n * 16 + n * n * 4


def test_model_info_bad_emb():
    proc = run("tools/model_info.py", "--EMB", "50", check=False)
    assert proc.returncode == 2
    assert_user_error(proc, "--EMB")


# ------------------------------------------------------------------ run as files or modules
ENTRY_FILES = sorted(p.relative_to(ROOT).as_posix() for folder in ("tools", "benchmarks")
                     for p in (ROOT / folder).glob("*.py")
                     if 'if __name__ == "__main__":' in p.read_text())


def _as_a_file(path: str, *args, cwd) -> subprocess.CompletedProcess:
    """`python tools/NAME.py ARGS` as a user types it: from another folder, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, str(ROOT / path), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_command_is_checked_as_a_file():
    assert len([p for p in ENTRY_FILES if p.startswith("tools/")]) >= 6
    assert len([p for p in ENTRY_FILES if p.startswith("benchmarks/")]) >= 12


@pytest.mark.parametrize("path", ENTRY_FILES)
def test_runs_as_a_file(path, tmp_path):
    """Each tool and benchmark runs as `python tools/NAME.py` as well as `python -m tools.NAME`
    (timm's scripts run as files): its imports resolve from the repository root."""
    proc = _as_a_file(path, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]


def test_model_info_as_a_file(tmp_path):
    dims_file = write_dims(tmp_path / "dims.yaml", TINY)
    proc = _as_a_file("tools/model_info.py", "--dims", dims_file, "--input-size", "32",
                      "--patch-size", "8", "--num-classes", "5", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["params"] == sum(p.numel() for p in _tiny_model().parameters())


# ------------------------------------------------------------------------------ export
def test_export_round_trip(tiny_ckpt, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt, m = tiny_ckpt
    out = tmp_path / "deploy"
    proc = run("tools/export.py", ckpt, "--output-dir", out, "--name", "net")
    assert "max abs diff" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["net.dims.json", "net.onnx", "net.safetensors"]

    x = torch.randn(3, 3, 32, 32)  # another batch size than the export and the check used
    with torch.no_grad():
        expected = m(x)
    session = ort.InferenceSession(str(out / "net.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    got = session.run(["logits"], {"images": x.numpy()})[0]
    assert got.shape == (3, 5)
    assert abs(got - expected.numpy()).max() <= 1e-4

    rebuilt = models.build_model("deit_base_distilled_patch16_224",
                                 checkpoint=out / "net.safetensors").eval()
    assert rebuilt.dims == m.dims
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    assert Dims.load(out / "net.dims.json") == m.dims


def test_export_refuses_raw_timm_state_dict(tmp_path, capsys):
    import timm
    path = tmp_path / "deit.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
                                 num_classes=5).state_dict(), path)
    assert export_tool.main([str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nvit checkpoint" in err[0], err
    assert not (tmp_path / "out").exists()


def test_export_errors_in_process(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    with pytest.raises(UserError, match="checkpoint not found"):
        export_tool.export(str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pth"):
        export_tool.export(str(tmp_path / "bad.pth"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--output-dir .* not writable"):
        export_tool.export(str(ckpt), output_dir=str(tmp_path / "a_file" / "sub"), check=False)
    with pytest.raises(UserError, match="--opset"):
        export_tool.export(str(ckpt), opset=11)


def test_export_mismatch_writes_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ckpt, _ = tiny_ckpt
    monkeypatch.setattr(export_tool, "TOLERANCE", -1.0)  # any difference now counts as a mismatch
    out = tmp_path / "out"
    assert export_tool.main([str(ckpt), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ONNX check failed")
    assert list(out.iterdir()) == []  # no final files and no temporary ones


# ------------------------------------------------------------------------- speed report
def _pruned_pair(tmp_path):
    """A dense model's dims and a compact file as nvit_prune.py writes it (original_dims)."""
    import checkpoints
    from argparse import Namespace
    frame = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, distilled=True)
    dense = Dims(64, [4, 4], [16, 16], [16, 16], [128, 128], **frame)
    compact = models.ReViT(Dims(32, [2, 4], [8, 16], [16, 8], [64, 32], **frame))
    path = tmp_path / "pruned_checkpoint.pth"
    checkpoints.save_model_file(path, compact, Namespace(), original_dims=dense.to_dict())
    return dense, compact, path


def test_speed_report_measures_and_compares(tmp_path, capsys):
    """The report times the dense model rebuilt from original_dims against the compact one
    and puts the measured speedup beside the MACs ratio (counted by torch's flop counter) and
    a latency table's prediction."""
    from models.flops import count_macs
    from pruning.cost import LatencyTable
    from tools import speed_report
    dense_dims, compact, path = _pruned_pair(tmp_path)
    macs = count_macs(compact)[0] / count_macs(models.ReViT(dense_dims))[0]
    table = tmp_path / "t.json"
    assert importlib.import_module("tools.build_latency_table").main(
        ["--output", str(table), "--num-tokens", str(dense_dims.num_tokens), "--embed-dims",
         "32,64", "--heads", "1,4", "--qk-dims", "8,16", "--v-dims", "8,16", "--mlp-dims",
         "32,128", "--warmup", "0", "--repeats", "1"]) == 0
    capsys.readouterr()
    assert speed_report.main([str(path), "--pairs", "3", "--repeats", "2", "--batch-size", "4",
                              "--latency-table", str(table), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["macs_ratio"] == pytest.approx(macs, rel=1e-12) and r["macs_speedup"] > 1
    assert r["dense_ms"] > 0 and r["compact_ms"] > 0 and r["pairs"] == 3 and r["batch_size"] == 4
    assert r["speedup_p25"] <= r["speedup"] <= r["speedup_p75"]
    t = LatencyTable.from_dict(json.loads(table.read_text()))
    assert r["table_speedup"] == pytest.approx(t.total(dense_dims) / t.total(compact.dims))
    for dense in ("deit_tiny_distilled_patch16_224", str(path)):  # named, or a file
        assert speed_report.main([str(path), "--dense", dense, "--pairs", "1", "--json"]) == 0
        other = json.loads(capsys.readouterr().out)
        assert (other["macs_ratio"] == 1.0) == (dense == str(path))
    lines = speed_report.report_lines({**r, "speedup": 0.5 * r["macs_speedup"]})
    assert lines[1].startswith("measured speedup") and lines[2].startswith("warning:")
    assert len(speed_report.report_lines({**r, "speedup": r["macs_speedup"]})) == 2


def test_speed_report_needs_the_dense_model(tmp_path, capsys):
    from tools import speed_report
    compact = models.ReViT(Dims(32, [2], [8], [8], [64], img_size=32, patch_size=8, in_chans=3,
                                num_classes=10, distilled=False))
    path = tmp_path / "m.pth"
    torch.save({"model": compact.state_dict(), "dims": compact.dims.to_dict()}, path)
    assert speed_report.main([str(path), "--pairs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no original_dims" in err and "--dense" in err
    assert speed_report.main([str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    (tmp_path / "t.json").write_text("{not json")
    assert speed_report.main([str(path), "--dense", str(path), "--latency-table",
                              str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--latency-table" in err and "not JSON" in err
