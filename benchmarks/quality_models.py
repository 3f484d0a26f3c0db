"""Study 5: the converged dense model (trained once, resumable, committed when small) and the
CPU latency table of method (b)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import torch

import engine
import models
from atomic import save_atomic, write_text_atomic
from benchmarks.common import (ROOT)
from benchmarks.quality_config import Config
from benchmarks.quality_data import Data
from benchmarks.quality_training import CPU, accuracy, cosine_lr, make_optimizer, scratch_batches, smoothed_ce
from pruning.cost import LatencyTable


# --------------------------------------------------------------------- caching
PLATEAU_POINTS = 0.5  # converged: the last fifth of the epochs gains less than this


def plateau_gain(curve: list[float]) -> float:
    """Top-1 points gained over the last fifth of the epochs (end minus the value before it)."""
    before = len(curve) - max(1, len(curve) // 5) - 1
    return curve[-1] - (curve[before] if before >= 0 else 0.0)


def train_resumable(dims, cfg: Config, data: Data, epochs: int, seed: int,
                    path: Path, key: dict, label: str) -> dict:
    """A model trained from scratch with the dense recipe (CE with label smoothing, crop +
    flip, AdamW, warmup + cosine), evaluated after every epoch; returns the finished file's
    dict ({"model", "dims", "key", "top1", "seconds", "curve", "plateau_gain"}), reused while
    its `key` matches. Training writes `<stem>.partial.pth` after every epoch (weights,
    optimizer, the batch order's generator and position, the top-1 curve), so a stopped run
    continues exactly where it stopped. Our own loop rather than timm's for that exact resume."""
    partial = path.with_name(path.stem + ".partial.pth")
    if path.is_file():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("key") == key:
            return ck
        print(f"{label}: {path} was made with another recipe; training again")
    n = len(data.x_train)
    per_epoch = n // cfg.batch_size
    total = epochs * per_epoch
    warmup = max(1, int(cfg.warmup_frac * total))
    torch.manual_seed(seed)
    model = models.model_class(dims)(dims)
    opt = make_optimizer(model, cfg.dense_lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order = {"perm": torch.randperm(n, generator=gen), "pos": 0}
    start, curve, seconds = 0, [], 0.0
    if partial.is_file():
        ck = torch.load(partial, map_location="cpu", weights_only=True)
        if ck.get("key") == key:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            gen.set_state(ck["generator"])
            order = {"perm": ck["perm"], "pos": ck["pos"]}
            start, curve, seconds = ck["epoch"] + 1, list(ck["curve"]), ck["seconds"]
            print(f"{label}: continuing {partial} after epoch {start}/{epochs}")

    next_batch, criterion = scratch_batches(data, cfg, gen, order), smoothed_ce(cfg)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        batches = [next_batch() for _ in range(per_epoch)]

        def lr_at(i: int, base: int = epoch * per_epoch) -> None:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(base + i, total, cfg.dense_lr, warmup)
        with contextlib.redirect_stdout(io.StringIO()):
            stats = engine.train_one_epoch(model, criterion, batches, opt, CPU, epoch,
                                           print_freq=10**9, step_update=lr_at)
        curve.append(accuracy(model, data, cfg.eval_batch))
        seconds += time.perf_counter() - t0
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "generator": gen.get_state(), "perm": order["perm"], "pos": order["pos"],
                     "epoch": epoch, "curve": curve, "seconds": seconds, "key": key}, partial)
        print(f"  {label}: epoch {epoch + 1}/{epochs} loss {stats['loss']:.3f} top-1 "
              f"{curve[-1]:.2f}% ({seconds:.0f} s)", flush=True)
    done = {"model": model.state_dict(), "dims": dims.to_dict(), "key": key,
            "top1": curve[-1], "seconds": seconds, "curve": curve,
            "plateau_gain": plateau_gain(curve)}
    save_atomic(done, path)
    partial.unlink(missing_ok=True)
    return done


COMMITTED = ROOT / "benchmarks" / "models"  # small finished dense models, see manifest.json
COMMIT_LIMIT = 1_000_000  # bytes: larger models stay in the work dir (the study retrains them)


def committed_dense(name: str) -> dict | None:
    """A committed dense model's file, checked against the manifest's sha256 (None: none)."""
    import hashlib
    manifest = COMMITTED / "manifest.json"
    if not manifest.is_file():
        return None
    entry = json.loads(manifest.read_text()).get(name)
    path = COMMITTED / name
    if entry is None or not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise SystemExit(f"{path}: sha256 {digest} is not the manifest's {entry['sha256']}; "
                         f"restore it (git checkout) or delete it to train the model again")
    return torch.load(path, map_location="cpu", weights_only=True)


