"""Swin (v1) and Swin v2 as ReSwin: timm's logits bitwise for every registered name, the
unit map (masked == compact for every kind at every stage, gate gradients equal to the
summed theta * dL/dtheta of the producing weights, written out here by hand), exact costs,
loading timm's and Microsoft's layouts, and the refusals."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from errors import UserError
from models import ReSwin, SwinDims
from models.flops import count_macs
from models.timm_swin import timm_swin_dims
from pruning import Gates, GlobalPruner, Saliency, build_cost_model, compact
from pruning.units import check_covered, clear_pruned_state

NAMES = [n for n in timm.list_models("swin*") if not n.startswith("swinv2_cr")]


def tiny_timm(name: str, **kw) -> torch.nn.Module:
    """timm's model of `name` at its own image size and windows, with narrow widths (2
    channels per head) and two blocks per stage (the second one shifted), every parameter
    perturbed so that no initial constant hides a wrong index."""
    torch.manual_seed(0)
    with torch.device("meta"):
        heads = [s.blocks[0].attn.num_heads for s in timm.create_model(name).layers]
    kw = {"embed_dim": 2 * heads[0], "depths": (2,) * len(heads), "num_heads": tuple(heads), **kw}
    m = timm.create_model(name, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def ours_of(timm_model: torch.nn.Module, name: str = "") -> ReSwin:
    ours = ReSwin(timm_swin_dims(timm_model, name)).eval()
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    return ours


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_swin_gives_timms_logits_bitwise(name):
    tm = tiny_timm(name)
    ours = ours_of(tm, name)
    d = ours.dims
    x = torch.randn(2, 3, d.img_size, d.img_size)
    with torch.no_grad():
        assert torch.equal(ours(x), tm(x))
    assert d.window_size == [_side(w) for w in tm._ref_window_sizes]


def _side(w) -> int:
    return w[0] if isinstance(w, (tuple, list)) else w


@pytest.mark.parametrize("name,kw", [
    ("swin_tiny_patch4_window7_224", dict(img_size=32)),  # padded windows, clamped stages
    ("swinv2_tiny_window8_256", dict(img_size=40)),  # odd grids: the merging pads
    ("swin_tiny_patch4_window7_224", dict(head_dim=8, mlp_ratio=2.0, num_classes=0)),
    ("swinv2_tiny_window8_256", dict(qkv_bias=False, depths=(1, 3, 2, 1))),
    ("swin_tiny_patch4_window7_224", dict(qkv_bias=False, global_pool="")),
])
def test_swin_structures_give_timms_logits_and_features(name, kw):
    tm = tiny_timm(name, **kw)
    ours = ours_of(tm, name)
    x = torch.randn(2, 3, ours.dims.img_size, ours.dims.img_size)
    with torch.no_grad():
        assert torch.equal(ours(x), tm(x))
        mine = ours.forward_intermediates(x)[1]
        theirs = tm.forward_intermediates(x)[1]
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
        assert torch.equal(ours.forward_head(ours.forward_features(x), pre_logits=True),
                           tm.forward_head(tm.forward_features(x), pre_logits=True))


def test_full_size_swin_t_and_our_registered_name():
    tm = timm.create_model("swin_tiny_patch4_window7_224").eval()
    ours = timm.create_model("reswin").eval()
    ours.load_state_dict(tm.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), tm(x))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tm.parameters())


@pytest.mark.parametrize("name,kw,words", [
    ("swinv2_cr_tiny_224", {}, ["swinv2_cr", "not supported"]),
    ("swin_tiny_patch4_window7_224", dict(window_size=(7, 5)), ["not square"]),
    ("swin_tiny_patch4_window7_224", dict(always_partition=True), ["always_partition"]),
    ("swin_tiny_patch4_window7_224", dict(strict_img_size=False), ["dynamic_img_size"]),
])
def test_unsupported_swins_are_refused_in_one_line(name, kw, words):
    with pytest.raises(UserError) as e:
        models.name_dims(name, **kw)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# -------------------------------------------------------------------- loading
def test_build_model_reads_timm_and_microsoft_layouts_and_our_checkpoints(tmp_path):
    name = "swin_tiny_patch4_window7_224"
    tm = tiny_timm(name, img_size=64, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = tm(x)
    timm_file = tmp_path / "timm.pth"
    torch.save(tm.state_dict(), timm_file)
    # Microsoft's layout: merging at the end of a stage, `head.`, buffers saved
    ms = {}
    for k, v in tm.state_dict().items():
        if ".downsample." in k:
            s = int(k.split(".")[1])
            k = k.replace(f"layers.{s}.", f"layers.{s - 1}.", 1)
        ms[k.replace("head.fc.", "head.")] = v
    ms["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    ms_file = tmp_path / "ms.pth"
    torch.save({"model": ms}, ms_file)
    for f in (timm_file, ms_file):
        m = models.build_model(name, checkpoint=f, img_size=64).eval()
        assert isinstance(m, ReSwin) and m.dims.num_classes == 7
        with torch.no_grad():
            assert torch.equal(m(x), want)
    ours = tmp_path / "ours.pth"
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, ours)
    # our checkpoint carries its dims: any model name builds it
    again = models.build_model("deit_tiny_patch16_224", checkpoint=ours).eval()
    with torch.no_grad():
        assert torch.equal(again(x), want)
    # finetuning at another size and label set: bias tables resampled as timm does
    small = models.build_model(name, checkpoint=timm_file, img_size=32, num_classes=3, adapt=True)
    ref = timm.create_model(name, img_size=32, num_classes=3, embed_dim=6,
                            depths=(2, 2, 2, 2), pretrained=False)
    table = "layers.1.blocks.0.attn.relative_position_bias_table"
    assert small.state_dict()[table].shape == ref.state_dict()[table].shape != tm.state_dict()[table].shape
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(UserError, match="relative_position_bias_table"):  # without adapt
        models.build_model(name, checkpoint=timm_file, img_size=32)
    with pytest.raises(UserError, match="num_classes=7"):
        models.build_model(name, checkpoint=ours, num_classes=3)


def test_dims_files_take_stages(tmp_path):
    """A dims file gives per-stage widths and per-block lists per stage (or flat, or one
    number); it round-trips through save and load, and models.load_dims tells it from a
    ViT's."""
    d = SwinDims([16, 32], [2, 1], [[2, 4], 4], 8, [8, 8, 16], [[32, 48], [64]], [4, 2],
                 version=2, img_size=32, patch_size=4, in_chans=3, num_classes=10)
    assert d.num_heads == [2, 4, 4] and d.v_dim == [8, 8, 16] and d.mlp_dim == [32, 48, 64]
    path = tmp_path / "swin.yaml"
    d.save(path)
    assert models.load_dims(path) == d
    path.write_text("embed_dim: [16, 32]\ndepths: [2, 1]\nnum_heads: [2, 4]\nqk_dim: 8\n"
                    "v_dim: 8\nmlp_dim: [32, 64, 64, 64]\nwindow_size: 4\n")
    with pytest.raises(UserError, match="mlp_dim has 4 entries but the stages have 3 blocks"):
        models.load_dims(path)


