"""Every benchmark behind docs/benchmarks.md, in one command (``make bench``):

1. ``benchmarks.attribution``: in-graph IG / DeepLIFT vs torch + Captum;
2. ``benchmarks.precision``: float32 vs float16 graphs on each device onnxruntime sees;
3. ``benchmarks.serving``: the service (REST, gRPC, OIP) vs in-process onnxruntime;
4. ``benchmarks.annotate_scale``: ``cellexplain annotate --local`` from 1k to 1M cells;
5. ``benchmarks.soak``: the load tests (Locust on REST, the gRPC driver) for 5 minutes each;
6. ``benchmarks.gpu``: the CUDA path (checks, cells/s per call size, torch + Captum on the GPU),
   only where onnxruntime has the CUDA provider (skipped otherwise, saying so);
7. ``benchmarks.renamed_genes``: real cells under the model's and under today's gene names;
8. ``benchmarks.file_to_file``: ``cellexplain annotate --local`` vs CellTypist 1.7.1 (in its own
   venv, ``.venv-celltypist``, made on first use), file to file on 55,900 cells x 32,786 genes;
9. ``benchmarks.accuracy``: our architectures beside CellTypist 1.7.1 (its own venv) on 5 repeated
   70/30 splits, accuracy and macro-F1 (mean +/- sd);
10. ``benchmarks.upload``: the upload door (read in a child process) vs the same work in-process;
11. ``benchmarks.novelty``: cell types held out of training, told from known ones by the served
    novelty score, by confidence, and by CellTypist 1.7.1's probability;
12. ``benchmarks.evidence``: deletion and insertion curves of the genes the answer names.

Each runs in its own process; their tables go to stdout and to
``benchmarks/results/latest.md`` (with the machine), from which docs/benchmarks.md is updated.

    python -m benchmarks [--quick] [--only serving precision ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

from benchmarks.timing import gpu_name

RESULTS = Path(__file__).resolve().parent / "results"

FULL: dict[str, list[str]] = {
    "attribution": ["-m", "benchmarks.attribution"],
    "precision": ["-m", "benchmarks.precision"],
    "serving": ["-m", "benchmarks.serving", "--seconds", "5"],
    "annotate_scale": ["benchmarks/annotate_scale.py", "--local"],
    "soak": ["-m", "benchmarks.soak", "--duration", "300"],
    "gpu": ["-m", "benchmarks.gpu", "all"],
    "renamed_genes": ["-m", "benchmarks.renamed_genes"],
    "file_to_file": ["-m", "benchmarks.file_to_file"],
    "accuracy": ["-m", "benchmarks.accuracy", "--seeds", "5"],
    "upload": ["-m", "benchmarks.upload"],
    "novelty": ["-m", "benchmarks.novelty", "--seeds", "2"],
    "evidence": ["-m", "benchmarks.evidence", "--seeds", "2"],
}
QUICK_ARGS: dict[str, list[str]] = {
    "attribution": ["--min-seconds", "0.3", "--repeat", "2"],
    "precision": ["--min-seconds", "0.3", "--batches", "1024"],
    "serving": ["--seconds", "2", "--sizes", "64", "1024"],
    "annotate_scale": ["--cells", "10000", "100000"],
    "soak": ["--duration", "30"],
    "gpu": ["--min-seconds", "0.2"],
    "renamed_genes": [],
    "file_to_file": ["--cells", "5000", "--repeat", "1"],
    "accuracy": ["--seeds", "2"],
    "upload": ["--cells", "700", "--repeat", "2"],
    "novelty": ["--seeds", "1", "--archs", "linear", "--no-celltypist"],
    "evidence": ["--seeds", "1", "--archs", "linear", "--k", "5"],
}


def machine() -> str:
    gpu = gpu_name() or "no GPU visible to onnxruntime"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; "
        f"Python {platform.python_version()}, onnxruntime {ort.__version__}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (minutes, not ~15)")
    p.add_argument("--only", nargs="+", choices=list(FULL), help="run only these")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    report = [
        "# Benchmark results",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} on {machine()}" + (" (--quick)" if args.quick else ""),
        "",
    ]
    failed = []
    for name, cmd in FULL.items():
        if args.only and name not in args.only:
            continue
        if name == "gpu" and "CUDAExecutionProvider" not in ort.get_available_providers():
            print("\n=== gpu: skipped (no CUDA provider in this onnxruntime)", flush=True)
            report += ["## gpu", "", "No GPU: skipped (no CUDA provider in this onnxruntime).", ""]
            continue
        full = [sys.executable, *cmd, *(QUICK_ARGS[name] if args.quick else [])]
        print(f"\n=== {name}: {' '.join(full[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(full, capture_output=True, text=True)
        print(proc.stdout[-6000:], flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            failed.append(name)
        tables = [ln for ln in proc.stdout.splitlines() if ln.startswith(("|", "#", "No GPU"))]
        report += [f"## {name} ({time.perf_counter() - t0:.0f} s)", "", *tables, ""]
    out = RESULTS / ("latest-quick.md" if args.quick else "latest.md")
    out.write_text("\n".join(report) + "\n")
    print(f"\nwrote {out}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
