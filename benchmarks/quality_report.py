"""Study 5: what a pruned model measures against the dense one, the statistics over seeds and
the written report (tables, findings, plots)."""
from __future__ import annotations

import math
import statistics

import torch

import models
from benchmarks import common
from benchmarks.common import (ROOT, T_LEVEL, interleaved, interval_text, md_table,
                               mean_sd, paired_interval, welch_interval, pm, ratio_stats)
from benchmarks.quality_config import BUDGETS, METHODS, REFERENCE, UNPAIRED, Config, method_name
from models.flops import count_macs


# ---------------------------------------------------------------------- measuring
def latency_vs_dense(model: torch.nn.Module, dense: torch.nn.Module, img: int,
                     repeats: int) -> dict:
    """Latency ratio model/dense at batch 1 and 32: median of interleaved pairs."""
    out = {}
    for b in (1, 32):
        x = torch.randn(b, 3, img, img)
        with torch.inference_mode():
            t = interleaved({"dense": lambda: dense(x), "model": lambda: model(x)},
                            repeats=repeats * (3 if b == 1 else 1), warmup=3,
                            inner=10 if b == 1 else 1)
        out[f"b{b}"] = ratio_stats(t["model"], t["dense"])
        out[f"b{b}"]["dense_ms"] = statistics.median(t["dense"]) * 1e3
    return out


def describe(model: models.ReViT, dense_macs: float) -> dict:
    d = model.dims
    macs = count_macs(model)[0]
    return {"params": sum(p.numel() for p in model.parameters()),
            "macs": macs, "macs_ratio": macs / dense_macs,
            "dims": {"embed_dim": d.embed_dim, "num_heads": d.num_heads, "qk_dim": d.qk_dim,
                     "v_dim": d.v_dim, "mlp_dim": d.mlp_dim}}


def model_text(cfg: Config) -> str:
    if cfg.family == "swin":
        return (f"a Swin of {cfg.stages} stages of {cfg.depth} blocks, embed {cfg.embed_dim}, "
                f"{cfg.num_heads} heads and MLP {cfg.mlp_dim} doubling per stage, windows of "
                f"{cfg.window}")
    return f"{cfg.depth} blocks, embed {cfg.embed_dim}, {cfg.num_heads} heads, MLP {cfg.mlp_dim}"


def tp_text(cfg: Config) -> str:
    if cfg.family == "swin":
        return (f"Torch-Pruning MetaPruner + GroupTaylorImportance, global_pruning, on timm's "
                f"SwinTransformer, the MLP hidden units only (ratio up to {cfg.tp_ratio} over "
                f"{cfg.tp_steps} steps, every other layer ignored: its head and embedding "
                f"scopes leave a Swin that no longer runs), round_to 2")
    return (f"Torch-Pruning MetaPruner + GroupTaylorImportance, global_pruning + isomorphic, "
            f"prune_num_heads (head ratio up to {cfg.tp_head_ratio}), embedding and MLP widths "
            f"(channel ratio up to {cfg.tp_ratio} over {cfg.tp_steps} steps), round_to 2, "
            f"classifier ignored")


def dims_text(d: dict) -> str:
    return (f"E{d['embed_dim']} H{d['num_heads']} qk{d['qk_dim']} v{d['v_dim']} "
            f"mlp{d['mlp_dim']}").replace(" ", "")  # compact for the table

# ------------------------------------------------------------------------ statistics
def summarise(rows: list[dict]) -> list[dict]:
    """Per method and budget over the seeds: mean +- sd of every figure, and the difference
    to the reference method (a) paired by seed, after pruning and after finetuning (for the
    UNPAIRED methods, a Welch interval of the finetuned top-1)."""
    by = {(r["method"], r["budget"], r["seed"]): r for r in rows}
    out = []
    for budget in BUDGETS:
        for method in METHODS:
            rs = sorted((r for r in rows if r["method"] == method and r["budget"] == budget),
                        key=lambda r: r["seed"])
            if not rs:
                continue
            s = {"method": method, "label": METHODS[method][0], "budget": budget,
                 "seeds": [r["seed"] for r in rs], "dims_first_seed": rs[0]["dims"]}
            for f in ("top1_pruned", "top1_finetuned", "macs_ratio", "params"):
                s[f] = mean_sd([r[f] for r in rs])
            for b in ("b1", "b32"):
                s[f"latency_{b}"] = mean_sd([r["latency"][b]["median"] for r in rs])
            if method in UNPAIRED:
                ref = [r["top1_finetuned"] for r in rows
                       if r["method"] == REFERENCE and r["budget"] == budget]
                s["top1_finetuned_vs_reference"] = welch_interval(
                    [r["top1_finetuned"] for r in rs], ref)
                s["top1_pruned_vs_reference"] = None
            elif method != REFERENCE:
                for f in ("top1_pruned", "top1_finetuned"):
                    pairs = [(r[f], by[(REFERENCE, budget, r["seed"])][f]) for r in rs
                             if (REFERENCE, budget, r["seed"]) in by]
                    s[f"{f}_vs_reference"] = paired_interval(
                        [a - b for a, b in pairs if a is not None and b is not None])
            out.append(s)
    return out


