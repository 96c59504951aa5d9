"""Request and response schemas of the annotation API (shared by every front door)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cellexplain.models.card import ModelCard

InputKind = Literal["auto", "counts", "log1p_cp10k"]
AttributionMode = Literal["top_k", "full", "none"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AnnotateOptions(_Schema):
    """How to annotate (everything but the cells themselves)."""

    model: str | None = Field(default=None, description="model name; default: the service's")
    input: InputKind = Field(
        default="auto",
        description="'counts' (raw UMI counts over all measured genes), 'log1p_cp10k', or "
        "'auto' (integers are counts, otherwise log1p)",
    )
    top_k: int = Field(
        default=10,
        ge=0,
        description="genes per cell for the call (largest positive attributions) and as many "
        "against it (most negative)",
    )
    attributions: AttributionMode = Field(
        default="top_k", description="'top_k' genes, the 'full' vector, or 'none'"
    )
    target: str = Field(
        default="predicted", description="'predicted', or a class name whose evidence to explain"
    )
    return_probabilities: bool = Field(default=False, description="include every class's prob.")
    unassigned_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="override the model's confidence threshold",
    )
    novelty_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="override the model's novelty threshold: cells whose novelty is at or "
        "above it are labelled Unassigned (1 turns it off; models without a novelty score "
        "ignore it)",
    )


#: the option defaults, defined once above: the REST form, the clients and the CLI take theirs
#: from here
DEFAULTS = AnnotateOptions()
#: the options' names, declared once above: the upload form's fields and the CLI's flags are
#: made from AnnotateOptions' fields; the client's arguments and the proto's fields are checked
#: against them (tests/unit/test_options.py)
OPTION_NAMES: tuple[str, ...] = tuple(AnnotateOptions.model_fields)


class AnnotateRequest(AnnotateOptions):
    """Cells to annotate: dense (``genes`` + rows) or sparse (``{gene: value}`` per cell)."""

    genes: list[str] | None = Field(
        default=None,
        description="gene symbols or Ensembl IDs: one per column of `cells` (dense rows); "
        "with {gene: value} maps, optional: every gene measured (so that genes absent from "
        "every map still count as measured zeros)",
    )
    cells: list[list[float]] | list[dict[str, float]] = Field(
        description="dense: one row per cell, in `genes` order; sparse: one {gene: value} map "
        "per cell, absent genes are zero",
    )
    cell_ids: list[str] | None = Field(default=None, description="one id per cell (default 0..n-1)")


class GeneAttribution(_Schema):
    gene: str
    attribution: float


class ProgramAttribution(_Schema):
    program: str
    attribution: float


class CellAnnotation(_Schema):
    id: str
    label: str = Field(
        description="predicted class, or 'Unassigned' (below the confidence threshold, or at "
        "or above the novelty threshold: see unassigned_reason)"
    )
    predicted_label: str = Field(description="the most probable class, whatever its confidence")
    confidence: float = Field(description="probability of the predicted class")
    explained_class: str | None = Field(default=None, description="class the attributions explain")
    unassigned_reason: Literal["low_confidence", "novel", "low_confidence_and_novel"] | None = (
        Field(default=None, description="why the cell is Unassigned (absent when it is not)")
    )
    novelty: float | None = Field(
        default=None,
        description="share of known-type cells that lie nearer to a known type than this "
        "cell (0.99: further from every class the model knows than 99% of them); absent for "
        "models exported before it existed",
    )
    probabilities: dict[str, float] | None = None
    top_genes: list[GeneAttribution] | None = Field(
        default=None,
        description="with attributions='top_k': the evidence FOR the explained class, the "
        "top_k largest positive attributions, largest first",
    )
    genes_against: list[GeneAttribution] | None = Field(
        default=None,
        description="with attributions='top_k': the evidence AGAINST the explained class, the "
        "top_k most negative attributions, most negative first",
    )
    attributions: list[float] | None = Field(
        default=None, description="full vector, in the order of `attribution_genes`"
    )
    program_attributions: list[ProgramAttribution] | None = Field(
        default=None,
        description="programs models: by |attribution|, the top_k (attributions='top_k') or all",
    )
    free_units_attribution: float | None = Field(
        default=None, description="programs models: the share of the free (non-program) units"
    )
    completeness_gap: float | None = Field(
        default=None,
        description="with attributions: |sum(attributions) - (F(x) - F(x0))| / |F(x) - F(x0)|, "
        "how much of the explained logit's change the attributions miss (Integrated Gradients' "
        "quadrature error; ~0 for exact methods); absent for models exported before it existed",
    )


class GeneMatching(_Schema):
    n_model_genes: int
    n_found: int
    n_missing: int
    missing: list[str] = Field(
        description="missing model genes, the most important first (by the model card's "
        "gene_importance; in model order for models without it)"
    )
    n_submitted: int
    n_unused: int = Field(description="submitted genes the model does not use")
    missing_fraction: float
    missing_importance: float | None = Field(
        default=None,
        description="the share of the model's gene importance (mean |attribution| per gene) "
        "that the missing genes carry: what the answer lacks, rather than how many genes",
    )
    n_case_insensitive: int = Field(
        default=0,
        description="model genes found only case-insensitively (or through an Ensembl ID and "
        "its symbol)",
    )
    n_previous_symbol: int = Field(
        default=0, description="model genes found only through an HGNC previous symbol"
    )
    n_duplicated: int = Field(
        default=0,
        description="submitted genes left out because an earlier or better-matching column "
        "named the same gene (by case, an ID and its symbol, or a renamed symbol)",
    )


class AnnotateResponse(_Schema):
    model: str
    model_version: str
    input_kind: Literal["counts", "log1p_cp10k"] = Field(description="how the input was read")
    attribution_method: str
    unassigned_threshold: float
    novelty_threshold: float | None = Field(
        default=None, description="the novelty threshold applied (None: the model has no score)"
    )
    gene_matching: GeneMatching
    attribution_genes: list[str] | None = Field(
        default=None, description="gene order of `attributions` (with attributions='full')"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what makes this answer less reliable than the model's test scores (for "
        "example, model genes missing from the request)",
    )
    cells: list[CellAnnotation]


class ModelSummary(_Schema):
    name: str
    tag: str
    architecture: str
    n_genes: int
    classes: list[str]
    attribution_method: str
    test_macro_f1: float | None = Field(
        description="held-out macro-F1 of a model trained here; null for an imported one"
    )
    default: bool


class ModelList(_Schema):
    models: list[ModelSummary]


class RequestLimits(_Schema):
    """What one request may hold: clients size their chunks by it."""

    max_cells_per_request: int = Field(ge=1)
    max_genes_per_request: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1, description="JSON body and gRPC message limit, in bytes")


class ModelDetail(_Schema):
    tag: str
    providers: list[str]
    card: ModelCard
    limits: RequestLimits | None = Field(
        default=None, description="the server's request limits (absent from older servers)"
    )


class ErrorDetail(_Schema):
    type: str = Field(
        description="invalid_argument, not_found, too_large, unauthenticated, unavailable, "
        "timeout or internal"
    )
    field: str | None = Field(default=None, description="the request field at fault, if any")
    message: str = Field(description="what is wrong and how to fix it")


class ErrorResponse(_Schema):
    """The body of every /v1 error response."""

    error: ErrorDetail
