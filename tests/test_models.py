"""The model family: dims spec, ReViT rule, forward/backward, timm equivalence, loading."""
import dataclasses
import json

import pytest
import timm
import torch

import models
from errors import UserError
from models import Dims, build_model, revit_dims
from models.dims import smallest_valid_emb

NAME = "deit_tiny_distilled_patch16_224"


def small_dims(**frame):
    return Dims(embed_dim=48, num_heads=[2, 3, 1], qk_dim=[8, 16, 4], v_dim=[16, 8, 12],
                mlp_dim=[64, 96, 32], **frame)


# ------------------------------------------------------------------------- ReViT rule
def test_revit_rule_reproduces_paper_lists():
    d = revit_dims(176)
    assert d.num_heads == [10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10]
    assert d.qk_dim == [16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16]
    assert d.v_dim == [64] * 12
    assert d.mlp_dim == [528] * 3 + [1056] * 6 + [528] * 3
    d = revit_dims(384)
    assert d.num_heads == [10, 4, 4] + [8] * 6 + [4, 4, 10]
    assert d.qk_dim == [32, 16, 16] + [32] * 6 + [16, 16, 32]


@pytest.mark.parametrize("emb,params", [(176, 5_341_512), (384, 23_125_656)])
def test_paper_parameter_counts(emb, params):
    """The reference's ReViT-T/S: the widths' 5,339,136 / 23,123,280 parameters plus a
    (198, 1) token scale in each of the 12 blocks."""
    model = build_model("deit_base_distilled_patch16_224", dims=revit_dims(emb))
    assert sum(p.numel() for p in model.parameters()) == params
    plain = dataclasses.replace(revit_dims(emb), token_scale=False)
    model = build_model("deit_base_distilled_patch16_224", dims=plain)
    assert sum(p.numel() for p in model.parameters()) == params - 12 * 198


def test_revit_rule_builds_the_reference_model():
    d = revit_dims(176)
    assert d.attn_scale == [64 ** -0.5] * 12 and d.token_scale and d.init == "torch_default"
    # hand-written dims keep timm's flavour, so older files and checkpoints keep their meaning
    s = small_dims()
    assert not s.token_scale and s.init == "trunc_normal"
    assert timm.create_model("revit_tiny_distilled_patch16_224").dims.token_scale


def test_token_scale_multiplies_q_k_v_per_token():
    """A scale c on every token is c times the q, k and v projections; a per-token scale
    changes the output (its exact per-token product is checked against the NViT reference's
    forward in test_reference_checkpoints.py)."""
    torch.manual_seed(0)
    d = dataclasses.replace(small_dims(img_size=16, patch_size=8, num_classes=3, in_chans=3,
                                       distilled=True), token_scale=True)
    m = models.ReViT(d).eval()
    a = m.blocks[1].attn
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base = m(x)
        a.token_scale.copy_(torch.linspace(0.5, 1.5, 6)[:, None])
        assert not torch.allclose(base, m(x))
        a.token_scale.fill_(2.0)
        two = m(x)
        a.token_scale.fill_(1.0)
        a.qkv.weight.mul_(2)
        a.qkv.bias.mul_(2)
        torch.testing.assert_close(m(x), two)


@pytest.mark.parametrize("init", ["trunc_normal", "torch_default"])
def test_init_modes(init):
    torch.manual_seed(0)
    d = dataclasses.replace(revit_dims(176), init=init)
    m = build_model("deit_base_distilled_patch16_224", dims=d).requires_grad_(False)
    fc1 = m.blocks[3].mlp.fc1
    heads = (m.head, m.head_dist)
    assert all(float(h.bias.abs().max()) == 0 and abs(float(h.weight.std()) - 0.02) < 2e-3
               for h in heads)
    if init == "trunc_normal":
        assert float(fc1.bias.abs().max()) == 0 and abs(float(fc1.weight.std()) - 0.02) < 1e-3
    else:  # PyTorch's default: uniform in +-1/sqrt(fan_in), bias too
        bound = 1 / 176 ** 0.5
        assert float(fc1.weight.abs().max()) <= bound and float(fc1.weight.std()) > 0.03
        assert float(fc1.bias.abs().max()) > 0
    assert all(torch.equal(b.attn.token_scale, torch.ones(198, 1)) for b in m.blocks)


