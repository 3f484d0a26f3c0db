"""Study 13: a pruned model where it is deployed: latency tables timed in ONNX Runtime, int8.

    python -m benchmarks.bench_deploy [--quick] [--threads N] [--data-root DIR]

1. Promised against delivered in the deploy runtime. DeiT-Ti/224
   (`deit_tiny_distilled_patch16_224`, timm's initialisation seeded: the study measures
   shapes and speed, not accuracy; no pretrained weights can be downloaded here) is pruned
   twice toward 50% of its latency by the shipped `nvit_prune.py` (a subprocess, as a user
   runs it; Imagenette's 224 px photos give the saliency; the reference's pruning config,
   KL coefficient and lambda 5e-4), each time ranking by a latency table that
   `tools.build_latency_table` timed at batch 32 on this CPU: once `--runtime onnxruntime`
   (every sublayer exported to ONNX and run in an InferenceSession), once `--runtime torch`
   (eager). The dense model and both compact models are then timed by the shipped
   `pruning.latency.Timer` in ONNX Runtime and in eager torch, at batch 1 (40 rounds) and
   32 (15 rounds; each round's time is the median of 5 forwards), each runtime's variants
   interleaved round by round. Promised = the table's dense / compact latency;
   delivered = the measured dense / compact time (median of the rounds' ratios).
2. int8 against fp32 in ONNX Runtime (its dynamic int8, `pruning.runtimes`): the dense model
   and the model pruned with the ONNX Runtime table, timed in the same rounds.
3. What int8 costs in top-1: study 5's DIGITS model (`benchmarks/models/
   quality_quick_dense_digits.pth`, 96.94% when trained) on DIGITS' 359 validation images
   (study 5's tensors), fp32 against ONNX Runtime's dynamic int8, its static int8 (QDQ,
   calibrated on 64 training images; what `tools.export --format onnx-int8
   --calibration-data-set` writes) and torch's dynamic int8, scored by `engine.evaluate`.

Results: benchmarks/results/deploy.{json,md}. Part 1 and 2 need the real photo set
(`--data-root`, default ../shared/data) and are skipped (said in the table) without it;
`--quick` prunes a 32 px DeiT-Ti on DIGITS with tiny tables instead (a smoke test, not a
result).
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import os
import tempfile
from pathlib import Path

import torch

import models
from benchmarks import common
from benchmarks.bench_real_photos import run as run_script
from benchmarks.common import ROOT, md_table, ratio_stats
from benchmarks.quality_data import load_data
from benchmarks.quality_models import committed_dense
from engine import evaluate
from models.flops import count_macs
from pruning import runtimes
from pruning.latency import Timer

STUDY = "deploy"
DATA = ROOT.parent / "shared" / "data"
NAME = "deit_tiny_distilled_patch16_224"
DIGITS_MODEL = "quality_quick_dense_digits.pth"
TABLE_RUNTIMES = ("onnxruntime", "torch")
FULL = {"img": 224, "patch": 16, "table": ["--model", NAME, "--batch-size", "32",
                                           "--warmup", "3", "--repeats", "20"],
        "prune": ["--batch-size", "16", "--epochs", "1", "--interval_prune", "2",
                  "--prune_per_iter", "128"],
        "batches": [1, 32], "rounds": [40, 15], "repeats": 5, "timeout": 3600}
QUICK = {"img": 32, "patch": 8, "table": ["--num-tokens", "18", "--batch-size", "4",
                                          "--embed-dims", "48,192", "--heads", "1,3",
                                          "--qk-dims", "8,64", "--v-dims", "8,64",
                                          "--mlp-dims", "48,768", "--warmup", "2",
                                          "--repeats", "3"],
         "prune": ["--batch-size", "32", "--epochs", "1", "--interval_prune", "1",
                   "--prune_per_iter", "1024"],
         "batches": [1, 4], "rounds": [2, 2], "repeats": 1, "timeout": 600}


def prune_flags(cfg: dict, data: list[str], dense: Path, table: Path, runtime: str,
                out: Path) -> list[str]:
    """The reference's pruning command, shortened, toward 50% of the table's latency."""
    return ["--model", NAME, "--input-size", str(cfg["img"]), "--patch-size", str(cfg["patch"]),
            *data, "--device", "cpu", "--num_workers", "1", "--seed", "0", "--lr", "1e-4",
            "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--aa", "none",
            "--reprob", "0", "--drop-path", "0", "--print-freq", "1000", *cfg["prune"],
            "--pretrained-path", str(dense), "--pruning", "--pruning_config",
            "configs/nvit_reference.json", "--kl_loss_coeff", "100000",
            "--original_loss_coeff", "1", "--student_eval", "true", "--cost", "latency",
            "--latency_target", "0.5", "--latency_regularization", "5e-4",
            "--latency_look_up_table", str(table), "--runtime", runtime, "--pruning_exit",
            "--speed-report-pairs", "0", "--output_dir", str(out)]


def prune_twice(cfg: dict, data: list[str], work: Path, threads) -> dict:
    """A table per runtime, a pruning run per table; each run's compact model and record."""
    torch.manual_seed(0)
    dense = models.build_model(NAME, img_size=cfg["img"], patch_size=cfg["patch"],
                               num_classes=10)
    torch.save({"model": dense.state_dict(), "dims": dense.dims.to_dict()}, work / "dense.pth")
    runs = {}
    for rt in TABLE_RUNTIMES:
        table = work / f"table_{rt}.json"
        built = run_script("tools/build_latency_table.py",
                           [*cfg["table"], "--runtime", rt, "--output", str(table)],
                           threads, cfg["timeout"])
        if not built["ok"]:
            raise SystemExit(f"build_latency_table --runtime {rt} failed:\n{built['stderr_tail']}")
        pruned = run_script("nvit_prune.py", prune_flags(cfg, data, work / "dense.pth", table,
                                                         rt, work / rt), threads, cfg["timeout"])
        path = work / rt / "pruned_checkpoint.pth"
        if not pruned["ok"] or not path.is_file():
            raise SystemExit(f"nvit_prune.py with the {rt} table failed:\n{pruned['stderr_tail']}")
        ckpt = models.read_checkpoint(str(path))
        runs[rt] = {"model": models.build_model(NAME, checkpoint=str(path)).eval(),
                    "table_ratio": ckpt["cost_ratio"], "table_seconds": built["seconds"],
                    "prune_seconds": pruned["seconds"], "dims": ckpt["dims"],
                    "table_meta": ckpt.get("latency_table")}
    runs["dense"] = {"model": models.ReViT(dense.dims).eval()}  # as tools.speed_report times it
    return runs


