"""The model card: everything needed to serve, explain and audit an exported model.

A model artifact is a folder with ``model.onnx`` and ``model.json`` (this card). The card alone
says how to preprocess input (so serving needs no training code), which genes and classes the
graph has, how attributions are computed, and how well the model did on held-out cells.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellexplain.models.errors import ArtifactError
from cellexplain.models.novelty import DEFAULT_THRESHOLD

CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
CARD_SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Preprocessing(_Strict):
    """How raw input becomes model input (re-applied at serving time)."""

    model_input: Literal["log1p_cp10k"] = "log1p_cp10k"
    target_sum: float = Field(default=1e4, description="counts per cell before log1p")
    normalise_over: Literal["all_genes"] = "all_genes"
    detected_training_input: Literal["counts", "log1p_cp10k"]
    detection_reason: str
    gene_selection: str = Field(description="'all' or 'highly_variable:N'")
    n_genes_in_training_data: int


class Architecture(_Strict):
    kind: Literal["linear", "mlp", "programs"]
    layer_sizes: list[int] = Field(description="input, hidden widths..., classes")
    n_programs: int = 0
    n_free_units: int = 0
    dropout: float = 0.0
    n_parameters: int
    l2: float | None = Field(
        default=None,
        description="linear: the L2 penalty of its convex fit (lambda/2 * |W|^2 beside the "
        "class-weighted mean cross-entropy)",
    )
    ensemble: int = Field(
        default=1,
        description="mlp, programs: networks from consecutive seeds averaged in the graph "
        "(layer_sizes and n_parameters are the whole graph's)",
    )
    converged: bool | None = Field(
        default=None,
        description="linear: whether both of its fits (the split's and the refit) reached the "
        "optimum (|gradient| / l2, a bound on the distance to it, within 1% of |W|)",
    )


class Attribution(_Strict):
    method: Literal["integrated_gradients", "deeplift", "gradient_x_input"]
    n_steps: int = Field(description="integration steps (integrated_gradients only)")
    rule: str = Field(description="quadrature rule of the integral (Captum's names)")
    baseline: Literal["zero", "mean"]
    exact: bool = Field(description="true when attributions are exact (linear models)")
    completeness: str


class Origin(_Strict):
    """Where a model not trained here comes from (``cellexplain models import-celltypist``)."""

    kind: Literal["celltypist"]
    file: str = Field(description="the file it was read from (its name)")
    sha256: str
    estimator: str = Field(description="the scikit-learn estimator it stored")
    description: dict[str, Any] = Field(
        default_factory=dict, description="the model's own description (CellTypist's)"
    )
    standardisation: str = Field(
        description="how the graph reads its genes: clip((x - mean) / scale, max=10), as "
        "CellTypist's annotate does"
    )
    missing_genes: Literal["mean"] = Field(
        default="mean",
        description="a model gene a request lacks reads as its training mean (z = 0), as "
        "CellTypist leaves it out of the score; `missing_fill` holds the values",
    )
    missing_fill: list[float] = Field(description="per model gene, the value a missing one reads")


class Novelty(_Strict):
    """The novelty score the graph returns (``novelty``): see :mod:`cellexplain.models.novelty`."""

    method: Literal["mahalanobis_pca"] = "mahalanobis_pca"
    n_components: int = Field(description="principal components of the standardised input")
    reference_cells: int = Field(description="labelled cells the class means and shared "
                                 "covariance were fitted on (those the model was fitted on, "
                                 "or a sample of them)")  # fmt: skip
    calibration_cells: int = Field(description="the same cells, whose distances novelty is a "
                                   "share of: each measured to a reference fitted without it "
                                   "(5-fold cross-fitting)")  # fmt: skip
    calibration_flagged: float = Field(
        description="share of the calibration cells at or above the threshold"
    )
    threshold: float = Field(
        default=DEFAULT_THRESHOLD,
        ge=0,
        le=1,
        description="cells whose novelty is at or above this are 'novel' (labelled Unassigned "
        "unless a request sets novelty_threshold); 1 never flags",
    )
    meaning: str = Field(
        default="the share of known-type cells (each unseen by the reference it was measured "
        "against) that lie nearer to a known type than this cell: 0.99 = further from every "
        "class than 99% of known cells (Mahalanobis distance to the nearest class mean, in "
        "the reference's principal components)",
    )


class GeneSetsUsed(_Strict):
    source: str
    sha256: str
    n_sets_in_file: int
    programs: list[str]
    program_sizes: list[int]
    n_genes_covered: int


class TrainingData(_Strict):
    source: str
    sha256: str = Field(description="fingerprint of matrix, genes and labels")
    n_cells: int
    n_genes: int
    label_key: str
    layer: str
    gene_key: str | None = None


class Split(_Strict):
    seed: int
    train: int
    validation: int
    test: int
    class_counts: dict[str, int]
    refit_cells: int | None = Field(
        default=None,
        description="cells the exported model was fitted on after the split chose its epochs "
        "(all the labelled cells); None: the exported model is the one fitted on `train`",
    )


class Scores(_Strict):
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]


class Calibration(_Strict):
    """The temperature the exported graph's logits are divided by (folded into its last
    layer: probabilities and attributions are those of the calibrated logits)."""

    temperature: float = Field(description="fitted on the validation split's logits (NLL)")
    fitted_on: str
    n_bins: int = Field(description="equal-width confidence bins of the ECE")
    ece_test_before: float = Field(
        description="expected calibration error of the scored model on the test split, "
        "without the temperature"
    )
    ece_test_after: float = Field(description="the same with it")


class Metrics(_Strict):
    split: Literal["test"] = "test"
    model: Scores
    logistic_regression: Scores
    epochs_trained: int = Field(description="epochs (mlp, programs); L-BFGS iterations of "
                                "the split's fit (linear)")  # fmt: skip
    best_epoch: int = Field(description="the epoch early stopping kept (mlp, programs); "
                            "the L-BFGS iterations again (linear)")  # fmt: skip
    how_obtained: str = Field(
        default="a model fitted on the train split, scored on the test split",
        description="how these metrics relate to the exported model",
    )


#: a float16 export must predict the float32 graph's class for this share of held-out cells...
FLOAT16_MIN_LABEL_AGREEMENT = 0.99
#: ...and its per-cell attribution error (L1, relative) must stay under this for 99% of them
FLOAT16_RTOL = 2e-2


class Float16Checks(_Strict):
    """The float16 graph vs the checked float32 graph on the same held-out cells."""

    label_agreement: float = Field(description="share of cells with the same predicted class")
    probabilities_max_abs_error: float
    attributions_rel_error_median: float = Field(
        description="per cell: sum |a16 - a32| / sum |a32|; the median over cells"
    )
    attributions_rel_error_p99: float
    attributions_rel_error_max: float


class GapDistribution(_Strict):
    """Distribution over cells of the per-cell completeness gap ``|sum(attributions) - (F(x) -
    F(x0))| / |F(x) - F(x0)|`` that the graph returns (``completeness_gap``)."""

    median: float
    p90: float
    p99: float
    max: float
    share_over_1pct: float = Field(description="share of cells whose gap exceeds 0.01")

    @classmethod
    def of(cls, gap: np.ndarray) -> GapDistribution:
        g = np.asarray(gap, dtype=np.float64)
        q = np.quantile(g, [0.5, 0.9, 0.99]) if g.size else np.zeros(3)
        return cls(
            median=float(q[0]),
            p90=float(q[1]),
            p99=float(q[2]),
            max=float(g.max()) if g.size else 0.0,
            share_over_1pct=float((g > 0.01).mean()) if g.size else 0.0,
        )


class ExportChecks(_Strict):
    """Checks run by the exporter on held-out cells (float32 ONNX vs float64 torch/Captum)."""

    n_cells: int
    captum_method: str
    captum_max_abs_error: float
    captum_rel_error: float = Field(
        description="float32 graph: max abs error / max |Captum attribution| over all cells"
    )
    captum_rel_error_p99: float = Field(
        description="float32 graph: 99th percentile over cells of the per-cell relative error"
    )
    float64_graph_rel_error: float = Field(
        description="the same graph built in float64 vs Captum: checks the graph's arithmetic"
    )
    program_captum_rel_error: float | None = None
    completeness_max_abs_error: float = Field(
        description="max |sum(attributions) - (F(x) - F(x0))| over the cells"
    )
    completeness_rel_error: float = Field(description="the same / mean |F(x) - F(x0)|")
    completeness_tolerance: float
    probabilities_max_abs_error: float
    completeness_gap: GapDistribution | None = Field(
        default=None,
        description="the served graph's per-cell completeness gap on these cells (the test "
        "split's; a refit model has seen them) (cards written before the graph returned it "
        "have none)",
    )
    completeness_gap_check_error: float | None = Field(
        default=None,
        description="max over cells of |graph's gap - the same from float64 torch logits| "
        "beyond 5% of the gap (must stay under 2e-3)",
    )
    float16: Float16Checks | None = Field(
        default=None, description="for a float16 export: its error versus float32"
    )
    novelty_max_abs_error: float | None = Field(
        default=None,
        description="max |graph's novelty - the same in float64 numpy| over the cells (a share "
        "of calibration cells: float32 may move a cell across one of them; must stay within "
        "two calibration cells' share)",
    )
    passed: bool


class OnnxInfo(_Strict):
    file: str = ONNX_FILE
    sha256: str
    precision: Literal["float32", "float16"] = Field(
        default="float32",
        description="arithmetic inside the graph; inputs and outputs are float32 either way",
    )
    opset: int
    inputs: list[str]
    outputs: list[str]


class ModelCard(_Strict):
    schema_version: int = CARD_SCHEMA_VERSION
    name: str
    version: str
    created_at: str
    cellexplain_version: str
    description: str = ""
    genes: list[str]
    gene_importance: list[float] | None = Field(
        default=None,
        description="per gene (in `genes` order), its mean |attribution| over the export's "
        "check cells: how much the model's calls lean on it (a request missing genes is "
        "warned by the share of this total it lacks)",
    )
    classes: list[str]
    unassigned_threshold: float = Field(
        default=0.5, description="cells whose confidence is below this are labelled 'Unassigned'"
    )
    preprocessing: Preprocessing
    architecture: Architecture
    attribution: Attribution
    gene_sets: GeneSetsUsed | None = None
    novelty: Novelty | None = Field(
        default=None, description="the novelty score (models exported before it have none)"
    )
    training_data: TrainingData | None = Field(
        default=None, description="models trained here; None for imported ones (see origin)"
    )
    split: Split | None = None
    metrics: Metrics | None = Field(
        default=None, description="held-out scores of models trained here; None when imported"
    )
    origin: Origin | None = Field(default=None, description="an imported model's source")
    calibration: Calibration | None = Field(
        default=None, description="models exported before calibration have none (T = 1)"
    )
    checks: ExportChecks
    onnx: OnnxInfo

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> ModelCard:
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            raise ArtifactError(f"no model card at {path}")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            raise ArtifactError(
                f"{path} is not a valid model card (written by another cellexplain version?): "
                f"{e.error_count()} problem(s), first: {e.errors()[0]['loc']}: "
                f"{e.errors()[0]['msg']}"
            ) from e


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
