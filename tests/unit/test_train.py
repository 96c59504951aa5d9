"""Training and export on the real bundled PBMC data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellexplain.models.attribution import AttributionSpec
from cellexplain.models.card import ModelCard, sha256_file
from cellexplain.models.data import load_labelled
from cellexplain.models.errors import ArtifactError, DataError, GeneSetError
from cellexplain.models.runtime import OnnxModel
from tests.conftest import train_small


def test_card_records_everything(programs_model, pbmc_data):
    card, out = programs_model
    on_disk = ModelCard.read(out)
    assert on_disk == card
    assert card.genes == pbmc_data.genes and len(card.genes) == 765
    assert len(card.classes) == 10 and card.classes == sorted(card.classes)
    assert card.preprocessing.detected_training_input == "log1p_cp10k"
    assert card.preprocessing.gene_selection == "all"
    assert card.architecture.kind == "programs"
    assert card.architecture.n_programs == len(card.gene_sets.programs) > 20
    assert card.architecture.layer_sizes[0] == 765 and card.architecture.layer_sizes[-1] == 10
    assert card.gene_sets.source == "hallmark.v7.5.1.symbols.gmt"
    assert card.attribution.method == "integrated_gradients" and card.attribution.n_steps == 32
    assert card.training_data.source == "scanpy:pbmc68k_reduced"
    assert card.split.train + card.split.validation + card.split.test == 700
    assert card.onnx.sha256 == sha256_file(out / "model.onnx")
    assert card.onnx.inputs == ["x", "target"]
    assert "program_attributions" in card.onnx.outputs
    # held-out scores for the model and the logistic-regression baseline, on the same split
    for s in (card.metrics.model, card.metrics.logistic_regression):
        assert 0.5 < s.accuracy <= 1 and 0.3 < s.macro_f1 <= 1
        assert set(s.per_class_f1) == set(card.classes)
    assert card.checks.passed
    assert card.checks.float64_graph_rel_error < 1e-9
    assert card.checks.captum_rel_error_p99 < 1e-4
    assert card.checks.captum_rel_error < 1e-2
    assert card.checks.program_captum_rel_error is not None
    assert card.checks.program_captum_rel_error < 1e-4
    assert card.checks.completeness_max_abs_error <= card.checks.completeness_tolerance
    # novelty: its reference, calibration and threshold, and the graph's check against numpy
    assert card.novelty is not None and card.novelty.n_components == 10
    assert card.novelty.reference_cells == card.novelty.calibration_cells == 700
    assert abs(card.novelty.calibration_flagged - (1 - card.novelty.threshold)) < 0.01
    assert "novelty" in card.onnx.outputs and card.checks.novelty_max_abs_error is not None
    assert card.gene_importance is not None and len(card.gene_importance) == 765
    assert card.calibration is not None and 0.05 < card.calibration.temperature < 20
    json.loads((out / "model.json").read_text())  # plain JSON, readable by anything


def test_the_temperature_is_folded_into_the_exported_logits(pbmc_data):
    import torch

    from cellexplain.models.train import TrainConfig, dense, fit

    cfg = dict(arch="mlp", name="t", max_epochs=8, patience=3, seed=2, refit=False)
    plain = fit(pbmc_data, TrainConfig(**cfg, calibrate=False), progress=False)
    scaled = fit(pbmc_data, TrainConfig(**cfg), progress=False)
    cal = scaled.card_fields["calibration"]
    assert plain.card_fields["calibration"] is None and cal is not None
    x = torch.from_numpy(dense(pbmc_data.X)[:50])
    with torch.no_grad():
        a, b = plain.model(x).numpy(), scaled.model(x).numpy()
    np.testing.assert_allclose(b, a / cal.temperature, rtol=1e-4, atol=1e-5)
    assert cal.n_bins == 15 and 0 <= cal.ece_test_after <= 1


def test_temperature_scaling_recovers_an_overconfident_scale():
    """Labels drawn from softmax(z), logits 3z: the fitted temperature is about 3, and the
    calibration error falls."""
    from cellexplain.models.train import _calibrate

    rng = np.random.default_rng(0)
    z = rng.normal(size=(6000, 5)) * 1.5
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    cal = _calibrate(3 * z[:3000], y[:3000], 3 * z[3000:], y[3000:])
    assert cal.temperature == pytest.approx(3.0, rel=0.1)
    assert cal.ece_test_after < cal.ece_test_before / 2


def test_onnx_matches_captum_on_real_cells(programs_model, pbmc_data):
    """Independent of the exporter's own checks: rebuild the torch reference here."""
    card, out = programs_model
    model = OnnxModel(out)
    x = pbmc_data.X[:64].toarray()
    pred = model.predict(x)
    assert pred.attributions.shape == (64, 765)
    assert pred.program_attributions is not None
    assert pred.program_attributions.shape == (64, card.architecture.n_programs)
    np.testing.assert_allclose(pred.probabilities.sum(1), 1, rtol=1e-5)
    # completeness: gene attributions sum to the same total as programs + free units would;
    # here against F(x) - F(0) computed from the graph's own logits at x and at zero
    zero = model.predict(np.zeros((1, 765), np.float32), target=pred.explained_class[:1])
    assert zero.logits.shape == (1, 10)
    delta = (
        pred.logits[np.arange(64), pred.explained_class]
        - model.predict(np.zeros((64, 765), np.float32)).logits[np.arange(64), pred.explained_class]
    )
    err = np.abs(pred.attributions.sum(1) - delta)
    assert err.max() < 0.05 * np.abs(delta).mean()  # 32 midpoint steps on a ReLU net


