"""What a pruning run writes, owned by one object (in the manner of timm's CheckpointSaver).

`PruneRecorder` holds a run's output folder, run id, settings, the dense model's top-1, the
epochs' records and their running sums, the scalar log and the speed report, and has one
method per event of the run: the dense model scored, a prune step, an epoch's end, a stop,
the end. It writes pruning_state.pth (for --resume), log.txt, dims_history.json, the
several-targets models and pareto.png, the compact model and widths.png; only rank 0 writes,
every rank keeps the same bookkeeping. `restore` takes it all back from a resumed state.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import checkpoints
import utils
from atomic import write_text_atomic
from errors import Stopped
from plots import plot_pareto, plot_widths
from pruning import compact
from pruning.loop import PruningLoop

WIDTH_FIELDS = ("embed_dim", "num_heads", "qk_dim", "v_dim", "mlp_dim")


def widths_of(dims) -> dict:
    return {k: getattr(dims, k) for k in WIDTH_FIELDS}


def width_summary(widths: dict) -> str:
    return (f"emb {widths['embed_dim']}  heads {sum(widths['num_heads'])}  "
            f"qk {widths['qk_dim']}  v {widths['v_dim']}  mlp {sum(widths['mlp_dim'])}")


def prune_step_line(record: dict, loop: PruningLoop, cost: str) -> str:
    target = (record.get("targets_reached") or [loop.pruner.target])[-1]
    done = len(loop.history)
    drop = (1 - record["ratio"]) / record["step"]
    mean_seconds = sum(r["seconds"] for r in loop.history) / done
    eta = "?" if drop <= 0 or target == 0 else \
        f"{max(0.0, (record['ratio'] - target) / drop) * mean_seconds:.0f}s"
    removed = ", ".join(f"{k} {n}" for k, n in record["removed_groups"].items() if n) or "none"
    return (f"prune step {record['step']}: {cost} ratio {record['ratio']:.4f} (target "
            f"{target})  removed groups: {removed}  {width_summary(record['dims'])}  loss "
            f"{record['loss']:.4f} (kl {record.get('loss_kl', 0.0):.4g}, deit "
            f"{record.get('loss_deit', 0.0):.4g})  img/s {record['img_s']:.1f}  eta {eta}")


def log_records(top1_dense: float | None, prune_steps: list[dict], epochs: list[dict],
                speed: dict | None = None) -> list[dict]:
    """log.txt of a pruning run, one JSON line each, in the order they happened: the dense
    model's top-1, every prune step (cost ratio, widths, loss parts, lr, img/s), every epoch
    (top-1, cost ratio, training loss parts) and the final speed report."""
    lines = [{"kind": "prune_step", **r} for r in prune_steps] + \
        [{"kind": "epoch", **r} for r in epochs]
    lines.sort(key=lambda r: (r["epoch"], r["kind"] == "epoch", r.get("iteration", 0)))
    head = [] if top1_dense is None else [{"kind": "dense", "test_acc1": top1_dense}]
    return head + lines + ([] if speed is None else [{"kind": "speed", **speed}])


class PruneRecorder:
    def __init__(self, output_dir: Path, is_main: bool, args, settings: dict, original,
                 images_per_step: int, several_targets: bool,
                 evaluate: Callable[[], dict]) -> None:
        """evaluate(): the student's top-1/top-5 now (for the several-targets models)."""
        self.output_dir, self.is_main, self.args = output_dir, is_main, args
        self.settings, self.original = settings, original
        self.images_per_step, self.several_targets = images_per_step, several_targets
        self.evaluate = evaluate
        self.run_id = checkpoints.new_run_id()
        self.top1_dense: float | None = None
        self.epochs: list[dict] = []
        self.epoch_means = utils.RunningMeans()  # the current epoch's, saved in mid-epoch
        self.speed: dict | None = None
        self.scalars = None
        self.loop = self.model = self.optimizer = self.scheduler = self.scaler = None

    def follow(self, loop: PruningLoop, model, optimizer, scheduler, scaler) -> None:
        """What the resumable state is made of (the loop calls `on_prune` back)."""
        self.loop, self.model = loop, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler

    def restore(self, ckpt: dict) -> None:
        """A resumed run's records, as the state holds them (mid-epoch sums included)."""
        self.run_id = ckpt.get("run_id") or self.run_id
        self.top1_dense = ckpt.get("top1_dense")
        self.epochs = list(ckpt.get("epoch_log") or [])
        if ckpt.get("epoch_means"):
            self.epoch_means.load_state_dict(ckpt["epoch_means"])

    def open(self) -> None:
        """Once the folder is claimed: the scalar log; logs rewritten from the state held."""
        self.scalars = utils.scalar_log(self.output_dir if self.is_main else None, self.args)
        self.write_logs()

    # ---------------------------------------------------------------------- events
    def dense_scored(self, stats: dict) -> None:
        self.top1_dense = stats["acc1"]
        print(f"before pruning: top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%")

    def unfinished_epoch(self) -> int | None:
        """An epoch whose every step ran but whose end (evaluation, record) did not: a state
        saved at a prune step in the epoch's last iteration, then a kill. Its running sums
        are in the state; the resumed run ends it before going on."""
        epoch = self.loop.epoch - 1
        if self.loop.iteration or epoch < 0 or not self.epoch_means.counts:
            return None
        return None if any(r["epoch"] == epoch for r in self.epochs) else epoch

    def epoch_started(self, resumed_in_it: bool) -> None:
        if not resumed_in_it:
            self.epoch_means.reset()

    def on_prune(self, record: dict) -> None:
        """PruningLoop's callback after every prune step."""
        record["img_s"] = (self.images_per_step * self.args.interval_prune
                           / max(record["seconds"], 1e-9))
        print(prune_step_line(record, self.loop, self.args.cost), flush=True)
        if self.several_targets and record.get("targets_reached"):
            self.save_target_models(record)
        if self.loop.save_due() or record.get("target_models"):
            self.save_state()
        self.write_logs()
        self.scalars.add(record, record["step"], axis="prune/step", prefix="prune/")

    def epoch_ended(self, epoch: int, train_stats: dict, stats: dict) -> None:
        pruner = self.loop.pruner
        print(f"Epoch {epoch}: student top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%"
              f"  {self.args.cost} ratio {pruner.ratio():.4f}")
        record = {"epoch": epoch, "ratio": pruner.ratio(), "prune_steps": pruner.steps,
                  **{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in stats.items()}}
        self.epochs.append(record)
        self.epoch_means.reset()  # the epoch is in its record now
        if not self.loop.done:
            self.save_state()
        self.write_logs()
        self.scalars.add(record, epoch, axis="epoch/epoch", prefix="epoch/")

    def stopped(self) -> None:
        """A stop agreed by every rank: the state saved, then Stopped (exit 130)."""
        self.save_state()
        utils.barrier()  # no rank ends (its launcher would then stop rank 0) before the save
        raise Stopped(f"stopped on request after {self.loop.pruner.steps} prune steps; the state "
                      f"is in {self.output_dir / checkpoints.PRUNING_STATE_FILE} (continue with "
                      f"--resume)")

    def dense_note(self) -> str:
        return "" if self.top1_dense is None else f" (dense {self.top1_dense:.2f}%)"

    def finished(self, compact_model, ratio: float, stats: dict, speed: dict | None,
                 latency_table: dict | None = None) -> None:
        """The compact model (with its speed report and the latency table's settings, which
        a model card quotes), log.txt and widths.png (rank 0)."""
        self.speed = speed
        self.write_logs()
        extra = {} if latency_table is None else {"latency_table": latency_table}
        checkpoints.save_model_file(
            self.output_dir / checkpoints.PRUNED_FILE, compact_model, self.args,
            run_id=self.run_id, original_dims=self.original.to_dict(), cost=self.args.cost,
            cost_ratio=ratio, top1_dense=self.top1_dense, top1_pruned=stats["acc1"], speed=speed,
            **extra)
        if self.loop.history:
            plot_widths(widths_of(self.original), self.loop.history[-1]["dims"],
                        self.output_dir / "widths.png")

    def close(self) -> None:
        self.scalars.close()

    # ----------------------------------------------------------------------- files
    def save_state(self) -> None:
        if self.is_main:
            checkpoints.save_pruning_state(
                self.output_dir / checkpoints.PRUNING_STATE_FILE, self.model, self.loop,
                self.optimizer, self.scheduler, self.scaler, self.settings, self.original,
                self.args, self.run_id, self.top1_dense, self.epochs,
                self.epoch_means.state_dict())
        self.loop.mark_saved()

    def write_logs(self) -> None:
        """dims_history.json and log.txt, whole, from what the state holds."""
        if self.is_main:
            write_text_atomic(self.output_dir / checkpoints.HISTORY_FILE, json.dumps(
                {"original": widths_of(self.original), "steps": self.loop.history}, indent=1))
            write_text_atomic(self.output_dir / checkpoints.LOG_FILE, utils.json_lines(
                log_records(self.top1_dense, self.loop.history, self.epochs, self.speed)))

    def save_target_models(self, record: dict) -> None:
        """Several targets: the compact model at each one reached, scored now (the student is
        evaluated mid-epoch, then put back in its training mode), and pareto.png."""
        stats = self.evaluate()
        self.loop.set_phase()
        record["target_models"] = [
            {"target": t, "file": checkpoints.target_file(t), "ratio": record["ratio"],
             "test_acc1": stats["acc1"], "test_acc5": stats["acc5"]}
            for t in record["targets_reached"]]
        for entry in record["target_models"]:
            print(f"target {entry['target']:g} reached: {self.args.cost} ratio "
                  f"{record['ratio']:.4f}, top-1 {stats['acc1']:.2f}%; wrote "
                  f"{self.output_dir / entry['file']}")
        if not self.is_main:
            return
        compact_model = compact(self.model)
        for entry in record["target_models"]:
            checkpoints.save_model_file(
                self.output_dir / entry["file"], compact_model, self.args, run_id=self.run_id,
                original_dims=self.original.to_dict(), cost=self.args.cost,
                cost_ratio=record["ratio"], target=entry["target"], top1_dense=self.top1_dense,
                top1_pruned=stats["acc1"])
        points = [e for r in self.loop.history for e in r.get("target_models", [])]
        plot_pareto(points, self.top1_dense, self.args.cost,
                    self.output_dir / checkpoints.PARETO_FILE)
