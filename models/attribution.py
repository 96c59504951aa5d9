"""Attribution graphs: one ONNX graph computes logits, probabilities and attributions together.

The network is a list of dense layers with ReLU between them (see
:meth:`cellexplain.models.architectures.CellClassifier.dense_layers`). The backward pass is
written by hand as plain ONNX ops (Gemm, MatMul, Mul, Where...), so the graph runs on any
onnxruntime provider.

Methods (for the class ``t`` of each cell: its predicted class, or the ``target`` input):

* ``integrated_gradients``: ``(x - x0) * sum_k w_k dF_t/dx (x0 + a_k (x - x0))`` with the
  nodes ``a_k`` and weights ``w_k`` of a quadrature rule (Captum's ``riemann_*`` and
  ``gausslegendre``). Linearity makes it cheap: the first layer's ``W1 (x - x0)`` is computed once
  and scaled by each ``a_k``; the upstream gradients are averaged over the steps **before** the
  product with ``W1``, so the wide gene-dimension matmuls run once per cell, not once per step.
  Steps are unrolled one after another, so memory is ``O(n * width)`` whatever the step count.
  Completeness (attributions sum to ``F_t(x) - F_t(x0)``) holds up to the quadrature error.
* ``deeplift``: DeepLIFT with the Rescale rule (single pass). For ReLU networks the attributions
  sum **exactly** to ``F_t(x) - F_t(x0)``. Baseline activations are constants of the graph.
* ``gradient_x_input``: ``x * dF_t/dx (x)`` (single pass, zero baseline; no completeness
  guarantee for non-linear networks).

For a network with no hidden layer (``linear``), all three equal the exact ``(x - x0) * W_t``.

Program attributions (``programs`` models) attribute to the first layer's pre-activations
(Captum's ``LayerIntegratedGradients`` / ``LayerDeepLift`` on that layer): one value per gene set;
together with the free units they sum to the same ``F_t(x) - F_t(x0)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cellexplain.models.novelty import NoveltyReference
from cellexplain.models.novelty import add_to_graph as add_novelty

Method = Literal["integrated_gradients", "deeplift", "gradient_x_input"]
METHODS: tuple[Method, ...] = ("integrated_gradients", "deeplift", "gradient_x_input")
Rule = Literal[
    "riemann_middle", "riemann_trapezoid", "riemann_left", "riemann_right", "gausslegendre"
]
RULES: tuple[Rule, ...] = (
    "riemann_middle",
    "riemann_trapezoid",
    "riemann_left",
    "riemann_right",
    "gausslegendre",
)
OPSET = 17
#: DeepLIFT falls back to the gradient where |x - x0| at a ReLU input is below this (as Captum)
DEEPLIFT_EPS = 1e-10
#: integration steps computed side by side in one set of ops (bounds IG's memory per batch:
#: about IG_STEP_GROUP x cells x widest layer floats per intermediate)
IG_STEP_GROUP = 8
#: the same in a float16 graph, where 1e-10 rounds to 0 (and 0/0 would give NaN)
DEEPLIFT_EPS_FP16 = 1e-3

Layers = Sequence[tuple[np.ndarray, np.ndarray]]


def integration_rule(rule: Rule, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alphas`` in [0, 1] and weights of a quadrature rule over [0, 1].

    The same definitions as Captum's ``approximation_parameters``, so the graph and Captum
    integrate at the same points.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    n = n_steps
    if rule == "riemann_middle":
        alphas = np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)
        weights = np.full(n, 1 / n)
    elif rule == "riemann_left":
        alphas = np.linspace(0, 1 - 1 / n, n)
        weights = np.full(n, 1 / n)
    elif rule == "riemann_right":
        alphas = np.linspace(1 / n, 1, n)
        weights = np.full(n, 1 / n)
    elif rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")
        # Captum's definition: weights 1/n with the two ends halved (they sum to (n-1)/n)
        alphas = np.linspace(0, 1, n)
        weights = np.full(n, 1 / n)
        weights[[0, -1]] /= 2
    elif rule == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(n)
        alphas = 0.5 * (nodes + 1)
        weights = 0.5 * w
    else:
        raise ValueError(f"unknown integration rule {rule!r}; choose one of {RULES}")
    return alphas.astype(np.float64), weights.astype(np.float64)


@dataclass(frozen=True)
class AttributionSpec:
    """How attributions are computed in the exported graph."""

    method: Method = "integrated_gradients"
    n_steps: int = 32
    rule: Rule = "riemann_middle"
    baseline: Literal["zero", "mean"] = "zero"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown attribution method {self.method!r}; choose one of {METHODS}")
        if self.method == "gradient_x_input" and self.baseline != "zero":
            raise ValueError("gradient_x_input has an implicit zero baseline")
        if self.method == "integrated_gradients":
            integration_rule(self.rule, self.n_steps)  # validates rule and steps


class _GraphBuilder:
    """A tiny helper to write ONNX graphs: unique names, constants as initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        output = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attrs))
        return output