def test_deeplift_export_is_complete_and_matches_captum(pbmc_data, tmp_path):
    card = train_small(
        pbmc_data,
        tmp_path,
        arch="mlp",
        max_epochs=10,  # the checks hold for any weights: no need to converge
        attribution=AttributionSpec("deeplift", baseline="mean"),
    )
    assert card.checks.passed and card.checks.captum_method == "DeepLift(rescale)"
    assert card.checks.completeness_rel_error < 1e-4
    assert "exact" in card.attribution.completeness


def test_linear_model_exact(pbmc_data, tmp_path):
    card = train_small(pbmc_data, tmp_path, arch="linear", max_epochs=10)
    assert card.attribution.exact and card.attribution.n_steps == 0
    assert card.checks.completeness_rel_error < 1e-4
    assert "program_attributions" not in card.onnx.outputs


def test_training_is_deterministic(pbmc_data, tmp_path):
    a = train_small(pbmc_data, tmp_path / "a", arch="mlp", max_epochs=5, seed=3)
    b = train_small(pbmc_data, tmp_path / "b", arch="mlp", max_epochs=5, seed=3)
    c = train_small(pbmc_data, tmp_path / "c", arch="mlp", max_epochs=5, seed=4)
    assert a.onnx.sha256 == b.onnx.sha256
    assert a.metrics == b.metrics
    assert a.onnx.sha256 != c.onnx.sha256


def test_highly_variable_selection_and_explicit_target(pbmc_data, tmp_path):
    card = train_small(pbmc_data, tmp_path, arch="mlp", n_top_genes=200, max_epochs=30)
    assert card.preprocessing.gene_selection == "highly_variable:200"
    assert len(card.genes) == 200 and set(card.genes) <= set(pbmc_data.genes)
    model = OnnxModel(tmp_path)
    idx = [pbmc_data.genes.index(g) for g in card.genes]
    x = pbmc_data.X[:20][:, idx].toarray()
    target = card.classes.index("CD14+ Monocyte")
    pred = model.predict(x, target=target)
    assert (pred.explained_class == target).all()
    assert not np.allclose(pred.attributions, model.predict(x).attributions)
    with pytest.raises(ValueError, match="out of range"):
        model.predict(x, target=len(card.classes))
    with pytest.raises(ValueError, match=r"x must be \[n, 200\]"):
        model.predict(x[:, :10])


