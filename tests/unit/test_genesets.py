from __future__ import annotations

import numpy as np
import pytest

from cellexplain.models.errors import GeneSetError
from cellexplain.models.genesets import default_gmt_path, program_mask, read_gmt


def test_bundled_hallmark_sets():
    gs = read_gmt()
    assert len(gs.names) == 50
    assert "INTERFERON_GAMMA_RESPONSE" in gs.names
    assert all(g == g.upper() for members in gs.genes for g in members)
    assert default_gmt_path().is_file()


def test_mask_over_pbmc_genes(pbmc_data):
    gs = read_gmt()
    pm = program_mask(gs, pbmc_data.genes, min_genes=5)
    assert pm.mask.shape == (len(pm.names), len(pbmc_data.genes))
    assert set(np.unique(pm.mask)) <= {0.0, 1.0}
    assert pm.sizes == [int(s) for s in pm.mask.sum(axis=1)]
    assert all(s >= 5 for s in pm.sizes)
    # the data README: about 308 of the 765 genes fall in at least one Hallmark set
    assert 250 <= pm.n_genes_covered <= 320
    # matching is case-insensitive
    lower = program_mask(gs, [g.lower() for g in pbmc_data.genes], min_genes=5)
    np.testing.assert_array_equal(lower.mask, pm.mask)


def test_no_overlap_is_a_clear_error():
    gs = read_gmt()
    with pytest.raises(GeneSetError, match=r"no overlap.*Ensembl"):
        program_mask(gs, [f"ENSG{i:011d}" for i in range(100)])


def test_malformed_gmt(tmp_path):
    p = tmp_path / "bad.gmt"
    p.write_text("ONLY_NAME\n")
    with pytest.raises(GeneSetError, match="separated by tabs"):
        read_gmt(p)
    p.write_text("A\tdesc\tCD3E\tCD4\t\t\nA\tdesc\tMS4A1\n")
    with pytest.raises(GeneSetError, match="appears twice"):
        read_gmt(p)
    with pytest.raises(GeneSetError, match="not found"):
        read_gmt(tmp_path / "missing.gmt")
    p.write_text("A\tdesc\tCD3E\tCD4\t\t\n")  # trailing empty fields are ignored
    assert read_gmt(p).genes == [["CD3E", "CD4"]]
