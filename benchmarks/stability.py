"""Do the genes named for a call depend on the training seed?

Each architecture is trained from disjoint groups of seeds (``--ensemble K``: K seeds per
group, averaged in one graph as ``cellexplain train --ensemble K`` does), on all 700 cells of
pbmc68k_reduced; each graph explains every cell's true class, and the served evidence (the 10
largest positive attributions) of the groups is compared cell by cell: Jaccard index of the
two sets, mean over cells (1: the same genes whatever the seeds).

    python -m benchmarks.stability [--ensembles 1 3] [--archs linear mlp programs]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import onnxruntime as ort

from cellexplain.api.annotations import signed_top_k
from cellexplain.models.architectures import ARCHS, Arch
from cellexplain.models.data import LabelledData, load_labelled
from cellexplain.models.export import served_graph
from cellexplain.models.runtime import session_options
from cellexplain.models.train import TrainConfig, dense, fit


def evidence(
    data: LabelledData, arch: Arch, seed: int, ensemble: int, X: np.ndarray, labels: np.ndarray
) -> list[set[int]]:
    """Per cell, the set of its 10 largest positive attributions for its true class."""
    fitted = fit(data, TrainConfig(arch=arch, name="s", seed=seed, ensemble=ensemble), False)
    model = fitted.model
    graph = served_graph(model, TrainConfig().attribution, fitted.mean)
    session = ort.InferenceSession(
        graph.SerializeToString(), session_options(), ["CPUExecutionProvider"]
    )
    y = np.searchsorted(np.asarray(fitted.card_fields["classes"]), labels).astype(np.int64)
    (attr,) = session.run(["attributions"], {"x": X, "target": y})
    idx, _, present = signed_top_k(attr, 10, 1)
    return [set(row[ok].tolist()) for row, ok in zip(idx, present, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ensembles", nargs="+", type=int, default=[1, 3])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    args = p.parse_args()
    data = load_labelled()
    X = dense(data.X)
    labels = np.asarray(data.labels).astype(str)
    t0 = time.perf_counter()
    rows = []
    for arch in args.archs:
        for k in args.ensembles if arch != "linear" else [1]:
            a, b = (evidence(data, arch, group * k, k, X, labels) for group in (0, 1))
            jaccard = np.mean([len(s & t) / max(len(s | t), 1) for s, t in zip(a, b, strict=True)])
            rows.append((arch, k, float(jaccard)))
            print(f"{arch} x{k}: {jaccard:.3f}", flush=True)
    print(
        f"\n# stability: {data.source}, all {len(labels)} cells, top-10 evidence for the true "
        f"class, seeds 0..k-1 vs k..2k-1; {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s\n"
    )
    print("| model | networks averaged | top-10 Jaccard between seed groups |")
    print("|---|---:|---:|")
    for arch, k, j in rows:
        print(f"| {arch} | {k} | {j:.3f} |")


if __name__ == "__main__":
    main()
