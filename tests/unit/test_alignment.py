"""Gene alignment's cache: pipelines send the same gene list with every chunk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cellexplain.api.errors import InvalidInputError
from cellexplain.service.alignment import GeneAligner

MODEL_GENES = ["CD3E", "MS4A1", "LYZ", "NKG7", "PPBP"]


def test_same_gene_list_reuses_its_alignment():
    aligner = GeneAligner(MODEL_GENES)
    sent = ["lyz", "CD3E", "XIST", "nkg7"]
    first = aligner.align(sent)
    assert aligner.align(list(sent)) is first  # equal list, new object: a cache hit
    assert first.n_found == 3 and first.missing == ["MS4A1", "PPBP"]
    assert list(first.take) == [1, -1, 0, 3, -1]
    with pytest.raises(ValueError):  # shared between requests, so read-only
        first.take[0] = 5
    other = aligner.align(["PPBP", "LYZ"])
    assert other is not first and other.n_found == 2


def test_cache_is_bounded_and_errors_are_not_cached():
    aligner = GeneAligner(MODEL_GENES, cache_bytes=4096)
    first = aligner.align(["LYZ"])
    for i in range(16):
        aligner.align(["LYZ", f"OTHER{i}"])
        assert aligner.cached_bytes <= 4096
    assert aligner.align(["LYZ"]) is not first  # evicted, aligned anew
    assert np.array_equal(aligner.align(["LYZ"]).take, first.take)
    for _ in range(2):  # a refused list is refused every time, with its own field name
        with pytest.raises(InvalidInputError, match="duplicated gene in genes"):
            aligner.align(["lyz", "Lyz"])
    with pytest.raises(InvalidInputError, match="duplicated gene in var"):
        aligner.align(["lyz", "Lyz"], "var")


def test_cache_is_bounded_in_bytes_whatever_the_gene_names():
    """Lists of 60,000 long names (an attacker's, or a careless pipeline's) used to pin
    their names in the cache (+650 MB); remembered by hash, they pin a few KB each."""
    aligner = GeneAligner(MODEL_GENES)
    tracemalloc.start()
    try:
        for i in range(8):
            names = [f"{i}-{j}-" + "G" * 300 for j in range(60_000)] + ["LYZ"]
            assert aligner.align(names).n_found == 1
            del names
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert aligner.cached_bytes < 8 * 4096
    assert held < 8 * 1024 * 1024, f"{held / 1e6:.1f} MB still held after 8 requests"


# -- the matching rules, as real files name genes ---------------------------------------------
RULE_MODEL = ["C1orf220", "CD3E", "IGJ", "MACROH2A1", "LYZ", "ENSG00000105374"]  # NKG7's ID


def test_exact_match_wins_over_a_case_variant_and_the_loser_is_counted():
    al = GeneAligner(RULE_MODEL).align(["C1ORF220", "C1orf220", "cd3e", "XIST"])
    assert al.take[0] == 1 and al.take[1] == 2  # C1orf220 exact; CD3E only case-insensitively
    assert al.n_case_insensitive == 1 and al.n_duplicated == 1 and al.n_unused == 2


def test_duplicates_the_model_does_not_use_never_refuse():
    al = GeneAligner(RULE_MODEL).align(["FOO", "foo", "Foo", "CD3E", "BAR", "BAR"])
    assert al.n_found == 1 and al.n_duplicated == 3 and al.n_unused == 5


def test_renamed_genes_match_in_both_directions():
    old_model = GeneAligner(["IGJ", "FYB", "ATP5B", "H2AFY", "CD3E"])
    al = old_model.align(["JCHAIN", "FYB1", "ATP5F1B", "MACROH2A1", "CD3E"])
    assert list(al.take) == [0, 1, 2, 3, 4] and al.n_previous_symbol == 4
    new_model = GeneAligner(["JCHAIN", "MACROH2A1"])
    al = new_model.align(["h2afy", "IGJ"])
    assert list(al.take) == [1, 0] and al.n_previous_symbol == 2


def test_a_current_symbol_beats_a_previous_one_for_the_same_gene():
    al = GeneAligner(["JCHAIN"]).align(["IGJ", "JCHAIN"])
    assert list(al.take) == [1] and al.n_previous_symbol == 0 and al.n_duplicated == 1


def test_ids_and_symbols_find_each_other():
    al = GeneAligner(RULE_MODEL).align(["NKG7", "ENSG00000198851.9"])  # CD3E's ID
    assert al.take[5] == 0 and al.take[1] == 1 and al.n_case_insensitive == 2
    # a symbol and its ID: the symbol is the exact name of the model gene, it wins
    al = GeneAligner(RULE_MODEL).align(["ENSG00000198851", "CD3E"])
    assert al.take[1] == 1 and al.n_duplicated == 1


def test_ties_at_the_best_tier_are_refused_naming_both_columns():
    with pytest.raises(InvalidInputError, match=r"'CD3E' \(position 0\) and 'CD3E' \(position 2\)"):
        GeneAligner(RULE_MODEL).align(["CD3E", "LYZ", "CD3E"])
    with pytest.raises(InvalidInputError, match="name the same gene 'CD3E'"):
        GeneAligner(RULE_MODEL).align(["cd3e", "Cd3e"])


def test_distinct_ids_of_one_symbol_are_summed():
    from cellexplain.service.alignment import ensembl_to_symbol

    by_symbol: dict[str, list[str]] = {}
    for gid, sym in ensembl_to_symbol().items():
        by_symbol.setdefault(sym, []).append(gid)
    sym, ids = next((s, i) for s, i in by_symbol.items() if len(i) == 2 and s.isalnum())
    al = GeneAligner([sym]).align([ids[0], "X", ids[1]])
    assert al.merged == {0: [0, 2]} and al.n_unused == 1


def test_a_previous_symbol_that_is_still_a_gene_is_not_a_rename():
    """GENCODE v44 (what Cell Ranger's references use) still has MIR583HG and LINC01513 as
    genes of their own: they must not claim CAST and ROPN1L (found by an outside tester)."""
    al = GeneAligner(["CAST", "ROPN1L", "LYZ"]).align(["MIR583HG", "LINC01513", "LYZ"])
    assert al.n_found == 1 and al.n_previous_symbol == 0


def test_sparse_maps_keep_every_column_of_a_repeated_name():
    """A gene list naming a gene twice keeps both columns, so the columns after it do not move
    (they used to shift by one: CD3E's value was read as LYZ's)."""
    from cellexplain.api.annotations import sparse_from_maps

    genes, X = sparse_from_maps(
        [{"CD3E": 10.0}, {"LYZ": 3.0, "TBCE": 1.0}], ["TBCE", "TBCE", "CD3E", "LYZ"]
    )
    assert genes == ["TBCE", "TBCE", "CD3E", "LYZ"] and X.shape == (2, 4)
    np.testing.assert_array_equal(X.toarray(), [[0, 0, 10, 0], [1, 0, 0, 3]])


def test_only_ascii_letters_fold():
    """Unicode case mapping turns the ligature U+FB05 into "ST": "C\ufb053" matched CST3."""
    from cellexplain.service.alignment import fold

    aligner = GeneAligner(["CST3", "CD3E"])
    assert aligner.claim("cst3") is not None and aligner.claim("cd3e") is not None
    assert "C\ufb053".upper() == "CST3"  # what full case mapping does
    assert fold("C\ufb053") == "C\ufb053"
    assert aligner.claim("C\ufb053") is None
    assert aligner.claim("\u0131") is None  # dotless i does not become I either
