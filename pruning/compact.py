"""Turn a gated ReViT into the dense smaller ReViT that computes the same function.

Removed units (gate 0) are dropped; live gate values are folded into the weights that
produce their unit (a no-op for the usual value 1), so the compact model equals the gated
one for any gate values. The per-block attention scale is kept from the original dims:
it is part of the function and must not follow the smaller QK width.
"""
from __future__ import annotations

import copy

import torch

from models.dims import Dims
from models.revit import ReViT

from .gates import head_widths, live_widths, widths_to_dims


def _model_gates(model: ReViT) -> tuple[torch.Tensor | None, list[dict] | None]:
    emb = model.emb_gate
    blocks = [{"head": b.attn.head_gate, "qk": b.attn.qk_gate, "v": b.attn.v_gate,
               "mlp": b.mlp.gate} for b in model.blocks]
    if all(v is None for g in blocks for v in g.values()):
        blocks = None
    return emb, blocks


def has_gates(model: ReViT) -> bool:
    emb, blocks = _model_gates(model)
    return emb is not None or blocks is not None


def compacted_dims(model: ReViT) -> Dims:
    """Dims of `compact(model)`: live widths, the model's frame and attention scales.

    A width pruned to 0 becomes one zero-weight placeholder unit (ReViT needs >= 1).
    """
    emb, blocks = _model_gates(model)
    return widths_to_dims(live_widths(emb, blocks, model.dims), model.dims)


def _select(gate: torch.Tensor | None, n: int, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, fold factors) of live units of a 1-d gate; one zero placeholder if none."""
    if gate is None:
        return torch.arange(n, device=device), torch.ones(n, device=device, dtype=dtype)
    g = gate.detach().to(device=device, dtype=dtype)
    idx = torch.nonzero(g != 0).flatten()
    if idx.numel() == 0:
        return torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, device=device,
                                                                            dtype=dtype)
    return idx, g[idx]


def _head_select(head: torch.Tensor, unit: torch.Tensor, width: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices into a (H * width) projection and the (head, dim) gate values there,
    head-major.

    `head` (H,) and `unit` (H, width) gate values; live heads and their live dims are kept
    (the same count per head, checked by head_widths). No live row -> one zero placeholder.
    """
    live_heads = torch.nonzero(head != 0).flatten()
    idx, fac = [], []
    for h in live_heads.tolist():
        d = torch.nonzero(unit[h] != 0).flatten()
        idx.append(h * width + d)
        fac.append(unit[h, d])
    if not idx or idx[0].numel() == 0:
        n_heads = max(1, live_heads.numel())
        z = torch.zeros(n_heads, dtype=torch.long, device=head.device)
        return z, torch.zeros(n_heads, dtype=head.dtype, device=head.device)
    return torch.cat(idx), torch.cat(fac)


