"""One DeiT model class for every case: dense DeiT, ReViT, a model being pruned, its compact result.

Each block has its own heads, QK width per head, V width per head and MLP width around a
shared embedding width. Q, K and V are one stored projection (rows Q | K | V).

Pruning attaches multiplicative gates (value 1 = kept, 0 = removed) through `set_gates`:
one embedding gate for the whole residual stream and per block head, QK, V and MLP gates.
Each gate multiplies the output of the weights that produce its unit (applied by scaling
those weights' rows, see `scaled`), so its gradient is `sum(theta * dL/dtheta)` over them:
the head gate multiplies a head's q, k and v, the QK gate q only (a zero q column removes
its k column's contribution too, and its gradient is then exactly the Q weights' sum, as the
NViT reference scores QK). While an
embedding gate is set, LayerNorm statistics are taken over live channels only, so the gated
model computes exactly the function of its compact version. With no gates set the forward
pass is the plain one.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, PatchEmbed, RotaryEmbeddingCat, apply_rot_embed_cat, trunc_normal_
from timm.models._features import feature_take_indices

from errors import UserError

from .dims import Dims

LN_EPS = 1e-6  # DeiT/timm ViT value


def scaled(weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's weight and bias with output row r multiplied by rows[r].

    Gates act on weights, not activations: (W * g) x + b * g equals g * (W x + b), and the
    gate's gradient is then the sum of theta * dL/dtheta over the rows it scales (what the
    saliency needs) while no activation-sized product is computed or saved for backward.
    """
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * rows.view(shape), None if bias is None else bias * rows