# ------------------------------------------------------------------ the unit map
def tiny(version: int, seed: int = 0) -> ReSwin:
    torch.manual_seed(seed)
    d = SwinDims([16, 32, 24], [2, 2, 2], [2, 2, 4, 4, 3, 3], [8, 8, 6, 6, 8, 8],
                 [8, 8, 12, 12, 8, 8], [32, 48, 64, 64, 96, 96], [4, 4, 2], version=version,
                 img_size=32, patch_size=2, in_chans=3, num_classes=10)
    m = ReSwin(d)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def remove_randomly(gates: Gates, seed: int) -> None:
    """Remove a random share of every layer's units (the same dims in every head of a block,
    so that compact widths exist), leaving at least one."""
    gen = torch.Generator().manual_seed(seed)
    for (kind, index), t in zip(gates.layers(), gates.tensors()):
        n = t.shape[-1]
        if n < 2:
            continue
        picked = torch.randperm(n, generator=gen)[:int(torch.randint(1, n, (1,), generator=gen))]
        units = picked.tolist()
        if kind in ("qk", "v") and not gates.shares_heads(kind):
            units = [(h, d) for h in range(t.shape[0]) for d in units]
        gates.remove(kind, index, units)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("qkv_units", ["shared", "per_head"])
def test_masked_equals_compact_for_every_kind_at_every_stage(version, qkv_units):
    for seed in range(3):
        model = tiny(version, seed).eval()
        check_covered(model)
        gates = Gates.attach(model, qkv_units=qkv_units)
        remove_randomly(gates, seed)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            small = compact(model)
            torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
        d = small.dims
        assert isinstance(small, ReSwin) and d.embed_dim == [int((e != 0).sum()) for e in gates.embs]
        assert d.window_size == model.dims.window_size and d.attn_scale == model.dims.attn_scale
        assert count_macs(small)[0] == build_cost_model("macs", d).total(d)


def _tg(p: torch.Tensor, idx) -> torch.Tensor:
    return (p[idx] * p.grad[idx]).sum()


def _blocks(m: ReSwin) -> list:
    return [b for stage in m.layers for b in stage.blocks]