# ------------------------------------------------------------------------ report
def findings(summary: list[dict], dense_top1: float, n_val: int, family: str = "vit") -> str:
    """Plain statements computed from the numbers: who wins each budget, and which methods
    the seed-paired intervals separate from NViT as published (a)."""
    lines = []
    ref_label = METHODS[REFERENCE][0]
    for b in BUDGETS:
        cands = [s for s in summary if s["budget"] == b and s["top1_finetuned"] is not None]
        if not cands:
            continue
        best = max(cands, key=lambda s: s["top1_finetuned"]["mean"])
        p = best["top1_finetuned"]["mean"] / 100
        noise = 2 * 100 * math.sqrt(max(p * (1 - p), 1e-4) / n_val)
        lines.append(f"- {int(b * 100)}% MACs: the best mean is {best['label']} "
                     f"{method_name(best['method'], family)} at {pm(best['top1_finetuned'])}% over "
                     f"{len(best['seeds'])} seed(s) (dense {dense_top1:.2f}%; two standard "
                     f"errors of one evaluation on {n_val} images are about {noise:.1f} points).")
        ref = next((s for s in cands if s["method"] == REFERENCE), None)
        if ref is None:
            continue
        for s in cands:
            iv = s.get("top1_finetuned_vs_reference")
            if s["method"] == REFERENCE or iv is None:
                continue
            name = f"{s['label']} {method_name(s['method'], family)}"
            if iv["lo"] is None:
                lines.append(f"  - {name}: {iv['mean']:+.2f} points against {ref_label} after "
                             f"finetuning (one seed: no interval yet).")
                continue
            if iv["lo"] > 0:
                verdict = f"BEATS {ref_label}"
            elif iv["hi"] < 0:
                verdict = f"loses to {ref_label}"
            else:
                verdict = f"not separated from {ref_label}"
            how = (f"{iv['n']} paired seeds" if iv.get("paired", True) else
                   f"{iv['n']} and {len(ref['seeds'])} seeds, unpaired (Welch)")
            lines.append(f"  - {name}: {verdict} (finetuned top-1 difference "
                         f"{interval_text(iv)} points, {int(T_LEVEL * 100)}% interval over "
                         f"{how}).")
        lat = next((s for s in cands if s["method"] == "hessian_latency"), None)
        if lat is not None:
            lines.append(f"  - latency-table ranking (b) vs MACs ranking {ref_label} at batch 32: "
                         f"latency ratio {pm(lat['latency_b32'])} vs {pm(ref['latency_b32'])}, "
                         f"MACs ratio {pm(lat['macs_ratio'], 3)} vs {pm(ref['macs_ratio'], 3)}.")
    return "\n".join(lines)


def plot(summary: list[dict], dense_top1: float, study: str, family: str = "vit") -> list[str]:
    """Top-1 after finetuning against MACs and against measured latency, mean +- sd bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = dict(zip(METHODS, "osD^vxPh"))
    paths = []
    for key, xlabel, xfield in (
            ("macs", "MACs / dense MACs", "macs_ratio"),
            ("latency", "CPU latency / dense latency (batch 32, median)", "latency_b32")):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for m, (label, _) in METHODS.items():
            desc = method_name(m, family)
            pts = sorted((s[xfield]["mean"], s[xfield]["sd"] or 0.0,
                          s["top1_finetuned"]["mean"], s["top1_finetuned"]["sd"] or 0.0)
                         for s in summary if s["method"] == m)
            if pts:
                x, xe, y, ye = zip(*pts)
                ax.errorbar(x, y, xerr=xe, yerr=ye, marker=markers[m], linestyle="-",
                            capsize=3, label=f"{label} {desc}")
        ax.plot([1.0], [dense_top1], marker="*", markersize=12, color="k", linestyle="",
                label="dense")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 after finetune (%), mean ± sd over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{study}: accuracy vs {key}")
        path = common.RESULTS / f"{study}_{key}.png"
        common.RESULTS.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return paths


def run_of(row: dict) -> str:
    """Where and when a row was measured (rows written before this was recorded: unknown)."""
    env = row.get("environment")
    return "unrecorded" if env is None else f"{env['cpu']}, {env['date'][:10]}"


def measured_where(rows: list[dict]) -> str:
    """The result's line on where its rows were measured: one machine and day, or each with
    its row count when they differ."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[run_of(r)] = counts.get(run_of(r), 0) + 1
    return "Measured on " + "; ".join(f"{where} ({n} rows)" for where, n in counts.items()) + "."


