"""Accuracy beside CellTypist: our architectures and CellTypist 1.7.1 on the same repeated splits.

For each seed, a stratified split of the labelled cells (default: scanpy's bundled
pbmc68k_reduced, ``bulk_labels``) into a training part and an unseen test part (70/30, as a lab
would hold out cells). Each of our architectures is trained on the training part exactly as
``cellexplain train`` does (its own inner split chooses the epochs, then the model is refit on
the whole training part) and scored on the test part; CellTypist, in its own venv
(``.venv-celltypist``, made on first use, see ``benchmarks/file_to_file.py``), is trained with
its documented defaults (``celltypist.train``: logistic regression, all genes) on the same
training cells (log1p CP10k, as it requires) and predicts the same test cells; the logistic-
regression baseline of our cards is scored on the same split too. Prints each seed and the mean
+/- sd of accuracy and macro-F1 as a Markdown table. Usage:

    python -m benchmarks.accuracy [--seeds 10] [--first-seed 0] [--archs linear mlp programs]
        [--test-size 0.3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from benchmarks.file_to_file import CT_PYTHON, celltypist_venv
from cellexplain.client.cli import score_table
from cellexplain.models.data import load_default_adata, load_labelled
from cellexplain.models.train import (
    ECE_BINS,
    TrainConfig,
    dense,
    expected_calibration_error,
    fit,
    logistic_regression_baseline,
)

#: CellTypist in its venv (argv: train.h5ad, test.h5ad, label column): trains with its defaults
#: and prints the test cells' predicted labels and their probabilities as JSON
CT_FIT_PREDICT = """
import json
import sys
import warnings

import anndata as ad
import celltypist

