"""--torchcompile: a compiled training step computes the eager one, a prune step recompiles
nothing, and both scripts run compiled."""
from __future__ import annotations

import functools
import json

import pytest
import torch

import models
from engine import train_one_epoch
from helpers import FAST, PRUNE_FLAGS, TRAIN, run_script, write_dense_model, write_dims
from pruning import Gates

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts


@functools.cache
def inductor_problem() -> str | None:
    """Why inductor cannot compile on this machine (no C++ compiler, ...), or None."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as e:  # whatever the platform lacks
        return f"{type(e).__name__}: {e}"
    return None


def _gated_model():
    torch.manual_seed(0)
    model = models.build_model("deit_tiny_distilled_patch16_224",
                               dims=models.Dims(embed_dim=32, num_heads=[2, 2], qk_dim=[8, 8],
                                                v_dim=[8, 8], mlp_dim=[48, 48]),
                               img_size=16, patch_size=8, num_classes=5)
    return model, Gates.attach(model)


def _loss(samples, outputs, targets):
    return sum(torch.nn.functional.cross_entropy(o, targets) for o in outputs)


def _steps(model, compiled, n_steps=2):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8 * n_steps, 3, 16, 16, generator=g),
                                          torch.randint(0, 5, (8 * n_steps,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.1)
    losses = []
    train_one_epoch(compiled, _loss, loader, optimizer, torch.device("cpu"), 0, print_freq=1000,
                    after_step=lambda i, out: losses.append(out["loss"]) and False)
    return losses


def test_compiled_training_and_prune_steps_equal_eager_without_recompiling():
    if inductor_problem():
        pytest.skip(f"torch.compile cannot compile here: {inductor_problem()}")
    from torch._dynamo.utils import counters
    eager, eager_gates = _gated_model()
    model, gates = _gated_model()
    compiled = torch.compile(model)
    assert _steps(compiled, compiled) == pytest.approx(_steps(eager, eager), rel=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    # prune steps: units of all five kinds removed, the embedding's with a live-channel norm
    for g in (gates, eager_gates):
        g.remove("emb", 0, [0, 5, 9])
        g.remove("head", 0, [1])
        g.remove("qk", 1, [2, 3])
        g.remove("v", 0, [4])
        g.remove("mlp", 1, list(range(10)))
    assert _steps(compiled, compiled) == pytest.approx(_steps(eager, eager), rel=1e-5)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for a, b in zip(gates.tensors(), eager_gates.tensors()):
        assert torch.equal(a, b)
    assert counters["stats"]["unique_graphs"] == graphs, "a prune step recompiled"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_dense_model(tmp_path_factory.mktemp("dense") / "dense.pth")


def test_pruning_script_runs_compiled(tmp_path, dense):
    """nvit_prune.py --torchcompile (backend "eager": dynamo's capture and guards, which decide
    recompiles, without inductor's build): the run prunes as the eager one does."""
    def prune(out, *extra):
        run_script("nvit_prune", [
            *FAST, *PRUNE_FLAGS, "--cost", "macs", "--pretrained-path", dense, "--epochs", "1",
            "--latency_target", "0", "--interval_prune", "5", "--speed-report-pairs", "0",
            "--output_dir", out, *extra])
        return json.loads((out / "dims_history.json").read_text())["steps"]
    eager = prune(tmp_path / "eager")
    compiled = prune(tmp_path / "compiled", "--torchcompile", "eager")
    assert [r["dims"] for r in compiled] == [r["dims"] for r in eager] and len(eager) >= 2
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)


def test_training_script_runs_and_evaluates_compiled(tmp_path, capsys):
    dims = write_dims(tmp_path / "d.yaml")
    logs = {}
    for name, extra in {"eager": [], "compiled": ["--torchcompile", "eager"]}.items():
        out = tmp_path / name
        run_script("revit_scratch", [*TRAIN, "--dims", dims, "--epochs", "1", "--output_dir", out,
                                     *extra])
        logs[name] = json.loads((out / "log.txt").read_text())
    assert logs["compiled"]["train_loss"] == pytest.approx(logs["eager"]["train_loss"], rel=1e-4)
    assert logs["compiled"]["test_acc1"] == pytest.approx(logs["eager"]["test_acc1"], abs=0.3)
    capsys.readouterr()
    run_script("revit_scratch", [*TRAIN, "--eval", "--resume", tmp_path / "compiled" /
                                 "checkpoint.pth", "--torchcompile", "eager"])
    assert f"top-1 {logs['compiled']['test_acc1']:.2f}%" in capsys.readouterr().out


def test_unknown_backend_is_one_line(tmp_path, capsys):
    dims = write_dims(tmp_path / "d.yaml")
    with pytest.raises(SystemExit) as e:
        run_script("revit_scratch", [*TRAIN, "--dims", dims, "--epochs", "1",
                                     "--torchcompile", "no_such_backend"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count("\n") == 1 and "--torchcompile no_such_backend" in err
