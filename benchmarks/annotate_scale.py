"""How `cellexplain annotate` scales with file size: cells/s and peak memory (RSS).

Synthesises .h5ad files of N cells from the real bundled PBMCs (integer counts, CSR, repeated
rows), then runs `cellexplain annotate` on each in a fresh process and reads its peak resident
memory from the kernel (getrusage of the child). Usage:

    python benchmarks/annotate_scale.py --cells 10000 100000 1000000 [--local | --url URL]

Results go to stdout as a Markdown table (copy them to docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp


def synthesise(n_cells: int, path: Path) -> None:
    """n_cells PBMC cells (counts, CSR) written block by block: memory stays small."""
    import pandas as pd
    from anndata.io import write_elem

    from cellexplain.models.data import load_default_adata

    pbmc = load_default_adata()
    raw = pbmc.raw.to_adata()
    counts = np.rint(np.expm1(raw.X.toarray()) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
    block = sp.csr_matrix(counts.astype(np.float32))
    n_genes = block.shape[1]
    # the skeleton (var, obs, an empty X), then X's CSR arrays appended block by block
    ad.AnnData(sp.csr_matrix((0, n_genes), dtype=np.float32), var=raw.var[[]].copy()).write_h5ad(
        path
    )
    with h5py.File(path, "r+") as f:
        del f["X"], f["obs"]
        write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        data = g.create_dataset("data", (0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        idx = g.create_dataset("indices", (0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        written = 0
        while written < n_cells:
            b = block[: min(block.shape[0], n_cells - written)]
            start = data.shape[0]
            data.resize((start + b.nnz,))
            idx.resize((start + b.nnz,))
            data[start:] = b.data
            idx[start:] = b.indices
            indptr.append(b.indptr[1:].astype(np.int64) + start)
            written += b.shape[0]
        g.create_dataset("indptr", data=np.concatenate(indptr))


def run_one(n_cells: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    src = workdir / f"cells_{n_cells}.h5ad"
    if not src.exists():
        synthesise(n_cells, src)
    out = workdir / f"out_{n_cells}.h5ad"
    cmd = [
        sys.executable,
        "-m",
        "cellexplain",
        "annotate",
        str(src),
        "--out",
        str(out),
        "--force",
        "-q",
        "--chunk-size",
        str(args.chunk_size),
        "--concurrency",
        str(args.concurrency),
        "--attributions",
        args.attributions,
    ]
    cmd += ["--local"] if args.local else ["--url", args.url]
    # measure in a separate interpreter so that getrusage(CHILDREN) sees only this run
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True
    )
    seconds, rss_kb = res.stdout.split()[-2:]
    return {
        "cells": n_cells,
        "seconds": float(seconds),
        "peak_rss_mb": int(rss_kb) / 1024,
        "file_mb": src.stat().st_size / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--local", action="store_true", help="in-process (no server)")
    p.add_argument("--url", default="http://localhost:3000")
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--attributions", default="top_k", choices=["top_k", "full", "none"])
    p.add_argument("--workdir", help="where to keep the synthetic files (default: a temp dir)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cellexplain-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mode = "--local" if args.local else f"REST {args.url}"
    machine = platform.processor() or platform.machine()
    print(
        f"# annotate scaling, {mode}, chunk {args.chunk_size}, concurrency "
        f"{args.concurrency}, attributions {args.attributions}; {machine}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print("| cells | file (MB) | time (s) | cells/s | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.cells:
        r = run_one(n, args, workdir)
        print(
            f"| {n:,} | {r['file_mb']:,.0f} | {r['seconds']:,.1f} | "
            f"{n / r['seconds']:,.0f} | {r['peak_rss_mb']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