def normalized_live(x: torch.Tensor, live: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm's (x - mean) / sqrt(var + eps) over the last axis's live positions only
    (`live` 1 or 0, broadcast against x), 0 at the others, in shapes that do not depend on
    which positions are live."""
    n = live.sum(-1, keepdim=True).clamp_min(1.0)
    centred = (x - (x * live).sum(-1, keepdim=True) / n) * live
    var = (centred * centred).sum(-1, keepdim=True) / n
    return centred * torch.rsqrt(var + eps)


class StreamNorm(nn.LayerNorm):
    """LayerNorm of the residual stream that can ignore pruned embedding channels.

    `gate` (E,) zeroes channels; statistics use the live ones (gate != 0) only, so the
    result equals a LayerNorm over the compacted stream. The gate scales this norm's weight
    and bias, so its gradient includes them. `repeats`: the normalised axis holds that many
    copies of the stream one after another (a Swin's patch merging, 4), each gated alike.
    The live channels are found once per change of the gate (its in-place version counter),
    not per forward: no host sync per step.
    """

    __jit_ignored_attributes__ = ["_live_key", "_live"]  # the gated path's cache
    _live_key = None
    _live = None

    @torch.jit.unused
    def live_channels(self, gate: torch.Tensor, repeats: int = 1) -> torch.Tensor | None:
        """Indices of the live positions, or None when every one is live."""
        key = (gate.data_ptr(), gate._version, repeats)
        if self._live_key != key:
            idx = torch.nonzero(gate.detach() != 0).flatten()
            if idx.numel() == gate.numel():
                self._live = None
            else:
                n = gate.numel()
                self._live = torch.cat([idx + j * n for j in range(repeats)])
            self._live_key = key
        return self._live

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None,
                repeats: int = 1) -> torch.Tensor:
        if gate is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.gated(x, gate, repeats)

    @torch.jit.unused
    def gated(self, x: torch.Tensor, gate: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """The norm while pruning: the gate scales weight and bias, statistics over live
        channels (kept out of TorchScript: a scripted model has no gates)."""
        full = gate if repeats == 1 else gate.repeat(repeats)
        weight, bias = scaled(self.weight, self.bias, full)
        if torch.compiler.is_compiling():
            return self.masked(x, full, weight, bias)
        idx = self.live_channels(gate, repeats)
        if idx is None:
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        if idx.numel() == 0:
            return x * 0
        y = F.layer_norm(x.index_select(-1, idx), (idx.numel(),), weight[idx], bias[idx], self.eps)
        return y.new_zeros(x.shape).index_copy(-1, idx, y)

    @torch.jit.unused
    def masked(self, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        """The same function with shapes that do not depend on the gate's values, for
        torch.compile: a prune step then changes no shape and recompiles nothing (the exact
        live-channel gather above has a data-dependent width). Equal up to rounding."""
        live = (gate.detach() != 0).float()
        y = normalized_live(x.float(), live, self.eps) * weight.float() + bias.float()
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


class LiveNorm(nn.LayerNorm):
    """A LayerNorm inside a block whose positions are pruning units: timm's qk-norm (over each
    head's QK dims, its weight shared by the heads) and scale_attn_inner (over all heads' V
    outputs). Under a gate (broadcast against x's last axis) the statistics are taken over the
    live positions and the gate scales weight and bias (pruned positions give 0), so the gated
    model computes what its compact version does, as `StreamNorm` does for the stream; shapes
    do not depend on the gate's values (no host sync, nothing cached against a gate)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.gated(x, gate)

    @torch.jit.unused
    def gated(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        live = (gate.detach() != 0).to(x.dtype)
        return normalized_live(x, live, self.eps) * (self.weight * gate) + self.bias * gate


class Skip(nn.Module):
    """The identity in the place of a StreamNorm or LayerScale a model does not have (no
    LayerScale, fc_norm instead of the final norm, a norm cut by prune_intermediate_layers)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return x


class LayerScale(nn.Module):
    """timm's LayerScale: a learnable per-channel factor `gamma` on a residual branch. Under
    an embedding gate gamma is gated too (the unit map's "emb" produce slice), so its
    theta * dL/dtheta joins the embedding channel's saliency."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return x * (self.gamma if gate is None else self.gamma * gate)


def sdpa_widths(dq: int, dv: int, device_type: str, dtype: torch.dtype,
                flash_max_width: int = 256, cuda_align: int = 8) -> tuple[int, int]:
    """The (QK, V) head widths to zero-pad to so that SDPA reaches a fused kernel.

    Zero QK columns add nothing to q.k and zero V columns are cut off again, so any widths
    at least the model's own give the same function; these are chosen by construction from
    PyTorch's kernel rules (aten/.../sdp_utils): the CPU's fused kernel and CUDA's flash
    kernel (16-bit, width <= 256) need equal widths; CUDA's memory-efficient kernel takes
    unequal QK and V widths if each is a multiple of 8 (fp32: 4). Equal widths are chosen
    wherever a kernel for them exists, so a narrower block never runs slower than the wider
    one it pads to, as the latency table's monotone reading assumes. flash_max_width: the
    widest head CUDA's flash kernel takes; cuda_align: the head widths CUDA's fused kernels
    take in 16-bit (fp32 needs 4) (sdp_utils.cpp; arguments, as TorchScript reads no
    module constants).
    """
    if device_type == "cpu":
        return max(dq, dv), max(dq, dv)
    if device_type != "cuda":
        return dq, dv
    uq, uv = -(-dq // cuda_align) * cuda_align, -(-dv // cuda_align) * cuda_align
    if (dtype == torch.float16 or dtype == torch.bfloat16) and max(uq, uv) <= flash_max_width:
        return max(uq, uv), max(uq, uv)
    return uq, uv


@torch.fx.wrap  # a leaf for FX tracing: its padding plan reads the tensors' device and dtype
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
              scale: float, pad: bool = True) -> torch.Tensor:
    """SDPA over (B, H, N, d) tensors whose QK width may differ from the V width.

    With `pad`, the head widths are zero-padded to `sdpa_widths` (exact) so that a fused
    kernel runs: without it, unequal widths take SDPA's unfused math path on the CPU (up to
    3.7x slower, benchmarks/README.md finding 2) and on CUDA whenever a width is not a
    multiple of 8. models/flops.py turns it off per module, to count the model's arithmetic.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    pq, pv = dq, dv
    if pad:
        pq, pv = sdpa_widths(dq, dv, q.device.type, q.dtype)
    if pq == dq and pv == dv:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if pq != dq:  # F.pad copies even when it pads nothing, so only the widened side is padded
        q, k = F.pad(q, (0, pq - dq)), F.pad(k, (0, pq - dq))
    if pv != dv:
        v = F.pad(v, (0, pv - dv))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out if pv == dv else out[..., :dv]


class Attention(nn.Module):
    """Multi-head attention with separate QK and V widths and a fixed per-block scale.

    One stored projection `qkv` whose rows are Q | K | V, each head-major (timm's fused
    layout when QK width == V width, so timm weights load as they are): one GEMM per forward
    and no weight concatenation. With `num_tokens`, q, k and v are multiplied by a learnable
    per-token scale (the NViT reference's `token_mask`, shape (tokens, 1), initialised to 1).
    """

    def __init__(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
                 attn_scale: float, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 num_tokens: int | None = None, qkv_bias: bool = True, qk_norm: bool = False,
                 ln_eps: float = LN_EPS, k_bias: bool = True, rope_index: list[int] | None = None,
                 rope_width: int = 0, rope_half: bool = False, num_prefix_tokens: int = 0,
                 qkv_fused: bool = True, out_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale = attn_scale  # kept when QK width is pruned: it is part of the function
        qk, v = num_heads * qk_dim, num_heads * v_dim
        if qkv_fused:  # timm's Eva attention has no K bias: Q and V biases of their own
            self.qkv = nn.Linear(embed_dim, 2 * qk + v, bias=qkv_bias and k_bias)
            self.q_proj = self.k_proj = self.v_proj = None
        else:  # timm's qkv_fused=False (EVA-02 B/L): three projections
            self.qkv = None
            self.q_proj = nn.Linear(embed_dim, qk, bias=qkv_bias)
            self.k_proj = nn.Linear(embed_dim, qk, bias=qkv_bias and k_bias)
            self.v_proj = nn.Linear(embed_dim, v, bias=qkv_bias)
        own = qkv_fused and qkv_bias and not k_bias
        self.q_bias = nn.Parameter(torch.zeros(qk)) if own else None
        self.v_bias = nn.Parameter(torch.zeros(v)) if own else None
        # rotary position embedding on the patch tokens' q and k (timm's Eva): the columns of
        # the model's (sin | cos) table this block's QK dims rotate by, None: all of them
        self.rope_half = rope_half
        self.num_prefix_tokens = num_prefix_tokens
        index = None
        if rope_index is not None:
            kept = torch.tensor(rope_index, dtype=torch.long)
            index = torch.cat([kept, kept + rope_width])
        self.register_buffer("rope_index", index, persistent=False)
        self.token_scale = nn.Parameter(torch.ones(num_tokens, 1)) if num_tokens else None
        self.q_norm = LiveNorm(qk_dim, eps=ln_eps) if qk_norm else None  # timm's qk-norm
        self.k_norm = LiveNorm(qk_dim, eps=ln_eps) if qk_norm else None
        # timm's scale_attn_inner: a LayerNorm over every head's V output before proj, its
        # statistics over the live (head, V dim) positions under the gates
        self.norm = LiveNorm(v, eps=ln_eps) if out_norm else Skip()
        self.proj = nn.Linear(v, embed_dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.head_gate: torch.Tensor | None = None  # (H,)
        self.qk_gate: torch.Tensor | None = None  # (H, qk_dim)
        self.v_gate: torch.Tensor | None = None  # (H, v_dim)
        self.pad_widths = True  # see `attention`

    @property
    def qkv_split(self) -> list[int]:
        """Rows of Q, K and V in `qkv`."""
        H = self.num_heads
        return [H * self.qk_dim, H * self.qk_dim, H * self.v_dim]

    def qkv_gate_rows(self) -> torch.Tensor:
        """Per row of `qkv`: head gate x QK gate on Q, head gate on K, head gate x V gate on V."""
        head = self.head_gate[:, None]
        return torch.cat([(head * self.qk_gate).flatten(),
                          head.expand(-1, self.qk_dim).flatten(), (head * self.v_gate).flatten()])

    def v_rows(self) -> torch.Tensor | None:
        """Per V output position (head-major): head gate x V gate (None without gates)."""
        if self.head_gate is None or self.v_gate is None:
            return None
        return (self.head_gate[:, None] * self.v_gate).flatten()

    def qkv_bias(self) -> torch.Tensor | None:
        """The bias of `qkv`'s rows: its own, or Eva's Q and V biases around a zero K bias."""
        if self.q_bias is not None and self.v_bias is not None:
            return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        if self.qkv is None:
            return None
        return self.qkv.bias

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v (B, N, heads x width), their rows scaled by the gates."""
        if self.q_proj is not None and self.k_proj is not None and self.v_proj is not None:
            if self.head_gate is None:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            else:
                rq, rk, rv = self.qkv_gate_rows().split(self.qkv_split)
                q = linear_rows(x, self.q_proj.weight, self.q_proj.bias, rq)
                k = linear_rows(x, self.k_proj.weight, self.k_proj.bias, rk)
                v = linear_rows(x, self.v_proj.weight, self.v_proj.bias, rv)
            if self.token_scale is not None:
                scale = self.token_scale.to(q.dtype)
                q, k, v = q * scale, k * scale, v * scale
            return q, k, v
        assert self.qkv is not None
        if self.head_gate is not None:
            qkv = linear_rows(x, self.qkv.weight, self.qkv_bias(), self.qkv_gate_rows())
        elif self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv = self.eva_qkv(x)
        if self.token_scale is not None:  # in qkv's dtype: the fp32 scale would promote a
            qkv = qkv * self.token_scale.to(qkv.dtype)  # 16-bit qkv to fp32 under autocast,
            # and SDPA (which casts back) would then miss flash for unequal QK/V widths
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        return q, k, v

    def eva_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Eva's projection as timm computes it: one F.linear with the Q, zero K and V biases;
        an int8 `qkv` (torch's dynamic quantization, no weight tensor) adds them after."""
        bias = self.qkv_bias()
        assert self.qkv is not None and bias is not None
        weight = self.qkv.weight
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight, bias)
        return self.qkv(x) + bias

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        """emb: the embedding gate, scaling the output channels; rope: the model's rotary
        (sin | cos) table over the patch tokens."""
        B, N, _ = x.shape
        H = self.num_heads
        q, k, v = self.project(x)
        q = q.view(B, N, H, self.qk_dim)
        k = k.view(B, N, H, self.qk_dim)
        v = v.view(B, N, H, self.v_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q, self.qk_gate), self.k_norm(k, self.qk_gate)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = self.rotated(q, rope).type_as(v), self.rotated(k, rope).type_as(v)
        x = attention(q, k, v, self.attn_drop if self.training else 0.0, self.scale,
                      self.pad_widths)
        x = x.transpose(1, 2).reshape(B, N, H * self.v_dim)
        x = self.norm(x, self.v_rows())
        if emb is None:
            return self.proj_drop(self.proj(x))
        weight, bias = scaled(self.proj.weight, self.proj.bias, emb)
        return self.proj_drop(F.linear(x, weight, bias))

    def rotated(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """t (B, H, N, d) with its patch tokens rotated as timm's Eva does (prefix tokens as
        they are), by this block's columns of the table. A gated QK pair is a multiple of its
        unrotated values, so it rotates to 0 when pruned: the compact block, which keeps its
        pairs' columns, computes the same."""
        if self.rope_index is not None:
            rope = rope.index_select(-1, self.rope_index)
        n = self.num_prefix_tokens
        return torch.cat([t[:, :, :n, :],
                          apply_rot_embed_cat(t[:, :, n:, :], rope, half=self.rope_half)], dim=2)


def mlp_activation(name: str) -> nn.Module:
    """The MLP's activation by its Dims name: timm's modules, so the numbers are timm's (each
    is 0 at 0, so a gate on fc1's output removes a neuron)."""
    from timm.layers import QuickGELU
    if name in ("swiglu_packed", "swiglu"):
        return nn.SiLU()
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                rows: torch.Tensor) -> torch.Tensor:
    """A linear layer with its output rows scaled by `rows` (see `scaled`)."""
    weight, bias = scaled(weight, bias, rows)
    return F.linear(x, weight, bias)


class Mlp(nn.Module):
    """fc1, activation, fc2; "swiglu_packed" (DINOv2-g, EVA-02-Ti, timm's SwiGLUPacked): fc1
    holds the gate rows then the value rows of the `hidden` units, and a unit's output is
    SiLU(gate) * value; "swiglu" (EVA-02 B/L, timm's SwiGLU): the same with the gate rows in
    `fc1_g` and the value rows in `fc1_x`. The unit's gate scales both of its rows (SiLU(0) * 0
    = 0). `norm` (timm's scale_mlp): a LayerNorm over the hidden units before fc2, its
    statistics over the live ones under a gate, as the stream's (`StreamNorm`)."""

    def __init__(self, embed_dim: int, hidden: int, drop: float = 0.0, act: str = "gelu",
                 norm: bool = False, ln_eps: float = LN_EPS) -> None:
        super().__init__()
        self.packed = act == "swiglu_packed"
        if act == "swiglu":
            self.fc1_g = nn.Linear(embed_dim, hidden)
            self.fc1_x = nn.Linear(embed_dim, hidden)
            self.fc1 = None
        else:
            self.fc1 = nn.Linear(embed_dim, hidden * (2 if self.packed else 1))
            self.fc1_g = self.fc1_x = None
        self.act = mlp_activation(act)
        self.drop1 = nn.Dropout(drop)
        self.norm = StreamNorm(hidden, eps=ln_eps) if norm else Skip()
        self.fc2 = nn.Linear(hidden, embed_dim)
        self.drop2 = nn.Dropout(drop)
        self.gate: torch.Tensor | None = None  # (hidden,), on fc1's output (GELU(0) = 0)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activated hidden units, each scaled by its gate."""
        gate = self.gate
        if self.fc1_g is not None and self.fc1_x is not None:
            if gate is None:
                return self.act(self.fc1_g(x)) * self.fc1_x(x)
            return (self.act(linear_rows(x, self.fc1_g.weight, self.fc1_g.bias, gate))
                    * linear_rows(x, self.fc1_x.weight, self.fc1_x.bias, gate))
        assert self.fc1 is not None
        if gate is None:
            x = self.fc1(x)
        else:
            x = linear_rows(x, self.fc1.weight, self.fc1.bias,
                            gate.repeat(2) if self.packed else gate)
        if self.packed:
            gate_rows, value = x.chunk(2, dim=-1)
            return self.act(gate_rows) * value
        return self.act(x)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """emb: the embedding gate, scaling the output channels."""
        x = self.norm(self.drop1(self.hidden(x)), self.gate)
        if emb is None:
            return self.drop2(self.fc2(x))
        weight, bias = scaled(self.fc2.weight, self.fc2.bias, emb)
        return self.drop2(F.linear(x, weight, bias))


class Block(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int, mlp_dim: int,
                 attn_scale: float, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, num_tokens: int | None = None, qkv_bias: bool = True,
                 layer_scale: float = 0.0, ln_eps: float = LN_EPS, mlp_act: str = "gelu",
                 qk_norm: bool = False, eva_names: bool = False, mlp_norm: bool = False,
                 **attn) -> None:
        """attn: the Attention's k_bias, qkv_fused, out_norm and rotary arguments; eva_names:
        LayerScale's gammas are the block's `gamma_1` and `gamma_2`, as in timm's Eva blocks."""
        super().__init__()
        self.norm1 = StreamNorm(embed_dim, eps=ln_eps)
        self.attn = Attention(embed_dim, num_heads, qk_dim, v_dim, attn_scale, attn_drop, drop,
                              num_tokens, qkv_bias, qk_norm, ln_eps, **attn)
        own = bool(layer_scale) and not eva_names
        self.ls1 = LayerScale(embed_dim, layer_scale) if own else Skip()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = StreamNorm(embed_dim, eps=ln_eps)
        self.mlp = Mlp(embed_dim, mlp_dim, drop, mlp_act, mlp_norm, ln_eps)
        self.ls2 = LayerScale(embed_dim, layer_scale) if own else Skip()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        eva = bool(layer_scale) and eva_names
        self.layer_scale = layer_scale
        self.gamma_1 = nn.Parameter(torch.full((embed_dim,), float(layer_scale))) if eva else None
        self.gamma_2 = nn.Parameter(torch.full((embed_dim,), float(layer_scale))) if eva else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ls1(self.attn(self.norm1(x, emb), emb, rope), emb)
        if self.gamma_1 is not None:
            y = y * (self.gamma_1 if emb is None else self.gamma_1 * emb)
        x = x + self.drop_path1(y)
        y = self.ls2(self.mlp(self.norm2(x, emb), emb), emb)
        if self.gamma_2 is not None:
            y = y * (self.gamma_2 if emb is None else self.gamma_2 * emb)
        return x + self.drop_path2(y)


def rotary_table(dims: Dims) -> nn.Module | None:
    """timm's axial rotary embedding (Eva's RotaryEmbeddingCat, by token index) over the patch
    grid, for a model with rope_dim > 0: its table is timm's to the bit, in buffers only."""
    if not dims.rope_dim:
        return None
    grid = dims.img_size // dims.patch_size
    ref = dims.rope_ref_grid
    return RotaryEmbeddingCat(dim=dims.rope_dim, temperature=dims.rope_temperature,
                              in_pixels=False, feat_shape=[grid, grid],
                              ref_feat_shape=[ref, ref] if ref else None,
                              grid_indexing=dims.rope_grid_indexing, rotate_half=dims.rope_half)


def pretrained_cfg(dims: Dims) -> dict:
    """timm's pretrained_cfg of a model with these dims: its input, DeiT's ImageNet
    preprocessing and classifier names (what timm's data config, validate.py and
    benchmark.py read); no weights URL, there are none to fetch."""
    from timm.models import PretrainedCfg
    return PretrainedCfg(
        input_size=(dims.in_chans, dims.img_size, dims.img_size), fixed_input_size=True,
        crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), num_classes=dims.num_classes, first_conv="patch_embed.proj",
        classifier=("head", "head_dist") if dims.distilled else "head").to_dict()


class ReViT(nn.Module):
    """DeiT with per-block dims; cls (+ dist) token, two heads as DeiT when distilled; and
    the timm ViT family around them (dims' family fields): no class token, register tokens,
    LayerScale, no qkv bias, a position embedding without the prefix tokens, average
    pooling with fc_norm, and the encoders' structures (pre-norm, QuickGELU, SwiGLU, qk-norm,
    attention pooling; timm's Eva: its names, rotary embedding, separate projections, norms
    inside the blocks). Parameter names are timm's (VisionTransformer's or Eva's, `layout`),
    so timm's weights load as they are.

    In training a distilled model returns (cls_logits, dist_logits); in eval their mean,
    unless `return_pair` is set (a student trained in eval mode, as the NViT reference
    prunes and finetunes, still needs both heads for its losses).
    """

    def __init__(self, dims: Dims, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not dims.complete:
            raise ValueError("ReViT needs a dims spec with its frame filled (use Dims.with_frame)")
        self.dims = dims = dims.with_family_defaults()
        E = self.embed_dim = self.num_features = self.head_hidden_size = dims.embed_dim
        self.num_classes = dims.num_classes
        self.distilled = bool(dims.distilled)
        # timm's VisionTransformer attributes of the same names
        self.num_prefix_tokens = dims.num_prefix_tokens
        self.has_class_token = dims.class_token
        self.num_reg_tokens = dims.reg_tokens
        self.no_embed_class = dims.no_embed_class
        self.global_pool = dims.global_pool
        # timm builds a pre-norm (CLIP) model's patch embedding without a bias
        self.patch_embed = PatchEmbed(dims.img_size, dims.patch_size, dims.in_chans, E,
                                      bias=not dims.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E)) if dims.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, E)) if self.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, dims.reg_tokens, E)) if dims.reg_tokens else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, dims.pos_embed_tokens, E))
                          if dims.abs_pos_embed else None)
        self.rope = rotary_table(dims)
        self.pos_drop = nn.Dropout(drop_rate)
        eps = dims.ln_eps
        self.norm_pre = StreamNorm(E, eps=eps) if dims.pre_norm else Skip()
        rates = [drop_path_rate * i / max(dims.depth - 1, 1) for i in range(dims.depth)]
        tokens = dims.num_tokens if dims.token_scale else None
        self.blocks = nn.ModuleList(
            Block(E, **dims.block(i), drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i],
                  num_tokens=tokens, qkv_bias=dims.qkv_bias, layer_scale=dims.layer_scale,
                  ln_eps=eps, mlp_act=dims.mlp_act, qk_norm=dims.qk_norm,
                  eva_names=dims.layout == "eva", mlp_norm=dims.mlp_norm,
                  qkv_fused=dims.qkv_fused, out_norm=dims.attn_norm, k_bias=dims.k_bias,
                  rope_index=dims.rope_index(i), rope_width=dims.rope_dim,
                  rope_half=dims.rope_half, num_prefix_tokens=dims.num_prefix_tokens)
            for i in range(dims.depth))
        self.norm = Skip() if dims.fc_norm else StreamNorm(E, eps=eps)
        self.fc_norm = StreamNorm(E, eps=eps) if dims.fc_norm else None
        self.attn_pool = None
        if dims.global_pool == "map":  # SigLIP's; imported here: it builds on this module
            from .attention_pool import AttentionPool
            self.attn_pool = AttentionPool(E, dims.pool_dim, dims.pool_heads, dims.pool_mlp_dim,
                                           eps, dims.mlp_act)
        self.head = self._classifier(dims.num_classes)
        self.head_dist = self._classifier(dims.num_classes) if self.distilled else None
        self.emb_gate: torch.Tensor | None = None
        self.emb_frame_gate: torch.Tensor | None = None
        self.return_pair = False
        self.return_features = False  # forward gives feature_pair (label-free distillation)
        self.grad_checkpointing = False
        # timm's feature API: every block's output, at the patch grid's stride
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=E, reduction=dims.patch_size)
                             for i in range(dims.depth)]
        self.pretrained_cfg = self.default_cfg = pretrained_cfg(dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation `dims.init` names; also what `--scratch` uses to re-initialise."""
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                trunc_normal_(p, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # timm's
        if self.attn_pool is not None:  # timm's: trunc-normal of std latent_dim^-0.5
            trunc_normal_(self.attn_pool.latent, std=self.attn_pool.latent.shape[-1] ** -0.5)
        heads = {self.head, self.head_dist}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if m in heads or self.dims.init == "trunc_normal":
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                else:
                    m.reset_parameters()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, PatchEmbed):
                m.proj.reset_parameters()
            elif isinstance(m, Attention) and m.token_scale is not None:
                nn.init.ones_(m.token_scale)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init_value)
            elif isinstance(m, Attention) and m.q_bias is not None and m.v_bias is not None:
                nn.init.zeros_(m.q_bias)  # timm's Eva
                nn.init.zeros_(m.v_bias)
            elif isinstance(m, Block) and m.gamma_1 is not None and m.gamma_2 is not None:
                nn.init.constant_(m.gamma_1, m.layer_scale)
                nn.init.constant_(m.gamma_2, m.layer_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token", "reg_token"}

    def _classifier(self, num_classes: int) -> nn.Module:
        """A head: Linear to the classes, or Identity for a backbone (num_classes 0), as timm."""
        return nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, as timm's ViT (layer-wise lr decay)."""
        return dict(stem=r"^cls_token|dist_token|reg_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (timm's API);
        gates and their saliency gradients pass through unchanged."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier head(s) for another label set (used by --finetune on new data);
        0: Identity heads, a backbone. global_pool: 'token' or 'avg' (not for a distilled
        model, which pools its two tokens)."""
        if global_pool is not None and global_pool != self.global_pool:
            if "map" in (global_pool, self.global_pool):  # as timm's reset_classifier
                raise UserError("reset_classifier cannot add or remove an attention pool "
                                "(global_pool 'map')", field="global_pool")
            self.dims.with_frame(global_pool=global_pool).validate()  # raises what is wrong
            self.global_pool = global_pool
        device = self.patch_embed.proj.weight.device
        self.num_classes = num_classes
        self.dims = self.dims.with_frame(num_classes=num_classes, global_pool=self.global_pool)
        self.head = self._classifier(num_classes).to(device)
        if self.distilled:
            self.head_dist = self._classifier(num_classes).to(device)
        for h in (self.head, self.head_dist):
            if isinstance(h, nn.Linear):
                trunc_normal_(h.weight, std=0.02)
                nn.init.zeros_(h.bias)

    # ---------------------------------------------------------------- gates
    def set_gates(self, embs: list | None, blocks: list[dict] | None,
                  frames: list | None = None, model: dict | None = None) -> None:
        """Attach gates (or remove them with `None, None`).

        `embs` holds the one embedding gate (E,) of the residual stream; `blocks[i]` holds
        tensors `head` (H,), `qk` (H, qk_dim), `v` (H, v_dim), `mlp` (M,). Either all block
        gates are set or none; the embedding gate is independent. `frames` (default `embs`)
        holds the embedding gate used where the stream meets the class/distillation tokens,
        the position embedding and the final norm (the classifier columns); the same values,
        detached, leave those weights out of the embedding score. `model` holds the
        model-level kinds' gates: "pool_mlp" (M,) on SigLIP's pool MLP's neurons.
        """
        self.emb_gate = None if embs is None else embs[0]
        self.emb_frame_gate = self.emb_gate if frames is None else frames[0]
        for i, blk in enumerate(self.blocks):
            g = blocks[i] if blocks is not None else {}
            blk.attn.head_gate = g.get("head")
            blk.attn.qk_gate = g.get("qk")
            blk.attn.v_gate = g.get("v")
            blk.mlp.gate = g.get("mlp")
        if self.attn_pool is not None:
            self.attn_pool.mlp.gate = (model or {}).get("pool_mlp")

    def current_gates(self) -> dict:
        """The gates set: {"emb": [per stream] or None, "blocks": [{kind: ...}] or None,
        "model": {kind: ...}}."""
        blocks = [{"head": b.attn.head_gate, "qk": b.attn.qk_gate, "v": b.attn.v_gate,
                   "mlp": b.mlp.gate} for b in self.blocks]
        if all(v is None for g in blocks for v in g.values()):
            blocks = None
        pool = self.attn_pool.mlp.gate if self.attn_pool is not None else None
        return {"emb": None if self.emb_gate is None else [self.emb_gate], "blocks": blocks,
                "model": {} if pool is None else {"pool_mlp": pool}}

    # -------------------------------------------------------------- forward
    def embed_patches(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        if emb is None:
            return self.patch_embed(x)
        return self.gated_patches(x, emb)

    @torch.jit.unused
    def gated_patches(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        pe = self.patch_embed
        weight, bias = scaled(pe.proj.weight, pe.proj.bias, emb)
        x = F.conv2d(x, weight, bias, pe.proj.stride, pe.proj.padding)
        return pe.norm(x.flatten(2).transpose(1, 2))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> the stream the blocks read: prefix tokens, patches, position embedding."""
        x = self.embed_patches(x, self.emb_gate)
        B = x.shape[0]
        tokens: list[torch.Tensor] = []
        if self.cls_token is not None:
            tokens.append(self.framed(self.cls_token).expand(B, -1, -1))
        if self.dist_token is not None:
            tokens.append(self.framed(self.dist_token).expand(B, -1, -1))
        if self.reg_token is not None:
            tokens.append(self.framed(self.reg_token).expand(B, -1, -1))
        if self.pos_embed is None:  # a RoPE ViT: positions only in the rotary embedding
            tokens.append(x)
            x = self.pos_drop(torch.cat(tokens, dim=1))
        elif self.no_embed_class:  # DeiT III, DINOv2 with registers: patches only
            tokens.append(x + self.framed(self.pos_embed))
            x = self.pos_drop(torch.cat(tokens, dim=1))
        else:
            tokens.append(x)
            x = self.pos_drop(torch.cat(tokens, dim=1) + self.framed(self.pos_embed))
        return self.norm_pre(x, self.emb_frame_gate)  # CLIP's; else the identity

    def framed(self, t: torch.Tensor) -> torch.Tensor:
        """A token or the position embedding under the embedding gate's frame values."""
        frame = self.emb_frame_gate
        if frame is None:
            return t
        return t * frame

    def rotary(self) -> torch.Tensor | None:
        """The rotary (sin | cos) table over the patch grid (timm's), or None."""
        if self.rope is None:
            return None
        return self.rope.get_embed()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(x)
        rope = self.rotary()
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = self._run_block(blk, x, self.emb_gate, rope)
        else:
            for blk in self.blocks:
                x = blk(x, self.emb_gate, rope)
        return self.norm(x, self.emb_frame_gate)

    @torch.jit.unused
    def _run_block(self, blk: nn.Module, x: torch.Tensor, emb: torch.Tensor | None,
                   rope: torch.Tensor | None = None):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, emb, rope, use_reentrant=False)
        return blk(x, emb, rope)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's ViT API: the outputs of the blocks `indices` names (int: the last n; None:
        all) as (B, C, H, W) maps of the patch tokens ("NCHW") or (B, L, C) ("NLC"), with the
        class/distillation tokens too if asked; returns (final features, intermediates)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        emb, frame = self.emb_gate, self.emb_frame_gate
        grid = (height // self.dims.patch_size, width // self.dims.patch_size)
        x = self.embed_tokens(x)
        rope = self.rotary()
        n_prefix = self.num_prefix_tokens
        intermediates = []
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, emb, rope)
            if i in take:
                y = self.norm(x, frame) if norm else x
                prefix, patches = y[:, :n_prefix], y[:, n_prefix:]
                if output_fmt == "NCHW":
                    patches = patches.reshape(B, *grid, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return self.norm(x, frame), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's API: drop the blocks after the last of `indices` (and the norm, the heads)."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.dims = self.dims.truncated(max_index + 1)
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = Skip()
            self.fc_norm = None
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.head_dist is None:
            if self.attn_pool is not None:
                x = self.attn_pool(x[:, self.num_prefix_tokens:], self.emb_frame_gate)
            elif self.global_pool == "avg":
                x = x[:, self.num_prefix_tokens:].mean(dim=1)
            else:
                x = x[:, 0]
            if self.fc_norm is not None:
                x = self.fc_norm(x, self.emb_frame_gate)
            return x if pre_logits else self.head(x)
        if pre_logits:  # timm's DeiT: the mean of the class and distillation tokens
            return (x[:, 0] + x[:, 1]) / 2
        cls = self.head(x[:, 0])
        dist = self.head_dist(x[:, 1])
        # TorchScript returns one type: the mean, as timm's scripted DeiT does
        if (self.training or self.return_pair) and not torch.jit.is_scripting():
            return cls, dist
        return (cls + dist) / 2

    @torch.jit.unused
    def feature_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled pre-logits features, patch tokens (B, N, E)) of forward_features' output:
        what a label-free distillation compares with the full model's."""
        return self.forward_head(x, pre_logits=True), x[:, self.num_prefix_tokens:]

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        if self.return_features and not torch.jit.is_scripting():
            return self.feature_pair(x)
        return self.forward_head(x)