VARIANTS = [  # (name, model, runtime, int8)
    ("dense", "dense", "onnxruntime", False), ("ort-table", "onnxruntime", "onnxruntime", False),
    ("torch-table", "torch", "onnxruntime", False),
    ("dense int8", "dense", "onnxruntime", True), ("ort-table int8", "onnxruntime", "onnxruntime", True),
    ("dense eager", "dense", "torch", False), ("ort-table eager", "onnxruntime", "torch", False),
    ("torch-table eager", "torch", "torch", False),
]


def time_variants(runs: dict, cfg: dict) -> dict:
    """Median ms per round of every variant at every batch. Each runtime's variants are
    interleaved round by round in a block of their own: ONNX Runtime's and torch's thread
    pools both spin after a call, so mixing them in one round would time each against the
    other's spinning threads."""
    cpu = torch.device("cpu")
    timers = {(rt, q): Timer(cpu, warmup=1, repeats=cfg["repeats"], amp_dtype=None,
                             runtime=rt, int8=q)
              for _, _, rt, q in VARIANTS}
    out = {}
    for batch, rounds in zip(cfg["batches"], cfg["rounds"]):
        x = torch.randn(batch, 3, cfg["img"], cfg["img"], generator=torch.Generator().manual_seed(0))
        times = {name: [] for name, *_ in VARIANTS}
        for runtime in ("onnxruntime", "torch"):
            block = [v for v in VARIANTS if v[2] == runtime]
            for _ in range(rounds):
                for name, model, rt, q in block:
                    times[name].append(timers[(rt, q)](runs[model]["model"], x))
        out[batch] = times
    return out


