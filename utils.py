"""Run set-up (distributed, device, seeds, output folder), progress logging and the error exit
of the entry scripts."""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import run_folder
from errors import Stopped, UserError
import flags
from flags import user_message
from tf32 import enable_tf32


# --------------------------------------------------------------------------- distributed
def init_distributed_mode(args) -> None:
    """Join the process group described by torchrun / `launch --use_env` variables.

    Sets args.distributed, args.rank, args.world_size, args.gpu. Plain `python` runs one
    process. The backend is nccl on CUDA and gloo on the CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        # the task's index on its node, whatever the distribution of tasks over nodes
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
        if args.dist_url == "env://":
            slurm_rendezvous(os.environ)
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.distributed = args.world_size > 1
    if not args.distributed:
        return
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        args.gpu = local_cuda_index(args.gpu, torch.cuda.device_count())
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=args.dist_timeout))
    dist.barrier()
    quiet_other_ranks(args.rank == 0)


SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000  # MASTER_PORT from the job id: below 32768


def slurm_rendezvous(environ) -> None:
    """MASTER_ADDR and MASTER_PORT for `env://` under srun, which sets neither: the first
    host of the job's node list and a port from the job id (the same on every task), unless
    the user exported them."""
    if "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        return
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
        or environ.get("SLURM_NODELIST")
    job = environ.get("SLURM_JOB_ID", "")
    if not nodes or not job.isdigit():
        raise UserError("srun sets no MASTER_ADDR/MASTER_PORT and the job's node list or id is "
                        "missing: export MASTER_ADDR=<first node> MASTER_PORT=<free port>, or "
                        "pass --dist_url tcp://HOST:PORT")
    environ.setdefault("MASTER_ADDR", first_slurm_host(nodes))
    environ.setdefault("MASTER_PORT", str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[007-009,012],cpu1" -> "gpu007",
    "rack[1-2]-n[01-04]" -> "rack1-n01" (each bracket's first value, zero padding kept)."""
    host, depth, bracket = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth, bracket = depth + 1, ""
        elif ch == "]":
            depth -= 1
            host.append(bracket.split(",")[0].split("-")[0])
        elif depth:
            bracket += ch
        elif ch == ",":
            break
        else:
            host.append(ch)
    if depth or not host:
        raise UserError(f"SLURM node list {nodelist!r} cannot be read: export MASTER_ADDR and "
                        f"MASTER_PORT")
    return "".join(host)


