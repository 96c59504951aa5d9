"""Gene alignment: put submitted genes in a model's gene order.

Rules (documented in the README):

* Symbols match case-insensitively (``cd3e`` is ``CD3E``).
* Ensembl gene IDs (``ENSG00000198851``, with or without a ``.version`` suffix) are mapped to
  symbols with the bundled GENCODE v44 table; an ID the table lacks is kept as an ID, so models
  trained on IDs still match.
* A gene named twice (the same symbol in two spellings, the same ID twice, or a symbol together
  with an ID of that symbol) is an error: the service cannot know which value to use.
* Several **different** Ensembl IDs that share one symbol (readthrough and paralog loci; GENCODE
  has 343 such symbols) are summed in linear expression space, as counts of one symbol would be.
* Model genes not submitted are zero-filled and reported (how many, and the first few).
"""

from __future__ import annotations

import csv
import gzip
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import scipy.sparse as sp

from service.errors import InvalidInputError

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
GENCODE_TABLE = "gencode_v44_human_gene_id2name.csv.gz"


@lru_cache(maxsize=1)
def ensembl_to_symbol() -> dict[str, str]:
    """Ensembl gene ID (no version) -> upper-case symbol, from the bundled GENCODE v44 table."""
    path = resources.files("service") / "resources" / GENCODE_TABLE
    with path.open("rb") as raw, gzip.open(raw, "rt", newline="") as f:
        return {row["gene_id"]: row["gene_name"].upper() for row in csv.DictReader(f)}


def is_ensembl(gene: str) -> bool:
    return bool(ENSEMBL_RE.match(gene.strip().upper()))


def canonical(gene: str) -> str:
    """The matching key of a gene name: an upper-case symbol, or an unversioned ID."""
    g = gene.strip().upper()
    if ENSEMBL_RE.match(g):
        g = g.split(".", 1)[0]
        return ensembl_to_symbol().get(g, g)
    return g


@dataclass
class Alignment:
    """Where each model gene comes from in the submitted columns.

    Attributes:
        take: ``[n_model_genes]`` submitted column index, or -1 when missing.
        merged: model gene index -> several submitted columns (distinct IDs of one symbol).
        n_found: model genes present in the submission.
        missing: names of the model genes not submitted (all of them).
        n_unused: submitted genes the model does not use.
    """

    take: np.ndarray  # read-only: alignments are cached and shared between requests
    merged: dict[int, list[int]] = field(default_factory=dict)
    n_found: int = 0
    missing: list[str] = field(default_factory=list)
    n_unused: int = 0

    @property
    def missing_fraction(self) -> float:
        return len(self.missing) / max(len(self.take), 1)

    def apply(self, x: np.ndarray | sp.csr_matrix) -> np.ndarray:
        """``[n_cells, n_submitted]`` log1p-normalised values (dense or CSR) -> dense float32
        ``[n_cells, n_model_genes]``, missing genes zero."""
        out = np.zeros((x.shape[0], len(self.take)), dtype=np.float32)
        found = self.take >= 0

        def cols(idx: np.ndarray | list[int]) -> np.ndarray:
            sub = x[:, idx]
            dense = sub.toarray() if sp.issparse(sub) else sub  # type: ignore[union-attr]
            return np.asarray(dense, dtype=np.float64)

        out[:, found] = cols(self.take[found])
        for j, merged_cols in self.merged.items():
            out[:, j] = np.log1p(np.expm1(cols(merged_cols)).sum(axis=1))
        return out


#: gene lists remembered per model (see :meth:`GeneAligner.align`)
CACHE_SIZE = 16