def test_counts_input_is_detected_and_normalised(counts_h5ad, tmp_path):
    data = load_labelled(counts_h5ad, label_key="bulk_labels")
    assert data.detection.kind == "counts"
    # normalised over all (765) genes: rows of expm1 sum to 10,000
    np.testing.assert_allclose(
        np.expm1(data.X.toarray() if sp.issparse(data.X) else data.X).sum(1), 1e4, rtol=1e-3
    )
    card = train_small(data, tmp_path, arch="linear", max_epochs=30)
    assert card.preprocessing.detected_training_input == "counts"
    assert card.training_data.source == str(counts_h5ad)


def test_artifact_tampering_is_refused(programs_model, tmp_path):
    import shutil

    _, out = programs_model
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        OnnxModel(bad)
    (bad / "model.json").unlink()
    with pytest.raises(ArtifactError, match="no model card"):
        OnnxModel(bad)


# -- bad data: each gets an error that names the problem ------------------------------------


def _write(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


@pytest.fixture
def small_adata(pbmc):
    raw = pbmc.raw.to_adata()
    return ad.AnnData(raw.X.toarray(), obs=pbmc.obs[["bulk_labels"]].copy(), var=raw.var.copy())


def test_missing_label_column(small_adata, tmp_path):
    path = _write(small_adata, tmp_path / "a.h5ad")
    with pytest.raises(DataError, match=r"label column .cell_type. not found.*bulk_labels"):
        load_labelled(path, label_key="cell_type")


def test_gene_key_not_found(small_adata, tmp_path):
    path = _write(small_adata, tmp_path / "a.h5ad")
    with pytest.raises(DataError, match="gene key 'symbol' not found"):
        load_labelled(path, label_key="bulk_labels", gene_key="symbol")


def test_nan_in_matrix(small_adata, tmp_path):
    small_adata.X[5, 7] = np.nan
    path = _write(small_adata, tmp_path / "a.h5ad")
    with pytest.raises(DataError, match="NaN"):
        load_labelled(path, label_key="bulk_labels")


def test_missing_layer_and_file(small_adata, tmp_path):
    path = _write(small_adata, tmp_path / "a.h5ad")
    with pytest.raises(DataError, match="layer 'counts' not found"):
        load_labelled(path, label_key="bulk_labels", layer="counts")
    with pytest.raises(DataError, match=r"has no \.raw"):
        load_labelled(path, label_key="bulk_labels", layer="raw")
    with pytest.raises(DataError, match="not found"):
        load_labelled(tmp_path / "nope.h5ad", label_key="bulk_labels")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(DataError, match="cannot read"):
        load_labelled(tmp_path / "junk.h5ad", label_key="bulk_labels")


def test_one_class_and_rare_class(small_adata, tmp_path):
    one = small_adata.copy()
    one.obs["bulk_labels"] = "T cell"
    data = load_labelled(_write(one, tmp_path / "one.h5ad"), label_key="bulk_labels")
    with pytest.raises(DataError, match="at least 2 classes"):
        train_small(data, tmp_path / "m1")
    data = load_labelled(_write(small_adata, tmp_path / "rare.h5ad"), label_key="bulk_labels")
    with pytest.raises(DataError, match=r"too few cells.*'CD4\+/CD45RA\+/CD25- Naive T' \(8\)"):
        train_small(data, tmp_path / "m2", min_cells_per_class=10)


def test_no_overlap_with_gene_sets(small_adata, tmp_path):
    ens = small_adata.copy()
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    data = load_labelled(_write(ens, tmp_path / "ens.h5ad"), label_key="bulk_labels")
    with pytest.raises(GeneSetError, match="no overlap with the gene sets"):
        train_small(data, tmp_path / "m", arch="programs")


def test_duplicated_genes(small_adata, tmp_path):
    dup = small_adata.copy()
    names = list(dup.var_names)
    names[1] = names[0]
    dup.var_names = names
    path = _write(dup, tmp_path / "dup.h5ad")
    with pytest.raises(DataError, match="duplicated gene name"):
        load_labelled(path, label_key="bulk_labels")


def test_the_exported_model_is_refit_on_every_labelled_cell(pbmc_data):
    """The split chooses the epochs and scores the recipe; the exported model is fitted on all
    700 cells (its standardisation is theirs), and the card says so. --no-refit keeps the
    split's model."""
    from cellexplain.models.train import TrainConfig, dense, fit

    cfg = dict(arch="mlp", name="refit", max_epochs=12, patience=5, seed=1)
    refit = fit(pbmc_data, TrainConfig(**cfg), progress=False)
    kept = fit(pbmc_data, TrainConfig(**cfg, refit=False), progress=False)
    everything = dense(pbmc_data.X)
    np.testing.assert_allclose(refit.mean, everything.mean(0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(kept.mean, everything.mean(0), atol=1e-3)  # the train split's
    split_r, split_k = refit.card_fields["split"], kept.card_fields["split"]
    assert split_r.refit_cells == 700 and split_k.refit_cells is None
    metrics_r, metrics_k = refit.card_fields["metrics"], kept.card_fields["metrics"]
    assert metrics_r.model == metrics_k.model  # the same scores: the split's model, held out
    assert "refit on all 700 cells" in metrics_r.how_obtained
    assert f"for the {metrics_r.best_epoch} epochs" in metrics_r.how_obtained
    assert "refit" not in metrics_k.how_obtained
    x = everything[:50]
    import torch

    with torch.no_grad():
        a = refit.model(torch.from_numpy(x)).numpy()
        b = kept.model(torch.from_numpy(x)).numpy()
    assert not np.allclose(a, b)  # a different fit


def test_sparse_and_dense_training_give_the_same_model(pbmc_data):
    """Training reads CSR rows a mini-batch at a time: the same cells as a CSR or a dense
    matrix make the same model (what densifying the whole matrix used to give)."""
    import dataclasses

    import torch

    from cellexplain.models.train import TrainConfig, dense, fit

    cfg = TrainConfig(arch="mlp", name="sparse", max_epochs=6, patience=3, seed=2, refit=False)
    as_csr = dataclasses.replace(pbmc_data, X=sp.csr_matrix(pbmc_data.X))
    as_dense = dataclasses.replace(pbmc_data, X=dense(pbmc_data.X))
    a, b = fit(as_csr, cfg, progress=False), fit(as_dense, cfg, progress=False)
    assert a.card_fields["metrics"] == b.card_fields["metrics"]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_streaming_gene_moments_match_numpy():
    from cellexplain.models.preprocess import gene_mean_var, select_variable_genes

    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(0.5, size=(3000, 40)) * rng.uniform(0.5, 3, size=40))
    rows = np.sort(rng.choice(3000, 1700, replace=False))
    for m in (x, sp.csr_matrix(x)):
        mean, var = gene_mean_var(m, rows, chunk=256)
        np.testing.assert_allclose(mean, x[rows].mean(0), rtol=1e-10)
        np.testing.assert_allclose(var, x[rows].var(0), rtol=1e-8, atol=1e-12)
        np.testing.assert_array_equal(
            select_variable_genes(m, 7, rows), select_variable_genes(x[rows], 7)
        )


def test_the_linear_model_is_its_objectives_unique_optimum_whatever_the_seed(pbmc_data):
    """The linear model is fitted to the minimum of a convex objective, from zero: its weights
    are scikit-learn's multinomial logistic regression of the same objective (balanced class
    weights, C = 1 / (l2 * cells)) on the same standardised cells, and its top genes do not
    depend on the seed (it chose AdamW's random start before: top-10 Jaccard 0.21)."""
    from sklearn.linear_model import LogisticRegression

    from cellexplain.models.train import TrainConfig, dense, fit

    fitted = [fit(pbmc_data, TrainConfig(arch="linear", seed=s), progress=False) for s in (0, 1)]
    tops = []
    for f in fitted:
        (layer,) = [m for m in f.model.net if isinstance(m, torch.nn.Linear)]
        W = layer.weight.detach().numpy().astype(np.float64)
        tops.append([set(np.argsort(-w)[:10]) for w in W])
    jaccard = np.mean([len(a & b) / len(a | b) for a, b in zip(*tops, strict=True)])
    assert jaccard >= 0.95, jaccard

    model = fitted[0].model  # refit on every labelled cell
    l2 = fitted[0].card_fields["architecture"].l2
    assert l2 == TrainConfig().l2 and fitted[0].card_fields["architecture"].converged
    classes = fitted[0].card_fields["classes"]
    y = np.searchsorted(np.asarray(classes), pbmc_data.labels)
    with torch.no_grad():
        Z = model.standardize(torch.from_numpy(dense(pbmc_data.X))).numpy().astype(np.float64)
    ref = LogisticRegression(
        C=1.0 / (l2 * len(y)), class_weight="balanced", max_iter=10_000, tol=1e-10
    ).fit(Z, y)
    (layer,) = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    # the exported weights are divided by the calibration's temperature: undone here
    temperature = fitted[0].card_fields["calibration"].temperature
    W = layer.weight.detach().numpy().astype(np.float64) * temperature
    rel = np.linalg.norm(W - ref.coef_) / np.linalg.norm(ref.coef_)
    assert rel < 2e-2, rel


def test_a_linear_fit_stopped_short_of_its_optimum_says_so(pbmc_data, monkeypatch):
    """Two L-BFGS iterations cannot reach the optimum: the card and its text say so, never
    "optimum"."""
    from cellexplain.models import train as training

    monkeypatch.setattr(training, "LBFGS_MAX_ITER", 2)
    monkeypatch.setattr(training, "LBFGS_ROUNDS", 1)
    fitted = training.fit(pbmc_data, training.TrainConfig(arch="linear"), progress=False)
    assert fitted.card_fields["architecture"].converged is False
    how = fitted.card_fields["metrics"].how_obtained
    assert "SHORT OF the optimum" in how and "SHORT OF its optimum" in how, how
    with pytest.raises(ValueError, match="finite number above 0"):
        training.TrainConfig(arch="linear", l2=float("inf"))


@pytest.mark.parametrize("arch", ["mlp", "programs"])
def test_an_ensemble_is_one_network_averaging_its_members(pbmc_data, arch):
    """Members side by side (block-diagonal layers, program units first): the logits are the
    mean of the members', and so are IG attributions (linear in the function), program
    attributions summed over the members' copies of a program."""
    import torch

    from cellexplain.models.architectures import ensemble
    from cellexplain.models.attribution import AttributionSpec, build_graph
    from cellexplain.models.train import TrainConfig, _build, dense

    X = dense(pbmc_data.X)
    genes = list(pbmc_data.genes)
    builts = [
        _build(genes, X, None, 10, TrainConfig(arch=arch, hidden=[16], n_free=8, seed=s))
        for s in range(3)
    ]
    members = [b.model.eval() for b in builts]
    combined = ensemble(members, builts[0].mask)
    assert combined.config.ensemble == 3
    x = torch.from_numpy(X[:40])
    with torch.no_grad():
        want = torch.stack([m(x) for m in members]).mean(0).numpy()
        np.testing.assert_allclose(combined(x).numpy(), want, rtol=1e-5, atol=1e-6)
    n_programs = members[0].config.n_programs
    spec = AttributionSpec()
    outputs = []
    for model, copies in [*((m, 1) for m in members), (combined, 3)]:
        graph = build_graph(
            model.dense_layers(), spec, np.zeros(len(genes)), n_programs=n_programs,
            dtype=np.float64, program_copies=copies,
        )  # fmt: skip
        import onnxruntime as ort

        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = ["attributions"] + (["program_attributions"] if n_programs else [])
        target = np.zeros(40, np.int64)  # the same class explained by every network
        outputs.append(session.run(names, {"x": X[:40].astype(np.float64), "target": target}))
    for j in range(len(outputs[0])):
        mean = np.mean([o[j] for o in outputs[:3]], axis=0)
        # float32 weights (the last layer divided by 3): rounding at 1e-7 of the values
        np.testing.assert_allclose(outputs[3][j], mean, rtol=1e-5, atol=1e-8)