def producer_sum(m: ReSwin, kind: str, index: int, unit: tuple) -> torch.Tensor:
    """sum(theta * dL/dtheta) over the weights producing one unit, by hand from ungated
    gradients: what each gate's gradient (times the gate) must equal."""
    d = m.dims
    if kind == "emb":
        (c,) = unit
        s, total = index, 0
        if s == 0:
            pe = m.patch_embed
            total = _tg(pe.proj.weight, c) + _tg(pe.proj.bias, c) + _tg(pe.norm.weight, c) + _tg(pe.norm.bias, c)
        else:
            down = m.layers[s].downsample
            total = _tg(down.reduction.weight, c)
            if d.version == 2:
                total = total + _tg(down.norm.weight, c) + _tg(down.norm.bias, c)
        if d.version == 1 and s + 1 < d.num_stages:  # the next merging's norm over 4 copies
            n = m.layers[s + 1].downsample.norm
            rows = [c + j * d.embed_dim[s] for j in range(4)]
            total = total + _tg(n.weight, rows) + _tg(n.bias, rows)
        for blk in m.layers[s].blocks:
            for mod in (blk.attn.proj, blk.mlp.fc2, blk.norm1, blk.norm2):
                total = total + _tg(mod.weight, c) + _tg(mod.bias, c)
        if s == d.num_stages - 1:
            total = total + _tg(m.norm.weight, c) + _tg(m.norm.bias, c)
        return total
    a = _blocks(m)[index].attn
    H, Q, V = a.num_heads, a.qk_dim, a.v_dim
    w = a.qkv.weight

    def rows(q=(), k=(), v=()) -> torch.Tensor:
        out = sum(_tg(w, r) for r in (*q, *(H * Q + r for r in k), *(2 * H * Q + r for r in v)))
        if d.version == 1:
            return out + sum(_tg(a.qkv.bias, r) for r in (*q, *(H * Q + r for r in k),
                                                           *(2 * H * Q + r for r in v)))
        return out + sum(_tg(a.q_bias, r) for r in q) + sum(_tg(a.v_bias, r) for r in v)
    if kind == "head":
        (h,) = unit
        qs, vs = range(h * Q, (h + 1) * Q), range(h * V, (h + 1) * V)
        return rows(qs, qs, vs)
    if kind == "qk":  # v1: q only, as ViTs; v2 (cosine attention): q and k
        h, j = unit
        return rows([h * Q + j], [h * Q + j] if d.version == 2 else [])
    if kind == "v":
        h, j = unit
        return rows(v=[h * V + j])
    (j,) = unit
    fc1 = _blocks(m)[index].mlp.fc1
    return _tg(fc1.weight, j) + _tg(fc1.bias, j)


