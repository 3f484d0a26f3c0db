"""Shared helpers for the end-to-end tests: run the entry scripts as a user would."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port the OS reports free now, so tests side by side (pytest -n 2) do not both ask
    for one fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_DIMS = {"embed_dim": 32, "num_heads": [2, 2], "qk_dim": [8, 8], "v_dim": [8, 8],
             "mlp_dim": [48, 48]}

# a fast, deterministic DIGITS recipe shared by the script tests
FAST = ["--model", "deit_tiny_distilled_patch16_224", "--patch-size", "8", "--input-size", "32",
        "--data-set", "DIGITS", "--batch-size", "64", "--num_workers", "0", "--device", "cpu",
        "--warmup-epochs", "0", "--cooldown-epochs", "0", "--lr", "1e-3", "--unscale-lr",
        "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0",
        "--drop-path", "0", "--print-freq", "1000"]
TRAIN = [*FAST, "--no-model-ema"]  # revit_scratch.py: no weight EMA (nvit_prune.py has none)
# nvit_prune.py's pruning flags at the reference's settings, fast; the cost model is added
PRUNE_FLAGS = ["--pruning", "--kl_loss_coeff", "100000", "--original_loss_coeff", "1",
               "--interval_prune", "4", "--prune_per_iter", "48", "--student_eval", "true",
               "--pruning_config", str(ROOT / "configs" / "nvit_reference.json")]


def run_script(module_name: str, argv: list) -> None:
    """A script's main in this process, as `python SCRIPT.py ARGV` would run it (no torch
    import per run: several times faster than `run` for short runs)."""
    import importlib
    import utils
    module = importlib.import_module(module_name)
    utils.run_main(module.main, module.get_args_parser().parse_args([str(a) for a in argv]))


def run_here(script: str, *args) -> subprocess.CompletedProcess:
    """`run(script, ..., check=False)` in this process: the exit code, stdout and stderr as a
    subprocess would give them, without paying the torch import. For runs whose result is not
    compared bitwise with a subprocess's (threads differ: OMP_NUM_THREADS=1 there)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_script(script.removesuffix(".py"), list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(),
                                       err.getvalue())


def write_dims(path: Path, dims: dict = TINY_DIMS) -> Path:
    path.write_text(yaml.safe_dump(dims))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def command(script: str) -> list[str]:
    """How a user runs it: `python SCRIPT.py` at the top, `python -m tools.NAME` for tools and
    benchmarks."""
    if script.startswith(("tools/", "benchmarks/")):
        return [sys.executable, "-m", script.removesuffix(".py").replace("/", ".")]
    return [sys.executable, str(ROOT / script)]


def run(script: str, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*command(script), *map(str, args)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Non-zero exit, no traceback, one 'error:' line naming the cause."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


def qkv_parts(attn) -> list:
    """The Q, K and V parts of `attn.qkv` as detached Linear-like objects (weight, bias, and
    their .grad when the projection has one), for formulas written per projection."""
    from types import SimpleNamespace
    lin = attn.qkv
    out = []
    pieces = [t.detach().split(attn.qkv_split) for t in (lin.weight, lin.bias)]
    grads = [None if t.grad is None else t.grad.split(attn.qkv_split) for t in (lin.weight, lin.bias)]
    for i in range(3):
        w, b = pieces[0][i].clone(), pieces[1][i].clone()
        if grads[0] is not None:
            w.grad, b.grad = grads[0][i].clone(), grads[1][i].clone()
        out.append(SimpleNamespace(weight=w, bias=b))
    return out


DENSE_DIMS = {"embed_dim": 64, "num_heads": [4, 4, 4], "qk_dim": [16, 16, 16],
              "v_dim": [16, 16, 16], "mlp_dim": [128, 128, 128]}


def write_dense_model(path: Path) -> Path:
    """A 'pretrained' dense DeiT for the pruning runs (DENSE_DIMS, 32 px, patch 8, 10
    classes): random weights are enough for the mechanics."""
    import torch
    import models
    torch.manual_seed(0)
    m = models.build_model("deit_tiny_distilled_patch16_224", dims=models.Dims(**DENSE_DIMS),
                           img_size=32, patch_size=8, num_classes=10)
    torch.save({"model": m.state_dict(), "dims": m.dims.to_dict()}, path)
    return path


def kill_at_first_state(script: str, *args, output_dir: Path) -> dict:
    """Run `script ARGS --save-every 1 --output_dir OUTPUT_DIR` and SIGKILL it as soon as its
    first pruning state is on disk (mid-run, mid-epoch); that state, loaded."""
    import signal
    import time

    import torch
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args),
                             "--save-every", "1", "--output_dir", str(output_dir)], cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = output_dir / "pruning_state.pth"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    killed = torch.load(state, map_location="cpu", weights_only=True)
    assert not killed["done"], "the run finished before it could be killed"
    return killed


def assert_same_pruning_state(full: Path, part: Path) -> tuple[dict, dict]:
    """Two runs' pruning_state.pth (an uninterrupted one, a killed and resumed one) hold the
    same pruner, masks and weights, bitwise; both states, loaded."""
    import torch
    a = torch.load(full / "pruning_state.pth", map_location="cpu", weights_only=True)
    b = torch.load(part / "pruning_state.pth", map_location="cpu", weights_only=True)
    assert a["pruner"] == b["pruner"]
    assert all(torch.equal(x, y) for x, y in zip(a["masks"]["emb"], b["masks"]["emb"]))
    for x, y in zip(a["masks"]["blocks"], b["masks"]["blocks"]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    pools = a["masks"].get("model", {}), b["masks"].get("model", {})  # model-level kinds
    assert pools[0].keys() == pools[1].keys()
    assert all(torch.equal(pools[0][k], pools[1][k]) for k in pools[0])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    return a, b