@pytest.mark.parametrize("emb", [0, 50, -3, smallest_valid_emb() - 1])
def test_revit_rule_refuses_small_emb(emb):
    with pytest.raises(UserError, match=rf"EMB {emb}.*EMB >= {smallest_valid_emb()}") as e:
        revit_dims(emb)
    assert e.value.field == "emb"  # the scripts name --EMB


def test_smallest_valid_emb_works():
    d = revit_dims(smallest_valid_emb())
    assert min(d.num_heads) >= 1 and min(d.qk_dim) >= 1


# -------------------------------------------------------------------- dims validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=3, num_heads=[2, 2]), "num_heads has 2 entries but depth is 3"),
    (dict(qk_dim=[8, 16]), "qk_dim has 2 entries but depth is 3"),
    (dict(mlp_dim=[64, 0, 32]), "mlp_dim must be positive.*block 1"),
    (dict(qk_dim=[8, -1, 4]), "qk_dim must be positive"),
    (dict(embed_dim=0), "embed_dim must be a positive"),
    (dict(img_size=30, patch_size=8), "not divisible by patch size"),
    (dict(attn_scale=[0.1, 0.2]), "attn_scale has 2 entries"),
    (dict(token_scale=1), "token_scale must be true or false"),
    (dict(init="xavier"), "init must be one of"),
])
def test_dims_validation(kwargs, match):
    base = dict(embed_dim=48, num_heads=[2, 3, 1], qk_dim=[8, 16, 4], v_dim=[16, 8, 12],
                mlp_dim=[64, 96, 32])
    base.update(kwargs)
    with pytest.raises(UserError, match=match):
        Dims(**base)


def test_default_attention_scale_is_inverse_sqrt_qk():
    d = small_dims()
    assert d.attn_scale == pytest.approx([8 ** -0.5, 16 ** -0.5, 4 ** -0.5])


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_dims_round_trip(tmp_path, suffix):
    d = small_dims(img_size=32, patch_size=8, num_classes=7, in_chans=3, distilled=False)
    d.attn_scale = [0.3, 0.2, 0.1]
    path = tmp_path / f"dims{suffix}"
    d.save(path)
    assert Dims.load(path) == d


def test_dims_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Dims.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid"):
        Dims.load(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**small_dims().to_dict(), "heads": [1]}))
    with pytest.raises(UserError, match="unknown dims field"):
        Dims.load(unknown)


# ------------------------------------------------------------------ forward / backward
@pytest.mark.parametrize("img,patch,distilled", [(32, 4, True), (32, 8, False), (48, 8, True),
                                                 (24, 6, True)])
def test_non_uniform_forward_backward(img, patch, distilled):
    torch.manual_seed(0)
    model = build_model(NAME, dims=small_dims(), img_size=img, patch_size=patch, num_classes=5,
                        distilled=distilled, drop_path_rate=0.1)
    x = torch.randn(3, 3, img, img)
    out = model(x)
    if distilled:
        assert isinstance(out, tuple) and all(o.shape == (3, 5) for o in out)
        loss = out[0].sum() + out[1].sum()
    else:
        assert out.shape == (3, 5)
        loss = out.sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ev = model(x)
    assert ev.shape == (3, 5)
    if distilled:  # eval output is the mean of the two heads
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
        torch.testing.assert_close(ev, expected)


def test_attention_uses_per_block_scale():
    torch.manual_seed(0)
    d = small_dims(img_size=32, patch_size=8, num_classes=5, in_chans=3, distilled=True)
    a = models.ReViT(d).eval()
    d2 = Dims.from_dict({**d.to_dict(), "attn_scale": [0.5, 0.5, 0.5]})
    b = models.ReViT(d2).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("qk,v,padded", [(4, 12, None), (12, 4, None), (5, 12, (8, 16)),
                                         (12, 5, (16, 8))])
