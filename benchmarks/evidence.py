"""Deletion and insertion curves of the genes each answer names: is the evidence served for a
call the evidence the model used?

For each architecture, trained on a stratified 70% of pbmc68k_reduced and exported to its
graph, each of the 30% test cells' genes are ranked by:

* ``served``: ``top_genes``, the largest positive attributions (the evidence for the call);
* ``|attribution|``: the largest magnitudes, for and against mixed (what was served before);
* ``coef x z``: CellTypist's explanation, a logistic regression's coefficient for the class
  times the gene's standardised expression (scikit-learn, fitted on the same 70%);
* ``random``.

Deletion: the top k genes are set to zero (the attributions' baseline) for k = 1..K; the
curve is the predicted class's probability, its AUC the mean over k (lower: the named genes
carried the call). Insertion: from all-zero, only the top k genes are given their values
(higher: the named genes alone make the call). Averaged over cells and ``--seeds`` splits.

    python -m benchmarks.evidence [--seeds 2] [--k 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import numpy as np
import onnxruntime as ort
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from cellexplain.api.annotations import signed_top_k, top_k_indices
from cellexplain.models.data import load_labelled
from cellexplain.models.export import served_graph
from cellexplain.models.runtime import session_options
from cellexplain.models.train import TrainConfig, dense, fit


def curves(
    session: ort.InferenceSession, x: np.ndarray, cls: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``[k]`` mean probability of ``cls`` with the top ``1..k`` genes of ``order`` (``[n,
    K]``) deleted, and with only them kept."""
    rows = np.arange(len(x))[:, None]
    deleted: list[float] = []
    inserted: list[float] = []
    for k in range(1, order.shape[1] + 1):
        gone = x.copy()
        gone[rows, order[:, :k]] = 0
        only = np.zeros_like(x)
        only[rows, order[:, :k]] = x[rows, order[:, :k]]
        for arr, out in ((gone, deleted), (only, inserted)):
            (p,) = session.run(["probabilities"], {"x": arr})
            out.append(float(p[np.arange(len(x)), cls].mean()))
    return np.asarray(deleted), np.asarray(inserted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--k", type=int, default=20, help="genes deleted or inserted, at most")
    p.add_argument("--archs", nargs="+", default=["linear", "mlp", "programs"])
    args = p.parse_args()

    data = load_labelled()
    labels = np.asarray(data.labels).astype(str)
    X = dense(data.X)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    against: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        train, test = train_test_split(
            np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=seed
        )
        part = dataclasses.replace(data, X=data.X[train], labels=data.labels[train])
        for arch in args.archs:
            fitted = fit(part, TrainConfig(arch=arch, name=f"ev-{arch}", seed=seed), False)
            keep = [data.genes.index(g) for g in fitted.card_fields["genes"]]
            x = np.ascontiguousarray(X[test][:, keep])
            graph = served_graph(fitted.model, TrainConfig().attribution, fitted.mean)
            session = ort.InferenceSession(
                graph.SerializeToString(), session_options(), ["CPUExecutionProvider"]
            )
            probs, attr = session.run(["probabilities", "attributions"], {"x": x})
            cls = probs.argmax(1)
            # CellTypist's explanation: coefficient x standardised expression, same train cells
            xt = X[train][:, keep]
            mu, sd = xt.mean(0), xt.std(0) + 1e-6
            classes = sorted(set(labels[train]))
            lr = LogisticRegression(max_iter=1000).fit((xt - mu) / sd, labels[train])
            coef = lr.coef_[np.searchsorted(np.asarray(lr.classes_), np.asarray(classes)[cls])]
            ct_score = coef * (x - mu) / sd
            rng = np.random.default_rng(seed)
            top_abs = top_k_indices(attr, args.k)
            idx, _, present = signed_top_k(attr, args.k, 1)
            against.setdefault(arch, []).append(
                float((np.take_along_axis(attr, top_abs, 1) < 0).mean())
            )
            rankings = {
                "served (top_genes)": idx,
                "|attribution|": top_abs,
                "coef x z (CellTypist)": top_k_indices(np.maximum(ct_score, 0), args.k, 1),
                "random": np.argsort(rng.random(x.shape), axis=1)[:, : args.k],
            }
            for name, order in rankings.items():
                d, i = curves(session, x, cls, order)
                results.setdefault((arch, name), []).append((float(d.mean()), float(i.mean())))
            print(f"seed {seed} {arch}: {present.mean():.2f} of top-{args.k} slots positive")
    print(
        f"\n# evidence: {data.source}, {args.seeds} stratified 70/30 splits, top 1..{args.k} "
        f"genes; {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print("| model | ranking | deletion AUC (lower better) | insertion AUC (higher better) |")
    print("|---|---|---|---|")
    for (arch, name), v in results.items():
        m = np.asarray(v).mean(0)
        print(f"| {arch} | {name} | {m[0]:.3f} | {m[1]:.3f} |")
    print()
    for arch, shares in against.items():
        print(f"{arch}: {np.mean(shares):.0%} of the top-{args.k} by |attribution| argue against")


if __name__ == "__main__":
    main()