def _relu_grad(b: _GraphBuilder, z: str, g: str, zero: str, elem: int) -> str:
    """``g * 1[z > 0]``: the gradient through a ReLU whose input is ``z``.

    A product with the cast mask, not ``Where(z > 0, g, 0)``: the same values (g is finite),
    and 5x faster on onnxruntime's CPU provider, whose Where broadcasting the scalar 0 was the
    largest cost of an IG step (profiled: 9 of the 12 slowest nodes)."""
    return b.op("Mul", [g, b.op("Cast", [b.op("Greater", [z, zero])], to=elem)])


def _float32_interface(
    b: _GraphBuilder,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
) -> None:
    """Give a float16 graph float32 inputs and outputs: ``x`` is cast to float16 on the way
    in and every float16 output to float32 on the way out (clients see no difference)."""
    half = {
        v.name for v in (*inputs, *outputs) if v.type.tensor_type.elem_type == TensorProto.FLOAT16
    }
    renamed = {n: f"{n}_fp16" for n in half}
    for node in b.nodes:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    casts_in = [
        helper.make_node("Cast", [v.name], [renamed[v.name]], to=TensorProto.FLOAT16)
        for v in inputs
        if v.name in half
    ]
    casts_out = [
        helper.make_node("Cast", [renamed[v.name]], [v.name], to=TensorProto.FLOAT)
        for v in outputs
        if v.name in half
    ]
    b.nodes[:] = [*casts_in, *b.nodes, *casts_out]
    for v in (*inputs, *outputs):
        if v.name in half:
            v.type.tensor_type.elem_type = TensorProto.FLOAT


#: the completeness gap's denominator is |F(x) - F(x0)|, but never below this share of the
#: attributions' total magnitude (cells whose attributions cancel out: float32 rounding of a sum
#: over thousands of genes is not a quadrature error)...
GAP_MAGNITUDE_SHARE = 1e-2
#: ...nor below this many logit units (a cell with no counts: F(x) = F(x0), all zeros)
GAP_FLOOR = 1e-3


def gap_denominator(rise: np.ndarray, attributions: np.ndarray) -> np.ndarray:
    """``max(|F(x) - F(x0)|, GAP_MAGNITUDE_SHARE * sum|attributions|, GAP_FLOOR)`` per cell
    (numpy; the graph computes the same)."""
    magnitude = np.abs(attributions).sum(axis=1)
    return np.maximum(np.maximum(np.abs(rise), GAP_MAGNITUDE_SHARE * magnitude), GAP_FLOOR)


def _forward(layers: Layers, x: np.ndarray) -> np.ndarray:
    """The network's logits at one input, in float64."""
    h = np.asarray(x, dtype=np.float64)
    for i, (W, bias) in enumerate(layers):
        h = W @ h + bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def _completeness_gap(b: _GraphBuilder, logits0: np.ndarray, dtype: type[np.floating[Any]]) -> None:
    """``completeness_gap`` ``[n]``: ``|sum(attributions) - (F_t(x) - F_t(x0))|`` over
    :func:`gap_denominator` per cell, from the graph's own outputs (``F_t`` the explained class's
    logit, ``logits0`` the logits at the baseline). Captum's convergence delta over the size of
    what the attributions explain: the quadrature error of IG, float rounding for exact
    methods."""
    axis1 = b.const("axis1", np.array([1], np.int64))
    total = b.op("ReduceSum", ["attributions", axis1], keepdims=0)
    rise = b.op("Sub", ["logits", b.const("logits0", logits0.astype(dtype))])
    t = b.op("Unsqueeze", ["explained_class", axis1])
    explained = b.op("Squeeze", [b.op("GatherElements", [rise, t], axis=1), axis1])
    err = b.op("Abs", [b.op("Sub", [total, explained])])
    magnitude = b.op("ReduceSum", [b.op("Abs", ["attributions"]), axis1], keepdims=0)
    share = b.op("Mul", [magnitude, b.const("gap_share", np.array(GAP_MAGNITUDE_SHARE, dtype))])
    floor = b.const("gap_floor", np.array(GAP_FLOOR, dtype=dtype))
    scale = b.op("Max", [b.op("Abs", [explained]), share, floor])
    b.op("Div", [err, scale], out="completeness_gap")


