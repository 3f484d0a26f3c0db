"""The foundation encoders' structures (issue 34): what each new unit-map entry means, checked
by hand on tiny models. Loading bitwise, masked == compact and exact costs of every family
are in test_timm_families.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from errors import UserError
from pruning import Gates, compact

FRAME = dict(img_size=32, patch_size=8, num_classes=10)


def assert_same_function(small: torch.nn.Module, gated: torch.nn.Module, size: int) -> None:
    """The compact model computes what the gated one does, on random images."""
    img = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(small(img), gated(img), rtol=0, atol=1e-5)


def perturbed(name: str, mlp_dim: int, seed: int, **kwargs) -> models.ReViT:
    """A tiny model of timm's `name` (32 channels, 2 blocks, 4 heads), weights drawn large
    enough that a wrong slice shows in the logits; kwargs: build_model's (frame, timm's)."""
    torch.manual_seed(seed)
    m = models.build_model(name, dims=models.Dims.uniform(32, 2, 4, mlp_dim),
                           **{**FRAME, **kwargs})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def qk_norm_vit(seed: int = 0) -> models.ReViT:
    # qk_norm: timm's kwarg (--model-kwargs qk_norm=True), read as the dims' family field
    return perturbed("vit_base_patch16_224", 64, seed, qk_norm=True)


def test_qk_norm_statistics_over_the_live_dims():
    """A removed QK dim: each head's q and k are normalised over the dims left, so the
    masked block equals its compact version (and the LayerNorm of the kept dims by hand)."""
    m = qk_norm_vit()
    a = m.blocks[0].attn
    gates = Gates.attach(m)
    gates.remove("qk", 0, [2, 5])  # shared units: dims 2 and 5 of every head
    x = torch.randn(2, 17, 4, 8)
    keep = [d for d in range(8) if d not in (2, 5)]
    by_hand = F.layer_norm(x[..., keep], (6,), a.q_norm.weight[keep], a.q_norm.bias[keep],
                           a.q_norm.eps)
    got = a.q_norm(x, a.qk_gate)
    torch.testing.assert_close(got[..., keep], by_hand, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[..., [2, 5]], torch.zeros(2, 17, 4, 2))
    small = compact(m).eval()
    assert small.blocks[0].attn.q_norm.weight.shape == (6,)
    assert_same_function(small, m, 32)


def test_qk_norm_saliency_sums_the_norms_weights():
    """The shared QK unit's gate gradient is sum(theta * dL/dtheta) over its Q rows and both
    norms' weight and bias at that dim (what the unit map lists as gated)."""
    m = qk_norm_vit(1).train()
    gates = Gates.attach(m)
    x = torch.randn(4, 3, 32, 32)
    m(x).pow(2).sum().backward()
    a = m.blocks[1].attn
    H, d = a.num_heads, a.qk_dim
    q_rows = a.qkv.weight[:H * d].view(H, d, -1), a.qkv.bias[:H * d].view(H, d)
    q_grads = a.qkv.weight.grad[:H * d].view(H, d, -1), a.qkv.bias.grad[:H * d].view(H, d)
    want = (q_rows[0] * q_grads[0]).sum((0, 2)) + (q_rows[1] * q_grads[1]).sum(0)
    for norm in (a.q_norm, a.k_norm):
        want = want + norm.weight * norm.weight.grad + norm.bias * norm.bias.grad
    got = (gates.blocks[1]["qk"] * gates.blocks[1]["qk"].grad).sum(0)
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6)


def test_qk_norm_refuses_per_head_units():
    with pytest.raises(UserError, match="per-head QK units") as e:
        Gates.attach(qk_norm_vit(), qkv_units="per_head")
    assert e.value.field == "qkv_units"


def swiglu_vit(seed: int = 0) -> models.ReViT:
    return perturbed("vit_giant_patch14_dinov2", 48, seed, img_size=28, patch_size=14)


def test_swiglu_unit_is_a_gate_row_and_its_value_row():
    m = swiglu_vit()
    fc1 = m.blocks[0].mlp.fc1
    assert m.dims.mlp_act == "swiglu_packed" and fc1.out_features == 96
    gates = Gates.attach(m)
    gates.remove("mlp", 0, [3, 40])
    small = compact(m).eval()
    keep = [u for u in range(48) if u not in (3, 40)]
    rows = keep + [48 + u for u in keep]
    assert torch.equal(small.blocks[0].mlp.fc1.weight, fc1.weight[rows])
    assert torch.equal(small.blocks[0].mlp.fc2.weight, m.blocks[0].mlp.fc2.weight[:, keep])
    assert_same_function(small, m, 28)


