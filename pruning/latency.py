"""Measuring latency tables (the model's own sublayers timed over a grid of widths) and the
speedup a compact model delivers against what its MACs and a table promised.

The attention sublayer (LayerNorm, q/k/v projection, SDPA, output projection, residual add)
and the MLP sublayer (LayerNorm, fc1, GELU, fc2, residual add) are the modules ReViT runs;
the stem is ReViT itself without blocks. Times are medians of repeated eval forwards under
torch.inference_mode after warm-up. tools/build_latency_table.py is the command line.
"""
from __future__ import annotations

import datetime
import math
import platform
import statistics
import time
import weakref
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn

from models.dims import Dims
from models.flops import count_macs
from models.revit import LN_EPS, Attention, Mlp, ReViT, StreamNorm
from tf32 import tf32_matmul_enabled

from .cost import LatencyTable, precision_name
from .runtimes import ONNX_RUNTIMES, check_runtime, describe, prepare


class Sublayer(nn.Module):
    """x + body(norm(x)): one sublayer of a block as the model runs it; `rope`: the rotary
    table an attention body rotates its patch tokens' q and k by."""

    def __init__(self, embed_dim: int, body: nn.Module, rope: torch.Tensor | None = None) -> None:
        super().__init__()
        self.norm = StreamNorm(embed_dim, eps=LN_EPS)
        self.body = body
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rope is None:
            return x + self.body(self.norm(x))
        return x + self.body(self.norm(x), None, self.rope)


def stem_of(dims: Dims, embed_dim: int) -> nn.Module:
    """What ReViT runs outside its blocks (patch embedding, tokens, position embedding, final
    norm, head(s)) at one embedding width: the model itself with its blocks removed."""
    one = replace(dims, embed_dim=embed_dim, depth=1, num_heads=[1], v_dim=[1], mlp_dim=[1],
                  qk_dim=[dims.family("rope_dim") or 1], rope_dims=None, attn_scale=[1.0])
    model = ReViT(one)
    model.blocks = nn.ModuleList()
    return model


