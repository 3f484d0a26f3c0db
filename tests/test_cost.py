"""Cost models against the built model (flop_counter, numel), latency tables and their tool."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.flops import count_macs

from errors import UserError
from models.dims import Dims
from models.revit import ReViT
from pruning.cost import LatencyTable, MacsCost, ParamsCost, build_cost_model

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "build_latency_table.py"
SOURCE = "latency table"


def odd_dims(patch: int, distilled: bool) -> Dims:
    """Non-uniform widths, QK != V, odd sizes: nothing cancels by accident."""
    return Dims(24, [2, 3, 1], [4, 8, 5], [8, 4, 3], [32, 24, 7], img_size=32,
                patch_size=patch, in_chans=3, num_classes=10, distilled=distilled)


FRAMES = list(itertools.product((4, 8), (False, True)))


@pytest.mark.parametrize("patch,distilled", FRAMES)
def test_macs_equal_flop_counter(patch: int, distilled: bool) -> None:
    dims = odd_dims(patch, distilled)
    model = ReViT(dims).eval()
    assert MacsCost(dims).total(dims) == count_macs(model)[0]


def test_macs_equal_flop_counter_when_qk_equals_v() -> None:
    """Equal Q/K/V widths take the CPU flash kernel, which torch's registry does not count."""
    dims = Dims(32, [2, 4], [8, 8], [8, 8], [16, 40], img_size=32, patch_size=8, in_chans=3,
                num_classes=10, distilled=True)
    model = ReViT(dims).eval()
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert plain.get_total_flops() / 2 < MacsCost(dims).total(dims)  # torch alone misses attention
    assert MacsCost(dims).total(dims) == count_macs(model)[0]


@pytest.mark.parametrize("token_scale", [False, True])
@pytest.mark.parametrize("patch,distilled", FRAMES)
def test_params_equal_numel(patch: int, distilled: bool, token_scale: bool) -> None:
    """Exact, the token scales (one per token per block, an nvit_prune.py student's) included."""
    dims = dataclasses.replace(odd_dims(patch, distilled), token_scale=token_scale)
    model = ReViT(dims)
    assert ParamsCost(dims).total(dims) == sum(p.numel() for p in model.parameters())


def test_total_is_stem_plus_blocks() -> None:
    dims = odd_dims(8, True)
    cost = MacsCost(dims)
    blocks = sum(cost.block(24, dims.num_heads[i], dims.qk_dim[i], dims.v_dim[i],
                            dims.mlp_dim[i]) for i in range(dims.depth))
    assert cost.total(dims) == cost.stem(dims, 24) + blocks


# ------------------------------------------------------------------ latency table
AXES_ATT = {"embed_dim": [16, 32], "num_heads": [1, 2], "qk_dim": [4, 8], "v_dim": [4, 8]}
AXES_MLP = {"embed_dim": [16, 32], "mlp_dim": [8, 32]}


def f_att(e: float, h: float, q: float, v: float) -> float:
    """Multilinear in each argument, so interpolation must reproduce it exactly."""
    return 1.0 + e * h * (q + v) / 100.0


def f_mlp(e: float, m: float) -> float:
    return 0.5 + e * m / 100.0


def hand_table(**overrides) -> dict:
    att = [[[[f_att(e, h, q, v) for v in AXES_ATT["v_dim"]] for q in AXES_ATT["qk_dim"]]
            for h in AXES_ATT["num_heads"]] for e in AXES_ATT["embed_dim"]]
    mlp = [[f_mlp(e, m) for m in AXES_MLP["mlp_dim"]] for e in AXES_MLP["embed_dim"]]
    data = LatencyTable.make_dict({"device": "cpu", "num_tokens": 10}, AXES_ATT, att,
                                  AXES_MLP, mlp, {"embed_dim": [16, 32]}, [2.0, 3.0])
    data.update(overrides)
    return data


def test_grid_points_exact_and_json_roundtrip() -> None:
    table = LatencyTable.from_dict(json.loads(json.dumps(hand_table())))
    for e, h, q, v, m in itertools.product(*AXES_ATT.values(), AXES_MLP["mlp_dim"]):
        assert table.block(e, h, q, v, m) == pytest.approx(f_att(e, h, q, v) + f_mlp(e, m))
    assert table.name == "latency" and table.unit == "ms"
    assert table.stem(odd_dims(8, True), 16) == 2.0


