"""GPU benchmark and checks of the served graphs, runnable on a bare CUDA machine.

A GPU box often has no torch/scanpy/captum to train with (or no network to install them), so
this runs in two steps:

    python -m benchmarks.gpu prepare DIR        # here: train once, export the graphs to DIR
    python -m benchmarks.gpu run DIR [--out F]  # there: numpy + onnxruntime-gpu + pydantic

``prepare`` exports the default programs model with IG 16/32/64 steps and DeepLIFT, each in
float32 and float16, plus a prediction-only graph (probabilities, no attributions) and the
held-out PBMC cells. ``run`` loads them through :class:`models.runtime.OnnxModel` (the serving
code path: CUDA provider, IO binding) and

1. checks the CUDA results against the CPU provider's (labels, probabilities, attributions)
   and each float16 graph against its float32 twin and the error recorded in its card;
2. measures cells/s at 1 to 65,536 cells per call on the GPU (IO binding on, and off at 8,192),
   and on the CPU provider for the same graphs, with the GPU memory in use after each graph.

Exit code 1 when a check fails. Tables go to stdout (and ``--out``), Markdown, with the device.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.timing import best_rate, device_name, gpu_name
from models.card import FLOAT16_MIN_LABEL_AGREEMENT, FLOAT16_RTOL
from models.runtime import OnnxModel, Prediction, Provider, available_providers, provider_name

#: (folder, attribution method, steps) of the exported graphs, each in both precisions
GRAPHS = [("ig16", "integrated_gradients", 16), ("ig32", "integrated_gradients", 32)]
GRAPHS += [("ig64", "integrated_gradients", 64), ("deeplift", "deeplift", 0)]
PREDICT_ONLY = "predict_only.onnx"
CELLS = "cells.npy"
#: call sizes measured on the CPU provider (beside the GPU's, for the ratio)
CPU_BATCHES = [1024, 8192]
#: (graph, device, cells per call, cells/s)
Row = tuple[str, str, int, float]


def prepare(folder: Path) -> None:
    """Train the default programs model once and export every graph :func:`run` measures."""
    import onnx

    from models.attribution import AttributionSpec
    from models.data import load_labelled
    from models.export import export_model
    from models.train import TrainConfig, fit

    folder.mkdir(parents=True, exist_ok=True)
    fitted = fit(load_labelled(), TrainConfig(), progress=False)
    for name, method, steps in GRAPHS:
        spec = AttributionSpec(method=method, n_steps=steps or 32)  # type: ignore[arg-type]
        for precision in ("float32", "float16"):
            out = folder / f"{name}-{precision}"
            export_model(
                fitted.model,
                spec,
                fitted.card_fields,
                out,
                check_x=fitted.test_x,
                mean=fitted.mean,
                precision=precision,
            )
            print(f"exported {out.name}", flush=True)
    onnx.utils.extract_model(
        str(folder / "ig32-float32" / "model.onnx"),
        str(folder / PREDICT_ONLY),
        input_names=["x"],
        output_names=["probabilities"],
    )
    np.save(folder / CELLS, np.asarray(fitted.test_x, np.float32))
    print(f"prepared {folder} ({len(fitted.test_x)} held-out cells)")


def gpu_memory_mib() -> float | None:
    """GPU memory in use on the first GPU (nvidia-smi), MiB."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return float(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_probabilities(sess: ort.InferenceSession, x: np.ndarray) -> object:
    return sess.run(["probabilities"], {"x": x})


class Checks:
    """Collects pass/fail lines; the run's exit code is 1 if any failed."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        self.failed += not ok
        self.lines.append(f"- {'ok' if ok else 'FAILED'}: {what}")
        print(self.lines[-1], flush=True)


def rel_error(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-cell L1 error of attributions relative to the reference's L1 norm."""
    return np.abs(a - ref).sum(1) / np.maximum(np.abs(ref).sum(1), 1e-12)


