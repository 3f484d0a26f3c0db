"""probes.py (DINO's weighted k-NN vote, the linear probe) against hand computations, and
tools.knn_eval end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

import models
import probes
from helpers import assert_user_error, run


def test_knn_vote_is_the_hand_computed_weighted_vote():
    """Each query: the k most cosine-similar training rows vote exp(s / T) for their label."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(30, 5, generator=gen)
    labels = torch.randint(0, 4, (30,), generator=gen)
    queries = torch.randn(7, 5, generator=gen)
    k, T = 6, 0.1
    pred = probes.knn_predict(train, labels, queries, 4, k, T, chunk=3)
    for q, p in zip(queries, pred):
        sims = [float(q @ t) / (float(q.norm()) * float(t.norm())) for t in train]
        top = sorted(range(30), key=lambda i: -sims[i])[:k]
        votes = [0.0] * 4
        for i in top:
            votes[int(labels[i])] += math.exp(sims[i] / T)
        assert int(p) == max(range(4), key=lambda c: votes[c])
    # the weights matter: one very close neighbour outvotes two far ones of another class
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    near = probes.knn_predict(bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), 2, 3, 0.07)
    assert near.tolist() == [0]
    flat = probes.knn_predict(bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), 2, 3, 100.0)
    assert flat.tolist() == [1]  # at a high temperature the vote is nearly a count


def test_top1s_on_separable_and_on_random_labels():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 8, generator=gen) * 5
    y = torch.arange(90) % 3
    x = centres[y] + 0.1 * torch.randn(90, 8, generator=gen)
    yq = torch.arange(30) % 3
    xq = centres[yq] + 0.1 * torch.randn(30, 8, generator=gen)
    assert probes.knn_top1(x, y, xq, yq, 3) == 100.0
    assert probes.linear_probe_top1(x, y, xq, yq) == 100.0
    shuffled = yq[torch.randperm(30, generator=gen)]
    assert probes.knn_top1(x, y, xq, shuffled, 3) < 60.0


@pytest.mark.slow
def test_knn_eval_tool_scores_a_pruned_model_and_its_dense_one(tmp_path):
    torch.manual_seed(0)
    dims = models.Dims(embed_dim=32, num_heads=[2, 2], qk_dim=[8, 8], v_dim=[8, 8], mlp_dim=[32, 32])
    dense = models.build_model("deit_tiny_patch16_224", dims=dims, img_size=32, patch_size=8,
                               num_classes=10)
    dense_path = tmp_path / "dense.pth"
    torch.save({"model": dense.state_dict(), "dims": dense.dims.to_dict()}, dense_path)
    # a stand-in for a pruned checkpoint: its run's --pretrained-path recorded in args
    small = models.build_model("deit_tiny_patch16_224", dims=models.Dims(
        embed_dim=32, num_heads=[1, 1], qk_dim=[8, 8], v_dim=[8, 8], mlp_dim=[16, 16]),
        img_size=32, patch_size=8, num_classes=10)
    pruned = tmp_path / "pruned.pth"
    torch.save({"model": small.state_dict(), "dims": small.dims.to_dict(),
                "args": {"pretrained_path": str(dense_path)}}, pruned)
    proc = run("tools/knn_eval.py", pruned, "--dense", "--data-set", "DIGITS",
               "--num-workers", "0", "--json")
    r = json.loads(proc.stdout)
    assert (r["train_images"], r["val_images"], r["k"]) == (1438, 359, 20)
    assert r["model"]["features"] == 32 and r["dense"]["features"] == 32
    # the dense model's figures are what the functions give on its features
    from torch.utils.data import DataLoader
    from datasets import build_dataset
    from engine import extract_features
    from types import SimpleNamespace
    frame = SimpleNamespace(data_set="DIGITS", data_path=None, input_size=32,
                            eval_crop_ratio=0.875)
    feats = [extract_features(DataLoader(build_dataset(t, frame, augment=False)[0],
                                         batch_size=256), dense, torch.device("cpu"))
             for t in (True, False)]
    want = probes.knn_top1(*feats[0], *feats[1], 10)
    assert r["dense"]["knn_top1"] == pytest.approx(want, abs=1e-9)
    with torch.no_grad():  # the features are the pooled pre-logits
        x = next(iter(DataLoader(build_dataset(False, frame)[0], batch_size=4)))[0]
        pooled = dense.forward_head(dense.forward_features(x), pre_logits=True)
        assert torch.allclose(feats[1][0][:4], pooled, atol=1e-5)  # (batch 256 against 4)
    # --dense without a recorded run: one line
    assert_user_error(run("tools/knn_eval.py", dense_path, "--dense", "--data-set", "DIGITS",
                          check=False), "--dense", "pretrained-path")