def test_interpolation_is_multilinear() -> None:
    table = LatencyTable.from_dict(hand_table())
    mid = table.attention(24, 1.5, 6, 6)
    corners = [f_att(*c) for c in itertools.product(*AXES_ATT.values())]
    assert mid == pytest.approx(sum(corners) / len(corners))
    assert table.attention(20, 1.25, 5, 7) == pytest.approx(f_att(20, 1.25, 5, 7))
    assert table.mlp(24, 20) == pytest.approx(f_mlp(24, 20))
    assert table.stem(odd_dims(8, True), 24) == pytest.approx(2.5)
    dims = Dims(24, [2, 1], [6, 4], [5, 8], [20, 8])
    expected = 2.5 + f_att(24, 2, 6, 5) + f_mlp(24, 20) + f_att(24, 1, 4, 8) + f_mlp(24, 8)
    assert table.total(dims) == pytest.approx(expected)


def test_outside_grid_clamped_below_proportional_above() -> None:
    table = LatencyTable.from_dict(hand_table())
    assert table.mlp(4, 2) == pytest.approx(f_mlp(16, 8))  # held below the grid
    assert table.mlp(64, 32) == pytest.approx(f_mlp(32, 32) * 2)  # grows with width above
    assert table.attention(64, 4, 8, 8) == pytest.approx(f_att(32, 2, 8, 8) * 4)


def test_monotone_and_non_negative_everywhere() -> None:
    table = LatencyTable.from_dict(hand_table())
    sweeps = {0: range(1, 80, 3), 1: range(0, 6), 2: range(0, 20), 3: range(0, 20),
              4: range(0, 70, 3)}
    base = [24, 2, 6, 6, 16]
    for axis, values in sweeps.items():
        for other in ([4, 1, 1, 1, 1], base, [64, 5, 16, 16, 64]):
            seq = []
            for x in values:
                point = list(other)
                point[axis] = x
                seq.append(table.block(*point))
            assert all(c >= 0 for c in seq)
            assert all(b >= a - 1e-12 for a, b in zip(seq, seq[1:])), (axis, other, seq)


def test_noisy_table_is_made_monotone_by_lowering() -> None:
    data = hand_table()
    data["mlp"]["latency"][0][0] = 50.0  # a slow outlier at the narrowest point
    table = LatencyTable.from_dict(data)
    assert table.parts["mlp"].lowered == 1
    # read as the largest time that keeps the table monotone: the smaller wider neighbour
    assert table.mlp(16, 8) == pytest.approx(min(f_mlp(32, 8), f_mlp(16, 32)))
    assert table.mlp(32, 32) == pytest.approx(f_mlp(32, 32))  # the others are untouched


def test_units_converted_to_ms() -> None:
    data = hand_table(unit="s")
    assert LatencyTable.from_dict(data).mlp(16, 8) == pytest.approx(1000 * f_mlp(16, 8))


def test_frame_note() -> None:
    table = LatencyTable.from_dict(hand_table())
    assert table.frame_note(odd_dims(8, True)) is not None  # 18 tokens, table says 10
    assert table.frame_note(Dims(24, [1], [4], [4], [8], img_size=12, patch_size=4, in_chans=3,
                                 num_classes=10, distilled=False)) is None
    # register tokens pass every block: 9 patches + cls + 4 registers is not the table's 10
    assert "14" in table.frame_note(Dims(24, [1], [4], [4], [8], img_size=12, patch_size=4,
                                         in_chans=3, num_classes=10, distilled=False,
                                         reg_tokens=4))
    assert table.frame_note(Dims(24, [1], [4], [4], [8], img_size=12, patch_size=4, in_chans=3,
                                 num_classes=10, distilled=False, class_token=False,
                                 global_pool="avg", reg_tokens=1)) is None


