"""What a pruning run writes, owned by one object (in the manner of timm's CheckpointSaver).

`PruneRecorder` holds a run's output folder, run id, settings, the dense model's score (top-1,
or label-free the feature cosine: engine.headline), the
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
from engine import headline, recorded_score, score_fields, score_text
from atomic import write_text_atomic
from errors import Stopped
from plots import plot_pareto, plot_widths
from pruning import compact, feature_channels
from pruning.loop import PruningLoop

WIDTH_FIELDS = ("embed_dim", "num_heads", "qk_dim", "v_dim", "mlp_dim")


def widths_of(dims) -> dict:
    return {k: getattr(dims, k) for k in WIDTH_FIELDS}


def width_summary(widths: dict) -> str:
    pool = f"  pool mlp {widths['pool_mlp_dim']}" if "pool_mlp_dim" in widths else ""
    return (f"emb {widths['embed_dim']}  heads {sum(widths['num_heads'])}  "
            f"qk {widths['qk_dim']}  v {widths['v_dim']}  mlp {sum(widths['mlp_dim'])}{pool}")


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
            f"{record['loss']:.4f}{loss_parts(record)}  img/s {record['img_s']:.1f}  eta {eta}")


def loss_parts(record: dict) -> str:
    """The loss's weighted terms, when it has two: the label-free run's pooled and token
    distances, or the KL and DeiT terms."""
    if "loss_pooled" in record:
        return f" (pooled {record['loss_pooled']:.4g}, tokens {record['loss_tokens']:.4g})"
    if "loss_kl" in record or "loss_deit" in record:
        return f" (kl {record.get('loss_kl', 0.0):.4g}, deit {record.get('loss_deit', 0.0):.4g})"
    return ""  # one term: the loss itself


def score_key(stats: dict) -> str:
    """The log records' key of a score: test_acc1, or label-free test_cos."""
    return "test_acc1" if "acc1" in stats else "test_cos"


def log_records(dense: dict | None, prune_steps: list[dict], epochs: list[dict],
                speed: dict | None = None) -> list[dict]:
    """log.txt of a pruning run, one JSON line each, in the order they happened: the dense
    model's score (`dense`: its log fields), every prune step (cost ratio, widths, loss parts, lr, img/s), every epoch
    (top-1, cost ratio, training loss parts) and the final speed report."""
    lines = [{"kind": "prune_step", **r} for r in prune_steps] + \
        [{"kind": "epoch", **r} for r in epochs]
    lines.sort(key=lambda r: (r["epoch"], r["kind"] == "epoch", r.get("iteration", 0)))
    head = [] if not dense else [{"kind": "dense", **dense}]
    return head + lines + ([] if speed is None else [{"kind": "speed", **speed}])


class PruneRecorder:
    def __init__(self, output_dir: Path, is_main: bool, args, settings: dict, original,
                 images_per_step: int, several_targets: bool,
                 evaluate: Callable[[], dict]) -> None:
        """evaluate(): the student's score now (for the several-targets models)."""
        self.output_dir, self.is_main, self.args = output_dir, is_main, args
        self.settings, self.original = settings, original
        self.images_per_step, self.several_targets = images_per_step, several_targets
        self.evaluate = evaluate
        self.run_id = checkpoints.new_run_id()
        self.dense_stats: dict = {}  # the dense model's evaluation ({} until scored)
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
        score = recorded_score(ckpt, "dense")
        if score is not None:
            self.dense_stats = {"acc1": score} if ckpt.get("top1_dense") is not None \
                else {"cos": score}
        self.epochs = list(ckpt.get("epoch_log") or [])
        if ckpt.get("epoch_means"):
            self.epoch_means.load_state_dict(ckpt["epoch_means"])

    def open(self) -> None:
        """Once the folder is claimed: the scalar log; logs rewritten from the state held."""
        self.scalars = utils.scalar_log(self.output_dir if self.is_main else None, self.args)
        self.write_logs()

    # ---------------------------------------------------------------------- events
    def dense_scored(self, stats: dict) -> None:
        self.dense_stats = stats
        print(f"before pruning: {score_text(stats)}")

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
        print(f"Epoch {epoch}: student {score_text(stats)}  {self.args.cost} ratio "
              f"{pruner.ratio():.4f}")
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

    def dense_scores(self) -> dict:
        return score_fields(self.dense_stats, "dense") if self.dense_stats else {}

    def dense_note(self) -> str:
        if not self.dense_stats:
            return ""
        name, value = headline(self.dense_stats)
        return f" (dense {value:.2f}%)" if name == "top-1" else f" (dense {value:.4f})"

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
            cost_ratio=ratio, **self.dense_scores(), **score_fields(stats, "pruned"), speed=speed,
            feature_channels=feature_channels(self.model), **extra)
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
                self.args, self.run_id, self.dense_scores(), self.epochs,
                self.epoch_means.state_dict())
        self.loop.mark_saved()

    def write_logs(self) -> None:
        """dims_history.json and log.txt, whole, from what the state holds."""
        if self.is_main:
            write_text_atomic(self.output_dir / checkpoints.HISTORY_FILE, json.dumps(
                {"original": widths_of(self.original), "steps": self.loop.history}, indent=1))
            write_text_atomic(self.output_dir / checkpoints.LOG_FILE, utils.json_lines(
                log_records(self._dense_log(), self.loop.history, self.epochs, self.speed)))

    def _dense_log(self) -> dict:
        if not self.dense_stats:
            return {}
        return {score_key(self.dense_stats): headline(self.dense_stats)[1]}

    def save_target_models(self, record: dict) -> None:
        """Several targets: the compact model at each one reached, scored now (the student is
        evaluated mid-epoch, then put back in its training mode), and pareto.png."""
        stats = self.evaluate()
        self.loop.set_phase()
        key = score_key(stats)
        record["target_models"] = [
            {"target": t, "file": checkpoints.target_file(t), "ratio": record["ratio"],
             **{f"test_{k}": v for k, v in stats.items() if k != "n"}}
            for t in record["targets_reached"]]
        for entry in record["target_models"]:
            print(f"target {entry['target']:g} reached: {self.args.cost} ratio "
                  f"{record['ratio']:.4f}, {score_text(stats)}; wrote "
                  f"{self.output_dir / entry['file']}")
        if not self.is_main:
            return
        compact_model = compact(self.model)
        for entry in record["target_models"]:
            checkpoints.save_model_file(
                self.output_dir / entry["file"], compact_model, self.args, run_id=self.run_id,
                original_dims=self.original.to_dict(), cost=self.args.cost,
                cost_ratio=record["ratio"], target=entry["target"], **self.dense_scores(),
                **score_fields(stats, "pruned"), feature_channels=feature_channels(self.model))
        points = [e for r in self.loop.history for e in r.get("target_models", [])]
        plot_pareto(points, self._dense_log().get(key), self.args.cost, key,
                    self.output_dir / checkpoints.PARETO_FILE)