def test_swiglu_saliency_sums_both_rows():
    m = swiglu_vit(1).train()
    gates = Gates.attach(m)
    m(torch.randn(3, 3, 28, 28)).pow(2).sum().backward()
    fc1 = m.blocks[1].mlp.fc1
    per_row = (fc1.weight * fc1.weight.grad).sum(1) + fc1.bias * fc1.bias.grad
    want = per_row[:48] + per_row[48:]
    got = gates.blocks[1]["mlp"] * gates.blocks[1]["mlp"].grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ --unit-scales auto
def test_auto_scales_are_the_cost_a_unit_saves_by_hand():
    """MACs of a uniform ViT: one MLP unit saves 2NE, a head N(E(2q + v) + vE) + N^2(q + v),
    a shared QK dim H(2NE + N^2), a shared V dim H(2NE + N^2), an embedding channel every
    block's share plus the stem's; the hessian's scale is the square root of the ratio."""
    from pruning.cost import MacsCost
    from pruning.scales import auto_scales, unit_savings
    d = models.Dims.uniform(32, 2, 4, 64, in_chans=3, distilled=False, **FRAME)
    N, E, H, q, v = d.num_tokens, 32, 4, 8, 8
    ones = {k: 1 for k in ("emb", "head", "qk", "v", "mlp")}
    saved = unit_savings(MacsCost(d), d, ones)
    per_block_emb = N * (2 * H * q + H * v) + N * H * v + 2 * N * 64
    stem_emb = d.num_patches * 3 * 64 + 10
    assert saved == pytest.approx({
        "mlp": 2 * N * E, "head": N * E * (2 * q + v) + N * v * E + N * N * (q + v),
        "qk": H * (2 * N * E + N * N), "v": H * (2 * N * E + N * N),
        "emb": 2 * per_block_emb + stem_emb})
    scales = auto_scales(MacsCost(d), d, "hessian", ones)
    assert scales["mlp"] == 1 and scales["head"] == pytest.approx(
        (saved["head"] / saved["mlp"]) ** 0.5)
    taylor = auto_scales(MacsCost(d), d, "taylor", ones)
    assert taylor["head"] == pytest.approx(saved["head"] / saved["mlp"])
    per_head = unit_savings(MacsCost(d), d, ones, qkv_units="per_head")
    assert per_head["qk"] == pytest.approx(saved["qk"] / H)
    with pytest.raises(ValueError, match="does not use them"):
        auto_scales(MacsCost(d), d, "magnitude", ones)


def test_auto_scales_of_deit_b_are_near_the_reference():
    """What the derivation gives for the model the reference's scales were set on."""
    from pruning import PruningConfig
    from pruning.cost import MacsCost
    from pruning.scales import auto_scales
    d = models.name_dims("deit_base_patch16_224")
    s = auto_scales(MacsCost(d), d, "hessian", PruningConfig().group_sizes)
    assert s["head"] == pytest.approx(12.0, rel=0.01)  # the reference: 12
    assert 8 < s["emb"] < 9 and 3.5 < s["qk"] == s["v"] < 4  # the reference: 12 and 2


# ------------------------------------------------------------------ SigLIP's attention pool
def siglip_vit(seed: int = 0) -> models.ReViT:
    return perturbed("vit_base_patch16_siglip_224", 64, seed)


def test_attention_pool_is_pruned_along_the_embedding():
    """Removed stream channels leave the latent, q's and kv's input columns, the output
    projection's rows, the pool's norm (statistics over live channels) and its MLP's outer
    sides; the pool's attention width and MLP width stay."""
    m = siglip_vit()
    assert (m.dims.global_pool, m.dims.pool_dim, m.dims.pool_heads, m.dims.pool_mlp_dim) == \
        ("map", 32, 4, 64)
    gates = Gates.attach(m)
    gates.remove("emb", 0, [3, 10])
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = m.forward_head(m.forward_features(img), pre_logits=True)
    assert torch.equal(pooled[:, [3, 10]], torch.zeros(2, 2))
    small = compact(m).eval()
    keep = [c for c in range(32) if c not in (3, 10)]
    pool, old = small.attn_pool, m.attn_pool
    assert torch.equal(pool.latent, old.latent[..., keep])
    assert torch.equal(pool.q.weight, old.q.weight[:, keep])
    assert torch.equal(pool.kv.weight, old.kv.weight[:, keep])
    assert torch.equal(pool.proj.weight, old.proj.weight[keep])
    assert torch.equal(pool.mlp.fc1.weight, old.mlp.fc1.weight[:, keep])
    assert torch.equal(pool.mlp.fc2.weight, old.mlp.fc2.weight[keep])
    assert (small.dims.pool_dim, small.dims.pool_mlp_dim) == (32, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(img), m(img), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="attention pool"):
        small.reset_classifier(0, global_pool="avg")