def test_table_times_the_token_scale_the_student_has(monkeypatch) -> None:
    """A table is timed with the token scale when asked (as nvit_prune.py's students have one
    by default) and says so; a model with the other setting is told, and a table from before
    the field was recorded is taken as it is."""
    import pruning.latency as latency
    timed = []
    monkeypatch.setattr(latency.Timer, "__call__", lambda self, module, x: timed.append(
        module) or 1.0)
    grid = {"embed_dims": [16], "heads": [1, 2], "qk_dims": [4], "v_dims": [4], "mlp_dims": [8]}
    frame = dict(img_size=12, patch_size=4, in_chans=3, num_classes=10, distilled=False)
    plain = Dims(24, [1], [4], [4], [8], **frame)
    scaled = dataclasses.replace(plain, token_scale=True)
    for token_scale in (True, False):
        timed.clear()
        data = latency.measure_table(grid, torch.device("cpu"), 2, 10, token_scale=token_scale)
        attns = [m.body for m in timed if isinstance(m.body, latency.Attention)]
        assert len(attns) == 2
        assert all((a.token_scale is not None) == token_scale for a in attns)
        assert all(a.token_scale.shape == (10, 1) for a in attns if token_scale)
        table = LatencyTable.from_dict(data)
        assert data["meta"]["token_scale"] is token_scale
        assert table.frame_note(scaled if token_scale else plain) is None
        note = table.frame_note(plain if token_scale else scaled)
        assert "token scale" in note and ("lacks" if token_scale else "has") in note
        del data["meta"]["token_scale"]
        assert LatencyTable.from_dict(data).frame_note(plain if token_scale else scaled) is None


def test_settings_note_names_device_and_precision() -> None:
    """A table timed on another kind of device, GPU model or precision than the run's is
    pointed out."""
    from pruning.cost import precision_name
    fp32, fp16, bf16 = (precision_name(d) for d in (None, torch.float16, torch.bfloat16))
    assert (fp32, fp16, bf16) == ("float32", "autocast float16", "autocast bfloat16")
    cpu_fp32 = LatencyTable.from_dict(hand_table())  # meta: device cpu, precision not recorded
    assert cpu_fp32.settings_note("cpu", fp32) is None
    assert "timed on cpu" in cpu_fp32.settings_note("cuda", fp32)
    data = hand_table()
    data["meta"].update(device="cuda:1", amp=True, dtype=fp16, batch_size=256)
    gpu_amp = LatencyTable.from_dict(data)
    assert gpu_amp.settings_note("cuda", fp16) is None
    assert gpu_amp.settings_note("cuda", fp32) == (
        "the latency table was timed on cuda in autocast float16 (batch 256), this run prunes on "
        "cuda in float32: the ranking follows the table's device and precision; build the table "
        "where and as you deploy")
    assert "this run prunes on cuda in autocast bfloat16" in gpu_amp.settings_note("cuda", bf16)
    del data["meta"]["dtype"]  # an older table: only whether autocast was on
    assert LatencyTable.from_dict(data).settings_note("cuda", bf16) is None
    assert "in autocast (batch 256)" in LatencyTable.from_dict(data).settings_note("cuda", fp32)
    assert LatencyTable.from_dict(reference_table()).settings_note("cuda", fp16) is None
    data["meta"].update(device_name="NVIDIA V100", dtype=fp16)
    v100 = LatencyTable.from_dict(data)
    assert v100.settings_note("cuda", fp16, "NVIDIA V100") is None
    assert "timed on cuda (NVIDIA V100) in autocast float16 (batch 256), this run prunes on " \
           "cuda (NVIDIA A100) in autocast float16" in v100.settings_note("cuda", fp16, "NVIDIA A100")


# ----------------------------------------------------------- NViT reference format
def reference_table() -> dict:
    """EMB_{e} -> QK_{heads}_{qk} -> V_{v} -> MLP_{m} -> seconds for one block."""
    return {f"EMB_{e}": {f"QK_{h}_{q}": {f"V_{v}": {f"MLP_{m}": (f_att(e, h, q, v) + f_mlp(e, m))
                                                      / 1000.0 for m in (1, 32)}
                                           for v in (4, 8)} for h in (1, 2) for q in (4, 8)}
            for e in (16, 32)}