def test_padding_of_head_widths_is_exact(qk, v, padded, monkeypatch):
    """Head widths zero-padded to reach a fused SDPA kernel (on the CPU to equal widths; a
    CUDA plan such as (8, 16) is forced here): the same outputs and gradients as SDPA on the
    unpadded tensors, and MACs still counted on the model's own widths (with the padding
    back on afterwards)."""
    from models import revit
    from models.flops import count_macs
    from models.revit import attention
    from pruning.cost import MacsCost
    if padded is not None:
        monkeypatch.setattr(revit, "sdpa_widths", lambda *a: padded)
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 9, qk, requires_grad=True), torch.randn(2, 3, 9, qk, requires_grad=True)
    val = torch.randn(2, 3, 9, v, requires_grad=True)
    grads = []
    for pad in (True, False):
        out = attention(q, k, val, 0.0, 0.37, pad=pad)
        assert out.shape == (2, 3, 9, v)
        grads.append((out, torch.autograd.grad((out * torch.arange(v)).sum(), (q, k, val))))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
    d = Dims(16, [2, 3], [qk, qk], [v, v], [8, 8], img_size=16, patch_size=8, in_chans=3,
             num_classes=3, distilled=False)
    model = models.ReViT(d)
    assert count_macs(model)[0] == MacsCost(d).total(d)
    assert all(b.attn.pad_widths for b in model.blocks)  # count_macs restored it


@pytest.mark.parametrize("qk,v", [(4, 12), (12, 4)])
def test_padding_leaves_the_wide_side_uncopied(qk, v, monkeypatch):
    """Only the narrower side is padded: the already-wide q, k or v reaches SDPA as the
    caller's tensor (F.pad copies even a zero pad; a wasted copy per block measured ~5% of a
    ReViT forward at batch 32, benchmarks/README.md finding 6)."""
    from models import revit
    seen = {}
    real = torch.nn.functional.scaled_dot_product_attention
    def spy(q, k, val, **kw):
        seen.update(q=q, k=k, v=val)
        return real(q, k, val, **kw)
    monkeypatch.setattr(revit.F, "scaled_dot_product_attention", spy)
    q, k, val = torch.randn(2, 3, 9, qk), torch.randn(2, 3, 9, qk), torch.randn(2, 3, 9, v)
    revit.attention(q, k, val, 0.0, 0.37)
    assert seen["q"].shape[-1] == seen["v"].shape[-1] == max(qk, v)
    wide = ("q", "k") if qk > v else ("v",)
    inputs = {"q": q, "k": k, "v": val}
    for name in ("q", "k", "v"):
        assert (seen[name] is inputs[name]) == (name in wide), name