warnings.simplefilter("ignore")
train, test = ad.read_h5ad(sys.argv[1]), ad.read_h5ad(sys.argv[2])
model = celltypist.train(train, labels=sys.argv[3])
pred = celltypist.annotate(test, model=model, majority_voting=False)
labels = pred.predicted_labels["predicted_labels"].astype(str).tolist()
print(json.dumps({"labels": labels, "confidence": pred.probability_matrix.max(1).tolist()}))
"""


def log1p_cp10k(counts: np.ndarray) -> sp.csr_matrix:
    """Per-cell log1p(counts / total * 1e4) over the genes present (what CellTypist checks)."""
    totals = np.maximum(counts.sum(1, keepdims=True), 1)
    return sp.csr_matrix(np.log1p(counts / totals * 1e4).astype(np.float32))


def celltypist_predictions(
    counts: np.ndarray, labels: np.ndarray, genes: list[str], train: np.ndarray, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CellTypist's labels for the test cells and their probabilities (its own: one-vs-rest
    logistic, the best class's)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, rows in (("train", train), ("test", test)):
            a = ad.AnnData(log1p_cp10k(counts[rows]))
            a.var_names = genes
            a.obs["label"] = labels[rows]
            a.write_h5ad(Path(tmp) / f"{name}.h5ad")
            paths.append(str(Path(tmp) / f"{name}.h5ad"))
        out = subprocess.run(
            [str(CT_PYTHON), "-c", CT_FIT_PREDICT, *paths, "label"],
            capture_output=True,
            text=True,
            check=True,
        )
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    return np.asarray(answer["labels"]), np.asarray(answer["confidence"])


def scores(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    return (
        float(accuracy_score(truth, pred)),
        float(f1_score(truth, pred, average="macro", zero_division=0)),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0, help="splits first-seed.. (0: 0..9)")
    p.add_argument("--archs", nargs="+", default=["linear", "mlp", "programs"])
    p.add_argument("--test-size", type=float, default=0.3)
    p.add_argument("--no-celltypist", action="store_true", help="ours and the baseline only")
    args = p.parse_args()

    data = load_labelled()
    pbmc = load_default_adata()  # counts for CellTypist, recovered from .raw as in file_to_file
    n_counts = pbmc.obs["n_counts"].to_numpy()[:, None]
    counts = np.rint(np.expm1(pbmc.raw.X.toarray()) * (n_counts / 1e4))
    labels = np.asarray(data.labels).astype(str)
    X = dense(data.X)
    versions = {} if args.no_celltypist else celltypist_venv()
    results: dict[str, list[tuple[float, float]]] = {}
    eces: dict[str, list[tuple[float, float, float]]] = {}
    t0 = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        idx = np.arange(len(labels))
        train, test = train_test_split(
            idx, test_size=args.test_size, stratify=labels, random_state=seed
        )
        part = dataclasses.replace(data, X=data.X[train], labels=data.labels[train])
        for arch in args.archs:
            cfg = TrainConfig(arch=arch, name=f"acc-{arch}", seed=seed)
            fitted = fit(part, cfg, progress=False)
            keep = [data.genes.index(g) for g in fitted.card_fields["genes"]]
            classes = np.asarray(fitted.card_fields["classes"])
            with torch.no_grad():
                logits = fitted.model(torch.from_numpy(X[test][:, keep])).numpy()
            predicted = classes[logits.argmax(1)]
            results.setdefault(arch, []).append(scores(labels[test], predicted))
            # the exported model's logits are divided by its temperature: ECE with and without
            cal = fitted.card_fields["calibration"]
            t = 1.0 if cal is None else cal.temperature
            right = predicted == labels[test]
            eces.setdefault(arch, []).append(
                (
                    expected_calibration_error(softmax(logits * t).max(1), right),
                    expected_calibration_error(softmax(logits).max(1), right),
                    t,
                )
            )
        y_classes = np.unique(labels[train])
        y_train = np.searchsorted(y_classes, labels[train])
        lr = logistic_regression_baseline(X[train], y_train, X[test], seed)
        results.setdefault("logistic regression (our baseline)", []).append(
            scores(labels[test], y_classes[lr])
        )
        if not args.no_celltypist:
            ct_pred, ct_conf = celltypist_predictions(counts, labels, data.genes, train, test)
            eces.setdefault("CellTypist 1.7.1", []).append(
                (
                    expected_calibration_error(ct_conf, ct_pred == labels[test]),
                    float("nan"),
                    float("nan"),
                )
            )
            results.setdefault("CellTypist 1.7.1", []).append(scores(labels[test], ct_pred))
        line = ", ".join(f"{k} {v[-1][1]:.3f}" for k, v in results.items())
        print(f"seed {seed}: macro-F1 {line}", flush=True)
    ct = f"; CellTypist {versions}" if versions else ""
    print(
        f"\n# accuracy: {data.source} ({data.label_key}, {len(labels)} cells), "
        f"{args.seeds} stratified {1 - args.test_size:.0%}/{args.test_size:.0%} splits (seeds "
        f"{seeds[0]}..{seeds[-1]}); {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s{ct}"
    )
    print("\n".join(score_table(results)))
    if "CellTypist 1.7.1" in results:
        print("\n".join(["", *paired_table(results, "CellTypist 1.7.1")]))
    print(
        f"\nexpected calibration error on the test cells ({ECE_BINS} equal-width bins of the "
        "best class's probability; mean +- sd over the splits):\n"
    )
    print("| model | ECE, uncalibrated | ECE, served (temperature) | temperature |")
    print("|---|---:|---:|---:|")
    for name, values in eces.items():
        v = np.asarray(values)
        m, sd = v.mean(0), v.std(0)
        if np.isnan(m[1]):
            print(f"| {name} | - | {m[0]:.3f} +- {sd[0]:.3f} | - |")
        else:
            print(
                f"| {name} | {m[1]:.3f} +- {sd[1]:.3f} | {m[0]:.3f} +- {sd[0]:.3f} | {m[2]:.2f} |"
            )


def paired_table(results: dict[str, list[tuple[float, float]]], reference: str) -> list[str]:
    """Each model's macro-F1 minus ``reference``'s on the same split: the mean and sd of the
    differences, the splits it is ahead on, and the paired t statistic (mean / (sd / sqrt(n)))
    with its two-sided p-value (Student's t, n - 1 degrees of freedom)."""
    from scipy import stats

    ref = np.array([f1 for _, f1 in results[reference]])
    rows = [
        f"paired macro-F1 difference to {reference} (same splits; mean +- sd of the differences):",
        "",
        "| model | difference | ahead on | paired t | p (two-sided) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in results.items():
        if name == reference:
            continue
        d = np.array([f1 for _, f1 in values]) - ref
        sd = d.std(ddof=1) if len(d) > 1 else float("nan")
        t = d.mean() / (sd / np.sqrt(len(d))) if sd and sd > 0 else float("nan")
        p = 2 * stats.t.sf(abs(t), len(d) - 1) if np.isfinite(t) else float("nan")
        rows.append(
            f"| {name} | {d.mean():+.3f} +- {sd:.3f} | {int((d > 0).sum())}/{len(d)} | "
            f"{t:.2f} | {p:.3f} |"
        )
    return rows


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


if __name__ == "__main__":
    main()