def test_attention_pool_mlp_neurons_are_a_kind_of_their_own():
    """The pool's MLP neurons are one model-level layer ("pool_mlp"): a unit is its fc1 row
    and fc2 column, its gate's gradient is theta * dL/dtheta over its fc1 row and bias, the
    pruner ranks it with the others and the compact model keeps the rest."""
    from pruning import GlobalPruner, Saliency
    from pruning.cost import MacsCost
    m = siglip_vit(1).train()
    gates = Gates.attach(m)
    assert gates.layers()[-1] == ("pool_mlp", 0) and gates.model["pool_mlp"].shape == (64,)
    m(torch.randn(3, 3, 32, 32)).pow(2).sum().backward()
    fc1 = m.attn_pool.mlp.fc1
    want = (fc1.weight * fc1.weight.grad).sum(1) + fc1.bias * fc1.bias.grad
    g = gates.model["pool_mlp"]
    torch.testing.assert_close(g * g.grad, want.detach(), rtol=1e-4, atol=1e-7)
    # the pruner removes pool neurons like any layer's units (a group of 16 at a step)
    sal = Saliency(gates, "hessian")
    sal.accumulate()
    scores = sal.step()
    assert scores["model"]["pool_mlp"].shape == (64,)
    pruner = GlobalPruner(gates, sal, MacsCost(m.dims), 0.5, 64)
    layer = [grp for layer in pruner.layers(scores) for grp in layer if grp.kind == "pool_mlp"]
    assert len(layer) == 4 and layer[0].cost_drop > 0
    gates.remove("pool_mlp", 0, [5, 9, 60])
    keep = [u for u in range(64) if u not in (5, 9, 60)]
    assert gates.widths()["pool_mlp_dim"] == 61
    small = compact(m.eval()).eval()
    assert small.dims.pool_mlp_dim == 61
    assert torch.equal(small.attn_pool.mlp.fc1.weight, fc1.weight[keep])
    assert torch.equal(small.attn_pool.mlp.fc2.weight, m.attn_pool.mlp.fc2.weight[:, keep])
    assert_same_function(small, m, 32)
    # resume: the masks hold the pool's layer too
    state = gates.state_dict()
    fresh = Gates.attach(siglip_vit(1))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.model["pool_mlp"], gates.model["pool_mlp"].detach())


# ------------------------------------------------------------------ rotary (EVA-02, RoPE ViT)
def rope_vit(seed: int = 0, **timm_kwargs) -> models.ReViT:
    """An EVA-02-style model (Eva's names, Q and V biases, rotary, packed SwiGLU): heads of 8
    dims, 4 rotary pairs each."""
    return perturbed("eva02_tiny_patch14_224", 48, seed, img_size=28, patch_size=14,
                     **timm_kwargs)


@pytest.mark.parametrize("half", [False, True])
def test_rotary_qk_unit_is_a_pair(half):
    """A QK unit is a rotary pair ((2i, 2i + 1) interleaved, (i, i + d/2) in the half
    layout): removing one zeroes both dims in every head, the compact block keeps the other
    pairs' rows and frequencies, and computes what the masked one does."""
    m = rope_vit(rope_rotate_half=True) if half else rope_vit()
    assert m.dims.rope_dim == 8 and m.dims.rope_half == half and not m.dims.k_bias
    gates = Gates.attach(m)
    assert gates.to_units([g.detach() for g in gates.tensors()])[2].shape == (4,)  # block 0 qk
    gates.remove("qk", 0, [1])
    gone = [1, 5] if half else [2, 3]
    assert not gates.blocks[0]["qk"][:, gone].any() and gates.blocks[0]["qk"].sum() == 4 * 6
    small = compact(m).eval()
    keep = [d for d in range(8) if d not in gone]
    assert small.dims.qk_dim == [6, 8] and small.dims.rope_dims == [keep, list(range(8))]
    a, b = m.blocks[0].attn, small.blocks[0].attn
    rows = [h * 8 + d for h in range(4) for d in keep]
    assert torch.equal(b.qkv.weight[:24], a.qkv.weight[rows])  # Q rows
    assert torch.equal(b.qkv.weight[24:48], a.qkv.weight[[32 + r for r in rows]])  # K rows
    assert torch.equal(b.q_bias, a.q_bias[rows]) and torch.equal(b.v_bias, a.v_bias)
    assert_same_function(small, m, 28)


def test_rotary_unit_saliency_sums_both_dims():
    """The pair's score is sum(theta * dL/dtheta) over both dims' Q rows and Q biases."""
    m = rope_vit(1).train()
    gates = Gates.attach(m)
    m(torch.randn(3, 3, 28, 28)).pow(2).sum().backward()
    a = m.blocks[1].attn
    per_dim = ((a.qkv.weight[:32] * a.qkv.weight.grad[:32]).sum(1)
               + a.q_bias * a.q_bias.grad).view(4, 8).sum(0)
    got = gates.to_units([g.detach() * g.grad for g in gates.tensors()])[6]  # block 1 qk
    torch.testing.assert_close(got, (per_dim[0::2] + per_dim[1::2]).detach(), rtol=1e-4, atol=1e-6)