def local_cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this process: its local rank, or, when the launcher shows each
    process only its own GPU(s) (srun/mpirun with per-task CUDA_VISIBLE_DEVICES), that rank
    modulo the visible count (set_device(LOCAL_RANK) would fail there)."""
    if visible <= 0:
        raise UserError("--device cuda: no CUDA device is visible to this process")
    return local_rank if local_rank < visible else local_rank % visible


def quiet_other_ranks(is_master: bool) -> None:
    """Only rank 0 prints progress: other ranks' stdout goes to /dev/null (errors still reach
    stderr, prefixed with the rank by run_main)."""
    if not is_master:
        sys.stdout = open(os.devnull, "w")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def collective_device() -> torch.device:
    """Where the process group's collectives run: NCCL reduces CUDA tensors only, gloo CPU
    ones (a CPU tensor on an NCCL group fails: --model-ema-force-cpu --dist-eval did)."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single-process run)."""
    if is_dist():
        dist.barrier()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over processes, in place (the tensor is on the group's device already)."""
    if is_dist():
        dist.all_reduce(t)
    return t


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (exact counts for --dist-eval)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def raise_on_every_rank(error: UserError | None, anywhere: bool) -> None:
    """Once a collective has told every rank whether some rank failed (`anywhere`): every
    rank raises the error of the lowest failing rank, its message sent to all, so that no
    rank is left waiting in a collective for one that stopped."""
    if not anywhere:
        return
    if not is_dist():
        raise error
    device = collective_device()
    first = torch.tensor([get_rank() if error is not None else get_world_size()], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    src = int(first.item())
    box = [user_message(error) if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=device)
    if get_rank() == src:
        raise error
    raise UserError(box[0])


def next_on_every_rank(batches: Iterator):
    """next(batches), where a UserError from one rank's data (a bad image: each rank reads
    its own shard) stops every rank with its message. One tiny collective per batch in a
    distributed run, taken before the step's forward is launched."""
    error = None
    try:
        batch = next(batches)
    except UserError as e:
        error, batch = e, None
    if is_dist():
        failed = torch.tensor([float(error is not None)], device=collective_device())
        dist.all_reduce(failed)
        raise_on_every_rank(error, bool(failed.item()))
    elif error is not None:
        raise error
    return batch


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device: cpu, cuda or cuda:N, which this machine must have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device name (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s)")
    return device


def configure_math(device: torch.device, tf32: bool, deterministic: bool = False) -> None:
    """cudnn.benchmark for the conv patch embedding and CNN teachers; TF32 only if asked.

    `deterministic` (--deterministic): PyTorch's deterministic algorithms everywhere (flash
    and memory-efficient attention then take their deterministic backward, cuBLAS a fixed
    workspace, cuDNN fixed algorithms), so a CUDA run repeats bitwise on the same machine,
    more slowly; an op without a deterministic version is reported by run_main.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    torch.use_deterministic_algorithms(deterministic)
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if tf32:
        enable_tf32()


# ------------------------------------------------------------------------------ seeding
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def iteration_seed(seed: int, epoch: int, iteration: int, rank: int) -> int:
    """Seed of one training step: reseeding every step makes a resumed run replay exactly."""
    return (seed * 1_000_003 + epoch * 100_003 + iteration * 7_919 + rank * 104_729) % 2**62


# --------------------------------------------------------------------------- run set-up
@dataclass
class Run:
    """Where and how this process runs."""
    device: torch.device
    rank: int
    world_size: int
    output_dir: Path | None  # None without --output_dir; created by claim_output_dir
    sharded_eval: bool  # --dist-eval over several processes: counts summed over shards

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_run(args, after_init=None, writes: bool = True) -> Run:
    """Join the process group, pick the device, seed this rank, check (not create) the output
    folder, unless the run `writes` nothing there (--eval may read a folder a live run holds).
    `after_init(args)` runs once the process group exists (so only rank 0 prints)."""
    init_distributed_mode(args)
    if after_init is not None:
        after_init(args)
    device = resolve_device(args.device)
    if device.type == "cuda":  # cuda:N without torchrun too: what uses the current device
        torch.cuda.set_device(device)  # (CUDA events, NCCL, memory stats) means this GPU
    configure_math(device, getattr(args, "tf32", False), getattr(args, "deterministic", False))
    rank = get_rank()
    seed_everything(args.seed + rank)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and writes:
        run_folder.check_output_dir(output_dir)
    return Run(device, rank, get_world_size(), output_dir, args.distributed and args.dist_eval)


def on_main_process(fn):
    """fn() on rank 0 only; a UserError there is raised on every rank, so that none waits
    for the others in a collective (all ranks leave with the same one-line message)."""
    message = None
    if is_main_process():
        try:
            fn()
        except UserError as e:
            message = user_message(e)
    if is_dist():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)


def claim_output_dir(run: Run, check=None, args=None) -> None:
    """Once every input has passed: `check()` the folder's contents (does it hold another
    run?), then create the output folder, lock it for this run and write the run's flags to
    args.yaml (timm's convention; `-c OUTPUT_DIR/args.yaml` repeats the run)."""
    def claim() -> None:
        if check is not None:
            check()
        run_folder.claim(run.output_dir)
        if isinstance(args, flags.Args):
            flags.write_args_yaml(args, run.output_dir / flags.ARGS_FILE)
    if run.output_dir is not None:
        on_main_process(claim)


def seed_fn(seed: int, epoch: int, rank: int):
    """engine.train_one_epoch's seed_fn: reseed before each step, so a resumed run replays."""
    return lambda i: seed_everything(iteration_seed(seed, epoch, i, rank))


# ------------------------------------------------------------------------------ logging
class RunningMeans:
    """Sums and counts of scalar metrics over an epoch. The caller may own it, so that a run
    saved in mid-epoch keeps what the epoch has summed so far (`state_dict`) and a resumed
    epoch's means equal an uninterrupted one's."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, n: int = 1, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] += float(v) * n
            self.counts[k] += n

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key]

    def averages(self) -> dict[str, float]:
        return {k: self.mean(k) for k in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.sums.update(state["sums"])
        self.counts.update(state["counts"])


class ProgressLogger:
    """Running means of scalar metrics (its own, or the caller's `means`) and a rank-0
    progress line every `print_freq` steps."""

    def __init__(self, header: str, total: int, print_freq: int, batch_size: int,
                 first: int = 0, means: RunningMeans | None = None) -> None:
        self.header, self.total, self.print_freq = header, total, max(1, print_freq)
        self.batch_size = batch_size
        self.means = RunningMeans() if means is None else means
        self.last: dict[str, float] = {}
        self.start = time.perf_counter()
        self.first = first  # iterations done before this logger started (resumed epoch)

    def update(self, n: int = 1, **values: float) -> None:
        self.means.update(n, **values)
        self.last.update({k: float(v) for k, v in values.items()})

    def step(self, i: int) -> None:
        """Call after iteration i (0-based); prints at the print frequency and at the end."""
        if (i + 1) % self.print_freq and i + 1 != self.total:
            return
        elapsed = time.perf_counter() - self.start
        done = i + 1 - self.first
        eta = elapsed / done * (self.total - i - 1)
        imgs = self.batch_size * get_world_size() * done / max(elapsed, 1e-9)
        parts = [f"{k} {self.last[k]:.4g} ({self.means.mean(k):.4g})" for k in self.last]
        print(f"{self.header} [{i + 1}/{self.total}] " + "  ".join(parts)
              + f"  img/s {imgs:.1f}  eta {datetime.timedelta(seconds=int(eta))}", flush=True)

    def averages(self) -> dict[str, float]:
        return self.means.averages()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def json_safe(value):
    """Non-finite floats (a diverged loss) as null, so that log files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class ScalarLog:
    """A run's scalars: TensorBoard in OUTPUT_DIR/tb (when tensorboard is installed) and,
    with --log-wandb, the same to Weights & Biases (imported only then). Each series has its
    own x axis (`axis`: "epoch", "prune/step", ...), as wandb needs one per series."""

    def __init__(self, output_dir: Path | None, wandb_config: dict | None = None) -> None:
        self.writer = self.wandb = None
        self._defined: set[str] = set()  # wandb metrics given their x axis
        if output_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(output_dir / "tb"))
        except ImportError:
            pass
        if wandb_config is not None:
            import wandb
            self.wandb = wandb.init(project=wandb_config.get("wandb_project") or "nvit",
                                    name=output_dir.name, dir=str(output_dir),
                                    config=wandb_config)

    def add(self, record: dict, step: int, axis: str, prefix: str = "") -> None:
        """A log record's numbers (not booleans, lists or text) at `step` of the series `axis`."""
        numbers = {prefix + k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("epoch", "step")}
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            for k in (axis, *numbers):
                if k not in self._defined:
                    self._defined.add(k)
                    self.wandb.define_metric(k, **({} if k == axis else {"step_metric": axis}))
            self.wandb.log({**numbers, axis: step})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def scalar_log(output_dir: Path | None, args) -> ScalarLog:
    """The run's ScalarLog (no output folder, as on ranks other than 0: logs nothing)."""
    config = flags.plain(args.resolved) if getattr(args, "log_wandb", False) else None
    return ScalarLog(output_dir, config)


def require_wandb(args) -> None:
    """--log-wandb without the package: refused before any work, not a silent no-op."""
    import importlib.util
    if getattr(args, "log_wandb", False) and importlib.util.find_spec("wandb") is None:
        raise UserError("--log-wandb needs the wandb package (pip install wandb)")


def json_lines(records: list[dict]) -> str:
    """log.txt's content: one strict-JSON record per line."""
    return "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)


def one_line(message: str) -> str:
    """A user error raised in a DataLoader worker arrives wrapped in the worker's traceback
    ("Caught BadImage in DataLoader worker process 0. Original Traceback ..."): keep its
    own message, the traceback's last line after the exception's name."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


NOT_DETERMINISTIC = "does not have a deterministic implementation"  # PyTorch's message


def run_main(main, args) -> None:
    """Run an entry script's main(); user mistakes end with one line on stderr and exit 2."""
    try:
        main(args)
    except UserError as e:
        run_folder.release_all()  # before the exit: another run may start at once
        where = f"[rank {get_rank()}] " if is_dist() else ""
        sys.stderr.write(f"error: {where}{one_line(user_message(e))}\n")
        sys.stderr.flush()
        if is_dist():
            e.__traceback__ = None  # it holds the run's frames, a DDP model among them
            leave_process_group()
        sys.exit(2)
    except RuntimeError as e:
        if NOT_DETERMINISTIC not in str(e):
            raise
        run_folder.release_all()
        op = str(e).split(NOT_DETERMINISTIC)[0].strip()
        sys.stderr.write(f"error: --deterministic: {op} has no deterministic implementation in "
                         f"PyTorch {torch.__version__}; run without --deterministic\n")
        sys.exit(2)
    except Stopped as e:  # every rank agreed to stop, so every rank leaves the group
        sys.stderr.write(f"{e}\n")
        if is_dist():
            e.__traceback__ = None
            leave_process_group()
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        run_folder.release_all()
    if is_dist():
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group after freeing what still holds it. destroy_process_group
    only drops torch's own reference: a DDP model kept alive by a reference cycle would keep
    the group to interpreter exit, whose teardown can abort the process (SIGABRT)."""
    gc.collect()
    dist.destroy_process_group()


def replicas_identical(model: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (a cheap end-of-run DDP check)."""
    return replicas_identical_tensors(list(model.parameters()))


@torch.no_grad()
def replicas_identical_tensors(tensors: list[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical copies of these tensors."""
    if not is_dist():
        return True
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