def test_reference_format() -> None:
    table = LatencyTable.from_dict(reference_table())
    assert table.source_format == "reference"
    assert table.block(32, 2, 8, 4, 32) == pytest.approx(f_att(32, 2, 8, 4) + f_mlp(32, 32))
    # the reference's grid holds the MLP_1 measurement at MLP width 0
    assert table.block(16, 1, 6, 6, 0) == pytest.approx(f_att(16, 1, 6, 6) + f_mlp(16, 1))
    at_8 = (24 * f_mlp(16, 1) + 8 * f_mlp(16, 32)) / 32
    assert table.block(16, 1, 4, 4, 8) == pytest.approx(f_att(16, 1, 4, 4) + at_8)
    # as in the reference code, embed widths below the table go linearly towards 0 at 0
    assert table.block(8, 1, 4, 4, 0) == pytest.approx((f_att(16, 1, 4, 4) + f_mlp(16, 1)) / 2)
    assert table.stem(odd_dims(8, True), 16) == 0.0
    with pytest.raises(ValueError):
        table.attention(16, 1, 4, 4)


def test_reference_format_is_read_as_measured() -> None:
    """The reference interpolates its table as it is: a point that timing noise made slower
    than a wider one stays so (our own format is made monotone)."""
    ref = reference_table()
    ref["EMB_16"]["QK_1_4"]["V_4"]["MLP_32"] = 1.0  # 1 s: far slower than anything wider
    table = LatencyTable.from_dict(ref)
    assert table.block(16, 1, 4, 4, 32) == pytest.approx(1000.0)
    assert table.parts["block"].lowered == 0


# --------------------------------------------------------------- malformed tables
def _drop(d: dict, *path) -> dict:
    node = d
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    return d


def _set(d: dict, value, *path) -> dict:
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


