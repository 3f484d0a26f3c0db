"""--grad-accum-steps: N batches of B compute what one batch of B*N computes, in the engine,
in both scripts (lr scaling, prune interval and saliency per optimizer step), and a pruning
run with accumulation still resumes exactly."""
from __future__ import annotations

import contextlib
import json
import signal

import pytest
import torch
import torch.nn.functional as F

import models
from engine import train_one_epoch
from helpers import FAST, PRUNE_FLAGS, TINY_DIMS, TRAIN, run_script, write_dense_model, write_dims

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts


class PartsLoss:
    """Cross-entropy with two logged parts, as the scripts' criteria report theirs."""

    def __call__(self, samples, outputs, targets):
        ce = F.cross_entropy(outputs, targets)
        reg = outputs.pow(2).mean()
        self.last_parts = {"loss_ce": ce.detach(), "loss_reg": reg.detach()}
        return ce + 0.01 * reg


class CountingWrapper(torch.nn.Module):
    """A model with DDP's no_sync, recording on which micro-steps gradients stayed local."""

    def __init__(self, module):
        super().__init__()
        self.module, self.local = module, []

    def forward(self, x):
        self.local.append(self._in_no_sync)
        return self.module(x)

    _in_no_sync = False

    @contextlib.contextmanager
    def no_sync(self):
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False


def _train(batch_size: int, accum: int, n_images: int = 40, wrap: bool = False):
    torch.manual_seed(0)
    model = models.build_model("deit_tiny_patch16_224", dims=models.Dims(**TINY_DIMS),
                               img_size=16, patch_size=8, num_classes=5)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n_images, 3, 16, 16, generator=g),
                                          torch.randint(0, 5, (n_images,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, drop_last=True)
    net = CountingWrapper(model) if wrap else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # linear in the gradient
    steps = []
    train_one_epoch(net, PartsLoss(), loader, optimizer, torch.device("cpu"), 0,
                    print_freq=1000, accum_steps=accum,
                    after_step=lambda i, losses: steps.append(losses) and False)
    return model, steps, net


def test_accumulated_batches_equal_one_larger_batch():
    big, big_steps, _ = _train(batch_size=8, accum=1)
    acc, acc_steps, _ = _train(batch_size=4, accum=2)
    assert len(big_steps) == len(acc_steps) == 5
    for a, b in zip(acc_steps, big_steps):
        assert a.keys() == b.keys() == {"loss", "loss_ce", "loss_reg"}
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    diff = max((p - q).abs().max().item() for p, q in zip(acc.parameters(), big.parameters()))
    assert diff < 1e-5
    # and it differs from not accumulating at all (the test can tell the two apart)
    small, _, _ = _train(batch_size=4, accum=1)
    assert max((p - q).abs().max().item()
               for p, q in zip(small.parameters(), big.parameters())) > 1e-4


def test_partial_accumulation_at_epoch_end_is_dropped_and_sync_only_on_last():
    # 40 images in batches of 4 = 10 batches; 3 per step: 3 steps, the last batch left out
    _, steps, net = _train(batch_size=4, accum=3, wrap=True)
    assert len(steps) == 3
    assert net.local == [True, True, False] * 3


def _prune(dense, out, batch_size, accum, *extra):
    run_script("nvit_prune", [
        *FAST, *PRUNE_FLAGS, "--cost", "macs", "--pretrained-path", dense, "--epochs", "1",
        "--latency_target", "0", "--interval_prune", "3", "--prune_per_iter", "32",
        "--batch-size", batch_size, "--grad-accum-steps", accum, "--speed-report-pairs", "0",
        "--output_dir", out, *extra])
    return json.loads((out / "dims_history.json").read_text())["steps"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_dense_model(tmp_path_factory.mktemp("dense") / "dense.pth")


def test_pruning_with_accumulation_matches_larger_batch(tmp_path, dense):
    """The prune interval counts optimizer steps and the saliency is taken once per step on the
    accumulated gradient: the same prune steps at the same iterations, the same widths."""
    big = _prune(dense, tmp_path / "big", 64, 1)
    acc = _prune(dense, tmp_path / "acc", 32, 2)
    assert len(big) >= 3
    assert [(r["iteration"], r["dims"]) for r in acc] == [(r["iteration"], r["dims"]) for r in big]
    for a, b in zip(acc, big):
        assert a["ratio"] == b["ratio"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["loss_kl"] == pytest.approx(b["loss_kl"], rel=1e-3, abs=1e-6)
    log = [json.loads(line) for line in (tmp_path / "acc" / "log.txt").read_text().splitlines()]
    epoch = next(r for r in log if r["kind"] == "epoch")
    big_log = [json.loads(line) for line in (tmp_path / "big" / "log.txt").read_text().splitlines()]
    assert epoch["test_acc1"] == pytest.approx(next(
        r for r in big_log if r["kind"] == "epoch")["test_acc1"], abs=0.3)


def test_pruning_with_accumulation_resumes_exactly(tmp_path, dense, monkeypatch):
    import prune_recorder
    full = _prune(dense, tmp_path / "full", 16, 2)
    line = prune_recorder.prune_step_line

    def stop_after_second(record, loop, cost):  # Ctrl-C during prune step 2 (mid-epoch)
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)
        return line(record, loop, cost)
    monkeypatch.setattr(prune_recorder, "prune_step_line", stop_after_second)
    with pytest.raises(SystemExit) as stopped:
        _prune(dense, tmp_path / "part", 16, 2)
    assert stopped.value.code == 130
    state = torch.load(tmp_path / "part" / "pruning_state.pth", weights_only=True)
    assert state["pruner"]["steps"] == 2 and state["iteration"] > 0  # mid-epoch
    monkeypatch.setattr(prune_recorder, "prune_step_line", line)
    part = _prune(dense, tmp_path / "part", 16, 2, "--resume")
    assert part == [{**r, "seconds": p["seconds"], "img_s": p["img_s"]}
                    for r, p in zip(full, part)] and len(part) == len(full)
    a = torch.load(tmp_path / "full" / "pruned_checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "pruned_checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_script_accumulates_like_a_larger_batch(tmp_path):
    """revit_scratch.py with 16 x 4 against 64: the same loss curve and weights, and --lr
    scaled by the 64 images per optimizer step (total batch / 512)."""
    dims = write_dims(tmp_path / "d.yaml")
    flags = [a for a in TRAIN if a != "--unscale-lr"]
    i = flags.index("--batch-size")
    del flags[i:i + 2]
    runs = {}
    for name, batch in {"acc": ["16", "--grad-accum-steps", "4"], "big": ["64"]}.items():
        out = tmp_path / name
        run_script("revit_scratch", [*flags, "--batch-size", *batch, "--dims", dims,
                                     "--epochs", "2", "--drop", "0", "--output_dir", out])
        log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
        weights = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
        runs[name] = log, weights
    (acc_log, acc_w), (big_log, big_w) = runs["acc"], runs["big"]
    assert acc_log[0]["train_lr"] == pytest.approx(1e-3 * 64 / 512)
    for a, b in zip(acc_log, big_log):
        assert a["train_lr"] == b["train_lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert max((acc_w[k] - big_w[k]).abs().max().item() for k in big_w) < 1e-4
