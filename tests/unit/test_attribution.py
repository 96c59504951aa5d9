"""The hand-written attribution graphs against Captum on the same torch model (float64)."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from captum.attr import (
    DeepLift,
    InputXGradient,
    IntegratedGradients,
    LayerDeepLift,
    LayerIntegratedGradients,
)
from captum.attr._utils.approximation_methods import approximation_parameters

from cellexplain.models.architectures import ArchConfig, CellClassifier
from cellexplain.models.attribution import (
    RULES,
    AttributionSpec,
    build_graph,
    gap_denominator,
    integration_rule,
)

G, C = 40, 5


def make_model(arch: str, seed: int = 0) -> CellClassifier:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mask = None
    n_programs = 0
    if arch == "programs":
        n_programs = 6
        mask = (rng.uniform(size=(n_programs, G)) < 0.3).astype(np.float32)
    cfg = ArchConfig(
        arch=arch,  # type: ignore[arg-type]
        n_genes=G,
        n_classes=C,
        first_width=16,
        hidden=[12] if arch != "linear" else [],
        n_programs=n_programs,
        n_free=4,
    )
    mean = rng.uniform(0, 1, G).astype(np.float32)
    scale = rng.uniform(0.5, 2, G).astype(np.float32)
    return CellClassifier(cfg, mean, scale, mask).eval()


def run_graph(
    model: CellClassifier,
    spec: AttributionSpec,
    x: np.ndarray,
    x0: np.ndarray,
    target: np.ndarray | None = None,
    dtype: type = np.float32,
) -> dict[str, np.ndarray]:
    onnx_model = build_graph(
        model.dense_layers(), spec, x0, n_programs=model.config.n_programs, dtype=dtype
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    feeds = {"x": x.astype(dtype)}
    if target is not None:
        feeds["target"] = target.astype(np.int64)
    return dict(zip(names, sess.run(names, feeds), strict=True))


def inputs(n: int = 24, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.log1p(rng.poisson(2.0, size=(n, G)) * rng.uniform(0.5, 3, size=G)).astype(np.float32)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("rule", RULES)
def test_integration_rules_match_captum(rule):
    for n in (2, 7, 32):
        alphas, weights = integration_rule(rule, n)
        step_sizes, alpha_fn = approximation_parameters(rule)
        np.testing.assert_allclose(alphas, alpha_fn(n), atol=1e-12)
        np.testing.assert_allclose(weights, step_sizes(n), atol=1e-12)
        expected = (n - 1) / n if rule == "riemann_trapezoid" else 1.0  # as Captum defines it
        assert weights.sum() == pytest.approx(expected)


@pytest.mark.parametrize("arch", ["mlp", "programs"])
@pytest.mark.parametrize("rule", ["riemann_middle", "riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_integrated_gradients_match_captum(arch, rule, baseline):
    model = make_model(arch)
    x = inputs()
    x0 = np.zeros(G) if baseline == "zero" else model.standardize.mean.numpy().astype(np.float64)
    spec = AttributionSpec("integrated_gradients", n_steps=16, rule=rule, baseline=baseline)
    out = run_graph(model, spec, x, x0)
    m64 = copy.deepcopy(model).double()
    xt, x0t = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(x0)[None]
    t = out["explained_class"].tolist()
    ref = IntegratedGradients(m64).attribute(xt, x0t, target=t, n_steps=16, method=rule).numpy()
    assert rel_err(out["attributions"], ref) < 1e-5
    if arch == "programs":
        lref = (
            LayerIntegratedGradients(m64, m64.first_layer)
            .attribute(xt, x0t, target=t, n_steps=16, method=rule)
            .numpy()
        )
        assert out["program_attributions"].shape == (len(x), 6)
        assert rel_err(out["program_attributions"], lref[:, :6]) < 1e-5


@pytest.mark.parametrize("arch", ["mlp", "programs"])
def test_deeplift_matches_captum_and_is_complete(arch):
    model = make_model(arch, seed=3)
    x = inputs(seed=4)
    x0 = model.standardize.mean.numpy().astype(np.float64)
    out = run_graph(model, AttributionSpec("deeplift", baseline="mean"), x, x0)
    m64 = copy.deepcopy(model).double()
    xt, x0t = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(x0)[None]
    t = out["explained_class"]
    ref = DeepLift(m64).attribute(xt, x0t, target=t.tolist()).detach().numpy()
    assert rel_err(out["attributions"], ref) < 1e-5
    with torch.no_grad():
        delta = (m64(xt)[np.arange(len(x)), t] - m64(x0t)[0, t]).numpy()
    np.testing.assert_allclose(out["attributions"].sum(1), delta, rtol=1e-4, atol=1e-4)
    if arch == "programs":
        lref = LayerDeepLift(m64, m64.first_layer).attribute(xt, x0t, target=t.tolist())
        assert rel_err(out["program_attributions"], lref.detach().numpy()[:, :6]) < 1e-5


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift"])
def test_float64_graph_equals_captum(method):
    """Built in float64, the graph's arithmetic is Captum's to rounding (no float32 kinks)."""
    model = make_model("programs", seed=13)
    x = inputs(seed=14)
    x0 = np.zeros(G)
    spec = AttributionSpec(method, n_steps=32)
    out = run_graph(model, spec, x, x0, dtype=np.float64)
    assert out["attributions"].dtype == np.float64
    m64 = copy.deepcopy(model).double()
    xt, x0t = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(x0)[None]
    t = out["explained_class"].tolist()
    if method == "deeplift":
        ref = DeepLift(m64).attribute(xt, x0t, target=t)
    else:
        ref = IntegratedGradients(m64).attribute(
            xt, x0t, target=t, n_steps=32, method="riemann_middle"
        )
    assert rel_err(out["attributions"], ref.detach().numpy()) < 1e-12


def test_gradient_x_input_matches_captum():
    model = make_model("mlp", seed=5)
    x = inputs(seed=6)
    out = run_graph(model, AttributionSpec("gradient_x_input"), x, np.zeros(G))
    m64 = copy.deepcopy(model).double()
    ref = InputXGradient(m64).attribute(
        torch.from_numpy(x.astype(np.float64)), target=out["explained_class"].tolist()
    )
    assert rel_err(out["attributions"], ref.detach().numpy()) < 1e-5


def test_ig_completeness_improves_with_steps():
    model = make_model("mlp", seed=7)
    x = inputs(seed=8)
    m64 = copy.deepcopy(model).double()
    errs = []
    for steps in (4, 16, 64):
        out = run_graph(model, AttributionSpec(n_steps=steps), x, np.zeros(G))
        t = out["explained_class"]
        with torch.no_grad():
            xt = torch.from_numpy(x.astype(np.float64))
            delta = (m64(xt)[np.arange(len(x)), t] - m64(torch.zeros(1, G).double())[0, t]).numpy()
        errs.append(float(np.max(np.abs(out["attributions"].sum(1) - delta))))
    assert errs[2] < errs[0]
    assert errs[2] < 0.05 * float(np.mean(np.abs(delta)))


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift", "gradient_x_input"])
def test_linear_model_is_exact(method):
    model = make_model("linear", seed=9)
    x = inputs(seed=10)
    out = run_graph(model, AttributionSpec(method), x, np.zeros(G))
    W, _ = model.dense_layers()[0]
    t = out["explained_class"]
    np.testing.assert_allclose(out["attributions"], x * W[t], rtol=1e-5, atol=1e-6)
    # completeness is exact: sum = logit_t(x) - logit_t(0)
    np.testing.assert_allclose(
        out["attributions"].sum(1), (x @ W.T)[np.arange(len(x)), t], rtol=1e-4, atol=1e-5
    )


def test_probabilities_and_target_override():
    model = make_model("programs", seed=11)
    x = inputs(seed=12)
    predicted = run_graph(model, AttributionSpec(n_steps=8), x, np.zeros(G))
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(predicted["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predicted["probabilities"].sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(predicted["explained_class"], logits.argmax(1))
    # explain another class, per cell and as one class for all cells
    other = (logits.argmax(1) + 1) % C
    per_cell = run_graph(model, AttributionSpec(n_steps=8), x, np.zeros(G), target=other)
    np.testing.assert_array_equal(per_cell["explained_class"], other)
    assert not np.allclose(per_cell["attributions"], predicted["attributions"])
    one = run_graph(model, AttributionSpec(n_steps=8), x, np.zeros(G), target=np.array([2]))
    np.testing.assert_array_equal(one["explained_class"], np.full(len(x), 2))
    ref = IntegratedGradients(copy.deepcopy(model).double()).attribute(
        torch.from_numpy(x.astype(np.float64)), target=2, n_steps=8, method="riemann_middle"
    )
    assert rel_err(one["attributions"], ref.numpy()) < 1e-5
    # a negative entry still means "the predicted class"
    mixed = np.where(np.arange(len(x)) % 2 == 0, -1, other)
    out = run_graph(model, AttributionSpec(n_steps=8), x, np.zeros(G), target=mixed)
    np.testing.assert_array_equal(
        out["explained_class"], np.where(mixed < 0, logits.argmax(1), other)
    )


def test_target_input_is_optional_for_plain_clients():
    model = make_model("mlp")
    onnx_model = build_graph(model.dense_layers(), AttributionSpec(n_steps=4), np.zeros(G))
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [i.name for i in sess.get_overridable_initializers()] == ["target"]


def test_graph_size_grows_with_step_groups_not_with_batch():
    """Steps run side by side in groups of IG_STEP_GROUP: the graph grows by one set of ops
    per group, never with the batch (the batch is a dynamic dimension)."""
    from cellexplain.models.attribution import IG_STEP_GROUP

    model = make_model("mlp")

    def n_nodes(steps: int) -> int:
        spec = AttributionSpec(n_steps=steps)
        return len(build_graph(model.dense_layers(), spec, np.zeros(G)).graph.node)

    one, two, four = (n_nodes(k * IG_STEP_GROUP) for k in (1, 2, 4))
    assert n_nodes(1) == one  # a partial group costs what a full one does
    assert four - two == 2 * (two - one) > 0


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown attribution method"):
        AttributionSpec("shap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="implicit zero baseline"):
        AttributionSpec("gradient_x_input", baseline="mean")
    with pytest.raises(ValueError, match="n_steps"):
        AttributionSpec(n_steps=0)
    with pytest.raises(ValueError, match="unknown integration rule"):
        AttributionSpec(rule="simpson")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift", "gradient_x_input"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_graph_has_no_dead_weights(method, dtype):
    """Every initializer feeds a node (an unused copy of a weight matrix doubles the file)."""
    model = make_model("mlp")
    graph = build_graph(
        model.dense_layers(), AttributionSpec(method=method), np.zeros(G), dtype=dtype
    ).graph
    used = {i for node in graph.node for i in node.input}
    dead = [t.name for t in graph.initializer if t.name not in used]
    assert dead == []


@pytest.mark.parametrize("n_steps", [4, 16, 64])
@pytest.mark.parametrize("arch", ["mlp", "programs"])
def test_completeness_gap_is_captums_convergence_delta(arch, n_steps):
    """The graph's per-cell ``completeness_gap`` is Captum's convergence delta (for the same
    model, cells, baseline and steps) over |F(x) - F(x0)|; more steps, smaller gaps."""
    model = make_model(arch)
    x = inputs()
    x0 = np.zeros(G)
    spec = AttributionSpec(method="integrated_gradients", n_steps=n_steps)
    out = run_graph(model, spec, x, x0, dtype=np.float64)
    m64 = copy.deepcopy(model).double()
    xt = torch.from_numpy(x.astype(np.float64))
    target = torch.from_numpy(out["explained_class"])
    _, delta = IntegratedGradients(m64).attribute(
        xt,
        baselines=torch.zeros_like(xt),
        target=target,
        n_steps=n_steps,
        method="riemann_middle",
        return_convergence_delta=True,
    )
    with torch.no_grad():
        rise = (m64(xt) - m64(torch.zeros_like(xt))).gather(1, target[:, None]).squeeze(1)
    want = np.abs(delta.numpy()) / gap_denominator(rise.numpy(), out["attributions"])
    np.testing.assert_allclose(out["completeness_gap"], want, rtol=1e-6, atol=1e-12)
    assert out["completeness_gap"].shape == (len(x),)
    served = run_graph(model, spec, x, x0)  # float32, as served
    np.testing.assert_allclose(served["completeness_gap"], want, rtol=1e-2, atol=1e-5)


def test_more_steps_give_smaller_gaps_and_exact_methods_none():
    model = make_model("mlp")
    x = inputs(64)
    x0 = np.zeros(G)
    medians = [
        float(np.median(run_graph(model, AttributionSpec(n_steps=s), x, x0, dtype=np.float64)[
            "completeness_gap"
        ]))
        for s in (4, 16, 64)
    ]  # fmt: skip
    assert medians[0] > medians[1] > medians[2] > 0
    exact = run_graph(model, AttributionSpec(method="deeplift"), x, x0, dtype=np.float64)
    assert float(exact["completeness_gap"].max()) < 1e-9
    linear = run_graph(make_model("linear"), AttributionSpec(n_steps=2), x, x0)
    assert float(linear["completeness_gap"].max()) < 1e-4  # float32 rounding only


def test_a_float16_graph_reports_its_gap_in_float32():
    model = make_model("programs")
    x = inputs()
    spec = AttributionSpec(n_steps=16)
    layers, n_programs = model.dense_layers(), model.config.n_programs
    graph = build_graph(layers, spec, np.zeros(G), n_programs=n_programs, dtype=np.float16)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    half = dict(zip(names, sess.run(names, {"x": x}), strict=True))  # float32 in and out
    full = run_graph(model, spec, x, np.zeros(G))
    assert half["completeness_gap"].dtype == np.float32
    assert np.isfinite(half["completeness_gap"]).all()
    # the float16 arithmetic adds error of its own; the gap says so, and stays small
    assert float(np.median(half["completeness_gap"])) < 0.05
    # the same quadrature, other rounding: the two agree within float16's own error
    np.testing.assert_allclose(
        np.median(half["completeness_gap"]), np.median(full["completeness_gap"]), atol=2e-2
    )


def test_a_cell_with_nothing_to_explain_has_no_gap():
    """A cell equal to the baseline (no counts of the model's genes): every attribution and the
    logit change are zero, float32 rounding is all that is left; the gap says 0, not 18%."""
    model = make_model("mlp")
    x = np.zeros((3, G), np.float32)
    for method in ("integrated_gradients", "deeplift"):
        out = run_graph(model, AttributionSpec(method=method), x, np.zeros(G))
        assert float(out["completeness_gap"].max()) < 1e-3, method