class Timer:
    """Median milliseconds of one eval forward of a module, run in `runtime`
    (pruning/runtimes.py: torch, torch-compile, onnxruntime, tensorrt; `int8` for the
    CPU's int8 paths).

    Each forward is timed with the wall clock, except torch on CUDA: there the host only
    queues kernels, so a sample is CUDA events around `CUDA_FORWARDS_PER_SAMPLE` forwards
    queued back to back, divided by their number: the GPU's time, not the launch overhead a
    synchronise per forward would add (ONNX Runtime's run returns when the output is ready).
    A module is prepared for the runtime once (compiled, exported) and reused.
    """

    CUDA_FORWARDS_PER_SAMPLE = 10

    def __init__(self, device: torch.device, warmup: int, repeats: int,
                 amp_dtype: torch.dtype | None, runtime: str = "torch",
                 int8: bool = False) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.amp_dtype, self.runtime, self.int8 = amp_dtype, runtime, int8
        self.cuda = device.type == "cuda" and runtime not in ONNX_RUNTIMES
        check_runtime(runtime, device, amp_dtype, int8)
        self._prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def method(self) -> str:
        if self.cuda:
            return f"CUDA events around {self.CUDA_FORWARDS_PER_SAMPLE} queued forwards per sample"
        return "wall clock per forward"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        run = self._prepared.get(module)
        if run is None:
            run = prepare(module, self.runtime, self.device, self.amp_dtype, x, self.int8)
            self._prepared[module] = run
        # CUDA events record on the current device's stream: make it the timed GPU's
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        times = []
        with on_device:
            for _ in range(self.warmup):  # also lets cudnn.benchmark settle on its algorithm
                run(x)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            for _ in range(self.repeats):
                times.append(self._cuda_sample(run, x) if self.cuda else self._wall_sample(run, x))
        return statistics.median(times)

    @staticmethod
    def _wall_sample(run, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        run(x)
        return (time.perf_counter() - t0) * 1000.0

    def _cuda_sample(self, run, x: torch.Tensor) -> float:
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(self.CUDA_FORWARDS_PER_SAMPLE):
            run(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.CUDA_FORWARDS_PER_SAMPLE


def table_meta(timer: Timer, device: torch.device, batch_size: int, amp_dtype,
               runtime: str, warmup: int, repeats: int) -> dict:
    """What every latency table records about where and how it was timed."""
    return {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size, "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "dtype": precision_name(timer.amp_dtype),
        "amp": amp_dtype is not None,
        "tf32": tf32_matmul_enabled() if device.type == "cuda" and amp_dtype is None else None,
        "timing": timer.method, **describe(runtime, device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warmup": warmup, "repeats": repeats, "statistic": "median"}


def measure_table(grid: dict[str, list[int]], device: torch.device, batch_size: int,
                  num_tokens: int, warmup: int = 5, repeats: int = 20,
                  amp_dtype: torch.dtype | None = None, model_dims: Dims | None = None,
                  model: str | None = None, token_scale: bool = False,
                  runtime: str = "torch") -> dict:
    """A latency table (pruning.cost.LatencyTable's JSON) timed on `device` in `runtime`: per
    embed width, every (heads, QK, V) attention sublayer and MLP sublayer of the grid, and
    with `model_dims` the model's stem (ReViT itself with its blocks taken out).
    `token_scale`: the attention multiplies q, k and v by a per-token scale, as a model with
    one does (an nvit_prune.py student by default)."""
    timer = Timer(device, warmup, repeats, amp_dtype, runtime)
    B, N = batch_size, num_tokens
    Es, Hs, Qs, Vs, Ms = (grid[k] for k in ("embed_dims", "heads", "qk_dims", "v_dims",
                                              "mlp_dims"))
    attention, mlp, stem = [], [], []
    act = model_dims.family("mlp_act") if model_dims is not None else "gelu"
    qk_norm = bool(model_dims is not None and model_dims.family("qk_norm"))
    rotary = bool(model_dims is not None and model_dims.family("rope_dim"))
    mlp_norm = bool(model_dims is not None and model_dims.family("mlp_norm"))
    attn_norm = bool(model_dims is not None and model_dims.family("attn_norm"))
    fused = model_dims is None or model_dims.family("qkv_fused")
    k_bias = model_dims is None or model_dims.family("k_bias")
    prefix = model_dims.num_prefix_tokens if rotary else 0

    def attention_at(E: int, h: int, q: int, v: int) -> nn.Module:
        """The sublayer as the model runs it (a rotary model rotates q and k: a table of
        the sublayer's own QK width, its values irrelevant to the time)."""
        tokens = N if token_scale else None
        body = Attention(E, h, q, v, 1.0 / math.sqrt(q), num_tokens=tokens, qk_norm=qk_norm,
                         k_bias=k_bias, rope_width=q if rotary else 0,
                         rope_half=rotary and model_dims.family("rope_half"),
                         num_prefix_tokens=prefix, qkv_fused=fused, out_norm=attn_norm)
        rope = torch.randn(N - prefix, 2 * q, device=device) if rotary else None
        return Sublayer(E, body, rope)

    for E in Es:
        t0 = time.perf_counter()
        x = torch.randn(B, N, E, device=device)
        attention.append([[[timer(attention_at(E, h, q, v), x)
                            for v in Vs] for q in Qs] for h in Hs])
        mlp.append([timer(Sublayer(E, Mlp(E, m, act=act, norm=mlp_norm)), x) for m in Ms])
        if model_dims is not None:
            img = torch.randn(B, model_dims.in_chans, model_dims.img_size, model_dims.img_size,
                              device=device)
            stem.append(timer(stem_of(model_dims, E), img))
        print(f"  embed {E}: {len(Hs) * len(Qs) * len(Vs)} attention + {len(Ms)} MLP points "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    meta = {
        **table_meta(timer, device, B, amp_dtype, runtime, warmup, repeats), "num_tokens": N,
        "model": model, "token_scale": bool(token_scale),
        "timed": {"attention": "LayerNorm + Attention (q, k, v, token scale if set, "
                               + ("qk-norm, " if qk_norm else "")
                               + ("rotary embedding, " if rotary else "")
                               + "SDPA, " + ("norm, " if attn_norm else "")
                               + "proj) + residual add",
                  "mlp": f"LayerNorm + Mlp (fc1, {act}, " + ("norm, " if mlp_norm else "")
                         + "fc2) + residual add",
                  "stem": "patch embedding, tokens + pos_embed (+ norm_pre), final LayerNorm, "
                          "head(s)"},
    }
    return LatencyTable.make_dict(
        meta, {"embed_dim": Es, "num_heads": Hs, "qk_dim": Qs, "v_dim": Vs}, attention,
        {"embed_dim": Es, "mlp_dim": Ms}, mlp,
        {"embed_dim": Es} if stem else None, stem or None)


SHORT_OF_MACS = 0.8  # warn below this fraction of the speedup the MACs ratio promises


def speed_report(dense: ReViT, compact: ReViT, device: torch.device, batch: int,
                 amp_dtype, pairs: int, repeats: int, table: LatencyTable | None = None,
                 runtime: str = "torch", int8: bool = False) -> dict:
    """Measured and promised speedups of `compact` over `dense` (see the module docstring),
    both run in `runtime`. With `int8`, each round also times the compact model in int8
    (`int8_ms`, `int8_speedup` over the dense model in full precision): what an int8
    deployment gains."""
    macs_ratio = count_macs(compact)[0] / count_macs(dense)[0]
    d = dense.dims
    x = torch.randn(batch, d.in_chans, d.img_size, d.img_size, device=device)
    timer = Timer(device, warmup=2, repeats=repeats, amp_dtype=amp_dtype, runtime=runtime)
    runs = {"dense": (timer, dense), "compact": (timer, compact)}
    if int8:
        runs["int8"] = (Timer(device, warmup=2, repeats=repeats, amp_dtype=amp_dtype,
                              runtime=runtime, int8=True), compact)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(pairs):  # interleaved rounds: drift and heat hit every model alike
        for k, (t, module) in runs.items():
            times[k].append(t(module, x))
    report = {"device": str(device), "batch_size": batch, "precision": precision_name(amp_dtype),
              "timing": timer.method, "pairs": pairs, **describe(runtime, device),
              "macs_ratio": macs_ratio, "macs_speedup": 1 / macs_ratio}
    for k in runs:
        report[f"{k}_ms"] = statistics.median(times[k])
    for k, key in (("compact", "speedup"), ("int8", "int8_speedup")):
        if k in runs:
            ratios = sorted(a / b for a, b in zip(times["dense"], times[k]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            report.update({key: statistics.median(ratios), f"{key}_p25": q[0],
                           f"{key}_p75": q[2]})
    if table is not None:
        report["table_speedup"] = float(table.total(dense.dims) / table.total(compact.dims))
    return report


def report_lines(r: dict) -> list[str]:
    """A speed report as printed: times, measured against promised speedups, and a warning
    when the compact model falls well short of its MACs ratio."""
    int8 = f", compact int8 {r['int8_ms']:.3f} ms" if "int8_ms" in r else ""
    lines = [f"dense {r['dense_ms']:.3f} ms, compact {r['compact_ms']:.3f} ms{int8} per batch "
             f"of {r['batch_size']} on {r['device']} in {r.get('runtime', 'torch')} "
             f"({r['precision']}, {r['pairs']} pairs)",
             f"measured speedup {r['speedup']:.2f}x (p25-p75 {r['speedup_p25']:.2f}-"
             f"{r['speedup_p75']:.2f})  promised by MACs {r['macs_speedup']:.2f}x (ratio "
             f"{r['macs_ratio']:.4f})" + (f"  by the latency table {r['table_speedup']:.2f}x"
                                          if "table_speedup" in r else "")]
    if r["speedup"] < SHORT_OF_MACS * r["macs_speedup"]:
        lines.append(f"warning: the compact model runs {r['speedup']:.2f}x faster where its MACs "
                     f"promise {r['macs_speedup']:.2f}x: at this size and batch, fixed costs "
                     f"(small matrix products, kernel launches, LayerNorm, copies) dominate; a "
                     f"latency table built here ranks by what this device does")
    if "int8_speedup" in r:
        lines.append(f"compact int8 speedup over dense {r['int8_speedup']:.2f}x (p25-p75 "
                     f"{r['int8_speedup_p25']:.2f}-{r['int8_speedup_p75']:.2f})")
    top1 = r.get("top1")
    if top1:
        dense = ("dense -" if top1.get("dense") is None else f"dense {top1['dense']:.2f}"
                 + (" (recorded when pruned)" if top1.get("dense_recorded") else ""))
        int8 = f", compact int8 {top1['int8']:.2f}" if "int8" in top1 else ""
        lines.append(f"top-1 on {top1['data_set']} ({top1['images']} val images, %): {dense}, "
                     f"compact {top1['compact']:.2f}{int8}")
    return lines
