"""Gene alignment: put submitted genes in a model's gene order.

Rules (documented in the README, the same at every door since every door aligns here):

* A submitted column claims a model gene at one of three tiers, best first:
  1. **exact**: the same name (for Ensembl IDs, the same ID without its ``.version``);
  2. **case-insensitive**: ``cd3e`` for ``CD3E``; an Ensembl ID whose GENCODE v44 symbol is the
     model gene's (in any case); a symbol whose ID the model was trained on;
  3. **previous symbol**: HGNC renamed the gene, in either direction (a model trained on 2017
     names such as ``IGJ`` finds today's ``JCHAIN``, and the reverse), through the bundled
     table of unambiguous HGNC previous symbols (``resources/hgnc_previous_symbols.csv.gz``).
* When several columns claim one model gene, the best tier wins and the others are ignored
  (counted as duplicates): ``C1orf220`` beats ``C1ORF220`` for a model gene ``C1orf220``.
  Several **different** Ensembl IDs at the best tier (readthrough and paralog loci; GENCODE has
  343 symbols with several IDs) are summed in linear expression space, as counts of one symbol
  would be. Any other tie (the same name twice, a symbol and an ID of it) is refused, naming
  the columns: the service cannot know which value to use.
* Duplicates among genes the model does not use never refuse a request; they are counted.
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
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellexplain.api.errors import InvalidInputError, brief

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.ASCII)
GENCODE_TABLE = "gencode_v44_human_gene_id2name.csv.gz"
PREVIOUS_TABLE = "hgnc_previous_symbols.csv.gz"
#: how a column claimed its model gene (lower is better)
EXACT, CASE_INSENSITIVE, PREVIOUS_SYMBOL = 0, 1, 2


def _table(name: str, key: str, value: str, fold_key: bool) -> dict[str, str]:
    """Two columns of a bundled gzipped CSV as ``{key: fold(value)}`` (``fold(key)`` with
    ``fold_key``), read with csv's C reader (a dict per row took twice as long)."""
    path = resources.files("cellexplain.service") / "resources" / name
    with path.open("rb") as raw, gzip.open(raw, "rt", newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        k, v = header.index(key), header.index(value)
        if fold_key:
            return {fold(r[k]): fold(r[v]) for r in rows}
        return {r[k]: fold(r[v]) for r in rows}


@lru_cache(maxsize=1)
def ensembl_to_symbol() -> dict[str, str]:
    """Ensembl gene ID (no version) -> upper-case symbol, from the bundled GENCODE v44 table."""
    return _table(GENCODE_TABLE, "gene_id", "gene_name", fold_key=False)


@lru_cache(maxsize=1)
def previous_to_current() -> dict[str, str]:
    """Upper-case HGNC previous symbol -> upper-case current symbol (unambiguous ones only:
    each names exactly one gene and is nobody's current symbol), from the bundled table."""
    return _table(PREVIOUS_TABLE, "previous_symbol", "current_symbol", fold_key=True)


#: a-z to A-Z and nothing else: gene symbols and IDs are ASCII, and full Unicode case mapping
#: would fold other names onto them (``str.upper`` turns the ligature U+FB05 into ``ST``, so
#: ``"C\ufb053"`` became ``CST3``)
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def fold(name: str) -> str:
    """``name`` with ASCII letters upper-cased; every other character is kept as it is."""
    return name.translate(_ASCII_UPPER)


def current_symbol(upper: str) -> str:
    """Today's HGNC symbol of an upper-case symbol (itself when it was never renamed)."""
    return previous_to_current().get(upper, upper)


def is_ensembl(gene: str) -> bool:
    return bool(ENSEMBL_RE.match(fold(gene.strip())))


@dataclass
class Alignment:
    """Where each model gene comes from in the submitted columns.

    Attributes:
        take: ``[n_model_genes]`` submitted column index, or -1 when missing.
        merged: model gene index -> several submitted columns (distinct IDs of one symbol).
        n_found: model genes present in the submission.
        missing: names of the model genes not submitted (all of them).
        n_unused: submitted genes the model does not use.
        n_case_insensitive: model genes found only by a case-insensitive match (or through an
            Ensembl ID and its symbol).
        n_previous_symbol: model genes found only through an HGNC previous symbol.
        n_duplicated: submitted columns naming a gene an earlier column already named (by
            case, or an ID and its symbol), left out.
    """

    take: np.ndarray  # read-only: alignments are cached and shared between requests
    merged: dict[int, list[int]] = field(default_factory=dict)
    n_found: int = 0
    missing: list[str] = field(default_factory=list)
    n_unused: int = 0
    n_case_insensitive: int = 0
    n_previous_symbol: int = 0
    n_duplicated: int = 0
    _identity: bool | None = field(default=None, repr=False, compare=False)

    @property
    def identity(self) -> bool:
        """Every model gene found at its own column, nothing merged or left over."""
        if self._identity is None:
            self._identity = (
                not self.merged
                and self.n_unused == 0
                and self.n_duplicated == 0
                and bool(np.array_equal(self.take, np.arange(len(self.take))))
            )
        return self._identity

    @property
    def missing_fraction(self) -> float:
        return len(self.missing) / max(len(self.take), 1)

    def apply(self, x: np.ndarray | sp.csr_matrix) -> np.ndarray:
        """``[n_cells, n_submitted]`` log1p-normalised values (dense or CSR) -> dense float32
        ``[n_cells, n_model_genes]``, missing genes zero; merged columns are summed as counts
        (``log1p(sum(expm1))``)."""
        if self.identity and not sp.issparse(x) and x.shape[1] == len(self.take):  # as is
            return np.asarray(x, dtype=np.float32)
        return self._gather(x, np.float32, log1p=True)

    def gather_counts(self, x: np.ndarray | sp.csr_matrix) -> np.ndarray:
        """``[n_cells, n_submitted]`` raw counts (dense or CSR) -> dense float64
        ``[n_cells, n_model_genes]`` counts of the model's genes, missing genes zero, merged
        columns summed: what normalising needs beside each cell's total, without touching the
        genes the model does not read."""
        return self._gather(x, np.float64, log1p=False)

    def _gather(self, x: np.ndarray | sp.csr_matrix, dtype: type, log1p: bool) -> np.ndarray:
        n, n_model = x.shape[0], len(self.take)
        found = self.take >= 0
        if x.shape[1] == 0 or not found.any():
            out: np.ndarray = np.zeros((n, n_model), dtype=dtype)
        else:  # every model column at once (a missing one reads column 0, then zeroed)
            out = _dense(x[:, np.where(found, self.take, 0)], dtype)
            if not found.all():
                out[:, ~found] = 0
        for j, merged_cols in self.merged.items():
            values = _dense(x[:, merged_cols], np.float64)
            out[:, j] = np.log1p(np.expm1(values).sum(axis=1)) if log1p else values.sum(axis=1)
        return out


def _dense(x: Any, dtype: type) -> np.ndarray:
    """A dense or sparse block as a dense array of ``dtype``."""
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=dtype)


