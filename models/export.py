"""Export a trained classifier to one ONNX graph and check it against torch and Captum.

The checks (recorded in the model card; export fails, writing nothing, if one fails), on
held-out cells:

1. the graph's arithmetic: the same graph built in float64 matches Captum on the float64 torch
   model (same baseline, steps and quadrature rule) to 1e-9 relative;
2. the served float32 graph matches that reference to 1e-4 relative for 99% of cells, and to 1e-2
   for the worst cell (float32 rounding can flip a ReLU gate whose input is within rounding of
   zero at one integration step, moving that cell's attributions by one step's share);
3. completeness: each cell's attributions sum to ``F_t(x) - F_t(x0)``, within the quadrature
   error of exact IG at the same steps (measured by Captum in float64) plus float32 rounding;
4. probabilities match the torch model to 1e-5.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from captum.attr import (
    DeepLift,
    InputXGradient,
    IntegratedGradients,
    LayerDeepLift,
    LayerIntegratedGradients,
)

from cellexplain.models.architectures import CellClassifier
from cellexplain.models.attribution import OPSET, AttributionSpec, build_graph, gap_denominator
from cellexplain.models.card import (
    CARD_FILE,
    FLOAT16_MIN_LABEL_AGREEMENT,
    FLOAT16_RTOL,
    ONNX_FILE,
    Attribution,
    ExportChecks,
    Float16Checks,
    GapDistribution,
    ModelCard,
    OnnxInfo,
)
from cellexplain.models.errors import ExportError
from cellexplain.models.novelty import NoveltyReference
from cellexplain.models.novelty import novelty as novelty_share
from cellexplain.models.runtime import session_options

log = logging.getLogger(__name__)

#: float32 rounding allowance, relative to the scale of the values compared
FLOAT32_RTOL = 1e-4
#: the float64 graph against float64 Captum: the same arithmetic, so only summation order differs
FLOAT64_RTOL = 1e-9
#: bound on the worst cell, where a ReLU gate flips between float32 and float64 at one step
KINK_RTOL = 1e-2
#: the graph's completeness gap vs the same from float64 torch logits: within 5% of the gap
#: plus 2e-3 (float32 logits and sums, over a denominator of at least 1e-3 logits)
GAP_CHECK_RTOL = 0.05
GAP_CHECK_ATOL = 2e-3
MAX_CHECK_CELLS = 512
MIN_CHECK_CELLS = 32
#: cells x steps x genes of one reference tensor in the export checks (100 MB as float64)
CHECK_VALUES = 12_500_000

Precision = Literal["float32", "float16"]


def _captum_reference(
    model64: CellClassifier,
    spec: AttributionSpec,
    x: torch.Tensor,
    x0: torch.Tensor,
    target: torch.Tensor,
    n_programs: int,
    copies: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Captum's gene (and program) attributions in float64 (a program's: the sum over a seed
    ensemble's ``copies`` of it)."""
    t = target.tolist()
    layer = model64.first_layer
    prog: torch.Tensor | None = None
    if spec.method == "integrated_gradients":
        ref = IntegratedGradients(model64).attribute(
            x, baselines=x0, target=t, n_steps=spec.n_steps, method=spec.rule
        )
        if n_programs:
            prog = LayerIntegratedGradients(model64, layer).attribute(
                x, baselines=x0, target=t, n_steps=spec.n_steps, method=spec.rule
            )
        name = f"IntegratedGradients(n_steps={spec.n_steps}, method={spec.rule})"
    elif spec.method == "deeplift":
        ref = DeepLift(model64).attribute(x, baselines=x0, target=t)
        if n_programs:
            prog = LayerDeepLift(model64, layer).attribute(x, baselines=x0, target=t)
        name = "DeepLift(rescale)"
    else:
        ref = InputXGradient(model64).attribute(x, target=t)
        name = "InputXGradient"
    prog_np = None
    if prog is not None:
        layer_attr = prog.detach().numpy()[:, : n_programs * copies]
        prog_np = layer_attr.reshape(len(layer_attr), copies, n_programs).sum(1)
    return ref.detach().numpy(), prog_np, name


def served_graph(
    model: CellClassifier,
    spec: AttributionSpec,
    mean: np.ndarray,
    name: str = "cellexplain",
    novelty: NoveltyReference | None = None,
    dtype: type[np.floating[Any]] = np.float32,
) -> onnx.ModelProto:
    """The graph :func:`export_model` serves for ``model`` (its baseline from ``spec`` and the
    training ``mean``; a seed ensemble's program copies summed), without the export's checks:
    what the benchmarks run on models they fit and do not export."""
    x0 = np.zeros_like(mean) if spec.baseline == "zero" else mean.astype(np.float64)
    return build_graph(
        model.dense_layers(),
        spec,
        x0,
        n_programs=model.config.n_programs,
        name=name,
        dtype=dtype,
        novelty=novelty,
        program_copies=model.config.ensemble,
    )