def report(rows: list[dict], summary: list[dict], cfg: Config, dense: models.ReViT,
           dense_top1: float, dense_macs: float, times: dict, n_val: int, study: str) -> str:
    ref_label = METHODS[REFERENCE][0]
    headers = ["method", "budget", "seeds", "top-1 pruned", "top-1 finetuned",
               f"finetuned − {ref_label} (95% CI)", f"pruned − {ref_label} (95% CI)", "params",
               "MACs ratio", "latency/dense b1", "latency/dense b32", "dims (first seed)"]
    table = [["dense", "1.00", "", "", f"{dense_top1:.2f}", "", "",
              f"{sum(p.numel() for p in dense.parameters()):,}", "1.000", "1.00", "1.00",
              dims_text(describe(dense, dense_macs)["dims"])]]
    for s in summary:
        table.append([f"{s['label']} {method_name(s['method'], cfg.family)}", f"{s['budget']:.2f}",
                      len(s["seeds"]), pm(s["top1_pruned"]), pm(s["top1_finetuned"]),
                      interval_text(s.get("top1_finetuned_vs_reference")),
                      interval_text(s.get("top1_pruned_vs_reference")),
                      f"{s['params']['mean']:,.0f}", pm(s["macs_ratio"], 3),
                      pm(s["latency_b1"]), pm(s["latency_b32"]), dims_text(s["dims_first_seed"])])
    several = len({run_of(r) for r in rows}) > 1  # rows measured on several machines or days
    runs = [[f"{r['label']}", f"{r['budget']:.2f}", r["seed"],
             "-" if r["top1_pruned"] is None else f"{r['top1_pruned']:.2f}",
             f"{r['top1_finetuned']:.2f}", f"{r['macs_ratio']:.3f}",
             f"{r['latency']['b32']['median']:.2f}", dims_text(r["dims"])]
            + ([run_of(r)] if several else [])
            for r in sorted(rows, key=lambda r: (-r["budget"], list(METHODS).index(r["method"]),
                                                 r["seed"]))]
    design = (
        f"Model: {model_text(cfg)}, {cfg.img_size} px, patch {cfg.patch_size}; data {cfg.data}. Dense: "
        f"{cfg.dense_epochs} epochs, AdamW lr {cfg.dense_lr}, cosine, label smoothing "
        f"{cfg.label_smoothing}, crop pad {cfg.crop_pad}, flip {cfg.hflip}. (a)-(f): one pruning "
        f"run per seed through 50% to 25% MACs by the shipped PruningLoop, a prune step every "
        f"{cfg.interval} iterations of batch {cfg.prune_batch}, {cfg.prune_per_iter} // 16 "
        f"groups per step (the reference's pace), group sizes {cfg.group_sizes}; loss "
        f"{cfg.original_loss_coeff} x label loss, plus from the first prune step "
        f"{cfg.kl_coeff(dense.dims.num_classes):g} x KL(T={cfg.kl_tau}, element-wise mean) to "
        f"the dense model (the reference's 1e5 on 1000 classes, scaled to the class count); "
        f"student in eval mode from that step ({cfg.student_eval}); constant lr "
        f"{cfg.prune_lr}. (b): lambda set at the first step so the median latency penalty is "
        f"{cfg.latency_weight}x the median score (table: batch 32, this model's tokens). "
        f"(c): the hessian criterion with every per-kind scale 1 instead of 12/12/2/2/1. "
        f"(h): {tp_text(cfg)}, the same loss between steps. Every pruned model: "
        f"{cfg.ft_epochs} finetune epoch(s), the reference's finetune loss (KL per head at "
        f"T={cfg.ft_kl_tau} x the same coefficient + label loss, student in eval mode), AdamW "
        f"lr {cfg.ft_lr} cosine (flip-only augmentation, dense logits cached). (g): the dense "
        f"recipe from scratch for {cfg.scratch_epochs()} epochs (dense + finetune epochs). "
        f"Seeds order the pruning and finetune batches, draw (f)'s scores and initialise (g); "
        f"the dense model is one (seed {cfg.seed}). Intervals: Student t over the seed-paired "
        f"differences; (g), which shares only a seed number with (a), Welch's unpaired "
        f"interval. Latency = model / dense time, median of interleaved pairs, on the CPU of "
        f"the row's run.")
    part_times = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items())
    return (md_table(headers, table) + "\n\n## Findings\n\n"
            + findings(summary, dense_top1, n_val, cfg.family)
            + "\n\n## Every run\n\n"
            + md_table(["method", "budget", "seed", "top-1 pruned", "top-1 finetuned",
                        "MACs ratio", "latency/dense b32", "dims"]
                       + (["measured on"] if several else []), runs)
            + "\n\n## Design\n\n" + design + "\n\n## Time per part\n\n" + part_times
            + f"\n\nPlots: {', '.join(plot(summary, dense_top1, study, cfg.family))}")