MALFORMED = {
    "list": [1, 2],
    "empty": {},
    "unrelated": {"foo": 1},
    "wrong format": hand_table(format="other"),
    "bad unit": hand_table(unit="minutes"),
    "unknown key": hand_table(extra=1),
    "no mlp": _drop(hand_table(), "mlp"),
    "no latency": _drop(hand_table(), "attention", "latency"),
    "axis renamed": _set(hand_table(), {"embed_dim": [16, 32], "hidden": [8, 32]}, "mlp", "axes"),
    "decreasing axis": _set(hand_table(), [32, 16], "mlp", "axes", "embed_dim"),
    "zero axis": _set(hand_table(), [0, 8], "mlp", "axes", "mlp_dim"),
    "short row": _set(hand_table(), [1.0], "mlp", "latency", 0),
    "negative": _set(hand_table(), -1.0, "mlp", "latency", 0, 0),
    "nan": _set(hand_table(), float("nan"), "mlp", "latency", 0, 0),
    "string value": _set(hand_table(), "1.0", "mlp", "latency", 0, 0),
    "bool value": _set(hand_table(), True, "mlp", "latency", 0, 0),
    "ref bad emb key": {"EMB_x": {}},
    "ref bad qk key": {"EMB_16": {"QK_4": {"V_4": {"MLP_1": 0.1}}}},
    "ref not full grid": _drop(reference_table(), "EMB_32", "QK_2_8", "V_8", "MLP_32"),
    "ref leaf not number": _set(reference_table(), [0.1], "EMB_16", "QK_1_4", "V_4", "MLP_1"),
    "ref empty level": _set(reference_table(), {}, "EMB_16", "QK_1_4"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_tables_raise_user_error(name: str) -> None:
    with pytest.raises(UserError, match=SOURCE):
        LatencyTable.from_dict(MALFORMED[name])


def test_build_cost_model() -> None:
    dims = odd_dims(8, False)
    assert isinstance(build_cost_model("macs", dims), MacsCost)
    assert isinstance(build_cost_model("params", dims), ParamsCost)
    assert isinstance(build_cost_model("latency", dims, hand_table()), LatencyTable)
    assert build_cost_model("macs", dims).name == "macs"
    with pytest.raises(UserError, match=SOURCE) as e:
        build_cost_model("latency", dims)
    assert e.value.field == "latency_table"  # the script names --latency_look_up_table
    with pytest.raises(UserError, match="flops") as e:
        build_cost_model("flops", dims)
    assert e.value.field == "cost"
    with pytest.raises(UserError) as e:
        build_cost_model("latency", dims, {"format": "bogus"})
    assert e.value.field == "latency_table"


# -------------------------------------------------------------------------- the tool
def test_tool_writes_a_readable_table(tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.build_latency_table", "--output", str(out),
         "--model", "deit_tiny_patch16_224", "--embed-dims", "16,32", "--heads", "1,2",
         "--qk-dims", "8", "--v-dims", "8,16",
         "--mlp-dims", "16,64", "--num-tokens", "17", "--warmup", "1", "--repeats", "2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["num_tokens"] == 17 and data["meta"]["repeats"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # no temp file left
    table = LatencyTable.from_dict(data)
    assert table.block(16, 1, 8, 8, 16) > 0
    assert table.block(24, 2, 8, 12, 40) > 0
    assert table.stem(odd_dims(8, True), 16) > 0  # --model also times the stem


def _load_tool():
    spec = importlib.util.spec_from_file_location("build_latency_table", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_GRID = ["--embed-dims", "16", "--heads", "1", "--qk-dims", "8", "--v-dims", "8",
             "--mlp-dims", "16", "--repeats", "1", "--warmup", "0"]


def test_tool_creates_folders_and_keeps_tables(tmp_path: Path, capsys) -> None:
    """The output's folders are made; an existing table is replaced only with --force; the
    file gets the umask's mode like any other."""
    tool = _load_tool()
    out = tmp_path / "tables" / "cpu" / "t.json"
    assert tool.main(["--output", str(out), *TINY_GRID]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    first = out.read_text()
    assert tool.main(["--output", str(out), *TINY_GRID]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == first
    assert tool.main(["--output", str(out), *TINY_GRID, "--force"]) == 0


def test_tool_records_what_it_timed(tmp_path: Path) -> None:
    """On the CPU the defaults are batch 1 in fp32 timed by the wall clock; --amp times bf16
    autocast; both are recorded for nvit_prune.py's comparison with its run."""
    tool = _load_tool()
    meta = []
    for extra in ([], ["--amp", "--batch-size", "3"], ["--amp-dtype", "float16"]):
        out = tmp_path / f"t{len(meta)}.json"
        assert tool.main(["--output", str(out), *TINY_GRID, *extra]) == 0
        meta.append(json.loads(out.read_text())["meta"])
    assert (meta[0]["batch_size"], meta[0]["amp"], meta[0]["dtype"]) == (1, False, "float32")
    assert (meta[1]["batch_size"], meta[1]["amp"], meta[1]["dtype"]) == (3, True,
                                                                          "autocast bfloat16")
    assert meta[0]["timing"] == "wall clock per forward" and meta[0]["cudnn"] is None
    assert (meta[2]["amp"], meta[2]["dtype"]) == (True, "autocast float16")  # implies --amp


@pytest.mark.parametrize("extra,message", [
    (["--heads", "1,x"], "--heads"),
    (["--mlp-dims", "0,8"], "--mlp-dims"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA")]))
def test_tool_user_errors(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    tool = _load_tool()
    out = tmp_path / "t.json"
    try:
        code = tool.main(["--output", str(out), *TINY_GRID, *extra])
    except SystemExit as e:  # flags out of range stop when parsed
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_tool_model_frame_and_a_grid_down_to_one_group(tmp_path: Path, capsys) -> None:
    """--input-size/--patch-size give --model's frame (its token count; what nvit_prune.py's
    advice asks for), and the model's grid reaches down to one pruning group per axis, so no
    width a run can leave reads as free."""
    from pruning import DEFAULT_GROUP_SIZES as G
    tool = _load_tool()
    from models import name_dims
    dims = name_dims("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8)
    grid = tool.model_grid(dims)
    assert dims.num_tokens == 18
    firsts = {k: int(v.split(",")[0]) for k, v in grid.items()}
    assert (firsts["embed_dims"], firsts["qk_dims"], firsts["v_dims"], firsts["mlp_dims"]) == \
        (G["emb"], G["qk"], G["v"], G["mlp"]) and firsts["heads"] == 1
    out = tmp_path / "t.json"
    assert tool.main(["--output", str(out), "--model", "deit_tiny_distilled_patch16_224",
                      "--input-size", "32", "--patch-size", "8", *TINY_GRID]) == 0
    assert json.loads(out.read_text())["meta"]["num_tokens"] == 18
    assert tool.main(["--output", str(tmp_path / "u.json"), "--input-size", "32", *TINY_GRID]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and not (tmp_path / "u.json").exists()
