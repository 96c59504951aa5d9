"""GPU benchmark and checks of the served graphs, runnable on a bare CUDA machine.

A GPU box often has no torch/scanpy/captum to train with (or no network to install them), so
this runs in two steps:

    python -m benchmarks.gpu prepare DIR        # here: train once, export the graphs to DIR
    python -m benchmarks.gpu run DIR [--out F]  # there: numpy + onnxruntime-gpu + pydantic
    python -m benchmarks.gpu all                # both, where one machine has everything

``prepare`` exports the default programs model with IG 16/32/64 steps and DeepLIFT, each in
float32 and float16, plus a prediction-only graph (probabilities, no attributions) and the
held-out PBMC cells. ``run`` loads them through
:class:`cellexplain.models.runtime.OnnxModel` (the serving code path: CUDA provider, IO binding) and

1. checks the CUDA results against the CPU provider's (labels, probabilities, attributions)
   and each float16 graph against its float32 twin and the error recorded in its card;
2. measures cells/s at 1 to 65,536 cells per call on the GPU (as served, and for float32 with
   IO binding too), on the CPU provider for the same graphs, the GPU memory in use after each
   graph, and torch + Captum on the GPU for the same network and cells.

Exit code 1 when a check fails. Tables go to stdout (and ``--out``), Markdown, with the device.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.timing import best_rate, device_name, gpu_name, nvidia_smi
from cellexplain.models.card import FLOAT16_MIN_LABEL_AGREEMENT, FLOAT16_RTOL
from cellexplain.models.runtime import (
    OnnxModel,
    Prediction,
    Provider,
    available_providers,
    provider_name,
    session_options,
)

#: (folder, attribution method, steps) of the exported graphs, each in both precisions
GRAPHS = [("ig16", "integrated_gradients", 16), ("ig32", "integrated_gradients", 32)]
GRAPHS += [("ig64", "integrated_gradients", 64), ("deeplift", "deeplift", 0)]
PREDICT_ONLY = "predict_only.onnx"
CELLS = "cells.npy"
LAYERS = "layers.npz"
#: cells per call of the torch + Captum comparison on the GPU
CAPTUM_BATCH = 8192
#: call sizes measured on the CPU provider (beside the GPU's, for the ratio)
CPU_BATCHES = [1024, 8192]
#: (graph, device, cells per call, cells/s)
Row = tuple[str, str, int, float]


def prepare(folder: Path, max_epochs: int | None = None) -> None:
    """Train the default programs model once and export every graph :func:`run` measures
    (``max_epochs``: fewer than the default's, for a quick check of the pipeline)."""
    import onnx

    from cellexplain.models.attribution import AttributionSpec
    from cellexplain.models.data import load_labelled
    from cellexplain.models.export import export_model
    from cellexplain.models.train import TrainConfig, fit

    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig() if max_epochs is None else TrainConfig(max_epochs=max_epochs)
    fitted = fit(load_labelled(), cfg, progress=False)
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
    layers = fitted.model.dense_layers()  # the network as dense ReLU layers, for Captum there
    np.savez(folder / LAYERS, *[a.astype(np.float32) for W, bias in layers for a in (W, bias)])
    print(f"prepared {folder} ({len(fitted.test_x)} held-out cells)")


def with_cpu(providers: list[Provider]) -> list[Provider]:
    """``providers`` with the CPU provider last (for nodes the others cannot run), once."""
    return [*providers, *([] if "CPUExecutionProvider" in providers else ["CPUExecutionProvider"])]


def gpu_memory_mib() -> float | None:
    """GPU memory in use on the first GPU (nvidia-smi), MiB."""
    used = nvidia_smi("memory.used")
    try:
        return float(used) if used else None
    except ValueError:
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
    ours: dict[str, tuple[float, np.ndarray]] = {}
    nc = max(
        [b for b in batches if b <= CAPTUM_BATCH], default=min(batches)
    )  # cells per call compared with torch + Captum
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
    cpu_only: list[Provider] = ["CPUExecutionProvider"]
    for provider, where in ((cuda, gpu_label), (cpu_only, cpu_label)):
        sess = ort.InferenceSession(
            str(folder / PREDICT_ONLY), session_options(), providers=with_cpu(provider)
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
            gpu = OnnxModel(path, providers=cuda)
            if device == "cuda":
                check(gpu.providers[0] == "CUDAExecutionProvider", f"{path.name} runs on CUDA")
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
            if precision == "float32":
                rate = next(r for lab, _, b, r in rows if lab == f"{label} float32" and b == nc)
                ours[label] = (rate, gpu.predict(big[:nc]).attributions)
            memory.append((f"{label} {precision}", gpu_memory_mib()))
            if precision == "float32":  # IO binding (off by default): what it costs or saves
                bound = OnnxModel(path, providers=cuda, io_binding=True)
                bound_out = bound.predict(big[:1024])
                check(
                    np.array_equal(bound_out.attributions, gpu.predict(big[:1024]).attributions),
                    f"{path.name}: IO binding gives the same outputs as run()",
                )
                sizes = [b for b in batches if b >= 1024]
                measure(f"{label} {precision}, IO binding", gpu_label, predict(bound), sizes)
                del bound
            if precision == "float32":
                measure(f"{label} {precision}", cpu_label, predict(cpu), CPU_BATCHES)
            del gpu, cpu
            gc.collect()
    report = render(rows, memory, check)
    report += "\n".join(["", *captum_rows(folder, big[:nc], ours, min_seconds, device), ""])
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
        report += "\n" + "\n".join(
            profile(folder, cuda, big[:b], profile_dir) for b in sorted({nc, max(batches)})
        )
    print(report)
    if out:
        out.write_text(report)
    return 1 if check.failed else 0


def captum_rows(
    folder: Path,
    x: np.ndarray,
    ours: dict[str, tuple[float, np.ndarray]],
    min_seconds: float,
    device: str = "cuda",
) -> list[str]:
    """torch + Captum on the GPU, on the same network (its dense layers rebuilt as a torch
    Sequential) and cells, against our in-graph rates ``ours[label] = (cells/s, attributions)``;
    Markdown rows, or a line saying why it was skipped."""
    try:
        import torch
        from captum.attr import DeepLift, IntegratedGradients
    except ImportError as e:
        return [f"torch + Captum comparison skipped: {e}"]
    if device == "cuda" and not torch.cuda.is_available():
        return ["torch + Captum comparison skipped: torch sees no CUDA device"]
    where = torch.cuda.get_device_name() if device == "cuda" else "the CPU"
    arrays = np.load(folder / LAYERS)
    params = [torch.from_numpy(arrays[f"arr_{i}"]) for i in range(len(arrays.files))]
    mods: list[torch.nn.Module] = []
    for i in range(0, len(params), 2):
        lin = torch.nn.Linear(params[i].shape[1], params[i].shape[0])
        lin.weight.data, lin.bias.data = params[i], params[i + 1]
        mods += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*mods[:-1]).to(device).eval()
    xt = torch.from_numpy(x).to(device)
    with torch.no_grad():
        target = net(xt).argmax(1)

    def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, np.ndarray]:
        def call() -> torch.Tensor:
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        rate = best_rate(call, len(x), 3, min_seconds)
        return rate, call().detach().cpu().numpy()

    rows = [
        f"torch {torch.__version__} + Captum on {where}, {len(x):,} cells per call (all IG "
        "steps in one batch, Captum's fastest), against our graph on the same device:",
        "",
        "| method | ours (cells/s) | torch + Captum (cells/s) | ratio | attribution error p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    ig = IntegratedGradients(net)
    for label, (rate, attr) in ours.items():
        if label.startswith("IG"):
            steps = int(label.split()[1])
            fn = partial(ig.attribute, xt, target=target, n_steps=steps, method="riemann_middle")
        else:
            fn = partial(DeepLift(net).attribute, xt, target=target)
        theirs, ref = timed(fn)
        err = float(np.quantile(rel_error(attr, ref), 0.99))
        rows.append(f"| {label} | {rate:,.0f} | {theirs:,.0f} | {rate / theirs:.1f}x | {err:.1e} |")
        print(rows[-1], flush=True)
    return rows


def profile(folder: Path, providers: list[Provider], x: np.ndarray, out_dir: Path) -> str:
    """Where a call's time goes: onnxruntime's profiler over 5 calls of the IG 32-step graph,
    summed per node and per provider, against the whole run (the rest: copies and overhead)."""
    import json

    opts = session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out_dir / "ort_profile")
    sess = ort.InferenceSession(
        str(folder / "ig32-float32" / "model.onnx"),
        opts,
        providers=[
            *providers,
            *(["CPUExecutionProvider"] if providers[-1] != "CPUExecutionProvider" else []),
        ],
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
        "cells/s per call size (one onnxruntime call per batch, as served unless noted; the "
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
    sp.add_argument(
        "--max-epochs", type=int, help="train for at most this many epochs (a quick check)"
    )
    rp = sub.add_parser("run", help="check and time the graphs on the GPU")
    rp.add_argument("folder", type=Path)
    ap = sub.add_parser("all", help="prepare into a temporary folder, then run")
    for q in (rp, ap):
        q.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 8192, 65536])
        q.add_argument("--min-seconds", type=float, default=0.5)
        q.add_argument("--out", type=Path, help="also write the Markdown report here")
        q.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run")
        q.add_argument("--profile", type=Path, help="also profile IG 32 steps; traces here")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.folder, args.max_epochs)
    elif args.cmd == "all":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            prepare(Path(tmp))
            code = run(
                Path(tmp), args.batches, args.min_seconds, args.out, args.device, args.profile
            )
        sys.exit(code)
    else:
        sys.exit(
            run(args.folder, args.batches, args.min_seconds, args.out, args.device, args.profile)
        )


if __name__ == "__main__":
    main()
