"""Multiplicative pruning gates attached to a ReViT, and the units they are read in.

One gate per prunable element: embedding channels (one gate per residual stream: a ViT has
one, a Swin one per stage), and per block heads, QK dims and V dims (per head) and MLP
neurons. At value 1 a gate leaves the
model unchanged and its gradient times its value is the summed `theta * dL/dtheta` of the
element's producing weights, which is what the saliency criteria need; at value 0 it
removes the element.

A pruning *unit* of the QK and V kinds is, by default, one index shared by every head of
a block ("shared", the NViT reference: removing QK index d removes it from all heads); with
"per_head" it is one (head, index) pair. The unit tensors are therefore (qk_dim,) or
(heads, qk_dim); a rotary model's QK unit is a pair of dims (`units.qk_pair`), halving that
last axis; all other kinds are their gates' shape. `Gates.to_units` reduces per-gate
values to units, `Gates.unit_live` tells which units are alive, `Gates.remove` zeroes units.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.distributed as dist

from errors import UserError

from .units import (BLOCK_KINDS, MODEL_KINDS, UNIT_KINDS, gate_shape, model_kinds, num_streams,
                    pair_dims, per_pair, qk_pair)

QKV_UNITS = ("shared", "per_head")
EMB_SALIENCY = ("full", "reference")  # what the embedding gate's gradient sums, see attach


def head_widths(head: torch.Tensor, qk: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
    """(live heads, QK width per live head, V width per live head) of one block.

    A compact block has one QK and one V width for all its heads, so the live counts must
    agree across live heads; otherwise the gates cannot be compacted and this raises.
    Widths are 0 when no head is live.
    """
    live = head != 0
    n_heads = int(live.sum())
    if n_heads == 0:
        return 0, 0, 0
    widths = []
    for name, g in (("QK", qk), ("V", v)):
        counts = (g[live] != 0).sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"{name} widths differ across live heads of a block: "
                             f"{counts.tolist()}; a compact block needs one width")
        widths.append(int(counts[0]))
    return n_heads, widths[0], widths[1]


def live_widths(embs: list | None, blocks: list[dict] | None, dims,
                model: dict | None = None) -> dict:
    """Widths of the compact model as dims field names; a missing gate counts as all ones
    (`model`: the model-level kinds' gates, e.g. SigLIP's pool MLP)."""
    streams = [w if embs is None or embs[s] is None else int((embs[s] != 0).sum())
               for s, w in enumerate(dims.streams)]
    out = {"embed_dim": dims.embed_value(streams),
           "num_heads": [], "qk_dim": [], "v_dim": [], "mlp_dim": []}
    for i in range(dims.depth):
        g = blocks[i] if blocks is not None else {}
        H, qk_w, v_w = dims.num_heads[i], dims.qk_dim[i], dims.v_dim[i]
        if g.get("head") is not None or g.get("qk") is not None or g.get("v") is not None:
            head = g.get("head")
            head = torch.ones(H) if head is None else head.detach()
            qk = g.get("qk")
            qk = torch.ones(H, qk_w) if qk is None else qk.detach()
            v = g.get("v")
            v = torch.ones(H, v_w) if v is None else v.detach()
            H, qk_w, v_w = head_widths(head.cpu(), qk.cpu(), v.cpu())
        mlp = g.get("mlp")
        out["num_heads"].append(H)
        out["qk_dim"].append(qk_w)
        out["v_dim"].append(v_w)
        out["mlp_dim"].append(dims.mlp_dim[i] if mlp is None else int((mlp != 0).sum()))
    for kind, gate in (model or {}).items():
        if gate is not None:
            out[UNIT_KINDS[kind].width] = int((gate != 0).sum())
    return out


def stream_widths(widths: dict) -> list[int]:
    """The per-stream embedding widths of a widths dict (a ViT's embed_dim is one number)."""
    e = widths["embed_dim"]
    return list(e) if isinstance(e, (list, tuple)) else [e]


def widths_to_dims(widths: dict, dims):
    """A buildable dims spec from live widths: frame and attention scales kept from `dims`.

    A model cannot hold a zero width, so a width that was pruned to 0 becomes a single
    placeholder unit whose producing weights are zero (compaction then keeps the function):
    one dim, or a rotary model's one QK pair.
    """
    least = {"qk_dim": 2 if qk_pair(dims) else 1}
    clamp = {k: (max(least.get(k, 1), v) if isinstance(v, int)
                 else [max(least.get(k, 1), x) for x in v])
             for k, v in widths.items()}
    return replace(dims, **clamp, attn_scale=list(dims.attn_scale))


class Gates:
    """All gate tensors of one model, with unit, mask, width and distributed helpers.

    `embs`: one embedding gate per residual stream; `blocks[i]`: block i's head, qk, v and
    mlp gates. A layer is addressed as (kind, index): the stream for "emb", else the block.
    """

    def __init__(self, embs: list[torch.Tensor], blocks: list[dict], dims,
                 qkv_units: str = "shared", model: dict | None = None) -> None:
        if qkv_units not in QKV_UNITS:
            raise ValueError(f"QK/V units must be one of {QKV_UNITS}, got {qkv_units!r}")
        self.embs = list(embs)
        self.blocks = blocks
        self.model = dict(model or {})  # model-level kind -> its one gate (SigLIP's pool MLP)
        self.dims = dims
        self.qkv_units = qkv_units
        self.qk_pair = qk_pair(dims)  # a rotary model's QK unit: a pair of dims

    @classmethod
    def attach(cls, model, dtype: torch.dtype = torch.float32, qkv_units: str = "shared",
               emb_saliency: str = "full") -> "Gates":
        """All-ones leaf gates on the model's device, set on the model.

        emb_saliency "full": the embedding gate's gradient sums every weight a channel
        removes (patch embedding, tokens, position embedding, every block's writers and
        readers, the classifier columns); "reference": only the patch embedding and the
        blocks' weights, as the NViT reference scores a channel (the tokens, position
        embedding and final norm see the same gate values, detached).
        """
        if emb_saliency not in EMB_SALIENCY:
            raise ValueError(f"embedding saliency must be one of {EMB_SALIENCY}, got {emb_saliency!r}")
        device = next(model.parameters()).device
        d = model.dims
        if qkv_units == "per_head" and getattr(d, "qk_norm", False):
            raise UserError("per-head QK units cannot be compacted with qk-norm (its weight is "
                            "shared by the heads, so a block keeps the same QK dims in every "
                            "head): prune with shared QK/V units", field="qkv_units")
        if qkv_units == "per_head" and qk_pair(d):
            raise UserError("per-head QK units cannot be compacted with rotary embeddings (a "
                            "compact block rotates every head by the same frequencies): prune "
                            "with shared QK/V units", field="qkv_units")

        def ones(*shape: int) -> torch.Tensor:
            return torch.ones(*shape, dtype=dtype, device=device, requires_grad=True)

        blocks = [{k: ones(*gate_shape(k, d, i)) for k in BLOCK_KINDS} for i in range(d.depth)]
        embs = [ones(*gate_shape("emb", d, s)) for s in range(num_streams(d))]
        gates = cls(embs, blocks, d, qkv_units,
                    {k: ones(*gate_shape(k, d, 0)) for k in model_kinds(d)})
        # "reference": detached views sharing storage, so the values follow every removal
        frames = [e.detach() for e in embs] if emb_saliency == "reference" else None
        model.set_gates(gates.embs, gates.blocks, frames, gates.model)
        return gates

    @staticmethod
    def detach_from(model) -> None:
        model.set_gates(None, None)

    # ------------------------------------------------------------- iteration
    def tensors(self) -> list[torch.Tensor]:
        """Every gate in a fixed order (the streams' embedding gates, then per block head,
        qk, v, mlp, then the model-level kinds')."""
        return (self.embs + [g[k] for g in self.blocks for k in BLOCK_KINDS]
                + [self.model[k] for k in MODEL_KINDS if k in self.model])

    def layers(self) -> list[tuple[str, int]]:
        """(kind, index) of each tensor in `tensors()` order."""
        return ([("emb", s) for s in range(len(self.embs))]
                + [(k, i) for i in range(len(self.blocks)) for k in BLOCK_KINDS]
                + [(k, 0) for k in MODEL_KINDS if k in self.model])

    def kinds(self) -> list[str]:
        """The kind of each tensor in `tensors()` order."""
        return [kind for kind, _ in self.layers()]

    def nest(self, flat: list) -> dict:
        """A flat list in `tensors()` order -> {"emb": [per stream], "blocks": [{kind: ...}]}."""
        it = iter(flat)
        embs = [next(it) for _ in self.embs]
        blocks = [{k: next(it) for k in BLOCK_KINDS} for _ in self.blocks]
        return {"emb": embs, "blocks": blocks,
                "model": {k: next(it) for k in MODEL_KINDS if k in self.model}}

    @staticmethod
    def flatten(nested: dict) -> list:
        """The inverse of `nest`: a nested dict in `tensors()` order."""
        return ([*nested["emb"]] + [b[k] for b in nested["blocks"] for k in BLOCK_KINDS]
                + [nested.get("model", {})[k] for k in MODEL_KINDS if k in nested.get("model", {})])

    def gate(self, kind: str, index: int) -> torch.Tensor:
        if kind in MODEL_KINDS:
            return self.model[kind]
        return self.embs[index] if kind == "emb" else self.blocks[index][kind]

    # ----------------------------------------------------------------- units
    def shares_heads(self, kind: str) -> bool:
        """Whether a unit of this kind is one index shared by every head of its block."""
        return kind in ("qk", "v") and self.qkv_units == "shared"

    def to_units(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-gate values (`tensors()` order and shapes) -> per-unit values, summed over the
        heads for shared QK/V units."""
        out = [v.sum(0) if self.shares_heads(k) else v for v, k in zip(values, self.kinds())]
        return [per_pair(v, self.qk_pair, operator.add) if k == "qk" and self.qk_pair else v
                for v, k in zip(out, self.kinds())]

    def unit_live(self) -> list[torch.Tensor]:
        """Which units are alive, per gate tensor in unit shape; a removed head's QK/V dims
        are not alive in per-head units."""
        out = [e.detach() != 0 for e in self.embs]
        for g in self.blocks:
            head = g["head"].detach() != 0
            for kind in BLOCK_KINDS:
                live = g[kind].detach() != 0
                if self.shares_heads(kind):
                    live = live.any(0)  # removal zeroes the index in every head
                elif kind in ("qk", "v"):
                    live = live & head[:, None]
                if kind == "qk" and self.qk_pair:
                    live = per_pair(live, self.qk_pair, operator.or_)
                out.append(live)
        return out + [self.model[k].detach() != 0 for k in MODEL_KINDS if k in self.model]

    def gate_units(self, kind: str, index: int, units: list) -> list:
        """Unit indices -> indices into the gate tensor ((head, dim) pairs for QK/V)."""
        if kind == "qk" and self.qk_pair:
            width = self.blocks[index]["qk"].shape[1]
            units = [d for u in units for d in pair_dims(int(u), width, self.qk_pair)]
        if self.shares_heads(kind):
            heads = self.blocks[index]["head"].shape[0]
            return [(h, int(d)) for d in units for h in range(heads)]
        return list(units)

    @torch.no_grad()
    def remove(self, kind: str, index: int, units: list) -> None:
        """Zero the gates of these units (indices in unit shape) of layer (kind, index)."""
        gate = self.gate(kind, index)
        if kind in ("qk", "v"):
            hs, ds = zip(*self.gate_units(kind, index, units))
            gate[list(hs), list(ds)] = 0
        else:
            gate[list(units)] = 0

    # ------------------------------------------------------------- gradients
    def zero_grad(self) -> None:
        for t in self.tensors():
            t.grad = None

    def all_reduce_grads(self) -> None:
        """Average gate gradients over ranks so every rank ranks units identically."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        ts = self.tensors()
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ts]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for t in ts:
            n = t.numel()
            t.grad = flat[offset:offset + n].view_as(t).clone()
            offset += n

    @torch.no_grad()
    def broadcast_from(self, src: int = 0) -> None:
        """Every rank takes rank `src`'s gate values, in one collective. Copied in (not
        broadcast in place, which leaves a tensor's version counter as it was) so that what
        is cached against a gate's version (StreamNorm's live channels) is recomputed."""
        ts = self.tensors()
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        dist.broadcast(flat, src=src)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view_as(t))

    def removed_since(self, before: list[torch.Tensor]) -> list:
        """(kind, index, gate indices) of every gate element that was live in `before` (an
        earlier `tensors()` snapshot) and is zero now: what a prune step removed, read off
        the masks every rank holds rather than one rank's own decisions."""
        out = []
        for (kind, index), t, was in zip(self.layers(), self.tensors(), before):
            gone = torch.nonzero((was != 0) & (t.detach() == 0))
            if gone.numel() == 0:
                continue
            idx = [tuple(r) for r in gone.tolist()] if t.dim() == 2 else gone.flatten().tolist()
            out.append((kind, index, idx))
        return out

    # ----------------------------------------------------------------- masks
    def masks(self) -> dict:
        """Which units are alive (gate != 0), nested like the gates."""
        return self.nest([t.detach() != 0 for t in self.tensors()])

    @torch.no_grad()
    def load_masks(self, masks: dict) -> None:
        """Set gate values to 1 (alive) or 0 (removed) in place, keeping the gate tensors.
        A ViT's masks saved before streams were lists hold one tensor under "emb"; masks
        saved before model-level kinds existed have no "model" (those gates stay alive)."""
        embs = masks["emb"] if isinstance(masks["emb"], (list, tuple)) else [masks["emb"]]
        if len(masks["blocks"]) != len(self.blocks) or len(embs) != len(self.embs):
            raise ValueError(f"masks have {len(embs)} streams and {len(masks['blocks'])} blocks, "
                             f"gates {len(self.embs)} and {len(self.blocks)}")
        pairs = list(zip(self.embs, embs)) + [(g[k], m[k]) for g, m in zip(self.blocks, masks["blocks"])
                                               for k in BLOCK_KINDS]
        pairs += [(self.model[k], m) for k, m in masks.get("model", {}).items()]
        for gate, mask in pairs:
            if tuple(mask.shape) != tuple(gate.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} != gate shape {tuple(gate.shape)}")
        for gate, mask in pairs:
            gate.copy_(mask.to(device=gate.device, dtype=torch.bool).to(gate.dtype))

    # ---------------------------------------------------------------- widths
    def widths(self) -> dict:
        """Widths a compact model would have, keyed like dims fields (0 if fully pruned)."""
        return live_widths(self.embs, self.blocks, self.dims, self.model)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Masks on the CPU: all that a resumed run needs to restore its gates."""
        m = self.masks()
        return {"emb": [e.cpu().clone() for e in m["emb"]],
                "blocks": [{k: v.cpu().clone() for k, v in b.items()} for b in m["blocks"]],
                "model": {k: v.cpu().clone() for k, v in m["model"].items()}}

    def load_state_dict(self, state: dict) -> None:
        self.load_masks(state)
