"""Device and process-group plumbing that the first GPU run depends on, checked on the CPU."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import weakref

import pytest
import torch
import torch.distributed as dist

import builders
import checkpoints
import tf32
import utils
from errors import Stopped, UserError


@pytest.mark.parametrize("local_rank,visible,expected", [(3, 8, 3), (0, 1, 0), (3, 1, 0),
                                                          (5, 2, 1)])
def test_local_cuda_index(local_rank, visible, expected):
    """One visible GPU per process (srun, mpirun): LOCAL_RANK 3 is that process's device 0."""
    assert utils.local_cuda_index(local_rank, visible) == expected


def test_local_cuda_index_without_devices():
    with pytest.raises(UserError, match="no CUDA device"):
        utils.local_cuda_index(0, 0)


def loader_args(device: str) -> argparse.Namespace:
    return argparse.Namespace(data_set="DIGITS", data_path=None, input_size=32, aa="none",
                              batch_size=16, grad_accum_steps=1, num_workers=0, pin_mem=True, seed=0,
                              repeated_aug=False, distributed=False, dist_eval=False,
                              device=device, skip_bad_images=False)


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_memory_pinned_for_the_chosen_device(monkeypatch, device, pinned):
    """A --device cpu run on a GPU machine must not pin memory (it would open a CUDA context)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    train, val, _, _ = builders.build_loaders(loader_args(device))
    assert train.pin_memory is pinned and val.pin_memory is pinned


def test_collectives_on_the_groups_device(tmp_path):
    """gloo reduces CPU tensors (an NCCL group gets CUDA ones: see tests/gpu)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert utils.collective_device() == torch.device("cpu")
        assert utils.all_reduce_sum([1.0, 2.5]) == [1.0, 2.5]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ending, code", [(None, None), (UserError("bad --dims"), 2),
                                          (Stopped("stopped on request"), 130)])
def test_run_main_frees_ddp_before_leaving_the_group(tmp_path, monkeypatch, ending, code):
    """A DDP model that outlives main() in a reference cycle (or in an exception's traceback)
    must be freed before the process group is destroyed: destroying it only drops torch's
    reference, and a group left to interpreter teardown can abort the process (the likely
    cause of one SIGABRT at the end of a two-rank CI run)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    alive = []
    leave = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda: (alive.append(ddp_ref() is not None), leave()))

    def main(args):
        nonlocal ddp_ref
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        cycle = [ddp]
        cycle.append(cycle)  # only a garbage collection frees it
        ddp_ref = weakref.ref(ddp)
        if ending is not None:
            raise ending

    ddp_ref = None
    gc.disable()  # no automatic collection may free the cycle by chance
    try:
        if code is None:
            utils.run_main(main, None)
        else:
            with pytest.raises(SystemExit) as e:
                utils.run_main(main, None)
            assert e.value.code == code
    finally:
        gc.enable()
        if dist.is_initialized():
            leave()
    assert alive == [False]


def test_checkpoint_tensors_on_cpu_without_copies():
    """cpu_tensors keeps the structure, detaches, and does not copy what is already on the CPU."""
    w = torch.ones(3, requires_grad=True)
    state = {"model": {"w": w}, "opt": [{"step": torch.tensor(2.0), "betas": (0.9, 0.99)}], "n": 1}
    out = checkpoints.cpu_tensors(state)
    assert out["n"] == 1 and out["opt"][0]["betas"] == (0.9, 0.99)
    assert not out["model"]["w"].requires_grad
    assert out["model"]["w"].data_ptr() == w.data_ptr()


def _train_where_rank_1_diverges(rank: int, folder: str) -> None:
    import engine
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = [(torch.randn(3, 4), torch.tensor([0, 1, 0]))] * 3

    def criterion(samples, outputs, targets):
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        return loss * float("nan") if rank == 1 else loss
    try:
        engine.train_one_epoch(model, criterion, data, torch.optim.SGD(model.parameters(), 0.1),
                               torch.device("cpu"), 0, print_freq=100)
        result = "trained on"
    except UserError as e:
        result = str(e)
    finally:
        dist.destroy_process_group()
    with open(f"{folder}/rank{rank}", "w") as f:
        f.write(result)


def test_a_loss_diverging_on_one_rank_stops_every_rank(tmp_path):
    """Raised on one rank only, the error would leave the others waiting in the next
    collective until the timeout: every rank learns of it in the same step."""
    torch.multiprocessing.spawn(_train_where_rank_1_diverges, args=(str(tmp_path),), nprocs=2)
    results = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert all("loss is not finite at epoch 0, iteration 0" in r for r in results), results
    assert "(here nan)" in results[1] and "(here" not in results[0]


class _Shard:
    """Three batches of one rank's shard; on rank 1 the second holds an unreadable image."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __len__(self) -> int:
        return 3

    def __iter__(self):
        from datasets import BadImage
        for i in range(3):
            if self.rank == 1 and i == 1:
                raise BadImage("/data/train/n01/bad.JPEG", "truncated file")
            yield torch.randn(3, 4), torch.tensor([0, 1, 0])