@pytest.mark.parametrize("version", [1, 2])
def test_gate_gradients_are_the_producing_weights_saliency(version):
    plain = tiny(version, seed=3).double().eval()
    if version == 2:  # timm's zero post-norms would zero every block's gradient: not here
        assert any(b.norm1.weight.abs().sum() > 0 for b in _blocks(plain))
    gated = copy.deepcopy(plain)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(plain(x), y).backward()
    gates = Gates.attach(gated, dtype=torch.float64, qkv_units="per_head")
    F.cross_entropy(gated(x), y).backward()
    gen = torch.Generator().manual_seed(7)
    for (kind, index), g in zip(gates.layers(), gates.tensors()):
        unit = tuple(int(torch.randint(n, (1,), generator=gen)) for n in g.shape)
        lhs = g[unit] * g.grad[unit]
        torch.testing.assert_close(lhs.detach(), producer_sum(plain, kind, index, unit).detach(),
                                   rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------ costs
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("img,patch,windows", [(32, 2, [4, 4, 2]), (40, 2, [8, 5, 3]),
                                               (36, 4, [3, 3, 3])])
def test_costs_are_exact(version, img, patch, windows):
    for qkv_bias, classes in ((True, 10), (False, 0)):
        d = SwinDims([16, 32, 48], [2, 1, 2], [2, 2, 4, 4, 3], [8, 6, 8, 4, 4], [8, 8, 12, 12, 8],
                     [32, 48, 64, 64, 96], windows, version=version, img_size=img,
                     patch_size=patch, in_chans=3, num_classes=classes, qkv_bias=qkv_bias)
        m = ReSwin(d)
        assert build_cost_model("macs", d).total(d) == count_macs(m)[0]
        assert build_cost_model("params", d).total(d) == sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------- the pruner
@pytest.mark.parametrize("version", [1, 2])
def test_global_pruning_reaches_the_target_and_clears_optimizer_state(version):
    """One ranking over every stage's embedding and every block's kinds: the run stops at
    the MACs target, the compact model's counted MACs are the ratio reached, and Adam's
    moments at removed units are zero."""
    model = tiny(version, seed=1)
    d = model.dims
    gates = Gates.attach(model)
    saliency = Saliency(gates)
    cost = build_cost_model("macs", d)
    pruner = GlobalPruner(gates, saliency, cost, target=0.6, prune_per_iter=32,
                          group_sizes={"emb": 4, "head": 1, "qk": 2, "v": 2, "mlp": 8})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(40):
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            saliency.accumulate()
            gates.zero_grad()
            opt.zero_grad()
        result = pruner.step(model)
        clear_pruned_state(opt, model, result.removed_units)
        for kind, index, units in result.removed_units:
            if kind == "emb":
                rows = model.patch_embed.proj.weight if index == 0 else \
                    model.layers[index].downsample.reduction.weight
                assert float(opt.state[rows]["exp_avg"][list(units)].abs().sum()) == 0
        if result.reached:
            break
    assert result.reached and result.ratio <= 0.6
    removed_streams = [int((e == 0).sum()) for e in gates.embs]
    assert sum(removed_streams) > 0 or any(int((b["mlp"] == 0).sum()) for b in gates.blocks)
    model.eval()
    small = compact(model)
    assert count_macs(small)[0] / count_macs(ReSwin(d))[0] == pytest.approx(result.ratio, rel=1e-12)


# ------------------------------------------- timm's model API, as tests/test_timm_api.py
def _api_models():
    """v1 and v2 at 40 px (odd grids: padded windows and mergings), with and without qkv
    bias, and a compact pruned one (per-block widths differ)."""
    out = {}
    for name, kw in (("swin_tiny_patch4_window7_224", {}),
                     ("swinv2_tiny_window8_256", {}),
                     ("swinv2_tiny_window8_256", {"qkv_bias": False})):
        torch.manual_seed(0)
        out[f"{name}{kw}"] = models.build_model(
            name, img_size=40, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
            num_classes=10, **kw)
    torch.manual_seed(0)
    dense = models.build_model("swin_tiny_patch4_window7_224", img_size=40, window_size=4,
                               embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10)
    gates = Gates.attach(dense)
    with torch.no_grad():
        gates.embs[1][:8] = 0
        gates.blocks[1]["mlp"][:20] = 0
        gates.blocks[2]["head"][0] = 0
    out["compact"] = compact(dense)
    return out


API_MODELS = _api_models()


@pytest.fixture(params=sorted(API_MODELS))
def api_model(request):
    return copy.deepcopy(API_MODELS[request.param]).eval()


def test_api_forward_backward_and_cfg(api_model):
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert api_model(x).shape == (2, 10)
    api_model.train()
    api_model(x).mean().backward()
    assert [n for n, p in api_model.named_parameters() if p.grad is None] == []
    state = api_model.state_dict()
    cfg = api_model.pretrained_cfg
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    assert cfg["input_size"] == (3, 40, 40)


def test_api_torchscript_and_fx_give_the_eager_logits(api_model):
    """TorchScript, FX (eval and train, same gradients) and FX then TorchScript: the gated
    path stays out of all of them."""
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want = api_model(x)
        assert torch.equal(torch.jit.script(api_model)(x), want)
        traced = torch.fx.symbolic_trace(api_model)
        assert torch.equal(traced(x), want)
        assert torch.equal(torch.jit.script(traced)(x), want)
    api_model.train()
    grads = []
    for m in (api_model, torch.fx.symbolic_trace(api_model)):
        api_model.zero_grad()
        torch.manual_seed(0)
        m(x).square().mean().backward()
        grads.append([p.grad.clone() for p in api_model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_api_features(api_model):
    """FX feature extraction (torchvision's and timm's) and features_only give the stage
    outputs forward_intermediates gives."""
    from timm.models import create_feature_extractor as timm_extractor
    from torchvision.models.feature_extraction import create_feature_extractor
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        _, maps = api_model.forward_intermediates(x)
        feats = create_feature_extractor(api_model, {"layers.0": "s0", "layers.1": "s1"})(x)
        assert torch.equal(feats["s0"].permute(0, 3, 1, 2), maps[0])
        assert torch.equal(feats["s1"].permute(0, 3, 1, 2), maps[1])
        feats = timm_extractor(api_model, {"layers.1": "s1"})(x)
        assert torch.equal(feats["s1"].permute(0, 3, 1, 2), maps[1])
        net = timm.create_model("reswin", dims=api_model.dims, features_only=True).eval()
        missing, _ = net.model.load_state_dict(api_model.state_dict(), strict=False)
        assert missing == []  # (the head it dropped is all that is left over)
        outs = net(x)
    assert [o.shape[1] for o in outs] == api_model.dims.embed_dim
    assert all(torch.equal(a, b) for a, b in zip(outs, maps))
