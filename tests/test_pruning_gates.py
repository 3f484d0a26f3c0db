"""Gates, saliency and compaction on tiny ReViTs: identities checked against independent
computations (ungated autograd, hand-written averages), not against the code under test."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import Dims, build_model
from models.revit import ReViT
from helpers import free_port, qkv_parts
from pruning import KINDS, Gates, Saliency, compact, compacted_dims

DIMS = dict(embed_dim=48, num_heads=[2, 3, 2], qk_dim=[8, 16, 8], v_dim=[16, 8, 8],
            mlp_dim=[64, 96, 32])


def tiny(seed: int = 0, **kw) -> ReViT:
    torch.manual_seed(seed)
    model = build_model("deit_tiny_distilled_patch16_224", dims=Dims(**DIMS), img_size=32,
                        patch_size=8, num_classes=5, **kw)
    # non-trivial norms and biases, so every producing parameter matters in the identities
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def loss_of(out, target: torch.Tensor) -> torch.Tensor:
    if isinstance(out, tuple):
        return sum(F.cross_entropy(o, target) for o in out)
    return F.cross_entropy(out, target)


# ------------------------------------------------------------------ gates = 1
def test_all_ones_gates_do_not_change_output() -> None:
    model = tiny().eval()
    x = images()
    with torch.no_grad():
        plain = model(x)
    Gates.attach(model)
    with torch.no_grad():
        gated = model(x)
    torch.testing.assert_close(gated, plain, rtol=1e-5, atol=1e-6)

    model.train()
    Gates.detach_from(model)
    with torch.no_grad():
        plain_t = model(x)
    Gates.attach(model)
    with torch.no_grad():
        gated_t = model(x)
    for a, b in zip(gated_t, plain_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------- saliency identity
def _tg(p: torch.Tensor, idx) -> torch.Tensor:
    return (p[idx] * p.grad[idx]).sum()


def emb_producer_sum(m: ReViT, c: int) -> torch.Tensor:
    """sum(theta * dL/dtheta) over every parameter writing embedding channel c, by hand: patch
    embedding, the tokens the model has, each block's output rows, norms and LayerScale
    gammas, and the final norm (fc_norm when the model pools through one)."""
    total = _tg(m.patch_embed.proj.weight, c) + _tg(m.patch_embed.proj.bias, c)
    for p in (m.cls_token, m.dist_token, m.reg_token, m.pos_embed):
        if p is not None:
            total = total + _tg(p, (..., c))
    for blk in m.blocks:
        for mod in (blk.attn.proj, blk.mlp.fc2, blk.norm1, blk.norm2):
            total = total + _tg(mod.weight, c) + _tg(mod.bias, c)
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                total = total + _tg(ls.gamma, c)
    final = m.fc_norm if m.fc_norm is not None else m.norm
    return total + _tg(final.weight, c) + _tg(final.bias, c)


def producer_sum(m: ReViT, kind: str, block: int | None, unit: tuple) -> torch.Tensor:
    """sum(theta * dL/dtheta) over the parameters producing one unit, from ungated grads."""
    if kind == "emb":
        return emb_producer_sum(m, *unit)
    a = m.blocks[block].attn
    if kind == "head":
        (h,) = unit
        qs = slice(h * a.qk_dim, (h + 1) * a.qk_dim)
        vs = slice(h * a.v_dim, (h + 1) * a.v_dim)
        q, k, v = qkv_parts(a)
        return sum(_tg(lin.weight, s) + _tg(lin.bias, s)
                   for lin, s in ((q, qs), (k, qs), (v, vs)))
    if kind == "qk":  # the QK gate is on q only: Q's weights, as the reference scores QK
        h, d = unit
        r = h * a.qk_dim + d
        q = qkv_parts(a)[0]
        return _tg(q.weight, r) + _tg(q.bias, r)
    if kind == "v":
        h, d = unit
        r = h * a.v_dim + d
        v = qkv_parts(a)[2]
        return _tg(v.weight, r) + _tg(v.bias, r)
    (j,) = unit
    fc1 = m.blocks[block].mlp.fc1
    return _tg(fc1.weight, j) + _tg(fc1.bias, j)


def reference_emb_sum(m: ReViT, c: int) -> torch.Tensor:
    """The NViT reference's embedding score before squaring: patch embedding rows, every
    block's attention-projection and fc2 rows, Q, K, V and fc1 input columns (not the tokens,
    position embedding, norms or classifier)."""
    total = _tg(m.patch_embed.proj.weight, c) + _tg(m.patch_embed.proj.bias, c)
    for blk in m.blocks:
        a = blk.attn
        for lin in (a.proj, blk.mlp.fc2):
            total = total + _tg(lin.weight, c) + _tg(lin.bias, c)
        for lin in (*qkv_parts(a), blk.mlp.fc1):
            total = total + _tg(lin.weight, (slice(None), c))
    return total


def gated_and_plain_grads(emb_saliency: str = "full", qkv_units: str = "per_head"):
    plain = tiny(seed=3).double().eval()
    gated = copy.deepcopy(plain)
    x, target = images(4).double(), torch.tensor([0, 1, 2, 3])
    loss_of(plain(x), target).backward()
    gates = Gates.attach(gated, dtype=torch.float64, qkv_units=qkv_units, emb_saliency=emb_saliency)
    loss_of(gated(x), target).backward()
    return plain, gates


def test_reference_embedding_saliency_leaves_out_tokens_and_classifier() -> None:
    plain, gates = gated_and_plain_grads("reference")
    full_plain, full = gated_and_plain_grads("full")
    for c in (0, 7, 31):
        want = reference_emb_sum(plain, c)
        torch.testing.assert_close(gates.embs[0].grad[c], want.detach(), rtol=1e-6, atol=1e-12)
        assert not torch.isclose(full.embs[0].grad[c], want.detach(), rtol=1e-3)


def test_shared_qk_v_scores_are_the_reference_formula() -> None:
    """The reference scores QK index d of a block by (sum over heads of theta * grad over
    Q's weights and bias at d / 2)^2, V index d likewise over V's (K is not scored)."""
    plain, gates = gated_and_plain_grads(qkv_units="shared")
    sal = Saliency(gates, "hessian")
    sal.accumulate()
    scores = sal.step()
    for i, blk in enumerate(plain.blocks):
        a = blk.attn
        aq, _, av = qkv_parts(a)
        for kind, lin, width in (("qk", aq, a.qk_dim), ("v", av, a.v_dim)):
            w = (lin.weight * lin.weight.grad).view(a.num_heads, width, -1).sum((0, 2))
            b = (lin.bias * lin.bias.grad).view(a.num_heads, width).sum(0)
            want = ((w + b) / 2) ** 2
            got = scores["blocks"][i][kind]
            assert got.shape == (width,)
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "pool_mlp"])  # no pool here
def test_gate_saliency_equals_weight_saliency(kind: str) -> None:
    plain, gates = gated_and_plain_grads()

    gen = torch.Generator().manual_seed(7)
    checked = 0
    layers = [(0, gates.embs[0])] if kind == "emb" else [(i, b[kind]) for i, b in enumerate(gates.blocks)]
    for block, g in layers:
        for _ in range(3):
            unit = tuple(int(torch.randint(n, (1,), generator=gen)) for n in g.shape)
            lhs = (g[unit] * g.grad[unit]) ** 2
            rhs = producer_sum(plain, kind, block, unit) ** 2
            assert lhs > 0
            torch.testing.assert_close(lhs.detach(), rhs.detach(), rtol=1e-6, atol=0)
            checked += 1
    assert checked >= 3


# ------------------------------------------------------------------ compaction
def random_masks(dims: Dims, seed: int, shared_qk: bool = False) -> tuple[dict, dict]:
    """Masks over all kinds with uniform per-head QK/V counts, and the widths they imply;
    `shared_qk`: every head keeps the same QK dims (QK units shared, as qk-norm needs); a
    rotary model's QK dims are kept in pairs, shared by the heads."""
    from pruning.units import pair_dims, qk_pair
    layout = qk_pair(dims)
    shared_qk = shared_qk or layout is not None
    gen = torch.Generator().manual_seed(seed)

    def pick(n: int, k: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=gen)[:k]] = True
        return m

    def between(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    E = dims.embed_dim
    n_emb = between(E // 2, E - 1)
    masks = {"emb": [pick(E, n_emb)], "blocks": []}
    widths = {"embed_dim": n_emb, "num_heads": [], "qk_dim": [], "v_dim": [], "mlp_dim": []}
    for i in range(dims.depth):
        H, Q, V, M = dims.num_heads[i], dims.qk_dim[i], dims.v_dim[i], dims.mlp_dim[i]
        n_heads = between(1, H)
        n_qk, n_v, n_mlp = between(1, Q), between(1, V), between(1, M)
        head = pick(H, n_heads)
        # dead heads get arbitrary dim masks: they must not count
        qk = torch.stack([pick(Q, n_qk) if head[h] else pick(Q, between(0, Q)) for h in range(H)])
        if layout is not None:  # whole rotary pairs
            n_qk = 2 * between(1, Q // 2)
            pairs = torch.nonzero(pick(Q // 2, n_qk // 2)).flatten().tolist()
            qk[:] = False
            qk[:, [d for u in pairs for d in pair_dims(u, Q, layout)]] = True
        if shared_qk:
            qk = qk[head.nonzero()[0]].expand(H, -1).clone()
        v = torch.stack([pick(V, n_v) if head[h] else pick(V, between(0, V)) for h in range(H)])
        masks["blocks"].append({"head": head, "qk": qk, "v": v, "mlp": pick(M, n_mlp)})
        for key, val in (("num_heads", n_heads), ("qk_dim", n_qk), ("v_dim", n_v),
                         ("mlp_dim", n_mlp)):
            widths[key].append(val)
    if dims.family("global_pool") == "map":  # SigLIP's pool MLP: a model-level layer
        widths["pool_mlp_dim"] = between(1, dims.pool_mlp_dim)
        masks["model"] = {"pool_mlp": pick(dims.pool_mlp_dim, widths["pool_mlp_dim"])}
    return masks, widths


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_compact_preserves_function(seed: int) -> None:
    model = tiny(seed=seed).eval()
    gates = Gates.attach(model)
    masks, widths = random_masks(model.dims, seed)
    gates.load_masks(masks)
    assert gates.widths() == widths

    small = compact(model)
    x = images(3, seed=seed + 10)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    assert small.emb_gate is None and all(b.attn.head_gate is None and b.mlp.gate is None
                                          for b in small.blocks)
    assert not small.training
    for key, val in widths.items():
        assert getattr(small.dims, key) == val
    assert small.dims.attn_scale == model.dims.attn_scale
    assert [b.attn.scale for b in small.blocks] == [b.attn.scale for b in model.blocks]
    assert compacted_dims(model) == small.dims
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())

    model.train()
    small = compact(model)
    assert small.training
    with torch.no_grad():
        out_small, out_model = small(x), model(x)
    assert isinstance(out_small, tuple) and len(out_small) == 2
    for a, b in zip(out_small, out_model):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def soften(gates: Gates) -> None:
    """Gate values in [0.5, 1.5), every third embedding channel off: what compact must fold."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in gates.tensors():
            t.mul_(0.5 + torch.rand(t.shape, generator=gen))
        gates.embs[0][::3] = 0


def test_compact_folds_soft_gate_values_and_zero_widths() -> None:
    """Non-binary gate values are folded in; widths pruned to 0 become zero placeholders."""
    model = tiny(seed=5).eval()
    gates = Gates.attach(model)
    soften(gates)
    with torch.no_grad():
        gates.blocks[0]["head"].zero_()  # no heads left in block 0
        gates.blocks[0]["mlp"].zero_()  # nor MLP neurons
        gates.blocks[1]["v"].zero_()  # live heads without V dims
        gates.blocks[2]["qk"].zero_()  # live heads without QK dims: uniform attention
    assert gates.widths()["num_heads"][0] == 0
    small = compact(model)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    assert small.dims.num_heads[0] == 1 and small.dims.mlp_dim[0] == 1
    assert small.dims.v_dim[1] == 1 and small.dims.qk_dim[2] == 1


def test_compact_without_gates_is_a_copy() -> None:
    model = tiny().eval()
    other = compact(model)
    assert other is not model
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    assert other.dims == model.dims


def test_compact_keeps_dtype_and_independent_storage() -> None:
    model = tiny().double().eval()
    gates = Gates.attach(model)
    with torch.no_grad():
        gates.blocks[1]["mlp"][:10] = 0
    small = compact(model)
    assert small.pos_embed.dtype == torch.float64
    with torch.no_grad():
        small.pos_embed.add_(1.0)
    assert not torch.equal(small.pos_embed, model.pos_embed)


# ------------------------------------------------------------------- saliency
def set_grads(gates: Gates, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for t in gates.tensors():
        t.grad = torch.randn(t.shape, generator=gen)
        grads.append(t.grad.clone())
    return grads


def flat(scores: dict) -> list[torch.Tensor]:
    return [*scores["emb"]] + [b[k] for b in scores["blocks"] for k in ("head", "qk", "v", "mlp")]


def kinds_of(gates: Gates) -> list[str]:
    return ["emb"] + [k for _ in gates.blocks for k in ("head", "qk", "v", "mlp")]


def test_saliency_average_ema_and_scales() -> None:
    model = tiny()
    gates = Gates.attach(model, qkv_units="per_head")
    scales = {"emb": 3.0, "head": 5.0, "qk": 0.5, "v": 2.0, "mlp": 7.0}
    sal = Saliency(gates, "hessian", scales=scales, momentum=0.75)
    kinds = kinds_of(gates)
    with torch.no_grad():
        for t in gates.tensors():
            t.mul_(0.5)  # gate values enter the score
        gates.blocks[2]["mlp"][:4] = 0

    def batch_scores(grads):
        return [(0.5 * g.double() / scales[k]) ** 2 for g, k in zip(grads, kinds)]

    g1 = set_grads(gates, 1)
    sal.accumulate()
    g2 = set_grads(gates, 2)
    sal.accumulate()
    first = flat(sal.step())
    avg1 = [(a + b) / 2 for a, b in zip(batch_scores(g1), batch_scores(g2))]
    avg1[-1][:4] = 0  # removed units score 0
    for got, want in zip(first, avg1):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

    grads = []
    for s in (3, 4, 5):
        grads.append(set_grads(gates, s))
        sal.accumulate()
    second = flat(sal.step())
    avg2 = [sum(parts) / 3 for parts in zip(*(batch_scores(g) for g in grads))]
    for got, prev, new in zip(second, avg1, avg2):
        want = 0.75 * prev + 0.25 * new
        if got.shape == second[-1].shape and got is second[-1]:
            want[:4] = 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert bool((second[-1][:4] == 0).all())
    # the reference's restart at the first prune step: the EMA continues from zero
    sal.reset_ema()
    g6 = set_grads(gates, 6)
    sal.accumulate()
    third = flat(sal.step())
    for got, new in zip(third, batch_scores(g6)):
        want = 0.25 * new
        if got is third[-1]:
            want[:4] = 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_taylor_squared_is_hessian_for_one_batch() -> None:
    gates = Gates.attach(tiny(), qkv_units="per_head")
    hess, tay = Saliency(gates, "hessian"), Saliency(gates, "taylor")
    set_grads(gates, 9)
    hess.accumulate()
    tay.accumulate()
    for h, t in zip(flat(hess.step()), flat(tay.step())):
        torch.testing.assert_close(h, t ** 2, rtol=1e-12, atol=0)
        assert bool((t >= 0).all())


def test_default_scales_with_real_backward() -> None:
    model = tiny()
    gates = Gates.attach(model)  # shared QK/V units: summed over the heads
    sal = Saliency(gates)
    x, target = images(2), torch.tensor([1, 4])
    loss_of(model.train()(x), target).backward()
    gates.all_reduce_grads()  # not distributed: a no-op
    scale = {"emb": 12, "head": 12, "qk": 2, "v": 2, "mlp": 1}
    want = [((t.grad.double().sum(0) if k in ("qk", "v") else t.grad.double()) / scale[k]) ** 2
            for t, k in zip(gates.tensors(), kinds_of(gates))]
    sal.accumulate()
    for got, w in zip(flat(sal.step()), want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=0)
    gates.zero_grad()
    assert all(t.grad is None for t in gates.tensors())
    with pytest.raises(RuntimeError):
        sal.step()  # nothing accumulated since the last step


def test_random_criterion_is_reproducible() -> None:
    gates = Gates.attach(tiny())
    with torch.no_grad():
        gates.blocks[0]["head"][0] = 0
    a, b = Saliency(gates, "random", seed=4), Saliency(gates, "random", seed=4)
    sa = [flat(a.step()) for _ in range(3)]
    sb = [flat(b.step()) for _ in range(3)]
    for x, y in zip(sa, sb):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert not torch.equal(sa[0][0], sa[1][0])  # a new draw at every step
    assert float(sa[0][1][0]) == 0.0  # removed head
    assert all(bool(((t >= 0) & (t < 1)).all()) for t in sa[0])
    c = Saliency(gates, "random", seed=4)
    c.load_state_dict(a.state_dict())
    for u, v in zip(flat(c.step()), flat(a.step())):
        assert torch.equal(u, v)


def test_magnitude_criterion() -> None:
    model = tiny()
    gates = Gates.attach(model, qkv_units="per_head")
    sal = Saliency(gates, "magnitude")
    with pytest.raises(ValueError):
        sal.step()
    with torch.no_grad():
        gates.blocks[1]["mlp"][3] = 0  # a removed neuron: scored 0, left out of the mean
    scores = sal.step(model)
    fc1 = model.blocks[1].mlp.fc1
    norms = torch.cat([fc1.weight, fc1.bias[:, None]], 1).double().norm(dim=1).detach()
    live = torch.ones_like(norms, dtype=torch.bool)
    live[3] = False
    torch.testing.assert_close(scores["blocks"][1]["mlp"][7], norms[7] / norms[live].mean())
    assert float(scores["blocks"][1]["mlp"][3]) == 0.0
    a = model.blocks[2].attn
    aq, ak, av = qkv_parts(a)
    rows = [aq.weight, ak.weight, av.weight]
    biases = [aq.bias, ak.bias, av.bias]
    head_norms = torch.stack([torch.cat([t.view(a.num_heads, -1)[h] for t in rows + biases])
                              .double().norm() for h in range(a.num_heads)]).detach()
    torch.testing.assert_close(scores["blocks"][2]["head"][1], head_norms[1] / head_norms.mean())
    # a removed head's QK dims are neither scored nor part of the live QK dims' mean
    with torch.no_grad():
        gates.blocks[2]["head"][0] = 0
    scores = sal.step(model)
    qk = torch.stack([torch.cat([t.view(a.num_heads, a.qk_dim, -1)[h] for t in (aq.weight, ak.weight)], 1)
                      .double().norm(dim=1)
                      for h in range(a.num_heads)]).detach()  # (H, qk) without biases
    qk = (qk.pow(2) + torch.stack([aq.bias.view(a.num_heads, -1)[h].double().pow(2) +
                                   ak.bias.view(a.num_heads, -1)[h].double().pow(2)
                                   for h in range(a.num_heads)]).detach()).sqrt()
    torch.testing.assert_close(scores["blocks"][2]["qk"][1], qk[1] / qk[1:].mean())
    assert float(scores["blocks"][2]["qk"][0].abs().sum()) == 0.0
    emb = scores["emb"][0]
    assert emb.shape == (48,) and bool((emb > 0).all())
    torch.testing.assert_close(emb.mean(), torch.tensor(1.0, dtype=torch.float64))


def test_shared_units_remove_an_index_from_every_head() -> None:
    gates = Gates.attach(tiny())
    live = gates.nest(gates.unit_live())
    assert live["blocks"][1]["qk"].shape == (16,) and live["blocks"][1]["v"].shape == (8,)
    gates.remove("qk", 1, [2, 5])
    qk = gates.blocks[1]["qk"]
    assert bool((qk[:, [2, 5]] == 0).all()) and int((qk != 0).sum()) == 3 * 14
    live = gates.nest(gates.unit_live())
    assert live["blocks"][1]["qk"].tolist() == [i not in (2, 5) for i in range(16)]
    assert gates.widths()["qk_dim"][1] == 14
    assert gates.gate_units("qk", 1, [2]) == [(0, 2), (1, 2), (2, 2)]


def test_saliency_state_dict_round_trip() -> None:
    gates = Gates.attach(tiny())
    a = Saliency(gates, "hessian", momentum=0.6)
    for s in range(2):
        set_grads(gates, s)
        a.accumulate()
    a.step()
    set_grads(gates, 10)
    a.accumulate()  # a partly accumulated interval is part of the state
    b = Saliency(gates, "hessian", momentum=0.6)
    b.load_state_dict(a.state_dict())
    assert b.step_index == a.step_index == 1
    set_grads(gates, 11)
    a.accumulate()
    b.accumulate()
    for u, v in zip(flat(a.step()), flat(b.step())):
        assert torch.equal(u, v)
    with pytest.raises(ValueError):
        Saliency(gates, "taylor").load_state_dict(a.state_dict())


def test_saliency_rejects_bad_arguments() -> None:
    gates = Gates.attach(tiny())
    with pytest.raises(ValueError):
        Saliency(gates, "l1")
    with pytest.raises(ValueError):
        Saliency(gates, scales={"embed": 1.0})
    with pytest.raises(ValueError):
        Saliency(gates, momentum=1.0)


# ---------------------------------------------------------------- gate helpers
def test_masks_round_trip_and_state() -> None:
    model = tiny()
    gates = Gates.attach(model)
    masks, widths = random_masks(model.dims, 11)
    gates.load_masks(masks)
    got = gates.masks()
    assert torch.equal(got["emb"][0], masks["emb"][0])
    for g, m in zip(got["blocks"], masks["blocks"]):
        for k in ("head", "qk", "v", "mlp"):
            assert g[k].dtype == torch.bool and torch.equal(g[k], m[k])
    assert all(t.requires_grad and t.is_leaf for t in gates.tensors())
    assert model.emb_gate is gates.embs[0]  # loaded in place: the model sees the new values

    other = Gates.attach(tiny())
    other.load_state_dict(gates.state_dict())
    assert other.widths() == widths
    bad = gates.masks()
    bad["blocks"][0]["qk"] = bad["blocks"][0]["qk"][:, :3]
    with pytest.raises(ValueError):
        gates.load_masks(bad)


def test_widths_reject_unequal_per_head_counts() -> None:
    gates = Gates.attach(tiny())
    assert gates.widths() == {k: DIMS[k] for k in DIMS}
    with torch.no_grad():
        gates.blocks[1]["qk"][0, :2] = 0
    with pytest.raises(ValueError, match="QK"):
        gates.widths()
    with torch.no_grad():
        gates.blocks[1]["head"][0] = 0  # the odd head is dead: no longer a problem
    assert gates.widths()["qk_dim"][1] == 16
    with torch.no_grad():
        gates.blocks[2]["v"][1, 0] = 0
    with pytest.raises(ValueError, match="V"):
        gates.widths()


def test_all_reduce_grads_single_process_group() -> None:
    gates = Gates.attach(tiny())
    grads = set_grads(gates, 3)
    gates.blocks[0]["mlp"].grad = None  # a missing grad counts as zero
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        gates.all_reduce_grads()
    finally:
        dist.destroy_process_group()
    for t, g in zip(gates.tensors(), grads):
        if t is gates.blocks[0]["mlp"]:
            assert torch.equal(t.grad, torch.zeros_like(t))
        else:
            torch.testing.assert_close(t.grad, g)


def test_collect_unscales_skips_overflow_and_clears() -> None:
    """Saliency.collect, nvit_prune's after-backward step: AMP-scaled gate gradients give the
    unscaled scores, a batch with a non-finite gradient is left out, gradients are cleared."""
    gates = Gates.attach(tiny(), qkv_units="per_head")
    ref = Saliency(gates, "hessian")
    set_grads(gates, 1)
    ref.accumulate()
    want = flat(ref.step())
    sal = Saliency(gates, "hessian")
    set_grads(gates, 2)
    gates.embs[0].grad[0] = float("inf")  # an overflowed batch: skipped
    assert sal.collect() is False and sal.count == 0
    assert all(t.grad is None for t in gates.tensors())
    set_grads(gates, 1)
    for t in gates.tensors():
        t.grad.mul_(1024.0)
    assert sal.collect(grad_scale=1024.0) is True and sal.count == 1
    assert all(t.grad is None for t in gates.tensors())
    for got, exp in zip(flat(sal.step()), want):
        torch.testing.assert_close(got, exp)


# ------------------------------------------------------------------------------ unit map
def test_unit_map_refuses_a_parameter_it_does_not_cover() -> None:
    """A new parameter (here a stray per-block gamma) is an error for every consumer of the
    unit map, not silently skipped by the optimizer clean-up, the scores or compaction."""
    from pruning.units import clear_pruned_state, squared_magnitudes
    model = tiny()
    model.blocks[1].gamma = torch.nn.Parameter(torch.ones(model.embed_dim))
    gates = Gates.attach(model)
    gates.remove("mlp", 0, [1])
    opt = torch.optim.AdamW(model.parameters())
    for call in (lambda: compact(model), lambda: squared_magnitudes(model),
                 lambda: clear_pruned_state(opt, model, [("mlp", 0, [1])])):
        with pytest.raises(ValueError, match="blocks.1.gamma"):
            call()


def test_clearing_a_head_zeroes_its_q_k_v_rows_and_proj_columns_only() -> None:
    from pruning.units import clear_pruned_state
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(images())
    (out[0].sum() + out[1].sum()).backward()
    opt.step()
    a = model.blocks[1].attn
    clear_pruned_state(opt, model, [("head", 1, [1])])
    rows = opt.state[a.qkv.weight]["exp_avg"].split(a.qkv_split)
    for part, width in zip(rows, (a.qk_dim, a.qk_dim, a.v_dim)):
        heads = part.view(a.num_heads, width, -1)
        assert bool((heads[1] == 0).all()) and bool((heads[0] != 0).any())
    cols = opt.state[a.proj.weight]["exp_avg"].view(-1, a.num_heads, a.v_dim)
    assert bool((cols[:, 1] == 0).all()) and bool((cols[:, 0] != 0).any())
    assert bool((opt.state[model.blocks[0].attn.qkv.weight]["exp_avg"] != 0).any())


def test_gated_norm_follows_every_in_place_change_of_the_embedding_gate() -> None:
    """The gated LayerNorm caches the live channels by the gate's version: a forward before
    and after zeroing a channel in place must each equal its compact model."""
    model = tiny().eval()
    gates = Gates.attach(model)
    x = images()
    with torch.no_grad():
        for channels in ([], [3, 7], [3, 7, 20]):
            gates.embs[0][channels] = 0
            out = model(x)
            small = compact(model)
            torch.testing.assert_close(small(x), out, rtol=0, atol=1e-5)
            assert small.dims.embed_dim == 48 - len(channels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_step_needs_no_more_activation_memory(dtype):
    """Gates scale weights, not activations, and stay out of autocast's way: a 16-bit step
    with gates attached allocates at its peak no more than a plain step (up to the gates'
    own few kilobytes), and one with a
    quarter of the units pruned (live-channel LayerNorm) stays within 1.25x (the budget
    that keeps the README's batch on a 16-24 GB GPU)."""
    from benchmarks.bench_step_memory import step_peak_bytes, variants
    torch.manual_seed(0)
    dense = build_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4,
                        num_classes=10, dims=Dims.uniform(64, 2, 2, 128))
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    cpu = torch.device("cpu")
    peaks = {}
    for name, model in variants(dense).items():
        def step():
            with torch.autocast("cpu", dtype=dtype):
                cls, dist_ = model(x)
                loss = F.cross_entropy(cls, y) + F.cross_entropy(dist_, y)
            loss.backward()
        step()
        peaks[name] = step_peak_bytes(step, cpu)
    assert peaks["gated"] <= 1.01 * peaks["plain"]
    assert peaks["gated, 25% pruned"] <= 1.25 * peaks["plain"]