def width_summary(dims: dict) -> str:
    return (f"embed {dims['embed_dim']}, heads {sum(dims['num_heads'])}, "
            f"QK {sum(h * q for h, q in zip(dims['num_heads'], dims['qk_dim']))}, "
            f"V {sum(h * v for h, v in zip(dims['num_heads'], dims['v_dim']))}, "
            f"MLP {sum(dims['mlp_dim'])}")


def speed_tables(runs: dict, times: dict, batches: list[int]) -> tuple[list[dict], str]:
    rows, lines = [], []
    dense_macs = count_macs(runs["dense"]["model"])[0]
    for rt in TABLE_RUNTIMES:
        r = runs[rt]
        row = {"table": rt, "table_ratio": r["table_ratio"], "promised": 1 / r["table_ratio"],
               "macs_ratio": count_macs(r["model"])[0] / dense_macs,
               "widths": width_summary(r["dims"]), "dims": r["dims"]}
        name = "ort-table" if rt == "onnxruntime" else "torch-table"
        for b in batches:
            for where, suffix in (("onnxruntime", ""), ("torch", " eager")):
                dense = "dense" + suffix
                row[f"delivered_{where}_b{b}"] = ratio_stats(times[b][dense], times[b][name + suffix])
        rows.append(row)
    big = batches[-1]
    headers = ["table timed in", "table ratio", "promised", "MACs ratio",
               *[f"delivered in ORT, b{b}" for b in batches],
               f"delivered / promised (ORT, b{big})",
               *[f"delivered in eager torch, b{b}" for b in batches], "widths kept"]
    body = []
    for row in rows:
        body.append([row["table"], f"{row['table_ratio']:.4f}", f"{row['promised']:.2f}x",
                     f"{row['macs_ratio']:.4f}",
                     *[fmt(row[f"delivered_onnxruntime_b{b}"]) for b in batches],
                     f"{row[f'delivered_onnxruntime_b{big}']['median'] / row['promised']:.2f}",
                     *[fmt(row[f"delivered_torch_b{b}"]) for b in batches], row["widths"]])
    lines.append(md_table(headers, body))
    shape = [[b, fmt(ratio_stats(times[b]["torch-table"], times[b]["ort-table"])),
              fmt(ratio_stats(times[b]["torch-table eager"], times[b]["ort-table eager"]))]
             for b in batches]
    lines += ["", "Which shape is faster: time of the torch-table model over the ORT-table model "
              "(> 1: the ORT-table model is faster)", "",
              md_table(["batch", "in ONNX Runtime", "in eager torch"], shape)]
    int8 = []
    for b in batches:
        for model in ("dense", "ort-table"):
            fp32, q = times[b][model], times[b][model + " int8"]
            int8.append([model, b, f"{median(fp32):.3f}", f"{median(q):.3f}",
                         fmt(ratio_stats(fp32, q)),
                         fmt(ratio_stats(times[b]["dense"], q))])
    lines += ["", "int8 (ONNX Runtime's dynamic int8) against fp32, both in ONNX Runtime", "",
              md_table(["model", "batch", "fp32 ms", "int8 ms", "int8 speedup",
                        "over dense fp32"], int8)]
    return rows, "\n".join(lines)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def fmt(s: dict) -> str:
    return f"{s['median']:.2f}x ({s['p25']:.2f}-{s['p75']:.2f})"