def run(
    folder: Path,
    batches: list[int],
    min_seconds: float,
    out: Path | None,
    device: str = "cuda",
    profile_dir: Path | None = None,
) -> int:
    """Check and time every graph in ``folder`` (see the module docstring); the exit code.

    ``device="cpu"`` runs the same steps with the CPU provider in the GPU's place (a dry run
    of this script on a machine without a GPU)."""
    if device == "cuda":
        cuda: list[Provider] = [p for p in available_providers(prefer_gpu=True) if "CUDA" in str(p)]
        if not cuda:
            print(
                f"no CUDA provider in onnxruntime {ort.__version__}: "
                f"{ort.get_available_providers()}"
            )
            return 1
    else:
        cuda = ["CPUExecutionProvider"]
    X = np.load(folder / CELLS)
    big = np.tile(X, (-(-max(*batches, *CPU_BATCHES) // len(X)), 1))
    check = Checks()
    rows: list[Row] = []
    memory: list[tuple[str, float | None]] = []
    gpu_label = device_name(provider_name(cuda[0]))
    cpu_label = device_name("CPUExecutionProvider")

    def measure(
        label: str, where: str, call: Callable[[np.ndarray], object], sizes: list[int]
    ) -> None:
        for b in sizes:
            rate = best_rate(partial(call, big[:b]), b, 3, min_seconds)
            rows.append((label, where, b, rate))
            print(f"{label:<34} {where[:24]:<24} batch {b:>6}: {rate:>12,.0f} cells/s", flush=True)

    def predict(m: OnnxModel) -> Callable[[np.ndarray], object]:
        return lambda xb: m.predict(xb, batch_size=len(xb))

    # prediction only: the limit of what any attribution can cost on top
    for provider, where in ((cuda, gpu_label), (["CPUExecutionProvider"], cpu_label)):
        sess = ort.InferenceSession(
            str(folder / PREDICT_ONLY), providers=[*provider, "CPUExecutionProvider"]
        )
        sizes = batches if where == gpu_label else CPU_BATCHES
        measure("prediction only", where, partial(run_probabilities, sess), sizes)
        del sess
    for name, _, _ in GRAPHS:
        label = {"ig16": "IG 16 steps", "ig32": "IG 32 steps", "ig64": "IG 64 steps"}.get(
            name, "DeepLIFT"
        )
        ref: dict[str, Prediction] = {}
        for precision in ("float32", "float16"):
            path = folder / f"{name}-{precision}"
            gpu = OnnxModel(path, providers=cuda, io_binding=True)
            if device == "cuda":
                check(gpu.providers[0] == "CUDAExecutionProvider", f"{path.name} runs on CUDA")
                check(
                    OnnxModel(path, providers=cuda).io_binding,
                    f"{path.name}: IO binding by default",
                )
            cpu = OnnxModel(path, providers=["CPUExecutionProvider"])
            g, c = (
                gpu.predict(big[:8192], batch_size=8192),
                cpu.predict(big[:8192], batch_size=8192),
            )
            agree = float((g.probabilities.argmax(1) == c.probabilities.argmax(1)).mean())
            err = float(np.quantile(rel_error(g.attributions, c.attributions), 0.99))
            dp = float(np.abs(g.probabilities - c.probabilities).max())
            tol = 1e-3 if precision == "float32" else 2e-2
            check(
                agree >= 0.999 and err < tol and dp < (1e-5 if precision == "float32" else 1e-2),
                f"{path.name}: CUDA vs CPU labels {agree:.2%}, probability max diff {dp:.1e}, "
                f"attribution error p99 {err:.1e} (< {tol:g})",
            )
            ref[precision] = g
            if precision == "float16":
                f16 = gpu.card.checks.float16
                e16 = float(
                    np.quantile(rel_error(g.attributions, ref["float32"].attributions), 0.99)
                )
                same = float(
                    (g.probabilities.argmax(1) == ref["float32"].probabilities.argmax(1)).mean()
                )
                recorded = f16.attributions_rel_error_p99 if f16 else float("nan")
                check(
                    f16 is not None and same >= FLOAT16_MIN_LABEL_AGREEMENT and e16 < FLOAT16_RTOL,
                    f"{path.name} on the GPU vs float32 on the GPU: labels {same:.2%}, attribution "
                    f"error p99 {e16:.1e} < {FLOAT16_RTOL:g} (card records {recorded:.1e}, "
                    "measured on the CPU at export)",
                )
            # a target chosen by the client goes through run() instead of the IO binding
            t = gpu.predict(big[:1024], target=0, batch_size=1024)
            check(bool((t.explained_class == 0).all()), f"{path.name}: explicit target on the GPU")
            measure(f"{label} {precision}", gpu_label, predict(gpu), batches)
            memory.append((f"{label} {precision}", gpu_memory_mib()))
            nobind = OnnxModel(path, providers=cuda, io_binding=False)
            measure(
                f"{label} {precision}, no IO binding", gpu_label, predict(nobind), [max(batches)]
            )
            if precision == "float32":
                measure(f"{label} {precision}", cpu_label, predict(cpu), CPU_BATCHES)
            del gpu, cpu, nobind
            gc.collect()
    report = render(rows, memory, check)
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
        report += "\n" + "\n".join(
            profile(folder, cuda, big[:b], profile_dir) for b in (8192, 65536)
        )
    print(report)
    if out:
        out.write_text(report)
    return 1 if check.failed else 0


def profile(folder: Path, providers: list[Provider], x: np.ndarray, out_dir: Path) -> str:
    """Where a call's time goes: onnxruntime's profiler over 5 calls of the IG 32-step graph,
    summed per node and per provider, against the whole run (the rest: copies and overhead)."""
    import json

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out_dir / "ort_profile")
    sess = ort.InferenceSession(
        str(folder / "ig32-float32" / "model.onnx"),
        opts,
        providers=list(dict.fromkeys([*providers, "CPUExecutionProvider"])),
    )
    t = np.full(len(x), -1, np.int64)
    for _ in range(6):
        sess.run(None, {"x": x, "target": t})
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    nodes: dict[str, float] = {}
    per_provider: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            nodes[name] = nodes.get(name, 0) + e["dur"] / len(runs)
            prov = e.get("args", {}).get("provider", "?")
            per_provider[prov] = per_provider.get(prov, 0) + e["dur"] / len(runs)
    run_us = float(np.median(runs[1:]))  # the first call warms up
    node_us = sum(per_provider.values())
    top = sorted(nodes.items(), key=lambda kv: -kv[1])[:12]
    lines = [
        f"Profile, IG 32 steps float32, {len(x):,} cells per call: model_run median "
        f"{run_us / 1000:.2f} ms, kernels {node_us / 1000:.2f} ms per call (the rest: input "
        "and output copies, allocation, launch)",
        "",
        "kernel time per call by provider (ms): "
        + ", ".join(f"{k} {v / 1000:.1f}" for k, v in per_provider.items()),
        "",
        "| node | µs per call |",
        "|---|---:|",
        *(f"| {k} | {v:,.0f} |" for k, v in top),
        "",
    ]
    return "\n".join(lines)


def render(rows: list[Row], memory: list[tuple[str, float | None]], check: Checks) -> str:
    """Markdown: one row per graph and device, one column per batch size."""
    table: dict[tuple[str, str], dict[int, float]] = {}
    for label, where, b, rate in rows:
        table.setdefault((label, where), {})[b] = rate
    sizes = sorted({b for _, _, b, _ in rows})
    lines = [
        f"# GPU: {gpu_name() or 'unknown GPU'}; onnxruntime {ort.__version__}; "
        f"Python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}",
        "",
        "cells/s per call size (one onnxruntime call per batch, IO binding unless noted; the "
        "programs model, 765 genes, PBMC held-out cells tiled)",
        "",
        "| graph | device | " + " | ".join(f"{b:,}" for b in sizes) + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for (label, where), by in table.items():
        cells = " | ".join(f"{by[b]:,.0f}" if b in by else "" for b in sizes)
        lines.append(f"| {label} | {where} | {cells} |")
    lines += ["", "GPU memory in use after each graph's largest batch (nvidia-smi, MiB):", ""]
    lines += [f"- {label}: {m:,.0f}" if m is not None else f"- {label}: n/a" for label, m in memory]
    lines += ["", "Checks:", "", *check.lines, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("prepare", help="train and export the graphs (needs the training extras)")
    sp.add_argument("folder", type=Path)
    rp = sub.add_parser("run", help="check and time the graphs on the GPU")
    rp.add_argument("folder", type=Path)
    rp.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 8192, 65536])
    rp.add_argument("--min-seconds", type=float, default=0.5)
    rp.add_argument("--out", type=Path, help="also write the Markdown report here")
    rp.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run")
    rp.add_argument("--profile", type=Path, help="also profile IG 32 steps; traces to this folder")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.folder)
    else:
        sys.exit(
            run(args.folder, args.batches, args.min_seconds, args.out, args.device, args.profile)
        )


if __name__ == "__main__":
    main()
