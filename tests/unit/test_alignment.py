"""Gene alignment's cache: pipelines send the same gene list with every chunk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from service.alignment import GeneAligner
from service.errors import InvalidInputError

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
            aligner.align(["LYZ", "lyz"])
    with pytest.raises(InvalidInputError, match="duplicated gene in var"):
        aligner.align(["LYZ", "lyz"], "var")


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
