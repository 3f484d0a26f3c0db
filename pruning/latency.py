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
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn

from models.dims import Dims
from models.flops import count_macs
from models.revit import LN_EPS, Attention, Mlp, ReViT, StreamNorm
from tf32 import tf32_matmul_enabled

from .cost import LatencyTable, precision_name


class Sublayer(nn.Module):
    """x + body(norm(x)): one sublayer of a block as the model runs it."""

    def __init__(self, embed_dim: int, body: nn.Module) -> None:
        super().__init__()
        self.norm = StreamNorm(embed_dim, eps=LN_EPS)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(self.norm(x))


def stem_of(dims: Dims, embed_dim: int) -> nn.Module:
    """What ReViT runs outside its blocks (patch embedding, tokens, position embedding, final
    norm, head(s)) at one embedding width: the model itself with its blocks removed."""
    one = replace(dims, embed_dim=embed_dim, depth=1, num_heads=[1], qk_dim=[1], v_dim=[1],
                  mlp_dim=[1], attn_scale=[1.0])
    model = ReViT(one)
    model.blocks = nn.ModuleList()
    return model


class Timer:
    """Median milliseconds of one eval forward of a module.

    On the CPU each forward is timed with the wall clock. On CUDA the host only queues
    kernels, so a sample is CUDA events around `CUDA_FORWARDS_PER_SAMPLE` forwards queued
    back to back, divided by their number: the GPU's time, not the launch overhead a
    synchronise per forward would add.
    """

    CUDA_FORWARDS_PER_SAMPLE = 10

    def __init__(self, device: torch.device, warmup: int, repeats: int,
                 amp_dtype: torch.dtype | None) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cuda = device.type == "cuda"
        self.amp_dtype = amp_dtype

    @property
    def method(self) -> str:
        if self.cuda:
            return f"CUDA events around {self.CUDA_FORWARDS_PER_SAMPLE} queued forwards per sample"
        return "wall clock per forward"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        module = module.to(self.device).eval()
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else nullcontext())
        # CUDA events record on the current device's stream: make it the timed GPU's
        on_device = torch.cuda.device(self.device) if self.cuda else nullcontext()
        times = []
        with torch.inference_mode(), autocast, on_device:
            for _ in range(self.warmup):  # also lets cudnn.benchmark settle on its algorithm
                module(x)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            for _ in range(self.repeats):
                times.append(self._cuda_sample(module, x) if self.cuda
                             else self._cpu_sample(module, x))
        return statistics.median(times)

    @staticmethod
    def _cpu_sample(module: nn.Module, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        module(x)
        return (time.perf_counter() - t0) * 1000.0

    def _cuda_sample(self, module: nn.Module, x: torch.Tensor) -> float:
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(self.CUDA_FORWARDS_PER_SAMPLE):
            module(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.CUDA_FORWARDS_PER_SAMPLE


def measure_table(grid: dict[str, list[int]], device: torch.device, batch_size: int,
                  num_tokens: int, warmup: int = 5, repeats: int = 20,
                  amp_dtype: torch.dtype | None = None, model_dims: Dims | None = None,
                  model: str | None = None, token_scale: bool = False) -> dict:
    """A latency table (pruning.cost.LatencyTable's JSON) timed on `device`: per embed width,
    every (heads, QK, V) attention sublayer and MLP sublayer of the grid, and with
    `model_dims` the model's stem (ReViT itself with its blocks taken out). `token_scale`:
    the attention multiplies q, k and v by a per-token scale, as a model with one does (an
    nvit_prune.py student by default)."""
    timer = Timer(device, warmup, repeats, amp_dtype)
    B, N = batch_size, num_tokens
    Es, Hs, Qs, Vs, Ms = (grid[k] for k in ("embed_dims", "heads", "qk_dims", "v_dims",
                                              "mlp_dims"))
    attention, mlp, stem = [], [], []
    for E in Es:
        t0 = time.perf_counter()
        x = torch.randn(B, N, E, device=device)
        tokens = N if token_scale else None
        attention.append([[[timer(Sublayer(E, Attention(E, h, q, v, 1.0 / math.sqrt(q),
                                                        num_tokens=tokens)), x)
                            for v in Vs] for q in Qs] for h in Hs])
        mlp.append([timer(Sublayer(E, Mlp(E, m)), x) for m in Ms])
        if model_dims is not None:
            img = torch.randn(B, model_dims.in_chans, model_dims.img_size, model_dims.img_size,
                              device=device)
            stem.append(timer(stem_of(model_dims, E), img))
        print(f"  embed {E}: {len(Hs) * len(Qs) * len(Vs)} attention + {len(Ms)} MLP points "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    meta = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "batch_size": B, "num_tokens": N, "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "dtype": precision_name(timer.amp_dtype),
        "amp": amp_dtype is not None,
        "tf32": tf32_matmul_enabled() if device.type == "cuda" and amp_dtype is None else None,
        "timing": timer.method,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warmup": warmup, "repeats": repeats, "statistic": "median",
        "model": model, "token_scale": bool(token_scale),
        "timed": {"attention": "LayerNorm + Attention (q, k, v, token scale if set, SDPA, "
                               "proj) + residual add",
                  "mlp": "LayerNorm + Mlp (fc1, GELU, fc2) + residual add",
                  "stem": "patch embedding, tokens + pos_embed, final LayerNorm, head(s)"},
    }
    return LatencyTable.make_dict(
        meta, {"embed_dim": Es, "num_heads": Hs, "qk_dim": Qs, "v_dim": Vs}, attention,
        {"embed_dim": Es, "mlp_dim": Ms}, mlp,
        {"embed_dim": Es} if stem else None, stem or None)


SHORT_OF_MACS = 0.8  # warn below this fraction of the speedup the MACs ratio promises


def speed_report(dense: ReViT, compact: ReViT, device: torch.device, batch: int,
                 amp_dtype, pairs: int, repeats: int, table: LatencyTable | None = None) -> dict:
    """Measured and promised speedups of `compact` over `dense` (see the module docstring)."""
    macs_ratio = count_macs(compact)[0] / count_macs(dense)[0]
    d = dense.dims
    x = torch.randn(batch, d.in_chans, d.img_size, d.img_size, device=device)
    timer = Timer(device, warmup=2, repeats=repeats, amp_dtype=amp_dtype)
    times = {"dense": [], "compact": []}
    for _ in range(pairs):
        times["dense"].append(timer(dense, x))
        times["compact"].append(timer(compact, x))
    ratios = sorted(a / b for a, b in zip(times["dense"], times["compact"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    report = {"device": str(device), "batch_size": batch, "precision": precision_name(amp_dtype),
              "timing": timer.method, "pairs": pairs,
              "dense_ms": statistics.median(times["dense"]),
              "compact_ms": statistics.median(times["compact"]),
              "speedup": statistics.median(ratios), "speedup_p25": q[0], "speedup_p75": q[2],
              "macs_ratio": macs_ratio, "macs_speedup": 1 / macs_ratio}
    if table is not None:
        report["table_speedup"] = float(table.total(dense.dims) / table.total(compact.dims))
    return report


def report_lines(r: dict) -> list[str]:
    """A speed report as printed: times, measured against promised speedups, and a warning
    when the compact model falls well short of its MACs ratio."""
    lines = [f"dense {r['dense_ms']:.3f} ms, compact {r['compact_ms']:.3f} ms per batch of "
             f"{r['batch_size']} on {r['device']} ({r['precision']}, {r['pairs']} pairs)",
             f"measured speedup {r['speedup']:.2f}x (p25-p75 {r['speedup_p25']:.2f}-"
             f"{r['speedup_p75']:.2f})  promised by MACs {r['macs_speedup']:.2f}x (ratio "
             f"{r['macs_ratio']:.4f})" + (f"  by the latency table {r['table_speedup']:.2f}x"
                                          if "table_speedup" in r else "")]
    if r["speedup"] < SHORT_OF_MACS * r["macs_speedup"]:
        lines.append(f"warning: the compact model runs {r['speedup']:.2f}x faster where its MACs "
                     f"promise {r['macs_speedup']:.2f}x: at this size and batch, fixed costs "
                     f"(small matrix products, kernel launches, LayerNorm, copies) dominate; a "
                     f"latency table built here ranks by what this device does")
    return lines