def commit_dense(trained: Path, name: str, command: str, key: dict) -> None:
    """Copy a finished dense model into COMMITTED as `name` and record it in manifest.json
    (sha256, the command that trained it, its top-1, plateau gain and training time)."""
    import hashlib
    import shutil
    present = committed_dense(name)
    if present is not None and present.get("key") == key:
        print(f"{COMMITTED / name} already holds this recipe's model")
        return
    ck = torch.load(trained, map_location="cpu", weights_only=True) if trained.is_file() else {}
    if ck.get("key") != key:
        raise SystemExit(f"no finished dense model of this recipe at {trained} to commit")
    if trained.stat().st_size > COMMIT_LIMIT:
        raise SystemExit(f"{trained} has {trained.stat().st_size:,} bytes, more than the "
                         f"{COMMIT_LIMIT:,} a committed model may have: keep it in the work dir "
                         f"(the study trains it again where it is absent)")
    COMMITTED.mkdir(parents=True, exist_ok=True)
    manifest_path = COMMITTED / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    shutil.copyfile(trained, COMMITTED / f"{name}.tmp")
    os.replace(COMMITTED / f"{name}.tmp", COMMITTED / name)
    manifest[name] = {"sha256": hashlib.sha256((COMMITTED / name).read_bytes()).hexdigest(),
                      "bytes": (COMMITTED / name).stat().st_size, "command": command,
                      "top1": ck["top1"], "epochs": len(ck["curve"]),
                      "plateau_gain": ck["plateau_gain"], "train_seconds": round(ck["seconds"]),
                      "torch": torch.__version__}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    print(f"committed {COMMITTED / name} ({manifest[name]['bytes']:,} bytes)")


def dense_model(cfg: Config, data: Data, work: Path, times: dict,
                committed_name: str | None = None) -> tuple[models.ReViT, float, dict]:
    """The dense model: the committed file `committed_name` when its recipe matches, else the
    work dir's `dense_<data>.pth`, else trained now (resumably, by `train_resumable`) until
    cfg.dense_epochs; the file keeps its top-1 curve and `plateau_gain` (converged when below
    PLATEAU_POINTS). Returns (model, top-1, record): the record (the file's sha256, its top-1
    curve, plateau gain and training seconds) goes into every result that uses the model."""
    key = cfg.dense_key()
    epochs = int(cfg.dense_epochs)
    if epochs != cfg.dense_epochs:
        raise SystemExit(f"dense_epochs must be whole epochs, got {cfg.dense_epochs}")
    ck, where = (committed_dense(committed_name) if committed_name else None), "committed"
    path = COMMITTED / committed_name if committed_name else None
    if ck is None or ck.get("key") != key:
        where = f"{work}"
        path = work / f"dense_{cfg.data}{'' if cfg.family == 'vit' else '_' + cfg.family}.pth"
        cached = path.is_file()
        ck = train_resumable(cfg.dims(), cfg, data, epochs, cfg.seed, path, key, "dense")
        where = where if cached else "trained now"
    times["dense_train_s" if where == "trained now" else "dense_train_cached_s"] = ck["seconds"]
    dims = cfg.dims()
    model = models.model_class(dims)(dims)
    model.load_state_dict(ck["model"])
    gain = ck["plateau_gain"]
    print(f"dense model ({where}): top-1 {ck['top1']:.2f}% after {len(ck['curve'])} epochs "
          f"({ck['seconds']:.0f} s of training); the last fifth gained {gain:.2f} points "
          f"({'converged' if gain < PLATEAU_POINTS else 'NOT converged'})")
    import hashlib
    record = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "curve": ck["curve"],
              "plateau_gain": gain, "train_seconds": ck["seconds"]}
    return model.eval(), ck["top1"], record


def latency_table(cfg: Config, work: Path, num_tokens: int, times: dict) -> LatencyTable:
    """A small CPU table at this model's token count, batch 32; measured once and cached."""
    path = work / f"latency_table_{cfg.data}.json"
    E, H, hd, M = cfg.embed_dim, cfg.num_heads, cfg.embed_dim // cfg.num_heads, cfg.mlp_dim
    grid = {"--embed-dims": sorted({max(8, E // 8), E // 4, E // 2, 3 * E // 4, E}),
            "--heads": list(range(1, H + 1)),
            "--qk-dims": sorted({4, max(4, hd // 4), hd // 2, hd}),
            "--v-dims": sorted({4, max(4, hd // 4), hd // 2, hd}),
            "--mlp-dims": sorted({8, M // 8, M // 4, M // 2, 3 * M // 4, M})}
    want = {"num_tokens": num_tokens, "batch_size": 32,
            "grid": {k: v for k, v in grid.items()}, "threads": torch.get_num_threads()}
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("meta", {}).get("study_key") == want:
            print(f"latency table: reusing {path}")
            return LatencyTable.from_dict(data)
    from pruning.latency import measure_table
    t0 = time.perf_counter()
    data = measure_table({k.lstrip("-").replace("-", "_"): v for k, v in grid.items()},
                         CPU, 32, num_tokens, warmup=3, repeats=10)
    times["latency_table_s"] = time.perf_counter() - t0
    data["meta"]["study_key"] = want
    table = LatencyTable.from_dict(data)
    write_text_atomic(path, json.dumps(data))
    return table
