"""Renamed genes: real cells sent once with the model's names and once with today's names.

The default model was trained on pbmc68k_reduced's 2017 symbols; today's references (GENCODE,
Cell Ranger) call 65 of its 765 genes otherwise (``IGJ`` is ``JCHAIN``). This sends the same
700 real cells under today's names (the 14 clone-based names with no HGNC symbol today, such as
``RP11-782C8.1``, are left out, as a current reference would not carry them) and compares genes
found and labels with the model's own names, with and without the previous-symbol table.

    python -m benchmarks.renamed_genes [--model-dir artifacts/pbmc-programs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cellexplain.models.data import load_default_adata
from cellexplain.models.runtime import OnnxModel
from cellexplain.service.alignment import GeneAligner, ensembl_to_symbol, previous_to_current


def todays_names(genes: list[str]) -> tuple[list[str], np.ndarray]:
    """Each gene's current HGNC symbol, and which genes today's references still carry."""
    table = previous_to_current()
    current = set(ensembl_to_symbol().values())
    names, keep = [], []
    for g in genes:
        upper = g.upper()
        names.append(table.get(upper, g))
        keep.append(upper in table or upper in current)
    return names, np.asarray(keep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("artifacts/pbmc-programs"))
    args = p.parse_args()
    model = OnnxModel(args.model_dir)
    raw = load_default_adata().raw.to_adata()
    assert list(raw.var_names) == model.genes, "the default data's genes are the model's"
    X = raw.X.toarray().astype(np.float32)
    names, keep = todays_names(model.genes)
    renamed = sum(n != g for n, g in zip(names, model.genes, strict=True))
    today = [n for n, k in zip(names, keep, strict=True) if k]
    X_today = X[:, keep]

    def labels(
        aligner: GeneAligner, genes: list[str], values: np.ndarray
    ) -> tuple[int, np.ndarray]:
        al = aligner.align(genes)
        return al.n_found, model.predict(al.apply(values)).probabilities.argmax(1)

    aligner = GeneAligner(model.genes)
    found0, ref = labels(aligner, model.genes, X)
    found1, with_table = labels(aligner, today, X_today)
    before = GeneAligner(model.genes)
    before.renamed = {}  # the alignment of the previous release: exact and case-insensitive only
    found2, without = labels(before, today, X_today)
    n = len(ref)
    print(
        f"{n} real PBMCs, model {model.card.name}: {renamed} of {len(model.genes)} genes have "
        f"another name today; {int((~keep).sum())} have none (left out)\n"
    )
    print("| sent as | model genes found | labels equal to the model's names |")
    print("|---|---:|---:|")
    print(f"| the model's names | {found0} / {len(model.genes)} | (reference) |")
    print(
        f"| today's names, previous symbols resolved | {found1} / {len(model.genes)} | "
        f"{(with_table == ref).mean():.1%} |"
    )
    print(
        f"| today's names, exact and case-insensitive only (before) | {found2} / "
        f"{len(model.genes)} | {(without == ref).mean():.1%} |"
    )


if __name__ == "__main__":
    main()