def _bad_image_on_rank_1(rank: int, folder: str, phase: str) -> None:
    import engine
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # a regression fails, not hangs
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    try:
        if phase == "train":
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            engine.train_one_epoch(ddp, lambda s, o, t: torch.nn.functional.cross_entropy(o, t),
                                   _Shard(rank), torch.optim.SGD(model.parameters(), 0.1),
                                   torch.device("cpu"), 0, print_freq=100)
        else:
            engine.evaluate(_Shard(rank), model, torch.device("cpu"), sharded=True)
        result = "went on"
    except UserError as e:
        result = str(e)
    finally:
        ddp = None  # DDP's reducer must go before its process group (else an abort at exit)
        gc.collect()
        dist.destroy_process_group()
    with open(f"{folder}/rank{rank}", "w") as f:
        f.write(result)


@pytest.mark.parametrize("phase", ["train", "sharded_eval"])
def test_a_bad_image_on_one_rank_stops_every_rank(tmp_path, phase):
    """Each rank reads its own shard, so a bad image is met by one rank only: raised there
    alone, the others would wait in the next collective until the timeout (torchrun kills
    them, srun and mpirun do not). Every rank stops with the file's message."""
    torch.multiprocessing.spawn(_bad_image_on_rank_1, args=(str(tmp_path), phase), nprocs=2)
    results = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert results[0] == results[1], results
    assert "cannot read image /data/train/n01/bad.JPEG: truncated file" in results[0]


def test_amp_dtype_choice():
    """--amp: fp16 (with a grad scaler) on CUDA, bf16 on the CPU, as the reference;
    --amp-dtype chooses and implies --amp; only fp16 gets a scaler."""
    from engine import amp_dtype_for, make_grad_scaler
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype_for(cpu, False) is None and amp_dtype_for(cuda, False) is None
    assert amp_dtype_for(cpu, True) == torch.bfloat16 and amp_dtype_for(cuda, True) == torch.float16
    assert amp_dtype_for(cuda, False, "bfloat16") == torch.bfloat16
    assert amp_dtype_for(cpu, True, "float16") == torch.float16
    assert make_grad_scaler(cpu, torch.bfloat16) is None
    assert make_grad_scaler(cpu, torch.float16) is not None
    import nvit_prune
    import revit_scratch
    for script in (revit_scratch, nvit_prune):
        assert script.get_args_parser().parse_args(["--amp-dtype", "bfloat16"]).amp_dtype == "bfloat16"


