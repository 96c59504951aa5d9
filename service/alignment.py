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
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import scipy.sparse as sp

from service.errors import InvalidInputError, brief

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


#: memory the remembered alignments of one model may hold (see :meth:`GeneAligner.align`)
CACHE_BYTES = 16 * 1024 * 1024


def _list_key(genes: Sequence[str]) -> bytes | None:
    """A fixed-size key for a gene list (BLAKE2b of the names), so that remembering a list
    never holds the names themselves: 60,000 long names cost 32 bytes, not megabytes."""
    if not all(isinstance(g, str) for g in genes):
        return None
    h = hashlib.blake2b(digest_size=32)
    for g in genes:
        h.update(g.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.digest()


def _alignment_bytes(al: Alignment) -> int:
    """What a remembered alignment holds: its index array, the list of missing model genes
    (references to the model's own names), merged columns, and the entry's overhead."""
    merged = sum(8 * (len(cols) + 8) for cols in al.merged.values())
    return al.take.nbytes + 8 * len(al.missing) + merged + 512


class GeneAligner:
    """Aligns submitted gene names to one model's genes (built once per model)."""

    def __init__(self, model_genes: Sequence[str], cache_bytes: int = CACHE_BYTES) -> None:
        self.model_genes = list(model_genes)
        self.index: dict[str, int] = {}
        for i, g in enumerate(self.model_genes):
            self.index.setdefault(canonical(g), i)
        self.model_uses_ids = sum(is_ensembl(g) for g in self.model_genes) > len(model_genes) / 2
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[bytes, tuple[Alignment, int]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        """Memory held by remembered alignments (bounded by ``cache_bytes``)."""
        return self._cached_bytes

    def align(self, genes: Sequence[str], field_name: str = "genes") -> Alignment:
        """Match ``genes`` (submitted order) to the model's genes.

        Alignments are remembered by a hash of the gene list, up to ``cache_bytes`` (least
        recently used first out): a pipeline sends the same list with every chunk, and matching
        30,000 names costs more than the inference of a small request.

        Raises:
            InvalidInputError: empty list, empty or non-string names, duplicated genes, or no
                overlap at all with the model's genes.
        """
        key = _list_key(genes)
        if key is not None:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit[0]
        alignment = self._align(genes, field_name)
        size = _alignment_bytes(alignment) + len(key or b"")
        if key is not None and size <= self.cache_bytes:
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = (alignment, size)
                    self._cached_bytes += size
                while self._cached_bytes > self.cache_bytes:
                    _, (_, freed) = self._cache.popitem(last=False)
                    self._cached_bytes -= freed
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
                    f"{field_name}[{col}] is not a gene name: {brief(g)}", f"{field_name}[{col}]"
                )
            upper = g.strip().upper()
            exact = upper.split(".", 1)[0] if ENSEMBL_RE.match(upper) else upper
            if exact in seen:
                first_col, first = seen[exact]
                raise InvalidInputError(
                    f"duplicated gene in {field_name}: {brief(first)} (position {first_col}) and "
                    f"{brief(g)} (position {col}) name the same gene",
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
                    names = ", ".join(brief(genes[c]) for c in cols[:5])
                    raise InvalidInputError(
                        f"duplicated gene in {field_name}: {names} all name {brief(key)}",
                        field_name,
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
            f"{', '.join(brief(g, 40) for g in genes[:3])}) matches any of the model's "
            f"{len(self.model_genes)} genes.{hint}"
        )
