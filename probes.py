"""Judging an encoder by its frozen features, without its classifier: DINO's weighted k-NN
vote and a linear probe.

k-NN (Caron et al. 2021, DINO's `eval_knn.py`): features L2-normalised; for each query the k
training features of highest cosine similarity s vote for their labels with weight
exp(s / T); the class with the largest summed weight is the prediction (k = 20, T = 0.07 by
default, as DINO). Linear probe: scikit-learn's multinomial logistic regression on the
standardised training features (what the probe fits and how is scikit-learn's, not ours).
"""
from __future__ import annotations

import torch

KNN_K = 20
KNN_TEMPERATURE = 0.07


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor,
                num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                chunk: int = 1024) -> torch.Tensor:
    """Predicted class of every query row by the weighted vote of its k nearest (cosine)
    training rows; queries in chunks so the similarity matrix stays small."""
    bank = torch.nn.functional.normalize(train.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for q in torch.nn.functional.normalize(queries.float(), dim=1).split(chunk):
        sims, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out)


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor,
             labels: torch.Tensor, num_classes: int, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 (%) of the weighted k-NN vote."""
    pred = knn_predict(train, train_labels, queries, num_classes, k, temperature)
    return 100.0 * float((pred == labels).float().mean())


def linear_probe_top1(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor,
                      labels: torch.Tensor, max_iter: int = 1000, seed: int = 0) -> float:
    """Top-1 (%) of a logistic regression fitted on the standardised training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter,
                                                               random_state=seed))
    probe.fit(train.double().numpy(), train_labels.numpy())
    return 100.0 * float(probe.score(queries.double().numpy(), labels.numpy()))