@torch.no_grad()
def compact(model: ReViT) -> ReViT:
    """A new dense ReViT without gates computing what the gated `model` computes."""
    if not has_gates(model):
        return copy.deepcopy(model)
    dims = compacted_dims(model)
    emb_gate, block_gates = _model_gates(model)
    ref = model.pos_embed
    device, dtype = ref.device, ref.dtype
    sd = model.state_dict()
    new_sd: dict[str, torch.Tensor] = {}

    e_idx, e_fac = _select(emb_gate, model.embed_dim, device, dtype)

    def produce(key: str, dim: int = 0) -> None:
        """Keep live emb channels along `dim` of a stream-producing tensor, gate folded."""
        t = sd[key].index_select(dim, e_idx)
        shape = [1] * t.dim()
        shape[dim] = -1
        new_sd[key] = t * e_fac.view(shape)

    def consume(key: str) -> torch.Tensor:
        """A Linear weight reading the stream: keep live emb input columns."""
        return sd[key].index_select(1, e_idx)

    produce("patch_embed.proj.weight")
    produce("patch_embed.proj.bias")
    for key in ("cls_token", "dist_token", "pos_embed"):
        if key in sd:
            produce(key, 2)
    produce("norm.weight")
    produce("norm.bias")
    for name in ("head", "head_dist"):
        if f"{name}.weight" in sd:
            new_sd[f"{name}.weight"] = consume(f"{name}.weight")
            new_sd[f"{name}.bias"] = sd[f"{name}.bias"]

    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            produce(p + n + ".weight")
            produce(p + n + ".bias")
        a = blk.attn
        g = block_gates[i] if block_gates is not None else {}
        H = a.num_heads

        def gate_or_ones(t: torch.Tensor | None, *shape: int) -> torch.Tensor:
            if t is None:
                return torch.ones(*shape, device=device, dtype=dtype)
            return t.detach().to(device=device, dtype=dtype)

        head = gate_or_ones(g.get("head"), H)
        qk = gate_or_ones(g.get("qk"), H, a.qk_dim)
        v = gate_or_ones(g.get("v"), H, a.v_dim)
        head_widths(head, qk, v)  # raises if widths differ across live heads
        qk_idx, qk_fac = _head_select(head, qk, a.qk_dim)
        v_idx, v_fac = _head_select(head, v, a.v_dim)
        # the head gate multiplies q, k and v of its head, the QK gate q only
        head_of = lambda idx, width: head[idx // width]  # noqa: E731
        k_fac = head_of(qk_idx, a.qk_dim) * (qk_fac != 0).to(dtype)
        folds = (("q", qk_idx, qk_fac * head_of(qk_idx, a.qk_dim)), ("k", qk_idx, k_fac),
                 ("v", v_idx, v_fac * head_of(v_idx, a.v_dim)))
        for n, idx, fac in folds:
            w = consume(p + f"attn.{n}.weight").index_select(0, idx)
            new_sd[p + f"attn.{n}.weight"] = w * fac[:, None]
            new_sd[p + f"attn.{n}.bias"] = sd[p + f"attn.{n}.bias"].index_select(0, idx) * fac
        if p + "attn.token_scale" in sd:
            new_sd[p + "attn.token_scale"] = sd[p + "attn.token_scale"]
        # proj reads the kept v dims; a placeholder (factor 0) column is zeroed too
        proj = sd[p + "attn.proj.weight"].index_select(1, v_idx) * (v_fac != 0).to(dtype)
        new_sd[p + "attn.proj.weight"] = proj.index_select(0, e_idx) * e_fac[:, None]
        produce(p + "attn.proj.bias")

        m_idx, m_fac = _select(g.get("mlp"), blk.mlp.fc1.out_features, device, dtype)
        fc1 = consume(p + "mlp.fc1.weight").index_select(0, m_idx)
        new_sd[p + "mlp.fc1.weight"] = fc1 * m_fac[:, None]
        new_sd[p + "mlp.fc1.bias"] = sd[p + "mlp.fc1.bias"].index_select(0, m_idx) * m_fac
        fc2 = sd[p + "mlp.fc2.weight"].index_select(1, m_idx) * (m_fac != 0).to(dtype)
        new_sd[p + "mlp.fc2.weight"] = fc2.index_select(0, e_idx) * e_fac[:, None]
        produce(p + "mlp.fc2.bias")

    out = ReViT(dims, drop_rate=model.pos_drop.p,
                attn_drop_rate=model.blocks[0].attn.attn_drop if len(model.blocks) else 0.0)
    # per-block dropout and drop-path settings are kept exactly as they were
    for new_blk, old_blk in zip(out.blocks, model.blocks):
        new_blk.attn.attn_drop = old_blk.attn.attn_drop
        new_blk.attn.proj_drop = copy.deepcopy(old_blk.attn.proj_drop)
        new_blk.mlp.drop1 = copy.deepcopy(old_blk.mlp.drop1)
        new_blk.mlp.drop2 = copy.deepcopy(old_blk.mlp.drop2)
        new_blk.drop_path1 = copy.deepcopy(old_blk.drop_path1)
        new_blk.drop_path2 = copy.deepcopy(old_blk.drop_path2)
    out.pretrained_cfg = copy.deepcopy(model.pretrained_cfg)
    out.to(device=device, dtype=dtype)
    missing = set(out.state_dict()) ^ set(new_sd)
    if missing:  # a parameter this function does not know about: fail loudly, not silently
        raise RuntimeError(f"compact: unhandled state entries {sorted(missing)}")
    out.load_state_dict(new_sd)
    out.train(model.training)
    return out
