"""The bundled ranking graph (service/ranking.py): what build_graph writes, and the same genes
for and against as numpy's selection, ties to the lower gene index."""

from __future__ import annotations

import numpy as np
import pytest

from cellexplain.api.annotations import signed_top_k
from cellexplain.service import ranking


def test_the_bundled_graph_is_what_build_graph_writes():
    assert ranking._graph_path().read_bytes() == ranking.build_graph()


@pytest.mark.parametrize("k", [1, 10, 765, 2000])
def test_rank_gives_numpys_genes_for_and_against(k):
    rng = np.random.default_rng(k)
    attr = rng.standard_normal((300, 765)).astype(np.float32)
    attr[rng.random(attr.shape) < 0.6] = 0  # genes a cell lacks: no attribution
    attr[0] = 0  # a cell with none either way
    attr[1, :] = -np.abs(attr[1])  # a cell with evidence against only
    got_for, got_against = ranking.rank(attr, k)
    for got, sign in ((got_for, 1), (got_against, -1)):
        idx, values, present = got
        want_idx, want_values, want_present = signed_top_k(attr, k, sign)
        np.testing.assert_array_equal(present, want_present)
        np.testing.assert_array_equal(values, want_values)  # the same values, in order
        # the same genes wherever the value is there (absent ones are zeros: any order)
        np.testing.assert_array_equal(
            np.where(present, idx, -1), np.where(want_present, want_idx, -1)
        )
    assert not got_for[2][0].any() and not got_against[2][0].any()
    assert not got_for[2][1].any()


def test_ties_go_to_the_lower_gene_index_and_float64_is_ranked_by_numpy():
    attr = np.array([[0.5, 2.0, 2.0, -1.0, -1.0, 0.0]], dtype=np.float32)
    (top_i, top_v, _), (bottom_i, _, bottom_present) = ranking.rank(attr, 2)
    assert top_i.tolist() == [[1, 2]] and top_v.tolist() == [[2.0, 2.0]]
    assert bottom_i.tolist() == [[3, 4]] and bottom_present.all()
    (i64, v64, _), _ = ranking.rank(attr.astype(np.float64), 3)
    assert sorted(i64[0, :2].tolist()) == [1, 2] and i64[0, 2] == 0 and v64.dtype == np.float32