class GeneAligner:
    """Aligns submitted gene names to one model's genes (built once per model)."""

    def __init__(self, model_genes: Sequence[str]) -> None:
        self.model_genes = list(model_genes)
        self.index: dict[str, int] = {}
        for i, g in enumerate(self.model_genes):
            self.index.setdefault(canonical(g), i)
        self.model_uses_ids = sum(is_ensembl(g) for g in self.model_genes) > len(model_genes) / 2
        self._cache: OrderedDict[tuple[str, ...], Alignment] = OrderedDict()
        self._lock = threading.Lock()

    def align(self, genes: Sequence[str], field_name: str = "genes") -> Alignment:
        """Match ``genes`` (submitted order) to the model's genes.

        The last :data:`CACHE_SIZE` gene lists that aligned are remembered: a pipeline sends the
        same list with every chunk, and matching 30,000 names costs more than the inference of
        a small request.

        Raises:
            InvalidInputError: empty list, empty or non-string names, duplicated genes, or no
                overlap at all with the model's genes.
        """
        key = tuple(genes) if all(isinstance(g, str) for g in genes) else None
        if key is not None:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
        alignment = self._align(genes, field_name)
        if key is not None:
            with self._lock:
                self._cache[key] = alignment
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return alignment

    def _align(self, genes: Sequence[str], field_name: str) -> Alignment:
        if len(genes) == 0:
            raise InvalidInputError(
                f"{field_name} is empty: send the gene of each column", field_name
            )
        seen: dict[str, tuple[int, str]] = {}  # exact key (symbol or ID) -> first column
        by_symbol: dict[str, list[int]] = {}
        for col, g in enumerate(genes):
            if not isinstance(g, str) or not g.strip():
                raise InvalidInputError(
                    f"{field_name}[{col}] is not a gene name: {g!r}", f"{field_name}[{col}]"
                )
            upper = g.strip().upper()
            exact = upper.split(".", 1)[0] if ENSEMBL_RE.match(upper) else upper
            if exact in seen:
                first_col, first = seen[exact]
                raise InvalidInputError(
                    f"duplicated gene in {field_name}: {first!r} (position {first_col}) and "
                    f"{g!r} (position {col}) name the same gene",
                    field_name,
                )
            seen[exact] = (col, g)
            by_symbol.setdefault(canonical(g), []).append(col)
        take = np.full(len(self.model_genes), -1, dtype=np.int64)
        merged: dict[int, list[int]] = {}
        used = 0
        for key, cols in by_symbol.items():
            j = self.index.get(key)
            if j is None:
                continue
            if len(cols) > 1:
                if not all(is_ensembl(genes[c]) for c in cols):
                    names = ", ".join(repr(genes[c]) for c in cols)
                    raise InvalidInputError(
                        f"duplicated gene in {field_name}: {names} all name {key}", field_name
                    )
                merged[j] = cols
            take[j] = cols[0]
            used += len(cols)
        n_found = int((take >= 0).sum())
        if n_found == 0:
            raise InvalidInputError(self._no_overlap_message(genes), field_name)
        missing = [self.model_genes[j] for j in np.flatnonzero(take < 0)]
        take.flags.writeable = False
        return Alignment(take, merged, n_found, missing, len(genes) - used)

    def _no_overlap_message(self, genes: Sequence[str]) -> str:
        sent_ids = sum(is_ensembl(g) for g in genes[:1000]) > min(len(genes), 1000) / 2
        sent = "Ensembl IDs" if sent_ids else "gene symbols"
        hint = ""
        if sent_ids and not self.model_uses_ids:
            hint = (
                " The IDs sent are not human GENCODE v44 gene IDs (mouse or another species?);"
                " the model's genes are human symbols."
            )
        elif not sent_ids and self.model_uses_ids:
            hint = " The model's genes are Ensembl IDs: send IDs or human symbols."
        else:
            hint = (
                " Check the species and the identifier type: the model's genes are e.g. "
                + ", ".join(self.model_genes[:5])
                + "."
            )
        return (
            f"none of the {len(genes)} submitted genes ({sent}, e.g. "
            f"{', '.join(map(str, genes[:3]))}) matches any of the model's "
            f"{len(self.model_genes)} genes.{hint}"
        )