def _run(
    onnx_bytes: bytes, x: np.ndarray, target: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(
        onnx_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    feeds = {"x": x} if target is None else {"x": x, "target": target}
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|."""
    return float(np.max(np.abs(a - ref)) / max(float(np.max(np.abs(ref))), 1e-12))


def export_model(
    model: CellClassifier,
    spec: AttributionSpec,
    card_fields: dict[str, Any],
    out_dir: str | Path,
    check_x: np.ndarray,
    mean: np.ndarray,
    precision: Precision = "float32",
    novelty: NoveltyReference | None = None,
) -> ModelCard:
    """Write ``out_dir/model.onnx`` and ``out_dir/model.json`` after checking the graph.

    Args:
        model: trained classifier (eval mode).
        spec: attribution method, steps, rule and baseline.
        card_fields: the card's fields other than ``attribution``, ``checks`` and ``onnx``.
        out_dir: destination folder (created).
        check_x: ``[n, n_genes]`` held-out model input to check parity on.
        mean: ``[n_genes]`` training mean of the model input (the ``mean`` baseline).
        precision: ``"float16"`` serves a half-precision graph (for GPUs: half the memory
            traffic; float32 inputs and outputs), after checking it against the float32 graph:
            the same labels for at least :data:`FLOAT16_MIN_LABEL_AGREEMENT` of the cells and
            per-cell attribution error under :data:`FLOAT16_RTOL` for 99% of them.
        novelty: the novelty score's constants: the graph returns ``novelty`` too, checked
            against :func:`~cellexplain.models.novelty.novelty` (float64 numpy).

    Raises:
        ExportError: a check failed; nothing is written.
    """
    model = model.eval()
    layers = model.dense_layers()
    n_programs = model.config.n_programs
    copies = model.config.ensemble
    x0 = np.zeros_like(mean) if spec.baseline == "zero" else mean.astype(np.float64)
    # the served graph (float32, or float16 once float32 has passed its checks)
    served = partial(served_graph, model, spec, mean, card_fields["name"], novelty)
    onnx_model = served()
    onnx_bytes = onnx_model.SerializeToString()

    # -- checks on held-out cells against the float64 torch model and Captum
    # Captum's float64 reference holds cells x steps x genes values per tensor: bound the cells
    # so a full transcriptome at many steps stays within memory (512 cells at 765 genes)
    steps = spec.n_steps if spec.method == "integrated_gradients" else 1
    n_check = max(MIN_CHECK_CELLS, min(MAX_CHECK_CELLS, CHECK_VALUES // (steps * len(mean))))
    xs = np.asarray(check_x[:n_check], dtype=np.float32)
    out = _run(onnx_bytes, xs)
    t_np = out["explained_class"]
    graph64 = build_graph(
        layers, spec, x0, n_programs=n_programs, dtype=np.float64, program_copies=copies
    )
    out64 = _run(graph64.SerializeToString(), xs.astype(np.float64), t_np)
    model64 = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(xs.astype(np.float64))
    x0_t = torch.from_numpy(x0).unsqueeze(0)
    target = torch.from_numpy(t_np)
    ref, ref_prog, captum_name = _captum_reference(
        model64, spec, x, x0_t, target, n_programs, copies
    )

    # (a) the graph's arithmetic: the float64 graph must equal Captum (float64) exactly
    f64_err = _rel_error(out64["attributions"], ref)
    if ref_prog is not None:
        f64_err = max(f64_err, _rel_error(out64["program_attributions"], ref_prog))
    # (b) the served float32 graph: rounding only, except where a ReLU input within float32
    # rounding of 0 flips its gate at one integration step (a kink); hence max and 99th pct
    attr = out["attributions"].astype(np.float64)
    abs_err = float(np.max(np.abs(attr - ref)))
    rel_err = _rel_error(attr, ref)
    per_cell = np.max(np.abs(attr - ref), axis=1) / np.maximum(np.max(np.abs(ref), axis=1), 1e-12)
    rel_p99 = float(np.quantile(per_cell, 0.99))
    prog_rel: float | None = None
    if ref_prog is not None and "program_attributions" in out:
        prog_rel = _rel_error(out["program_attributions"], ref_prog)

    with torch.no_grad():
        logits64 = model64(x)
        f_x = logits64.gather(1, target[:, None]).squeeze(1).numpy()
        f_x0 = model64(x0_t).squeeze(0).numpy()[target.numpy()]
        probs64 = torch.softmax(logits64, 1).numpy()
    delta_f = f_x - f_x0 if spec.method != "gradient_x_input" else None
    if delta_f is not None:
        complete_err = np.abs(attr.sum(1) - delta_f)
        ref_err = np.abs(ref.sum(1) - delta_f)  # quadrature error of exact IG at these steps
        scale = max(float(np.mean(np.abs(delta_f))), 1e-12)
        tolerance = float(ref_err.max()) + FLOAT32_RTOL * scale
        completeness_abs = float(complete_err.max())
        completeness_rel = completeness_abs / scale
        complete_ok = completeness_abs <= tolerance
    else:  # gradient x input has no completeness property
        completeness_abs = completeness_rel = tolerance = float("nan")
        complete_ok = True
    prob_err = float(np.max(np.abs(out["probabilities"] - probs64)))
    novelty_err: float | None = None
    novelty_ok = True
    if novelty is not None:
        novelty_err = float(np.max(np.abs(out["novelty"] - novelty_share(novelty, xs))))
        novelty_ok = novelty_err <= 2.0 / max(len(novelty.calibration), 1) + 1e-6
    # the graph's own per-cell completeness gap, against the same gap from float64 torch logits
    gap = out["completeness_gap"].astype(np.float64)
    rise = f_x - f_x0
    gap_ref = np.abs(attr.sum(1) - rise) / gap_denominator(rise, attr)
    # the excess of the difference over its allowance (5% of the gap, plus float32 rounding)
    gap_err = float(np.max(np.abs(gap - gap_ref) - GAP_CHECK_RTOL * gap_ref))
    passed = (
        f64_err < FLOAT64_RTOL
        and rel_p99 < FLOAT32_RTOL
        and rel_err < KINK_RTOL
        and (prog_rel is None or prog_rel < KINK_RTOL)
        and complete_ok
        and prob_err < 1e-5
        and gap_err < GAP_CHECK_ATOL
        and novelty_ok
    )
    checks = ExportChecks(
        n_cells=len(xs),
        captum_method=captum_name,
        captum_max_abs_error=abs_err,
        captum_rel_error=rel_err,
        captum_rel_error_p99=rel_p99,
        float64_graph_rel_error=f64_err,
        program_captum_rel_error=prog_rel,
        completeness_max_abs_error=completeness_abs,
        completeness_rel_error=completeness_rel,
        completeness_tolerance=tolerance,
        probabilities_max_abs_error=prob_err,
        completeness_gap=GapDistribution.of(gap),
        completeness_gap_check_error=gap_err,
        novelty_max_abs_error=novelty_err,
        passed=passed,
    )
    if passed and precision == "float16":
        onnx_model = served(dtype=np.float16)
        onnx_bytes = onnx_model.SerializeToString()
        fp16 = _float16_checks(_run(onnx_bytes, xs, t_np), out)
        checks.float16 = fp16
        checks.passed = passed = (
            fp16.label_agreement >= FLOAT16_MIN_LABEL_AGREEMENT
            and fp16.attributions_rel_error_p99 < FLOAT16_RTOL
        )
    log.info("export checks: %s", checks.model_dump())
    if not passed:
        raise ExportError(f"exported graph failed its checks: {checks.model_dump()}")

    exact = len(layers) == 1
    if exact:
        completeness = "exact: attributions are (x - x0) * W_t for a linear model"
    elif spec.method == "integrated_gradients":
        completeness = (
            f"sum equals F(x) - F(x0) up to the {spec.rule} quadrature error at {spec.n_steps} "
            f"steps (measured max {completeness_rel:.2e} relative on held-out cells)"
        )
    elif spec.method == "deeplift":
        completeness = "exact (DeepLIFT rescale on a ReLU network), up to float32 rounding"
    else:
        completeness = "none: gradient x input does not sum to F(x) - F(0) for non-linear models"
    card = ModelCard(
        **card_fields,
        gene_importance=[float(v) for v in np.abs(attr).mean(0)],
        attribution=Attribution(
            method=spec.method,
            n_steps=spec.n_steps if spec.method == "integrated_gradients" and not exact else 0,
            rule=spec.rule if spec.method == "integrated_gradients" and not exact else "none",
            baseline=spec.baseline,
            exact=exact,
            completeness=completeness,
        ),
        checks=checks,
        onnx=OnnxInfo(
            sha256=hashlib.sha256(onnx_bytes).hexdigest(),
            precision=precision,
            opset=OPSET,
            inputs=[i.name for i in onnx_model.graph.input],
            outputs=list(out),
        ),
    )
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_path / ONNX_FILE, onnx_bytes)
    _atomic_write(out_path / CARD_FILE, (card.model_dump_json(indent=2) + "\n").encode())
    return card


def _float16_checks(half: dict[str, np.ndarray], full: dict[str, np.ndarray]) -> Float16Checks:
    """The float16 graph's outputs vs the float32 graph's on the same cells and targets."""
    a16 = half["attributions"].astype(np.float64)
    a32 = full["attributions"].astype(np.float64)
    per_cell = np.abs(a16 - a32).sum(1) / np.maximum(np.abs(a32).sum(1), 1e-12)
    same = half["probabilities"].argmax(1) == full["probabilities"].argmax(1)
    return Float16Checks(
        label_agreement=float(same.mean()),
        probabilities_max_abs_error=float(
            np.max(np.abs(half["probabilities"] - full["probabilities"]))
        ),
        attributions_rel_error_median=float(np.median(per_cell)),
        attributions_rel_error_p99=float(np.quantile(per_cell, 0.99)),
        attributions_rel_error_max=float(per_cell.max()),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
