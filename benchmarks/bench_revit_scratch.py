"""Study 12: does ReViT's redistributed shape train better from scratch than a uniform DeiT of the same cost?

    python -m benchmarks.bench_revit_scratch [--quick] [--seeds 0,1,2] [--epochs N]
        [--emb 104] [--work-dir DIR] [--threads 2] [--out DIR] [--name NAME]

The seed's headline claim, at CPU scale: a 12-block ReViT whose dims come from the `--EMB`
rule (`models.dims.revit_dims`: few heads and narrow QK in blocks 2-3 and 10-11, wide MLPs
in the middle) against a uniform 12-block DeiT (head width 64, embedding and MLP (3-5x) chosen
so its MACs are closest to ReViT's), both trained from scratch on the CIFAR-10 subset of
../shared/data/cifar10 (32 px, patch 8) with one recipe and epoch count, once per seed. Both
arms are the same model class with the reference's frame (token scale, attention scale
64^-0.5, PyTorch's default init), so only the per-block dims differ. Training is the quality
study's dense recipe (`bench_quality.train_resumable`: AdamW, warmup + cosine, crop + flip,
label smoothing), checkpointed every epoch, so a stopped study resumes.

Reported: top-1 after the last epoch (mean +- sd over the seeds), the seed-paired difference
ReViT - uniform with a 95% Student t interval, params, MACs, and CPU latency of ReViT relative
to the uniform model at batch 1 and 32 (interleaved pairs, median). `--quick` runs a tiny
DIGITS variant for CI.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import os

# The quality study's training, with its sleeping OpenMP threads; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import models  # noqa: E402
from benchmarks import bench_quality as bq  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import (  # noqa: E402
    interval_text,
    md_table,
    mean_sd,
    paired_interval,
    pm,
    write_results,
)
from benchmarks.passive import machine_note, omp_policy  # noqa: E402
from errors import UserError  # noqa: E402
from models.dims import REFERENCE_ATTN_SCALE, revit_dims  # noqa: E402
from models.flops import count_macs  # noqa: E402
from pruning.cost import MacsCost  # noqa: E402

STUDY = "revit_scratch"
ARMS = ("revit", "uniform")
FULL = dict(data="cifar10", emb=104, epochs=30, patch_size=8, batch_size=128, dense_lr=2e-3,
            crop_pad=4, hflip=True)
QUICK = dict(data="digits", emb=104, epochs=3, patch_size=16, batch_size=64, dense_lr=2e-3,
             crop_pad=2, hflip=False)


def frame(patch_size: int) -> dict:
    return dict(img_size=32, patch_size=patch_size, in_chans=3, num_classes=10, distilled=False)


def uniform_match(target: models.Dims) -> models.Dims:
    """The uniform DeiT-style shape (head width 64, MLP 3-5x embed, nearest 4x on ties) whose
    MACs are closest to `target`'s, in ReViT's frame so that only the dims differ."""
    macs = MacsCost(target)
    goal, best = macs.total(target), None
    for embed in range(64, 513, 8):
        heads = max(1, round(embed / 64))
        for mlp in range(3 * embed, 5 * embed + 1, 8):
            d = models.Dims.uniform(embed, target.depth, heads, mlp, qk_dim=64,
                                    img_size=target.img_size, patch_size=target.patch_size,
                                    in_chans=target.in_chans, num_classes=target.num_classes,
                                    distilled=target.distilled)
            rank = (abs(macs.total(d) - goal), abs(mlp - 4 * embed))
            if best is None or rank < best[0]:
                best = (rank, d)
    return dataclasses.replace(best[1], v_dim=[64] * target.depth,
                               attn_scale=[REFERENCE_ATTN_SCALE] * target.depth,
                               token_scale=True, init="torch_default")


def main(argv: list[str] | None = None) -> None:
    p = common.study_parser(__doc__, STUDY, "tiny DIGITS variant for CI (~1 min)")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; 0,1 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; 3 quick)")
    p.add_argument("--emb", type=int, default=None, help="ReViT's --EMB (default 104)")
    p.add_argument("--work-dir", default=str(common.ROOT / "benchmarks" / "work" / STUDY))
    args = p.parse_args(argv)
    study = common.apply_study_args(args, STUDY, set_threads=False)
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    load_at_start = os.getloadavg()
    recipe = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    if args.emb is not None:
        recipe["emb"] = args.emb
    try:
        seeds = [int(x) for x in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    except ValueError:
        raise SystemExit(f"--seeds wants comma-separated integers, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
    if recipe["epochs"] < 1:
        raise SystemExit(f"--epochs must be positive, got {recipe['epochs']}")
    if recipe["data"] == "cifar10" and not (bq.cifar_dir() / "cifar10_train20k.npz").is_file():
        print(f"skipped: no CIFAR-10 subset at {bq.cifar_dir()} (see ../shared/data/README); "
              f"--quick runs on scikit-learn's DIGITS")
        return

    try:
        revit = revit_dims(recipe["emb"], **frame(recipe["patch_size"]))
    except UserError as e:
        raise SystemExit(f"--emb: {e}") from None
    shapes = {"revit": revit, "uniform": uniform_match(revit)}
    cfg = bq.Config(data=recipe["data"], embed_dim=revit.embed_dim, depth=revit.depth,
                    num_heads=revit.num_heads[0], mlp_dim=revit.mlp_dim[0],
                    patch_size=recipe["patch_size"], batch_size=recipe["batch_size"],
                    dense_epochs=recipe["epochs"], dense_lr=recipe["dense_lr"],
                    crop_pad=recipe["crop_pad"], hflip=recipe["hflip"])
    data = bq.load_data(cfg.data, cfg.img_size, cfg.train_subset)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"data {cfg.data}: {len(data.x_train)} train / {len(data.x_val)} val; seeds {seeds}; "
          f"{recipe['epochs']} epochs; {torch.get_num_threads()} threads")

    runs, trained = [], {}
    for seed in seeds:  # seed-major: a stopped study has both arms at its first seeds
        for arm in ARMS:
            dims = shapes[arm]
            key = {**cfg.dense_key(), "dims": dims.to_dict(), "dense_epochs": recipe["epochs"],
                   "seed": seed}
            ck = bq.train_resumable(dims, cfg, data, recipe["epochs"], seed,
                                    work / f"{study}_{arm}_s{seed}.pth", key, f"{arm} seed {seed}")
            model = models.ReViT(dims)
            model.load_state_dict(ck["model"])
            trained[(arm, seed)] = model.eval()
            runs.append({"arm": arm, "seed": seed, "top1": ck["top1"], "curve": ck["curve"],
                         "plateau_gain": ck["plateau_gain"], "train_seconds": ck["seconds"]})
            print(f"  -> {arm} seed {seed}: top-1 {ck['top1']:.2f}%", flush=True)

    models_of = {arm: trained[(arm, seeds[0])] for arm in ARMS}
    latency = bq.latency_vs_dense(models_of["revit"], models_of["uniform"], cfg.img_size,
                                  6 if args.quick else 15)
    arms = {}
    for arm in ARMS:
        m = models_of[arm]
        rs = [r for r in runs if r["arm"] == arm]
        arms[arm] = {"params": sum(p.numel() for p in m.parameters()), "macs": count_macs(m)[0],
                     "top1": mean_sd([r["top1"] for r in rs]),
                     "train_seconds_per_epoch": mean_sd([r["train_seconds"] / recipe["epochs"]
                                                         for r in rs]),
                     "dims": dims_text(shapes[arm])}
    by = {(r["arm"], r["seed"]): r["top1"] for r in runs}
    diff = paired_interval([by[("revit", s)] - by[("uniform", s)] for s in seeds])
    md = report(arms, diff, latency, recipe, seeds, len(data.x_val), load_at_start)
    path = write_results(study, {"quick": args.quick, "recipe": recipe, "seeds": seeds, "config": dataclasses.asdict(cfg),
                                 "shapes": {a: shapes[a].to_dict() for a in ARMS}, "arms": arms,
                                 "revit_minus_uniform": diff, "latency_revit_vs_uniform": latency,
                                 "runs": runs, "omp_policy": omp_policy()}, md)
    print(path.read_text())


def dims_text(d: models.Dims) -> str:
    return bq.dims_text({"embed_dim": d.embed_dim, "num_heads": d.num_heads, "qk_dim": d.qk_dim,
                         "v_dim": d.v_dim, "mlp_dim": d.mlp_dim})


def verdict(diff: dict | None) -> str:
    """The claim, answered plainly from the paired interval."""
    if diff is None or diff["lo"] is None:
        return "one seed: no interval, no verdict"
    if diff["lo"] > 0:
        return "ReViT's shape trains BETTER than the uniform DeiT of the same MACs here"
    if diff["hi"] < 0:
        return "ReViT's shape trains WORSE than the uniform DeiT of the same MACs here"
    return "the seeds do not separate ReViT's shape from the uniform DeiT of the same MACs here"


def report(arms: dict, diff: dict | None, latency: dict, recipe: dict, seeds: list[int],
           n_val: int, load_at_start: tuple) -> str:
    headers = ["arm", "params", "MMACs", "top-1 (mean ± sd)", "train s/epoch", "dims"]
    rows = [[arm, f"{a['params']:,}", f"{a['macs'] / 1e6:.1f}", pm(a["top1"]),
             pm(a["train_seconds_per_epoch"], 1), a["dims"]] for arm, a in arms.items()]
    ratio = arms["uniform"]["macs"] / arms["revit"]["macs"]
    lines = [
        f"- ReViT − uniform top-1, paired by seed: {interval_text(diff)} points "
        f"(95% interval over {len(seeds)} seeds): {verdict(diff)}.",
        f"- CPU latency ReViT / uniform (seed {seeds[0]}'s models, median of interleaved "
        f"pairs): batch 1 {latency['b1']['median']:.2f} ({latency['b1']['p25']:.2f}-"
        f"{latency['b1']['p75']:.2f}), batch 32 {latency['b32']['median']:.2f} "
        f"({latency['b32']['p25']:.2f}-{latency['b32']['p75']:.2f}); the MACs promise "
        f"{1 / ratio:.2f}.",
        f"- {recipe['data']}: {n_val} validation images; {recipe['epochs']} epochs, 32 px, "
        f"patch {recipe['patch_size']}, batch {recipe['batch_size']}, AdamW lr "
        f"{recipe['dense_lr']}, warmup + cosine, crop pad {recipe['crop_pad']}, flip "
        f"{recipe['hflip']}, label smoothing 0.1. ReViT: `revit_dims({recipe['emb']})`; "
        f"uniform: head width 64, embedding and MLP width matched on MACs; both with the token "
        f"scale, attention scale 64^-0.5 and PyTorch's default init.",
        f"- {machine_note(load_at_start)}",
    ]
    return md_table(headers, rows) + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
