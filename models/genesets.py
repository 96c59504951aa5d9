"""Gene sets (GMT files) and the program mask of the ``programs`` architecture."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from cellexplain.models.errors import GeneSetError

#: MSigDB Hallmark gene sets v7.5.1 (CC BY 4.0, Liberzon et al. 2015), bundled in the package
DEFAULT_GMT = "hallmark.v7.5.1.symbols.gmt"


@dataclass(frozen=True)
class GeneSets:
    """Named gene sets as read from a GMT file (genes upper-cased for matching)."""

    names: list[str]
    genes: list[list[str]]
    source: str
    sha256: str


def default_gmt_path() -> Path:
    """Path of the bundled Hallmark GMT file."""
    return Path(str(resources.files("cellexplain.models") / "resources" / DEFAULT_GMT))


def read_gmt(path: str | Path | None = None) -> GeneSets:
    """Read a GMT file: one set per line, ``name<TAB>description<TAB>gene<TAB>gene...``.

    Empty trailing fields are ignored; a set named twice is an error.
    """
    p = Path(path) if path is not None else default_gmt_path()
    if not p.is_file():
        raise GeneSetError(f"gene-set file not found: {p}")
    raw = p.read_bytes()
    names: list[str] = []
    genes: list[list[str]] = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 3:
            raise GeneSetError(
                f"{p}:{lineno}: expected name, description and genes separated by tabs"
            )
        name = fields[0].strip()
        if name in names:
            raise GeneSetError(f"{p}:{lineno}: gene set {name!r} appears twice")
        members = sorted({g.strip().upper() for g in fields[2:] if g.strip()})
        names.append(name)
        genes.append(members)
    if not names:
        raise GeneSetError(f"{p}: no gene sets found")
    return GeneSets(names, genes, p.name, hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class ProgramMask:
    """Which model genes feed which program unit.

    Attributes:
        names: kept gene-set names, one per program unit.
        mask: ``[n_programs, n_genes]`` 0/1 float32 matrix.
        sizes: genes of each set found among the model's genes.
        n_genes_covered: model genes in at least one kept set.
    """

    names: list[str]
    mask: np.ndarray
    sizes: list[int]
    n_genes_covered: int


def program_mask(gene_sets: GeneSets, genes: Sequence[str], min_genes: int = 5) -> ProgramMask:
    """Build the program mask of ``gene_sets`` over the model's ``genes`` (case-insensitive).

    Sets with fewer than ``min_genes`` of the model's genes are dropped.

    Raises:
        GeneSetError: no set keeps ``min_genes`` genes (e.g. IDs vs symbols mismatch).
    """
    index = {g.upper(): i for i, g in enumerate(genes)}
    rows: list[np.ndarray] = []
    names: list[str] = []
    sizes: list[int] = []
    for name, members in zip(gene_sets.names, gene_sets.genes, strict=True):
        idx = [index[g] for g in members if g in index]
        if len(idx) >= min_genes:
            row = np.zeros(len(genes), dtype=np.float32)
            row[idx] = 1.0
            rows.append(row)
            names.append(name)
            sizes.append(len(idx))
    if not rows:
        overlap = len({g for m in gene_sets.genes for g in m} & set(index))
        hint = ""
        if genes and str(genes[0]).upper().startswith("ENSG"):
            hint = (
                " (the model's genes look like Ensembl IDs; the GMT holds symbols: use --gene-key)"
            )
        raise GeneSetError(
            f"no overlap with the gene sets: no set of {gene_sets.source} has at least {min_genes} "
            f"of the {len(genes)} model genes ({overlap} genes overlap in total){hint}"
        )
    mask = np.stack(rows)
    return ProgramMask(names, mask, sizes, int((mask.sum(axis=0) > 0).sum()))
