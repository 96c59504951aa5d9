"""Training at atlas scale: time per epoch and peak memory at 100k and 1M cells, beside
CellTypist's mini-batch SGD training on the same file.

Tiles the 700 real PBMCs (raw counts, labels ``bulk_labels``) to N cells x 32,786 genes (the
real 765 and mostly-zero real GENCODE symbols, as ``benchmarks/file_to_file.py`` builds them),
then, each in a fresh process whose peak RSS the kernel reports:

* ours: ``load_labelled`` + ``fit`` (what ``cellexplain train --data F`` runs): sparse rows
  normalised in place, genes selected in a streaming pass (``--n-top-genes``), mini-batches
  densified one at a time, never the matrix;
* CellTypist 1.7.1 in its own venv: ``celltypist.train(use_SGD=True, mini_batch=True)`` with
  its defaults (1,000 cells x 100 batches per epoch, 10 epochs), after its required
  normalisation.

    python -m benchmarks.train_scale [--cells 100000 1000000] [--epochs 2] [--arch programs]
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
from cellexplain.models.data import load_labelled
from cellexplain.models.train import TrainConfig, fit
data = load_labelled(sys.argv[1], "bulk_labels")
t1 = time.perf_counter()
cfg = TrainConfig(arch=sys.argv[2], name="scale", max_epochs=int(sys.argv[3]),
                  patience=int(sys.argv[3]), n_top_genes=int(sys.argv[4]), refit=False)
f = fit(data, cfg, progress=True)
t2 = time.perf_counter()
m = f.card_fields["metrics"]
print(json.dumps({"load_s": t1 - t0, "fit_s": t2 - t1, "epochs": m.epochs_trained,
                  "macro_f1": m.model.macro_f1,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

CELLTYPIST = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import anndata as ad, celltypist, scanpy as sc
a = ad.read_h5ad(sys.argv[1])
sc.pp.normalize_total(a, target_sum=1e4)
sc.pp.log1p(a)
t1 = time.perf_counter()
celltypist.train(a, labels="bulk_labels", use_SGD=True, mini_batch=True)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "fit_s": t2 - t1, "epochs": 10,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run(cmd: list[str]) -> dict[str, float]:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}  # type: ignore[dict-item]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--arch", default="programs", choices=["linear", "mlp", "programs"])
    p.add_argument("--n-top-genes", type=int, default=2000)
    # CellTypist densifies and scales every gene: ~8 GB at 20,000 x 32,786, beyond RAM at 100k
    p.add_argument("--celltypist-max-cells", type=int, default=20_000)
    args = p.parse_args()
    CACHE.mkdir(exist_ok=True)
    versions = celltypist_venv()
    rows = []
    for n in args.cells:
        path = CACHE / f"pbmc68k_tiled_{n}x{GENES}_labelled.h5ad"
        if not path.exists():
            build_file(n, GENES, path, labels=True)
        ours = run([sys.executable, "-c", OURS, str(path), args.arch, str(args.epochs),
                    str(args.n_top_genes)])  # fmt: skip
        print(f"{n:,} cells, ours: {ours}", flush=True)
        ct: dict[str, float] = {}
        if n <= args.celltypist_max_cells:
            ct = run([str(CT_PYTHON), "-c", CELLTYPIST, str(path)])
            print(f"{n:,} cells, CellTypist: {ct}", flush=True)
        rows.append((n, ours, ct))
    print(
        f"\n# training at scale: {args.arch}, --n-top-genes {args.n_top_genes}, "
        f"{GENES:,} genes; {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}; CellTypist {versions.get('celltypist')}"
    )
    print("| cells | tool | load + normalise (s) | s per epoch | peak RSS (GB) |")
    print("|---:|---|---:|---:|---:|")
    for n, ours, ct in rows:
        for name, r in ((f"cellexplain ({args.arch})", ours), ("CellTypist SGD mini-batch", ct)):
            if "fit_s" in r:
                print(
                    f"| {n:,} | {name} | {r['load_s']:.0f} | {r['fit_s'] / r['epochs']:.0f} | "
                    f"{r['peak_rss_gb']:.2f} |"
                )
            elif r:
                print(f"| {n:,} | {name} | failed: {r.get('error')} | | |")


if __name__ == "__main__":
    main()
