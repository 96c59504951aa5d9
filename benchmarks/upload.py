"""What reading uploads in a child process costs: the upload door vs the same work in-process.

Starts a real server (``bentoml serve``, one worker) on a model artifact, uploads a real
``.h5ad`` (the bundled PBMCs as raw counts, repeated to ``--cells``) to ``/v1/annotate/h5ad``
``--repeat`` times, and times, side by side in the same run:

* **door**: the upload's round trip (the child process checks and reads the file, the worker
  annotates, the child writes the answer: ``service/sandbox.py``);
* **in-process**: the same steps in this process, with no child and no HTTP:
  ``check_h5ad`` + ``anndata.read_h5ad``, the same core (``Annotator``), the annotations
  written with ``write_h5ad``;
* **child start**: ``python -m cellexplain.service.sandbox``'s interpreter and imports alone.

    python -m benchmarks.upload [--cells 700 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import scipy.sparse as sp

from cellexplain.api.annotations import expression
from cellexplain.api.schemas import AnnotateOptions
from cellexplain.service.anndata_io import read_h5ad_upload, write_h5ad, write_result
from cellexplain.service.core import Annotator
from cellexplain.service.h5ad_check import Limits
from cellexplain.service.settings import Settings
from tests.integration.servers import bentoml_server, import_into_store


def counts_file(n_cells: int, folder: Path) -> Path:
    """The bundled PBMCs as integer raw counts (CSR), rows repeated to ``n_cells``."""
    from cellexplain.models.data import load_default_adata

    pbmc = load_default_adata()
    raw = pbmc.raw.to_adata()
    x = raw.X.toarray() if hasattr(raw.X, "toarray") else np.asarray(raw.X)
    counts = np.rint(np.expm1(x) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
    rows = np.resize(np.arange(counts.shape[0]), n_cells)
    a = ad.AnnData(sp.csr_matrix(counts[rows].astype(np.float32)), var=raw.var[[]].copy())
    a.obs_names = [f"cell{i}" for i in range(n_cells)]
    path = folder / f"pbmc_{n_cells}.h5ad"
    a.write_h5ad(path)
    return path


def in_process(annotator: Annotator, path: Path, folder: Path) -> float:
    t0 = time.perf_counter()
    limits = Limits(10**6, 60_000, 1 << 31)
    adata = read_h5ad_upload(path, limits)
    genes, X = expression(adata)
    res = asyncio.run(
        annotator.annotate(genes, X, AnnotateOptions(), [str(n) for n in adata.obs_names])
    )
    write_result(adata, res)
    write_h5ad(adata, folder / "out.h5ad")
    return time.perf_counter() - t0


def child_start() -> float:
    t0 = time.perf_counter()
    code = "import cellexplain.service.sandbox, cellexplain.service.anndata_io"
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", help="model folder (default: train the default model)")
    p.add_argument("--cells", type=int, nargs="+", default=[700, 10_000])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        artifact = Path(args.artifact) if args.artifact else folder / "model"
        if not args.artifact:
            from cellexplain.models.data import load_labelled
            from cellexplain.models.train import TrainConfig, train

            cfg = TrainConfig(name="pbmc-programs", arch="programs")
            train(load_labelled(), cfg, artifact, progress=False)
        home = folder / "home"
        home.mkdir()
        import_into_store(artifact, home)
        settings = Settings(models=[], model_dirs=[str(artifact)], workers=1)
        annotator = Annotator.from_settings(settings)
        starts = [child_start() for _ in range(args.repeat)]
        print(f"child start (interpreter + imports): median {statistics.median(starts):.2f} s")
        env = {"CELLEXPLAIN_MODELS": "pbmc-programs", "CELLEXPLAIN_WORKERS": "1"}
        print("| cells | file MB | door (s) | in-process (s) | door - in-process (s) | ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        with bentoml_server(home, env) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
            for n in args.cells:
                path = counts_file(n, folder)
                door, local = [], []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    with path.open("rb") as f:
                        r = c.post("/v1/annotate/h5ad", files={"file": (path.name, f)})
                    r.raise_for_status()
                    door.append(time.perf_counter() - t0)
                    local.append(in_process(annotator, path, folder))
                d, lo = statistics.median(door), statistics.median(local)
                size = path.stat().st_size / 1e6
                print(f"| {n} | {size:.1f} | {d:.2f} | {lo:.2f} | {d - lo:.2f} | {d / lo:.2f}x |")
        annotator.close()


if __name__ == "__main__":
    main()
