"""In-graph attributions (onnxruntime) vs torch + Captum on the same model and cells.

Trains a model on the bundled PBMCs (Captum needs the torch model), builds its graph for each
method and step count, and times, on the same batch of real cells:

* onnxruntime: one session run of the exported graph (probabilities + attributions together);
* Captum: ``IntegratedGradients`` (same steps and rule, ``internal_batch_size`` = batch) and
  ``DeepLift`` on the float32 torch model.

Prints cells/s and the ratio, as a Markdown table, then what IG's steps buy: the distribution
over the real cells of the graph's per-cell ``completeness_gap`` (|sum(attributions) - (F(x) -
F(x0))| / |F(x) - F(x0)|) beside its speed, from 8 to 128 steps. Usage:

    python -m benchmarks.attribution [--arch programs] [--batch 1024] [--steps 16 32 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import onnxruntime as ort
import torch
from captum.attr import DeepLift, IntegratedGradients

from benchmarks.timing import best_rate
from cellexplain.models.attribution import AttributionSpec, build_graph
from cellexplain.models.data import load_labelled
from cellexplain.models.train import TrainConfig, fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="programs", choices=["linear", "mlp", "programs"])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="0: all cores (both sides)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_labelled()
    fitted = fit(data, TrainConfig(arch=args.arch, name="bench"), progress=False)
    model = fitted.model.eval()
    layers = model.dense_layers()
    n_programs = model.config.n_programs
    X = np.asarray(data.X[: args.batch].toarray(), dtype=np.float32)
    reps = -(-args.batch // X.shape[0])
    X = np.tile(X, (reps, 1))[: args.batch]
    x_t = torch.from_numpy(X)
    zero = np.zeros(X.shape[1])

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = args.threads

    def session(spec: AttributionSpec) -> Callable[[], object]:
        graph = build_graph(layers, spec, zero, n_programs=n_programs).SerializeToString()
        sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": X})

    with torch.no_grad():
        target = model(x_t).argmax(1).tolist()
    print(
        f"# attributions: {args.arch} model "
        f"({'-'.join(map(str, fitted.card_fields['architecture'].layer_sizes))}),"
        f" batch {args.batch}; {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print("| method | steps | onnxruntime (cells/s) | torch + Captum (cells/s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    ig = IntegratedGradients(model)
    for steps in args.steps:
        ours = best_rate(
            session(AttributionSpec("integrated_gradients", n_steps=steps)),
            args.batch,
            args.repeat,
            args.min_seconds,
        )

        def captum_ig(s: int = steps) -> object:
            return ig.attribute(
                x_t,
                target=target,
                n_steps=s,
                method="riemann_middle",
                internal_batch_size=args.batch,
            )

        theirs = best_rate(captum_ig, args.batch, args.repeat, args.min_seconds)
        print(
            f"| Integrated Gradients | {steps} | {ours:,.0f} | {theirs:,.0f} | "
            f"{ours / theirs:.1f}x |",
            flush=True,
        )
    ours = best_rate(
        session(AttributionSpec("deeplift")), args.batch, args.repeat, args.min_seconds
    )
    dl = DeepLift(model)
    theirs = best_rate(
        lambda: dl.attribute(x_t, baselines=0.0, target=target),
        args.batch,
        args.repeat,
        args.min_seconds,
    )
    print(f"| DeepLIFT (rescale) | 1 | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.1f}x |")
    unique = np.asarray(data.X.toarray(), dtype=np.float32)
    print(
        f"\n# what steps buy: completeness gap over the {len(unique)} real cells (riemann_middle, "
        "zero baseline), and onnxruntime's speed at the batch above"
    )
    print("| IG steps | median gap | p90 | p99 | max | cells > 1% | onnxruntime (cells/s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for steps in (8, 16, 32, 64, 128):
        spec = AttributionSpec("integrated_gradients", n_steps=steps)
        graph = build_graph(layers, spec, zero, n_programs=n_programs).SerializeToString()
        sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        (gap,) = sess.run(["completeness_gap"], {"x": unique})
        q = np.quantile(gap, [0.5, 0.9, 0.99])
        rate = best_rate(partial(sess.run, None, {"x": X}), args.batch, 1, args.min_seconds)
        print(
            f"| {steps} | {q[0]:.2e} | {q[1]:.2e} | {q[2]:.2e} | {gap.max():.2e} | "
            f"{(gap > 0.01).mean():.1%} | {rate:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