def int8_top1(work: Path) -> tuple[list[dict], str]:
    """Study 5's DIGITS model: fp32 against the int8 paths, top-1 and agreement."""
    ckpt = committed_dense(DIGITS_MODEL)
    if ckpt is None:
        return [], f"(part 3 skipped: benchmarks/models/{DIGITS_MODEL} is absent)"
    import onnxruntime as ort
    model = models.build_model("deit_tiny_patch16_224",
                               checkpoint=str(ROOT / "benchmarks" / "models" / DIGITS_MODEL)).eval()
    data = load_data("digits", model.dims.img_size, None)
    batches = list(zip(data.x_val.split(64), data.y_val.split(64)))
    cpu = torch.device("cpu")
    example = data.x_val[:1]
    fp32_path, static_path = work / "digits.onnx", work / "digits.static.onnx"
    runtimes.export_onnx(model, fp32_path, example)
    runtimes.quantize_onnx(fp32_path, static_path, list(data.x_train[:64].split(8)))
    static = ort.InferenceSession(str(static_path), runtimes.session_options(),
                                  providers=["CPUExecutionProvider"])
    runners = {
        "fp32 (eager torch)": lambda x: model(x),
        "fp32 ONNX Runtime": runtimes.prepare(model, "onnxruntime", cpu, None, example),
        "int8 ONNX Runtime, dynamic": runtimes.prepare(model, "onnxruntime", cpu, None, example,
                                                       int8=True),
        "int8 ONNX Runtime, static (64 calibration images)":
            lambda x: torch.from_numpy(static.run(["logits"], {"images": x.numpy()})[0]),
        "int8 torch, dynamic": runtimes.prepare(model, "torch", cpu, None, example, int8=True),
    }
    with torch.no_grad():
        reference = torch.cat([model(x).argmax(-1) for x, _ in batches])
    rows = []
    for name, run in runners.items():
        with torch.no_grad():
            top1 = evaluate(batches, runtimes.Deployed(run), cpu)["acc1"]
            preds = torch.cat([run(x).argmax(-1) for x, _ in batches])
        rows.append({"variant": name, "top1": top1,
                     "agreement": float((preds == reference).float().mean()) * 100})
    base = rows[0]["top1"]
    table = md_table(["DIGITS model (study 5)", "top-1 (%)", "change (points)",
                      "agrees with fp32 (%)"],
                     [[r["variant"], f"{r['top1']:.2f}", f"{r['top1'] - base:+.2f}",
                       f"{r['agreement']:.2f}"] for r in rows])
    return rows, f"int8's top-1 on {len(data.y_val)} DIGITS validation images\n\n" + table


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "a 32 px DeiT-Ti pruned on DIGITS, tiny tables, "
                                            "2 rounds (a smoke test, not a result)")
    p.add_argument("--data-root", default=str(DATA), help="the shared data directory")
    args = p.parse_args()
    name = common.apply_study_args(args, STUDY, set_threads=False)  # --threads: the scripts'
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    photos = Path(args.data_root) / "imagenette_224_subset"
    data = (["--data-set", "DIGITS"] if args.quick else
            ["--data-set", "FOLDER", "--data-path", str(photos)])
    load = os.getloadavg()
    parts, rows, times = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        work = Path(tmp)
        if args.quick or (photos / "train").is_dir():
            runs = prune_twice(cfg, data, work, args.threads)
            times = time_variants(runs, cfg)
            rows, text = speed_tables(runs, times, cfg["batches"])
            parts.append(text)
            for rt in TABLE_RUNTIMES:
                rows_rt = next(r for r in rows if r["table"] == rt)
                rows_rt.update(table_seconds=runs[rt]["table_seconds"],
                               prune_seconds=runs[rt]["prune_seconds"],
                               table_meta=runs[rt]["table_meta"])
        else:
            parts.append(f"(parts 1 and 2 skipped: {photos} is absent)")
        top1_rows, text = int8_top1(work)
        parts.append(text)
    common.publish(name, "\n\n".join(parts), load, args.quick, config=cfg, speed=rows,
                   times={str(b): t for b, t in times.items()}, int8_top1=top1_rows)


if __name__ == "__main__":
    main()