@pytest.mark.parametrize("dq,dv", [(16, 64), (8, 64), (32, 64), (64, 64), (40, 24), (5, 3),
                                   (96, 320), (300, 300)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sdpa_widths_meet_the_fused_kernels_rules(dq, dv, dtype):
    """The padded widths never narrow a head and meet PyTorch's rules for a fused kernel
    (sdp_utils): on the CPU equal widths; on CUDA in 16-bit equal multiples of 8 up to 256
    (flash), otherwise multiples of 8 (memory-efficient, which takes unequal QK and V)."""
    from models.revit import sdpa_widths
    cpu = sdpa_widths(dq, dv, "cpu", dtype)
    assert cpu == (max(dq, dv),) * 2
    pq, pv = sdpa_widths(dq, dv, "cuda", dtype)
    assert pq >= dq and pv >= dv and pq % 8 == 0 and pv % 8 == 0
    assert pq - dq < 8 or pq == pv, "QK padded beyond alignment only to equal V"
    assert pv - dv < 8 or pq == pv, "V padded beyond alignment only to equal QK"
    flash = dtype != torch.float32 and max(pq, pv) <= 256
    assert (pq == pv) == (flash or -(-dq // 8) == -(-dv // 8))


@pytest.mark.parametrize("token_scale", [True, False])
def test_attention_gets_16_bit_inputs_under_autocast(token_scale, monkeypatch):
    """Under bf16 autocast q, k and v reach attention in bf16, with or without the fp32 token
    scale, so the widths SDPA is given on CUDA are the flash kernel's equal ones (an fp32 q
    kept (16, 64) and only the memory-efficient kernel took it); fp32 stays fp32."""
    from models import revit
    seen = []
    real = revit.attention
    def spy(q, k, v, *args, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, revit.sdpa_widths(q.shape[-1], v.shape[-1],
                                                                  "cuda", q.dtype)))
        return real(q, k, v, *args, **kw)
    monkeypatch.setattr(revit, "attention", spy)
    torch.manual_seed(0)
    model = build_model("revit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                        num_classes=10)
    if not token_scale:
        model = build_model("revit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                            num_classes=10, dims=dataclasses.replace(model.dims, token_scale=False))
    assert (model.blocks[0].attn.token_scale is not None) == token_scale
    assert model.dims.qk_dim[1] != model.dims.v_dim[1]
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, dist = model(x)
    (cls.float().sum() + dist.float().sum()).backward()
    assert len(seen) == model.dims.depth
    for dq, dk, dv, (pq, pv) in seen:
        assert dq == dk == dv == torch.bfloat16
        assert pq == pv  # flash's equal widths
    if token_scale:
        assert model.blocks[0].attn.token_scale.grad is not None
        assert model.blocks[0].attn.token_scale.grad.dtype == torch.float32
    seen.clear()
    model(x)
    assert all(d[0] == torch.float32 for d in seen)


# -------------------------------------------------------------------- timm equivalence
@pytest.mark.parametrize("name,kwargs", [
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, num_classes=10)),
    ("deit_tiny_patch16_224", dict(img_size=48, patch_size=16, num_classes=7)),
])
def test_timm_state_dict_gives_timm_logits(tmp_path, name, kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(name, **kwargs).eval()
    path = tmp_path / "timm.pth"
    torch.save({"model": ref.state_dict()}, path)  # DeiT's own checkpoint layout
    ours = build_model(name, checkpoint=path, img_size=kwargs["img_size"],
                       num_classes=kwargs["num_classes"]).eval()
    assert ours.dims.is_uniform and ours.dims.patch_size == kwargs["patch_size"]
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ref.train()
    ours.train()
    with torch.no_grad():
        r, o = ref(x), ours(x)
    if isinstance(r, tuple):
        for a, b in zip(o, r):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_timm_registration_and_create_model():
    m = timm.create_model("revit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                          num_classes=10)
    assert isinstance(m, models.ReViT) and m.dims.num_heads == revit_dims(176).num_heads
    g = timm.create_model("revit", dims=small_dims().to_dict(), img_size=32, patch_size=8,
                          num_classes=4)
    assert g.dims.mlp_dim == [64, 96, 32] and g.num_classes == 4
    assert models.name_dims("revit_small_distilled_patch16_224").embed_dim == 384


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model(NAME, dims=small_dims(), img_size=32, patch_size=8, num_classes=5).eval()
    path = tmp_path / "ck.pth"
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    # the name does not matter: dims come from the checkpoint
    n = build_model("deit_base_patch16_224", checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(n(x), m(x))


def test_checkpoint_errors(tmp_path):
    m = build_model(NAME, dims=small_dims(), img_size=32, patch_size=8, num_classes=5)
    path = tmp_path / "ck.pth"
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    with pytest.raises(UserError, match="num_classes=5.*num_classes=10"):
        build_model(NAME, checkpoint=path, num_classes=10)
    with pytest.raises(UserError, match="other dims"):
        build_model(NAME, checkpoint=path, dims=revit_dims(176))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        build_model(NAME, checkpoint=corrupt)
    with pytest.raises(UserError, match="checkpoint not found"):
        build_model(NAME, checkpoint=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="is a folder, not a checkpoint file"):
        build_model(NAME, checkpoint=tmp_path)  # --pretrained-path DIR said "not found"
    # a timm state dict whose shapes do not fit the named model's heads / our frame
    ref = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(UserError, match="img_size=32, but img_size=64"):
        build_model("deit_tiny_patch16_224", checkpoint=tmp_path / "timm.pth", img_size=64)
    with pytest.raises(UserError, match="not a timm model name"):
        build_model("no_such_model_xyz")


def test_finetune_adapt_resamples_and_resets_head(tmp_path):
    m = build_model(NAME, dims=small_dims(), img_size=32, patch_size=8, num_classes=5)
    path = tmp_path / "ck.pth"
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    n = build_model(NAME, checkpoint=path, img_size=48, num_classes=3, adapt=True)
    assert n.pos_embed.shape[1] == 2 + 36 and n.head.out_features == 3
    torch.testing.assert_close(n.blocks[1].attn.qkv.weight, m.blocks[1].attn.qkv.weight)


def test_finetune_adapt_resamples_token_scales_like_the_position_embedding(tmp_path):
    from timm.layers import resample_abs_pos_embed
    d = dataclasses.replace(small_dims(), token_scale=True)
    m = build_model(NAME, dims=d, img_size=32, patch_size=8, num_classes=5)
    with torch.no_grad():
        for b in m.blocks:
            b.attn.token_scale.uniform_(0.5, 1.5)
    path = tmp_path / "ck.pth"
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    n = build_model(NAME, checkpoint=path, img_size=48, num_classes=5, adapt=True)
    t = m.blocks[2].attn.token_scale
    expected = resample_abs_pos_embed(t.reshape(1, -1, 1), (6, 6), num_prefix_tokens=2)
    assert n.blocks[2].attn.token_scale.shape == (38, 1)
    torch.testing.assert_close(n.blocks[2].attn.token_scale, expected.reshape(38, 1))
    assert torch.equal(n.blocks[2].attn.token_scale[:2], t[:2])  # cls and dist kept as they are


def test_token_scale_added_at_one_keeps_the_function(tmp_path):
    """nvit_prune gives a pretrained model the reference's token scale: same logits."""
    torch.manual_seed(0)
    m = build_model(NAME, dims=small_dims(), img_size=32, patch_size=8, num_classes=5).eval()
    path = tmp_path / "ck.pth"
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    n = build_model(NAME, checkpoint=path, token_scale=True).eval()
    assert n.dims.token_scale and sum(p.numel() for p in n.parameters()) == \
        sum(p.numel() for p in m.parameters()) + 3 * 18
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(n(x), m(x))


def test_return_pair_gives_both_heads_in_eval():
    torch.manual_seed(0)
    m = build_model(NAME, dims=small_dims(), img_size=32, patch_size=8, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mean = m(x)
        m.return_pair = True
        cls, dist = m(x)
    torch.testing.assert_close((cls + dist) / 2, mean)


def test_checkpoint_with_separate_q_k_v_loads_as_one_projection(tmp_path):
    """Our checkpoints written before q, k and v became one `qkv` projection still load, to
    the same function."""
    m = build_model(NAME, dims=small_dims(), img_size=32, patch_size=8, num_classes=5).eval()
    old = {}
    for k, v in m.state_dict().items():
        if ".attn.qkv." in k:
            a = m.blocks[int(k.split(".")[1])].attn
            for name, part in zip("qkv", v.split(a.qkv_split)):
                old[k.replace(".qkv.", f".{name}.")] = part.clone()
        else:
            old[k] = v
    path = tmp_path / "old.pth"
    torch.save({"model": old, "dims": m.dims.to_dict()}, path)
    n = build_model(NAME, checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(n(x), m(x), rtol=0, atol=0)