def build_graph(
    layers: Layers,
    spec: AttributionSpec,
    baseline: np.ndarray,
    n_programs: int = 0,
    name: str = "cellexplain",
    dtype: type[np.floating[Any]] = np.float32,
    novelty: NoveltyReference | None = None,
    program_copies: int = 1,
    input_clip: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> onnx.ModelProto:
    """Write the prediction + attribution graph of a dense ReLU network.

    Args:
        layers: ``[(W [out, in], b [out]), ...]``, float64; ReLU between consecutive layers.
        spec: attribution method, steps and rule.
        baseline: ``[n_genes]`` baseline expression ``x0`` (zeros for the zero baseline).
        n_programs: for program models, how many leading first-layer units are gene programs.
        name: graph name.
        dtype: ``np.float32`` (served), ``np.float16`` (the half-precision export for GPUs:
            float32 inputs and outputs, float16 weights and arithmetic inside) or
            ``np.float64`` (used by the export checks to verify the graph's arithmetic against
            Captum without float32 rounding; its inputs and outputs are float64).
        novelty: the constants of the novelty score (:mod:`~cellexplain.models.novelty`);
            with them the graph also returns ``novelty`` ``[n]``.
        program_copies: a seed ensemble's members (:func:`~cellexplain.models.architectures.
            ensemble`): its first ``program_copies x n_programs`` units are the members'
            programs, member after member, and a program's attribution is their sum.
        input_clip: ``(mean, scale, upper)``, linear models only: the layer reads
            ``z = min((x - mean) / scale, upper)`` (CellTypist's standardisation, clipped above
            at 10) instead of ``x``; its weights are ``z``'s. Attributions stay exact:
            ``W_t * (z - z0)`` for ``z0`` the baseline's ``z`` (the path from the baseline
            crosses the clip gene by gene, and a linear layer sums what each gene moved).

    Returns:
        An ONNX model with inputs ``x`` float32 ``[n, n_genes]`` and ``target`` int64 ``[m]``
        (optional: an overridable initializer defaulting to ``[-1]``; ``m`` is 1 or ``n``; a
        negative value means the predicted class) and outputs ``logits`` ``[n, C]``,
        ``probabilities`` ``[n, C]``, ``attributions`` ``[n, n_genes]``, ``explained_class``
        int64 ``[n]``, ``completeness_gap`` ``[n]`` (see :func:`_completeness_gap`) and, when
        ``n_programs > 0``, ``program_attributions`` ``[n, n_programs]``, and with ``novelty``,
        ``novelty`` ``[n]``.
    """
    if not layers:
        raise ValueError("a network needs at least one layer")
    f32 = np.dtype(dtype)
    elem = {
        np.dtype(np.float64): TensorProto.DOUBLE,
        np.dtype(np.float32): TensorProto.FLOAT,
        np.dtype(np.float16): TensorProto.FLOAT16,
    }[f32]
    G = layers[0][0].shape[1]
    C = layers[-1][0].shape[0]
    x0 = np.asarray(baseline, dtype=np.float64).reshape(G)
    b = _GraphBuilder()
    inp = "x"  # what the first layer reads: x, or its clipped standardisation
    if input_clip is not None:
        if len(layers) != 1:
            raise ValueError("input_clip is for linear models (one layer)")
        mean, scale, upper = (np.asarray(v, dtype=np.float64) for v in input_clip)
        x0 = np.minimum((x0 - mean) / scale, upper)  # the baseline, as the layer reads it
        inp = b.op(
            "Min",
            [
                b.op(
                    "Mul",
                    [b.op("Sub", ["x", b.const("mean", mean.astype(f32))]),
                     b.const("inv_scale", (1.0 / scale).astype(f32))],
                ),
                b.const("upper", np.asarray(upper, dtype=f32)),
            ],
        )  # fmt: skip
    zero_baseline = not np.any(x0)
    zero = b.const("zero", np.array(0.0, dtype=f32)) if len(layers) > 1 else ""
    Ws = [b.const(f"W{i + 1}", W.astype(f32)) for i, (W, _) in enumerate(layers)]

    # d = x - x0 and the first layer's pre-activation difference D1 = d @ W1^T
    d = inp if zero_baseline else b.op("Sub", [inp, b.const("baseline", x0.astype(f32))])
    W1, b1 = layers[0]
    a0 = W1 @ x0 + b1  # first-layer pre-activation at the baseline (a constant)
    a0_c = b.const("a0", a0.astype(f32))
    D1 = b.op("Gemm", [d, Ws[0]], transB=1)
    z1 = b.op("Add", [D1, a0_c])

    # forward pass at x: pre-activations z_1..z_{L-1} and the logits
    zs = [z1]
    h = z1
    for i in range(1, len(layers)):
        h = b.op(
            "Gemm",
            [b.op("Relu", [h]), Ws[i], b.const(f"b{i + 1}", layers[i][1].astype(f32))],
            transB=1,
        )
        zs.append(h)
    logits = b.op("Identity", [zs[-1]], out="logits")
    b.op("Softmax", [logits], out="probabilities", axis=1)

    # the explained class: target where given (>= 0), else the predicted class
    pred = b.op("ArgMax", [logits], axis=1, keepdims=0)
    t = b.op(
        "Where",
        [b.op("Less", ["target", b.const("zero_i", np.array(0, dtype=np.int64))]), pred, "target"],
        out="explained_class",
    )
    g_top = b.op("Gather", [Ws[-1], t], axis=0)  # dF_t / d(last hidden activation), [n, width]

    def backward_to_first(gate: Callable[[int, str], str]) -> str:
        """Chain ``g_top`` back to the first layer's pre-activation: dF_t/dz1 ``[n, width1]``.

        ``gate(i, g)`` applies the derivative (or DeepLIFT multiplier) of ReLU ``i`` to ``g``.
        """
        g = g_top
        for i in range(len(layers) - 2, -1, -1):
            g = gate(i, g)
            if i > 0:
                g = b.op("MatMul", [g, Ws[i]])
        return g

    def relu_gate(pre_activations: Sequence[str]) -> Callable[[int, str], str]:
        """The ReLU derivative gate for :func:`backward_to_first` at these pre-activations."""
        return lambda i, g: _relu_grad(b, pre_activations[i], g, zero, elem)

    program_out: str | None = None
    if len(layers) == 1:
        # linear: exact attributions (x - x0) * W_t for every method
        b.op("Mul", [d, g_top], out="attributions")
    else:
        if spec.method == "integrated_gradients":
            # the steps run side by side: a leading step axis [k, n, width] per group of at
            # most IG_STEP_GROUP steps (few, large ops; memory bounded by the group size)
            alphas, weights = integration_rule(spec.rule, spec.n_steps)
            # hidden layers' weights, transposed for batched MatMul over the step axis
            Wts = {
                i: b.const(f"W{i + 1}T", layers[i][0].T.astype(f32))
                for i in range(1, len(layers) - 1)
            }
            axis0 = b.const("axis0", np.array([0], dtype=np.int64))
            acc: str | None = None
            for start in range(0, len(alphas), IG_STEP_GROUP):
                a_k = alphas[start : start + IG_STEP_GROUP].reshape(-1, 1, 1)
                w_k = weights[start : start + IG_STEP_GROUP].reshape(-1, 1, 1)
                zk = b.op("Add", [b.op("Mul", [D1, b.const("alpha", a_k.astype(f32))]), a0_c])
                hk = zk
                zks = [zk]
                for i in range(1, len(layers) - 1):
                    hk = b.op(
                        "Add",
                        [
                            b.op("MatMul", [b.op("Relu", [hk]), Wts[i]]),
                            b.const(f"b{i + 1}", layers[i][1].astype(f32)),
                        ],
                    )
                    zks.append(hk)
                g = backward_to_first(relu_gate(zks))  # [k, n, width1]
                g = b.op("Mul", [g, b.const("w", w_k.astype(f32))])
                g = b.op("ReduceSum", [g, axis0], keepdims=0)
                acc = g if acc is None else b.op("Add", [acc, g])
            assert acc is not None
            g1 = acc
        elif spec.method == "deeplift":
            # baseline activations are constants; rescale multipliers m = Δrelu / Δz per ReLU
            z0s: list[np.ndarray] = [a0]
            for W, bias in layers[1:-1]:
                z0s.append(W @ np.maximum(z0s[-1], 0) + bias)
            mults: list[str] = []
            eps = DEEPLIFT_EPS_FP16 if elem == TensorProto.FLOAT16 else DEEPLIFT_EPS
            for z, z0 in zip(zs[:-1], z0s, strict=True):
                z0c = b.const("z0", z0.astype(f32))
                dz = b.op("Sub", [z, z0c])
                dr = b.op("Sub", [b.op("Relu", [z]), b.const("r0", np.maximum(z0, 0).astype(f32))])
                small = b.op("Less", [b.op("Abs", [dz]), b.const("eps", np.array(eps, dtype=f32))])
                grad = b.op("Cast", [b.op("Greater", [z, zero])], to=elem)
                # safe division: where dz is tiny, divide by 1 and take the gradient instead
                safe_dz = b.op("Where", [small, b.const("one", np.array(1.0, dtype=f32)), dz])
                mults.append(b.op("Where", [small, grad, b.op("Div", [dr, safe_dz])]))
            g1 = backward_to_first(lambda i, g: b.op("Mul", [g, mults[i]]))
        else:  # gradient_x_input: the gradient at x (the baseline is zero, so d is x)
            g1 = backward_to_first(relu_gate(zs))
        b.op("Mul", [d, b.op("MatMul", [g1, Ws[0]])], out="attributions")
        if n_programs > 0:
            # layer attribution at the first layer's pre-activation: Δz1 * dF/dz1
            prog = b.op("Mul", [D1, g1])
            starts = b.const("starts", np.array([0], dtype=np.int64))
            ends = b.const("ends", np.array([n_programs * program_copies], dtype=np.int64))
            axes = b.const("axes", np.array([1], dtype=np.int64))
            if program_copies == 1:
                program_out = b.op("Slice", [prog, starts, ends, axes], out="program_attributions")
            else:  # [n, copies x P] -> [n, copies, P], summed over the copies
                shape = b.const("copies", np.array([0, program_copies, n_programs], np.int64))
                copies = b.op("Reshape", [b.op("Slice", [prog, starts, ends, axes]), shape])
                program_out = b.op(
                    "ReduceSum", [copies, axes], out="program_attributions", keepdims=0
                )

    n, g_dim, c_dim = "n", G, C
    inputs = [
        helper.make_tensor_value_info("x", elem, [n, g_dim]),
        helper.make_tensor_value_info("target", TensorProto.INT64, ["n_target"]),
    ]
    # `target` is an overridable initializer: optional, defaulting to "predicted class"
    b.initializers.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "target"))
    outputs = [
        helper.make_tensor_value_info("logits", elem, [n, c_dim]),
        helper.make_tensor_value_info("probabilities", elem, [n, c_dim]),
        helper.make_tensor_value_info("attributions", elem, [n, g_dim]),
        helper.make_tensor_value_info("explained_class", TensorProto.INT64, [n]),
    ]
    if program_out is not None:
        outputs.append(helper.make_tensor_value_info("program_attributions", elem, [n, n_programs]))
    if elem == TensorProto.FLOAT16:
        _float32_interface(b, inputs, outputs)
    # after the interface: the gap is computed from the outputs as served (float32 for a
    # float16 graph, whose float16 sum over thousands of genes would swamp the gap itself)
    out_elem = TensorProto.DOUBLE if elem == TensorProto.DOUBLE else TensorProto.FLOAT
    out_dtype = np.float64 if elem == TensorProto.DOUBLE else np.float32
    _completeness_gap(b, _forward(layers, x0), out_dtype)
    outputs.append(helper.make_tensor_value_info("completeness_gap", out_elem, [n]))
    if novelty is not None:  # from the input as sent: float32 (float64 for the check graph)
        add_novelty(b, "x", novelty, out_dtype)
        outputs.append(helper.make_tensor_value_info("novelty", out_elem, [n]))
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="cellexplain",
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    return model