def test_rotary_cost_of_a_unit_is_two_dims():
    """The pruner's cost drop for one QK unit is the block's cost at two dims fewer; a group
    counts units, so 4 pairs are a head's last group."""
    from pruning import GlobalPruner
    from pruning.cost import MacsCost
    m = rope_vit()
    gates = Gates.attach(m)
    cost = MacsCost(m.dims)
    w = gates.widths()
    pruner = GlobalPruner(gates, None, cost, 0.5, 16, group_sizes={"qk": 2})
    drop = pruner._unit_drop("qk", 0, w, m.dims)
    assert drop == (cost.block_at(0, 32, 4, 8, 8, 48) - cost.block_at(0, 32, 4, 6, 8, 48)) * 1e-9
    pruner = GlobalPruner(gates, None, cost, 0.5, 16, group_sizes={"qk": 4})
    assert pruner._unit_drop("qk", 0, w, m.dims) == 0.0


def test_rotary_refuses_per_head_units():
    with pytest.raises(UserError, match="rotary") as e:
        Gates.attach(rope_vit(), qkv_units="per_head")
    assert e.value.field == "qkv_units"


# ------------------------------------------- EVA-02 B/L and CLIP: SwiGLU, norms, q/k/v layers
def eva_clip_vit(seed: int = 0) -> models.ReViT:
    """EVA-02 CLIP's structure: separate q, k and v projections, a norm over the attention
    output, SwiGLU with gate and value layers of their own and a norm over its hidden units."""
    return perturbed("eva02_base_patch16_clip_224", 24, seed)


def test_split_swiglu_unit_and_its_norm():
    """An MLP unit is its fc1_g row, its fc1_x row and its position of the MLP norm; the norm
    takes its statistics over the live units (the LayerNorm of the kept ones, by hand)."""
    m = eva_clip_vit()
    d = m.dims
    assert (d.mlp_act, d.mlp_norm, d.attn_norm, d.qkv_fused) == ("swiglu", True, True, False)
    mlp = m.blocks[0].mlp
    gates = Gates.attach(m)
    gates.remove("mlp", 0, [3, 20])
    keep = [u for u in range(24) if u not in (3, 20)]
    h = torch.randn(2, 5, 24)
    by_hand = F.layer_norm(h[..., keep], (22,), mlp.norm.weight[keep], mlp.norm.bias[keep],
                           mlp.norm.eps)
    got = mlp.norm(h, mlp.gate)
    torch.testing.assert_close(got[..., keep], by_hand, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[..., [3, 20]], torch.zeros(2, 5, 2))
    small = compact(m).eval()
    for name in ("fc1_g", "fc1_x"):
        assert torch.equal(getattr(small.blocks[0].mlp, name).weight,
                           getattr(mlp, name).weight[keep])
    assert torch.equal(small.blocks[0].mlp.norm.bias, mlp.norm.bias[keep])
    assert_same_function(small, m, 32)


def test_separate_projections_and_the_attention_output_norm():
    """A head removes its rows of q_proj, k_proj and v_proj and its V positions of the norm
    over the attention output; a V dim its v_proj row and norm position in every head. The
    norm's statistics are over the live (head, V dim) positions."""
    m = eva_clip_vit(1)
    a = m.blocks[1].attn
    gates = Gates.attach(m)
    gates.remove("head", 1, [2])
    gates.remove("v", 1, [0, 5])
    small = compact(m).eval()
    b = small.blocks[1].attn
    heads, vdims, qk = [0, 1, 3], [1, 2, 3, 4, 6, 7], list(range(8))
    v_rows = [h * 8 + d for h in heads for d in vdims]
    assert torch.equal(b.v_proj.weight, a.v_proj.weight[v_rows])
    assert torch.equal(b.q_proj.weight, a.q_proj.weight[[h * 8 + d for h in heads for d in qk]])
    assert torch.equal(b.k_proj.weight, a.k_proj.weight[[h * 8 + d for h in heads for d in qk]])
    assert torch.equal(b.norm.weight, a.norm.weight[v_rows])
    out = torch.randn(2, 5, 32)
    got = a.norm(out, a.v_rows())
    by_hand = F.layer_norm(out[..., v_rows], (18,), a.norm.weight[v_rows], a.norm.bias[v_rows],
                           a.norm.eps)
    torch.testing.assert_close(got[..., v_rows], by_hand, rtol=1e-5, atol=1e-6)
    assert_same_function(small, m, 32)
