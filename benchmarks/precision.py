"""float32 vs float16 graphs on every device onnxruntime offers here (CPU; CUDA where present):
cells/s for 32-step Integrated Gradients and single-pass DeepLIFT, and the float16 error.

Trains the default programs model on the bundled PBMCs, builds both graphs for each method and
times one session run on batches of real cells (IO binding on GPU providers). Usage:

    python -m benchmarks.precision [--batches 1024 8192] [--steps 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.timing import best_rate, device_name
from cellexplain.models.attribution import AttributionSpec, build_graph
from cellexplain.models.data import load_labelled
from cellexplain.models.runtime import available_providers, provider_name, session_options
from cellexplain.models.train import TrainConfig, fit


def session(model: onnx.ModelProto, provider: str, folder: Path) -> ort.InferenceSession:
    path = folder / f"{model.graph.name}.onnx"
    onnx.save(model, path)
    providers = [p for p in available_providers(prefer_gpu=True) if provider_name(p) == provider]
    return ort.InferenceSession(
        str(path), session_options(), providers=[*providers, "CPUExecutionProvider"]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--min-seconds", type=float, default=1.0)
    args = p.parse_args()

    data = load_labelled()
    fitted = fit(data, TrainConfig(name="bench", arch="programs"), progress=False)
    layers = fitted.model.dense_layers()
    n_prog = fitted.model.config.n_programs
    x0 = np.zeros(layers[0][0].shape[1])
    X = np.asarray(fitted.test_x, np.float32)  # held-out model input (log1p CP10k)
    big = np.tile(X, (-(-max(args.batches) // len(X)), 1))
    providers = [provider_name(p) for p in available_providers(prefer_gpu=True)]
    providers = [pr for pr in providers if pr != "TensorrtExecutionProvider"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for method, spec in (
            (f"IG {args.steps} steps", AttributionSpec(n_steps=args.steps)),
            ("DeepLIFT", AttributionSpec(method="deeplift")),
        ):
            dtypes: tuple[type[np.floating[Any]], ...] = (np.float32, np.float16)
            graphs = {
                dt: build_graph(layers, spec, x0, n_programs=n_prog, dtype=dt, name=f"g{i}")
                for i, dt in enumerate(dtypes)
            }
            for provider in providers:
                sess = {dt: session(g, provider, folder) for dt, g in graphs.items()}
                if sess[np.float32].get_providers()[0] != provider:
                    continue  # a provider listed but not usable (no GPU visible)
                outs = ["probabilities", "attributions"]
                r32 = sess[np.float32].run(outs, {"x": X})
                r16 = sess[np.float16].run(outs, {"x": X})
                agree = float((r32[0].argmax(1) == r16[0].argmax(1)).mean())
                rel = np.abs(r16[1] - r32[1]).sum(1) / np.abs(r32[1]).sum(1)
                for batch in args.batches:
                    xb = big[:batch]
                    rates = {
                        dt: best_rate(
                            partial(s.run, outs, {"x": xb}),
                            batch,
                            3,
                            args.min_seconds,
                        )
                        for dt, s in sess.items()
                    }
                    rows.append(
                        (
                            method,
                            device_name(provider),
                            batch,
                            rates[np.float32],
                            rates[np.float16],
                            agree,
                            float(np.quantile(rel, 0.99)),
                        )
                    )
                    print(
                        f"{method:<14} {provider:<24} batch {batch:>5}: float32 "
                        f"{rates[np.float32]:>10,.0f}  float16 {rates[np.float16]:>10,.0f} cells/s",
                        flush=True,
                    )
    print(
        f"\n# precision: programs model, {len(X)} held-out cells for the error; onnxruntime "
        f"{ort.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| method | device | batch | float32 (cells/s) | float16 (cells/s) | "
        "same label | attribution error p99 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, dev, batch, r32_, r16_, agree, err in rows:
        print(
            f"| {method} | {dev} | {batch} | {r32_:,.0f} | {r16_:,.0f} | {agree:.1%} | {err:.1e} |"
        )
    if not any("CUDA" in r[1] for r in rows):
        print("\nNo GPU visible to onnxruntime here: GPU figures not measured in this run.")


if __name__ == "__main__":
    main()
