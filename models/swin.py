"""ReSwin: timm's Swin Transformer (v1) and Swin Transformer V2 with per-block dims.

Parameter names, module layout and the operations of the forward pass are timm's
(`timm.models.swin_transformer`, `swin_transformer_v2`: the default, unfused attention), so
timm's weights load as they are and the logits agree bitwise in fp32. Each block may have
its own heads, QK width per head, V width per head and MLP width, and each stage its own
embedding width (`SwinDims`); Q, K and V are one projection with rows Q | K | V, head-major,
as in ReViT.

Pruning gates act as in ReViT (models/revit.py): one embedding gate per stage's residual
stream, per block head, QK, V and MLP gates, each scaling the rows of the weights that
produce its unit, and LayerNorms of a stream taking their statistics over its live channels
(v1's patch-merging norm over the previous stage's four concatenated copies). v2's cosine
attention normalises q and k over their QK dims, so there the QK gate scales K's rows as well
as Q's: a removed dim is then absent from both norms, as in the compact block.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, ndgrid, trunc_normal_
from timm.models._features import feature_take_indices

from .revit import Mlp, Skip, StreamNorm, scaled
from .swin_dims import CPB_HIDDEN, LN_EPS, SwinDims


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, w, w, C), as timm."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w, w, C)


def window_reverse(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """(B * windows, w, w, C) -> (B, H, W, C), as timm."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def relative_position_index(w: int) -> torch.Tensor:
    """Pair-wise relative position of the tokens of a w x w window, as an index into a
    (2w - 1)^2 table (timm's)."""
    coords = torch.stack(ndgrid(torch.arange(w), torch.arange(w))).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def relative_coords_table(w: int, pretrained: int) -> torch.Tensor:
    """v2's log-spaced relative coordinates (1, 2w - 1, 2w - 1, 2), as timm."""
    h = torch.arange(-(w - 1), w, dtype=torch.float32)
    table = torch.stack(ndgrid(h, h)).permute(1, 2, 0).contiguous().unsqueeze(0)
    table /= max((pretrained if pretrained > 0 else w) - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


def shift_mask(grid: int, w: int, shift: int) -> torch.Tensor | None:
    """(windows, w*w, w*w) additive mask of a shifted block: -100 between tokens that the
    cyclic shift brought together from non-adjacent regions (timm's)."""
    if not shift:
        return None
    img = torch.zeros(1, grid, grid, 1)
    cnt = 0
    for h in ((0, -w), (-w, -shift), (-shift, None)):
        for v in ((0, -w), (-w, -shift), (-shift, None)):
            img[:, h[0]:h[1], v[0]:v[1], :] = cnt
            cnt += 1
    windows = window_partition(img, w).view(-1, w * w)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


class WindowAttention(nn.Module):
    """Multi-head attention within windows, with separate QK and V widths: v1's relative
    position bias table and scaled dot product, or v2's cosine attention with a learnable
    per-head logit scale and the continuous position bias MLP."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, attn_scale: float,
                 window: int, version: int, qkv_bias: bool, pretrained_window: int = 0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.version, self.window = version, window
        self.scale = attn_scale  # v1; kept when QK width is pruned: part of the function
        H = num_heads
        if version == 1:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, H))
            self.qkv = nn.Linear(dim, H * (2 * qk_dim + v_dim), bias=qkv_bias)
        else:
            self.logit_scale = nn.Parameter(torch.full((H, 1, 1), math.log(10)))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN, bias=True), nn.ReLU(inplace=True),
                                         nn.Linear(CPB_HIDDEN, H, bias=False))
            self.qkv = nn.Linear(dim, H * (2 * qk_dim + v_dim), bias=False)
            if qkv_bias:  # timm's names; a marker attribute tells TorchScript they exist
                self.q_bias = nn.Parameter(torch.zeros(H * qk_dim))
                self.register_buffer("k_bias", torch.zeros(H * qk_dim), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(H * v_dim))
                self.q_bias_v2 = True
            self.register_buffer("relative_coords_table",
                                 relative_coords_table(window, pretrained_window), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window),
                             persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(H * v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.head_gate: torch.Tensor | None = None  # (H,)
        self.qk_gate: torch.Tensor | None = None  # (H, qk_dim)
        self.v_gate: torch.Tensor | None = None  # (H, v_dim)

    @property
    def qkv_split(self) -> list[int]:
        H = self.num_heads
        return [H * self.qk_dim, H * self.qk_dim, H * self.v_dim]

    def qkv_gate_rows(self) -> torch.Tensor:
        """Per row of `qkv`: head x QK gate on Q, the head gate on K (v2: head x QK gate),
        head x V gate on V."""
        head = self.head_gate[:, None]
        k = head * self.qk_gate if self.version == 2 else head.expand(-1, self.qk_dim)
        return torch.cat([(head * self.qk_gate).flatten(), k.flatten(),
                          (head * self.v_gate).flatten()])

    def _qkv_bias(self) -> torch.Tensor | None:
        if hasattr(self, "q_bias_v2"):  # v2 with biases: q | zero k | v, as timm
            return torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.qkv.bias

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_gate is None:
            return F.linear(x, self.qkv.weight, self._qkv_bias())
        return self._gated_qkv(x)

    @torch.jit.unused
    def _gated_qkv(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = scaled(self.qkv.weight, self._qkv_bias(), self.qkv_gate_rows())
        return F.linear(x, weight, bias)

    def _bias(self) -> torch.Tensor:
        """(H, N, N) relative position bias."""
        N = self.window * self.window
        if hasattr(self, "relative_position_bias_table"):  # v1
            table = self.relative_position_bias_table
            bias = table[self.relative_position_index.view(-1)].view(N, N, -1)
            return bias.permute(2, 0, 1).contiguous()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "logit_scale"):  # v2: cosine attention, learnable per-head scale
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            return attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        return (q * self.scale) @ k.transpose(-2, -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                emb: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        H = self.num_heads
        q, k, v = self._qkv(x).split(self.qkv_split, dim=-1)
        q = q.view(B_, N, H, self.qk_dim).transpose(1, 2)
        k = k.view(B_, N, H, self.qk_dim).transpose(1, 2)
        v = v.view(B_, N, H, self.v_dim).transpose(1, 2)
        attn = self._logits(q, k) + self._bias().unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, H, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, H * self.v_dim)
        if emb is None:
            return self.proj_drop(self.proj(x))
        return self.proj_drop(self._gated_proj(x, emb))

    @torch.jit.unused
    def _gated_proj(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        weight, bias = scaled(self.proj.weight, self.proj.bias, emb)
        return F.linear(x, weight, bias)


class SwinBlock(nn.Module):
    """A Swin block over a (B, H, W, C) grid: attention within (every second block: shifted)
    windows, then the MLP; v1 normalises each branch's input (pre-norm), v2 its output
    (res-post-norm)."""

    def __init__(self, dim: int, grid: int, window: int, shift: int, version: int,
                 num_heads: int, qk_dim: int, v_dim: int, mlp_dim: int, attn_scale: float,
                 qkv_bias: bool, pretrained_window: int = 0, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.grid, self.window, self.shift, self.version = grid, window, shift, version
        self.norm1 = StreamNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, num_heads, qk_dim, v_dim, attn_scale, window, version,
                                    qkv_bias, pretrained_window, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = StreamNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim, proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        padded = -(-grid // window) * window
        self.register_buffer("attn_mask", shift_mask(padded, window, shift), persistent=False)

    def _attn(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        C = x.shape[-1]
        w, s, g = self.window, self.shift, self.grid  # static: the input grid is the model's
        pad = (w - g % w) % w
        shifted = torch.roll(x, shifts=(-s, -s), dims=(1, 2)) if s else x
        if pad:  # timm pads always; a zero pad is a copy of the same values
            shifted = F.pad(shifted, (0, 0, 0, pad, 0, pad))
        windows = window_partition(shifted, w).view(-1, w * w, C)
        out = self.attn(windows, self.attn_mask, emb)
        out = window_reverse(out.view(-1, w, w, C), w, g + pad, g + pad)
        if pad:
            out = out[:, :g, :g, :].contiguous()
        return torch.roll(out, shifts=(s, s), dims=(1, 2)) if s else out

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.version == 1:
            x = x + self.drop_path1(self._attn(self.norm1(x, emb), emb))
            x = x.reshape(B, -1, C)
            x = x + self.drop_path2(self.mlp(self.norm2(x, emb), emb))
        else:
            x = x + self.drop_path1(self.norm1(self._attn(x, emb), emb))
            x = x.reshape(B, -1, C)
            x = x + self.drop_path2(self.norm2(self.mlp(x, emb), emb))
        return x.reshape(B, H, W, C)


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C, timm's order: the four copies of the previous
    stream one after another) and projected to the stage's width; v1 normalises the 4C
    input, v2 the projected output."""

    def __init__(self, dim: int, out_dim: int, version: int, grid: int) -> None:
        super().__init__()
        self.version, self.grid = version, grid  # the input's token grid
        if version == 1:
            self.norm = StreamNorm(4 * dim, eps=LN_EPS)
            self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        else:
            self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
            self.norm = StreamNorm(out_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, emb_in: torch.Tensor | None = None,
                emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, g = x.shape[0], x.shape[-1], self.grid
        if g % 2:
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
            g += 1
        x = x.reshape(B, g // 2, 2, g // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        if self.version == 1:
            x = self.norm(x, emb_in, repeats=4)
        x = self._reduce(x, emb)
        return self.norm(x, emb) if self.version == 2 else x

    def _reduce(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        if emb is None:
            return self.reduction(x)
        return self._gated_reduce(x, emb)

    @torch.jit.unused
    def _gated_reduce(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(x, scaled(self.reduction.weight, None, emb)[0])


class SwinStage(nn.Module):
    """A stage without gates: its patch merging (none in stage 0), then its blocks."""

    def __init__(self, downsample: nn.Module, blocks: list[SwinBlock], index: int) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class SwinPatchEmbed(nn.Module):
    """timm's PatchEmbed of a Swin: convolution, NHWC, LayerNorm; gated like a stream."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size,) * 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = StreamNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if emb is None:
            x = self.proj(x)
        else:
            x = self._gated_conv(x, emb)
        return self.norm(x.permute(0, 2, 3, 1), emb)

    @torch.jit.unused
    def _gated_conv(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        weight, bias = scaled(self.proj.weight, self.proj.bias, emb)
        return F.conv2d(x, weight, bias, self.proj.stride, self.proj.padding)


def pretrained_cfg(dims: SwinDims) -> dict:
    """timm's pretrained_cfg of a Swin with these dims: input, ImageNet preprocessing as
    timm's Swins (crop 0.9, bicubic), classifier name; no weights URL."""
    from timm.models import PretrainedCfg
    g = dims.grid(dims.num_stages - 1)
    return PretrainedCfg(
        input_size=(dims.in_chans, dims.img_size, dims.img_size), fixed_input_size=True,
        pool_size=(g, g), crop_pct=0.9, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), num_classes=dims.num_classes, first_conv="patch_embed.proj",
        classifier="head.fc").to_dict()


class ReSwin(nn.Module):
    """A Swin (v1 or v2, `dims.version`) with per-block dims and per-stage widths; timm's
    parameter names and forward. drop_rate: the classifier's dropout (timm's drop_rate),
    proj_drop_rate: the attention output's and the MLP's."""

    def __init__(self, dims: SwinDims, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        if not dims.complete:
            raise ValueError("ReSwin needs a dims spec with its frame filled")
        self.dims = d = dims
        self.num_classes = d.num_classes
        self.global_pool = d.global_pool
        self.output_fmt = "NHWC"
        self.embed_dim = d.embed_dim[0]
        self.num_features = self.head_hidden_size = d.embed_dim[-1]
        self.patch_embed = SwinPatchEmbed(d.img_size, d.patch_size, d.in_chans, d.embed_dim[0])
        rates = calculate_drop_path_rates(drop_path_rate, d.depths, stagewise=True)
        stages, self.feature_info, scale = [], [], 1
        for s in range(d.num_stages):
            window, shift = d.window(s)
            blocks = [SwinBlock(d.embed_dim[s], d.grid(s), window, shift if j % 2 else 0,
                                d.version, **d.block(i), qkv_bias=d.qkv_bias,
                                pretrained_window=d.pretrained_window_size[s],
                                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                                drop_path=rates[s][j])
                      for j, i in enumerate(d.stage_blocks(s))]
            down = (PatchMerging(d.embed_dim[s - 1], d.embed_dim[s], d.version, d.grid(s - 1))
                    if s else nn.Identity())
            stages.append(SwinStage(down, blocks, s))
            if s > 0:
                scale *= 2
            self.feature_info.append(dict(num_chs=d.embed_dim[s], reduction=d.patch_size * scale,
                                          module=f"layers.{s}"))
        self.layers = nn.ModuleList(stages)
        self.norm = StreamNorm(d.embed_dim[-1], eps=LN_EPS)
        self.head = ClassifierHead(self.num_features, d.num_classes, pool_type=d.global_pool,
                                   drop_rate=drop_rate, input_fmt=self.output_fmt)
        self.emb_gates: list | None = None
        self.emb_frame_gates: list | None = None
        self.return_pair = False  # what a pruning loop sets on a distilled ViT; a Swin has one head
        self.return_features = False  # forward gives feature_pair (label-free distillation)
        self.pretrained_cfg = self.default_cfg = pretrained_cfg(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: every Linear trunc-normal(0.02) with zero bias, v1's bias
        tables trunc-normal(0.02), v2's logit scales log(10), zero q/v biases and (res-post-norm)
        zero block norms; the patch convolution keeps PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                if m.version == 1:
                    trunc_normal_(m.relative_position_bias_table, std=0.02)
                else:
                    nn.init.constant_(m.logit_scale, math.log(10))
                    if hasattr(m, "q_bias_v2"):
                        nn.init.zeros_(m.q_bias)
                        nn.init.zeros_(m.v_bias)
        self.patch_embed.proj.reset_parameters()
        if self.dims.version == 2:
            for stage in self.layers:
                for blk in stage.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    # ------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        words = ("relative_position_bias_table",) if self.dims.version == 1 else ("cpb_mlp", "logit_scale")
        return {n for n, _ in self.named_parameters() if any(w in n for w in words)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+).downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None),
            (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for another label set (0: none, a backbone), as timm."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        self.head.to(self.norm.weight.device)
        if isinstance(self.head.fc, nn.Linear):
            trunc_normal_(self.head.fc.weight, std=0.02)
            nn.init.zeros_(self.head.fc.bias)
        if global_pool is not None:
            self.global_pool = global_pool
        self.dims = replace(self.dims, num_classes=num_classes, global_pool=self.global_pool)

    # ---------------------------------------------------------------- gates
    def set_gates(self, embs: list | None, blocks: list[dict] | None,
                  frames: list | None = None, model: dict | None = None) -> None:
        """Attach gates (or remove them with `None, None`): `embs[s]` (C_s,) per stage,
        `blocks[i]` the head, qk, v and mlp gates of block i (all stages in order);
        `frames[s]` (default `embs[s]`) is what the final norm sees; `model`: a Swin has no
        model-level kinds."""
        if model:
            raise ValueError(f"a Swin has no model-level unit kinds, got {sorted(model)}")
        self.emb_gates = embs
        self.emb_frame_gates = embs if frames is None else frames
        blks = [b for stage in self.layers for b in stage.blocks]
        for i, blk in enumerate(blks):
            g = blocks[i] if blocks is not None else {}
            blk.attn.head_gate = g.get("head")
            blk.attn.qk_gate = g.get("qk")
            blk.attn.v_gate = g.get("v")
            blk.mlp.gate = g.get("mlp")

    def current_gates(self) -> dict:
        """The gates set: {"emb": [per stream] or None, "blocks": [{kind: ...}] or None}."""
        blocks = [{"head": b.attn.head_gate, "qk": b.attn.qk_gate, "v": b.attn.v_gate,
                   "mlp": b.mlp.gate} for stage in self.layers for b in stage.blocks]
        if all(v is None for g in blocks for v in g.values()):
            blocks = None
        return {"emb": self.emb_gates, "blocks": blocks}

    @torch.jit.unused
    def _gate(self, s: int) -> torch.Tensor | None:
        return None if self.emb_gates is None else self.emb_gates[s]

    # -------------------------------------------------------------- forward
    @torch.jit.unused
    def _stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Stage s as forward_features runs it (forward_intermediates' one stage at a time)."""
        stage = self.layers[s]
        if self.emb_gates is None and not stage.grad_checkpointing:
            return stage(x)
        return self._gated_stage(s, x)

    @torch.jit.unused
    def _gated_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """A stage with gates (or gradient checkpointing): kept out of TorchScript and FX."""
        stage = self.layers[s]
        if s:
            x = stage.downsample(x, self._gate(s - 1), self._gate(s))
        emb = self._gate(s)
        for blk in stage.blocks:
            if stage.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, emb, use_reentrant=False)
            else:
                x = blk(x, emb)
        return x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.emb_frame_gates is None:
            return self.norm(x)
        return self._gated_final_norm(x)

    @torch.jit.unused
    def _gated_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.emb_frame_gates[-1])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.emb_gates is None:
            return self.patch_embed(x)
        return self.patch_embed(x, self._gate(0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for stage in self.layers:  # as _stage, which TorchScript cannot index by a variable
            if self.emb_gates is None and not stage.grad_checkpointing:
                x = stage(x)
            else:
                x = self._gated_stage(stage.index, x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    @torch.jit.unused
    def feature_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled pre-logits features, the last stage's tokens (B, N, C)), as ReViT's."""
        return self.forward_head(x, pre_logits=True), x.flatten(1, 2)

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        if self.return_features and not torch.jit.is_scripting():
            return self.feature_pair(x)
        return self.forward_head(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's Swin API: the outputs of the stages `indices` names as (B, C, H, W) maps;
        returns (final features, intermediates)."""
        if output_fmt != "NCHW":
            raise ValueError("output_fmt must be NCHW")
        take, max_index = feature_take_indices(len(self.layers), indices)
        x = self._embed(x)
        last = len(self.layers) - 1
        stages = range(max_index + 1) if stop_early else range(len(self.layers))
        intermediates, i = [], 0
        for i in stages:
            x = self._stage(i, x)
            if i in take:
                y = self._final_norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        return (self._final_norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[:max_index + 1]
        self.dims = self.dims.truncated(max_index + 1)
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = Skip()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type="", input_fmt=self.output_fmt)
            self.num_classes = 0
        return take