@contextlib.contextmanager
def math_settings_restored():
    """Torch's global math settings as they were before the block, restored explicitly: pytest
    9.2's monkeypatch deletes the attributes of torch's backend modules on undo instead of
    setting them back, and tf32 settings must be written through the API torch has."""
    conv = (lambda: torch.backends.cudnn.conv.fp32_precision) if tf32.has_precision_api() else (
        lambda: torch.backends.cudnn.allow_tf32)
    rnn = torch.backends.cudnn.rnn.fp32_precision if tf32.has_precision_api() else None
    saved = (torch.get_float32_matmul_precision(), conv(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        yield
    finally:
        matmul, conv_value, benchmark, deterministic, algorithms, workspace = saved
        torch.set_float32_matmul_precision(matmul)
        if tf32.has_precision_api():
            torch.backends.cudnn.conv.fp32_precision = conv_value
            torch.backends.cudnn.rnn.fp32_precision = rnn
        else:
            torch.backends.cudnn.allow_tf32 = conv_value
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = deterministic
        torch.use_deterministic_algorithms(algorithms)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def test_cuda_math_settings():
    """CUDA runs: cudnn.benchmark on, TF32 only with --tf32 (through torch's fp32_precision
    API where it has one, so the settings read back consistently through both APIs); a CPU
    run changes nothing."""
    with math_settings_restored():
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        if tf32.has_precision_api():
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
        else:
            torch.backends.cudnn.allow_tf32 = False
        utils.configure_math(torch.device("cpu"), tf32=True)
        assert not torch.backends.cudnn.benchmark
        assert not tf32.tf32_matmul_enabled() and not tf32.tf32_conv_enabled()
        utils.configure_math(torch.device("cuda"), tf32=False)
        assert torch.backends.cudnn.benchmark
        assert not tf32.tf32_matmul_enabled() and not tf32.tf32_conv_enabled()
        utils.configure_math(torch.device("cuda"), tf32=True)
        assert tf32.tf32_matmul_enabled() and tf32.tf32_conv_enabled()
        if tf32.has_precision_api():  # the per-op API, not the deprecated cudnn.allow_tf32
            assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
            torch.backends.cudnn.rnn.fp32_precision = "tf32"  # as conv: allow_tf32 is readable
        # what torch.compile's autotuning and older code read must still be readable
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    import revit_scratch
    assert revit_scratch.get_args_parser().parse_args(["--tf32"]).tf32


def test_deterministic_mode():
    """--deterministic: PyTorch's deterministic algorithms, fixed cuDNN algorithms and a
    fixed cuBLAS workspace on CUDA (set before cuBLAS starts); off without the flag."""
    with math_settings_restored():
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = False
        utils.configure_math(torch.device("cuda"), tf32=False, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        utils.configure_math(torch.device("cuda"), tf32=False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_an_op_without_a_deterministic_version_is_one_line(capsys):
    """PyTorch raises for an op with no deterministic version under --deterministic: the run
    ends with one line naming the op and the flag, not a traceback."""
    def main(args):
        raise RuntimeError("scatter_reduce_cuda does not have a deterministic implementation, "
                           "but you set 'torch.use_deterministic_algorithms(True)'.")
    with pytest.raises(SystemExit) as e:
        utils.run_main(main, None)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --deterministic: scatter_reduce_cuda has no deterministic")
    assert err.count("\n") == 1
    with pytest.raises(RuntimeError):  # any other RuntimeError is a bug: its traceback stays
        utils.run_main(lambda args: (_ for _ in ()).throw(RuntimeError("shape")), None)


def test_device_names_are_checked_against_this_machine(monkeypatch):
    """--device cuda:N names a GPU this machine has (one resolver for scripts and tools)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert utils.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert utils.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda:2: this machine has 2 CUDA device"):
        utils.resolve_device("cuda:2")
    with pytest.raises(UserError, match="only cpu and cuda"):
        utils.resolve_device("meta")
    with pytest.raises(UserError, match="not a device name"):
        utils.resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        utils.resolve_device("cuda")


def test_a_single_process_run_on_cuda_n_makes_it_the_current_device(monkeypatch):
    """Without torchrun, --device cuda:1 still becomes the current device (set_device was only
    called at distributed init), so whatever uses the current device (CUDA events, memory
    statistics) works on the run's GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(utils, "configure_math", lambda *a, **k: None)
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(device="cuda:1", local_rank=0, dist_url="env://", seed=0,
                              output_dir="", dist_eval=False)
    run = utils.setup_run(args, writes=False)
    assert run.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[007-009,012],cpu1", "gpu007"), ("node-a,node-b", "node-a"), ("solo", "solo"),
    ("rack[1-2]-n[01-04]", "rack1-n01"), ("gpu[12,3-4]", "gpu12"), ("n[0099-0100]-ib", "n0099-ib")])
def test_first_slurm_host(nodelist, first):
    assert utils.first_slurm_host(nodelist) == first


def test_a_broken_slurm_node_list_is_one_line():
    with pytest.raises(UserError, match="export MASTER_ADDR"):
        utils.first_slurm_host("gpu[001-004")


def _init_under_slurm(monkeypatch, environ: dict, gpus: int = 4, **flags):
    """init_distributed_mode with SLURM's variables (no torchrun's) and the collectives
    stubbed: (args, what init_process_group was given, the GPU set_device was given)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.setenv(var, "")  # recorded, so that what the code sets is undone too
        monkeypatch.delenv(var)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    seen = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("gpu", i))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.setdefault("init", kw))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(utils, "quiet_other_ranks", lambda is_master: None)
    args = argparse.Namespace(**{"device": "cuda", "local_rank": 0, "dist_url": "env://",
                                 "dist_timeout": 30.0, **flags})
    utils.init_distributed_mode(args)
    return args, seen.get("init"), seen.get("gpu")


def test_srun_finds_its_rendezvous_and_its_gpu(monkeypatch):
    """srun sets neither MASTER_ADDR nor MASTER_PORT: they come from the job's first node and
    its id, the same on every task; the GPU is the task's local id (a cyclic distribution
    puts ranks 0, 2, 4, 6 on node 1, so rank % GPUs would give two ranks one GPU)."""
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    args, init, gpu = _init_under_slurm(monkeypatch, env)
    assert (args.rank, args.world_size, args.gpu, gpu) == (2, 8, 1, 1)
    assert os.environ["MASTER_ADDR"] == "gpu007"
    assert os.environ["MASTER_PORT"] == str(utils.SLURM_PORT_BASE + 123456 % utils.SLURM_PORT_SPAN)
    assert init["init_method"] == "env://" and init["backend"] == "nccl"
    assert init["timeout"] == datetime.timedelta(minutes=30)


def test_srun_keeps_what_the_user_exported(monkeypatch):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "7",
           "MASTER_ADDR": "head", "MASTER_PORT": "29400"}
    args, init, _ = _init_under_slurm(monkeypatch, env, dist_timeout=2.5)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "29400")
    assert init["timeout"] == datetime.timedelta(minutes=2.5)  # --dist-timeout


def test_srun_without_a_node_list_says_what_to_export(monkeypatch):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    with pytest.raises(UserError, match="export MASTER_ADDR=<first node> MASTER_PORT"):
        _init_under_slurm(monkeypatch, env)
    # --dist_url tcp://... needs no rendezvous variables
    args, init, _ = _init_under_slurm(monkeypatch, env, dist_url="tcp://head:29400")
    assert init["init_method"] == "tcp://head:29400" and "MASTER_ADDR" not in os.environ
