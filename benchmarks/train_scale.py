"""Training at atlas scale, at a real 10x density: time per epoch and peak memory at 20k, 250k
and 1M cells, beside CellTypist's mini-batch SGD training on the same file.

Tiles the 700 real PBMCs' raw counts (labels ``bulk_labels``) to N cells x 32,786 genes at a real
10x density (~1,840 stored values per cell: each PBMC's, and small counts in the padding genes,
as ``benchmarks/file_to_file.py`` builds them; 1M cells is a 14.5 GB ``.h5ad``), then, each in
a fresh process whose peak RSS the kernel reports:

* ours: ``load_labelled`` + ``fit`` (what ``cellexplain train --data F`` runs). A file whose
  model input does not fit the in-memory budget streams from disk: blocks of rows read,
  normalised and cut to the selected genes as they are needed, an epoch in shuffled blocks;
* CellTypist 1.7.1 in its own venv: ``celltypist.train(use_SGD=True, mini_batch=True)`` with
  its defaults (an epoch is 100 batches of 1,000 cells, or every cell when there are fewer; 10
  epochs), after its required normalisation. It densifies and scales every gene, so it runs only
  where that fits in RAM (``--celltypist-max-cells``).

"s per epoch" is the training pass alone (ours: the train split's mini-batches and the
validation loss; CellTypist: its ``partial_fit`` calls), "fit" everything else too (gene
selection, test scores, baseline, novelty reference).

    python -m benchmarks.train_scale [--cells 20000 250000 1000000] [--epochs 2] [--arch mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.file_to_file import CT_PYTHON, build_file, celltypist_venv

GENES = 32_786
CACHE = Path(tempfile.gettempdir()) / "cellexplain-file-to-file"

OURS = """
import json, resource, sys, time
t0 = time.perf_counter()
import cellexplain.models.train as T
from cellexplain.models.data import load_labelled
from cellexplain.models.train import TrainConfig, fit
first = []
fit_rows = T._fit
def timed(model, X, y, rows, *a, **k):
    t = time.perf_counter()
    out = fit_rows(model, X, y, rows, *a, **k)
    first.append((time.perf_counter() - t, out[0], len(rows), type(X).__name__))
    return out
T._fit = timed
data = load_labelled(sys.argv[1], "bulk_labels", progress=True)
t1 = time.perf_counter()
top = int(sys.argv[4])
cfg = TrainConfig(arch=sys.argv[2], name="scale", max_epochs=int(sys.argv[3]),
                  patience=int(sys.argv[3]), n_top_genes=top or None, refit=False)
f = fit(data, cfg, progress=True)
t2 = time.perf_counter()
seconds, epochs, cells, kind = first[0]
print(json.dumps({"load_s": t1 - t0, "fit_s": t2 - t1, "epoch_s": seconds / epochs,
                  "epoch_cells": cells, "streamed": kind == "FileMatrix",
                  "macro_f1": f.card_fields["metrics"].model.macro_f1,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

CELLTYPIST = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import anndata as ad, celltypist, scanpy as sc
from sklearn.linear_model import SGDClassifier
spent = [0.0]
partial_fit = SGDClassifier.partial_fit
def timed(self, *a, **k):
    t = time.perf_counter()
    out = partial_fit(self, *a, **k)
    spent[0] += time.perf_counter() - t
    return out
SGDClassifier.partial_fit = timed
a = ad.read_h5ad(sys.argv[1])
sc.pp.normalize_total(a, target_sum=1e4)
sc.pp.log1p(a)
t1 = time.perf_counter()
celltypist.train(a, labels="bulk_labels", use_SGD=True, mini_batch=True)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "fit_s": t2 - t1, "epoch_s": spent[0] / 10,
                  "epoch_cells": min(100 * 1000, a.n_obs), "streamed": False,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run(cmd: list[str]) -> dict[str, float]:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}  # type: ignore[dict-item]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[20_000, 250_000, 1_000_000])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--arch", default="mlp", choices=["linear", "mlp", "programs"])
    p.add_argument("--n-top-genes", type=int, default=2000, help="0: all genes")
    # CellTypist densifies and scales every gene: ~8 GB at 20,000 x 32,786, beyond RAM at 100k
    p.add_argument("--celltypist-max-cells", type=int, default=20_000)
    args = p.parse_args()
    CACHE.mkdir(exist_ok=True)
    versions = celltypist_venv()
    rows = []
    for n in args.cells:
        path = CACHE / f"pbmc68k_tiled_{n}x{GENES}_labelled.h5ad"
        if not path.exists():
            print(f"building {path} ...", flush=True)
            build_file(n, GENES, path, labels=True)
        ours = run([sys.executable, "-c", OURS, str(path), args.arch, str(args.epochs),
                    str(args.n_top_genes)])  # fmt: skip
        print(f"{n:,} cells, ours: {ours}", flush=True)
        ct: dict[str, float] = {}
        if n <= args.celltypist_max_cells:
            ct = run([str(CT_PYTHON), "-c", CELLTYPIST, str(path)])
            print(f"{n:,} cells, CellTypist: {ct}", flush=True)
        rows.append((n, path.stat().st_size / 1e9, ours, ct))
    genes = f"--n-top-genes {args.n_top_genes}" if args.n_top_genes else "all genes"
    print(
        f"\n# training at scale: {args.arch}, {genes}, {GENES:,} genes at a real 10x density; "
        f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; "
        f"CellTypist {versions.get('celltypist')}"
    )
    print(
        "| cells (file GB) | tool | read + check (s) | s per epoch | cells per epoch | "
        "cells/s in an epoch | whole fit (s) | peak RSS (GB) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, size, ours, ct in rows:
        name = f"cellexplain ({args.arch}{', streamed' if ours.get('streamed') else ''})"
        for tool, r in ((name, ours), ("CellTypist SGD mini-batch", ct)):
            if "fit_s" in r:
                print(
                    f"| {n:,} ({size:.1f}) | {tool} | {r['load_s']:.0f} | {r['epoch_s']:.1f} | "
                    f"{r['epoch_cells']:,} | {r['epoch_cells'] / r['epoch_s']:,.0f} | "
                    f"{r['fit_s']:.0f} | {r['peak_rss_gb']:.2f} |"
                )
            elif r:
                print(f"| {n:,} | {tool} | failed: {r.get('error')} | | | | | |")
        if "epoch_s" in ours and "epoch_s" in ct:
            rates = [r["epoch_cells"] / r["epoch_s"] for r in (ours, ct)]
            print(
                f"| | **ratio, CellTypist / ours** | | {ct['epoch_s'] / ours['epoch_s']:.2f}x | "
                f"| {rates[0] / rates[1]:.2f}x | | |"
            )


if __name__ == "__main__":
    main()