#: memory the remembered alignments of one model may hold (see :meth:`GeneAligner.align`)
CACHE_BYTES = 16 * 1024 * 1024


def _list_key(genes: Sequence[str]) -> bytes | None:
    """A fixed-size key for a gene list (BLAKE2b of the names), so that remembering a list
    never holds the names themselves: 60,000 long names cost 32 bytes, not megabytes."""
    try:  # one join and one hash, in C: a 33,000-gene file's chunks hash in ~1 ms each
        joined = "\x00".join(genes)
    except TypeError:  # not all names are str
        return None
    h = hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=32)
    h.update(len(genes).to_bytes(8, "little"))
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
        # model gene index by each tier's key (the first model gene wins a shared key)
        self.exact: dict[str, int] = {}
        self.folded: dict[str, int] = {}
        self.renamed: dict[str, int] = {}
        ids = ensembl_to_symbol()
        for j, g in enumerate(self.model_genes):
            name = g.strip()
            upper = fold(name)
            if ENSEMBL_RE.match(upper):
                uid = upper.split(".", 1)[0]
                self.exact.setdefault(uid, j)
                symbol = ids.get(uid)
                if symbol is not None:
                    self.folded.setdefault(symbol, j)
                    self.renamed.setdefault(current_symbol(symbol), j)
            else:
                self.exact.setdefault(name, j)
                self.folded.setdefault(upper, j)
                self.renamed.setdefault(current_symbol(upper), j)
        self.model_uses_ids = sum(is_ensembl(g) for g in self.model_genes) > len(model_genes) / 2
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[bytes, tuple[Alignment, int]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def claim(self, gene: str) -> tuple[int, int] | None:
        """The model gene a submitted name claims, and the tier of the claim."""
        name = gene.strip()
        upper = fold(name)
        if ENSEMBL_RE.match(upper):
            uid = upper.split(".", 1)[0]
            j = self.exact.get(uid)
            if j is not None:
                return j, EXACT
            symbol = ensembl_to_symbol().get(uid)
            if symbol is None:
                return None
            j = self.folded.get(symbol)
            if j is not None:
                return j, CASE_INSENSITIVE
            j = self.renamed.get(current_symbol(symbol))
            return None if j is None else (j, PREVIOUS_SYMBOL)
        j = self.exact.get(name)
        if j is not None:
            return j, EXACT
        j = self.folded.get(upper)
        if j is not None:
            return j, CASE_INSENSITIVE
        j = self.renamed.get(current_symbol(upper))
        return None if j is None else (j, PREVIOUS_SYMBOL)

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
            if field_name in ("cells", "sparse"):  # {gene: value} maps and no gene list
                raise InvalidInputError(
                    "the {gene: value} maps name no gene (and no genes list was sent): send "
                    "at least one gene",
                    field_name,
                )
            raise InvalidInputError(
                f"{field_name} is empty: send the gene of each column", field_name
            )
        claims: dict[int, list[tuple[int, int]]] = {}  # model gene -> [(tier, column)]
        keys: set[str] = set()
        n_duplicated = 0
        ids = ensembl_to_symbol()
        for col, g in enumerate(genes):
            if not isinstance(g, str) or not g.strip():
                raise InvalidInputError(
                    f"{field_name}[{col}] is not a gene name: {brief(g)}", f"{field_name}[{col}]"
                )
            claim = self.claim(g)
            if claim is None:
                upper = fold(g.strip())
                key = upper.split(".", 1)[0] if ENSEMBL_RE.match(upper) else upper
                symbol = ids.get(key, key)
                if key in keys or symbol in keys:
                    n_duplicated += 1
                keys.update((key, symbol))
                continue
            j, tier = claim
            claims.setdefault(j, []).append((tier, col))
        take = np.full(len(self.model_genes), -1, dtype=np.int64)
        merged: dict[int, list[int]] = {}
        used = 0
        tiers = [0, 0, 0]
        for j, claimed in claims.items():
            best = min(t for t, _ in claimed)
            cols = [c for t, c in claimed if t == best]
            n_duplicated += len(claimed) - len(cols)
            if len(cols) > 1:
                uids = [fold(genes[c].strip()).split(".", 1)[0] for c in cols]
                if not all(ENSEMBL_RE.match(u) for u in uids) or len(set(uids)) != len(uids):
                    names = " and ".join(f"{brief(genes[c])} (position {c})" for c in cols[:5])
                    raise InvalidInputError(
                        f"duplicated gene in {field_name}: {names} name the same gene "
                        f"{brief(self.model_genes[j])}",
                        field_name,
                    )
                merged[j] = cols
            take[j] = cols[0]
            used += len(cols)
            tiers[best] += 1
        n_found = int((take >= 0).sum())
        if n_found == 0:
            raise InvalidInputError(self._no_overlap_message(genes), field_name)
        missing = [self.model_genes[j] for j in np.flatnonzero(take < 0)]
        take.flags.writeable = False
        return Alignment(
            take,
            merged,
            n_found,
            missing,
            len(genes) - used,
            n_case_insensitive=tiers[CASE_INSENSITIVE],
            n_previous_symbol=tiers[PREVIOUS_SYMBOL],
            n_duplicated=n_duplicated,
        )

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
