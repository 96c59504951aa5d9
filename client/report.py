"""``cellexplain report``: pictures of an annotated ``.h5ad`` in one self-contained HTML page.

Label composition, confidence distribution, and for each cell type the genes (and gene
programs) that most drove its calls across cells, plus a heatmap of mean attributions for the
top genes by cell type. Attributions are read from ``obsm`` in chunks (any file size); without
them (``--attributions top_k``), gene charts count how often a gene is among a cell's top genes.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata.io as aio
import h5py
import numpy as np
import pandas as pd

from cellexplain.api.annotations import PREFIX, UNASSIGNED
from cellexplain.api.errors import InvalidInputError


@dataclass
class Summary:
    """Per-label statistics gathered from an annotated file."""

    info: dict[str, Any]
    labels: pd.Series
    confidence: np.ndarray
    genes: list[str]
    gene_means: pd.DataFrame | None  # labels x genes, mean attribution
    gene_counts: pd.DataFrame | None  # labels x genes, share of cells with it in the top genes
    program_means: pd.DataFrame | None  # labels x programs


def summarise(path: str | Path, chunk: int = 20_000) -> Summary:
    """Read what the report needs from an annotated ``.h5ad`` (chunked, bounded memory)."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InvalidInputError(f"{path} is not a readable .h5ad: {e}", "input") from e
    with f:
        if f"uns/{PREFIX}" not in f:
            raise InvalidInputError(
                f"{path} has no uns['{PREFIX}']: annotate it first (cellexplain annotate)", "input"
            )
        info = aio.read_elem(f[f"uns/{PREFIX}"])
        obs = aio.read_elem(f["obs"])
        labels = obs[f"{PREFIX}_label"].astype(str)
        conf = obs[f"{PREFIX}_confidence"].to_numpy(dtype=np.float64)
        genes = [str(g) for g in info["genes"]]
        order = sorted(labels.unique(), key=lambda s: (s == UNASSIGNED, s))
        codes = pd.Categorical(labels, categories=order).codes
        sizes = np.bincount(codes, minlength=len(order)).astype(np.float64)

        def means(name: str, columns: list[str]) -> pd.DataFrame | None:
            key = f"obsm/{name}"
            if key not in f:
                return None
            ds = f[key]
            sums = np.zeros((len(order), ds.shape[1]))
            for start in range(0, ds.shape[0], chunk):
                block = ds[start : start + chunk]
                np.add.at(sums, codes[start : start + chunk], block)
            return pd.DataFrame(sums / np.maximum(sizes, 1)[:, None], index=order, columns=columns)

        gene_means = means(f"{PREFIX}_attributions", genes)
        programs = [str(p) for p in info.get("programs", [])]
        program_means = means(f"{PREFIX}_program_attributions", programs) if programs else None
        gene_counts = None
        if gene_means is None and f"{PREFIX}_top_genes" in obs:
            top = obs[f"{PREFIX}_top_genes"].astype(str).str.split(";").explode()
            table = pd.crosstab(top.index.map(dict(zip(obs.index, labels, strict=True))), top)
            gene_counts = table.div(pd.Series(sizes, index=order).reindex(table.index), axis=0)
    return Summary(info, labels, conf, genes, gene_means, gene_counts, program_means)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figures(s: Summary, top: int = 10) -> dict[str, str]:
    """Base64 PNGs by name: composition, confidence, genes, programs, heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    counts = s.labels.value_counts()
    counts = counts.reindex(sorted(counts.index, key=lambda c: (c == UNASSIGNED, -counts[c])))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(counts) + 1))
    colors = ["#bbbbbb" if c == UNASSIGNED else "#3b75af" for c in counts.index]
    ax.barh(counts.index[::-1], counts.to_numpy()[::-1], color=colors[::-1])
    for i, v in enumerate(counts.to_numpy()[::-1]):
        ax.text(v, i, f" {v:,} ({v / counts.sum():.1%})", va="center", fontsize=8)
    ax.set_xlabel("cells")
    ax.set_title("Label composition")
    ax.spines[["top", "right"]].set_visible(False)
    out["composition"] = _png(fig)

    fig, axes = plt.subplots(
        1, 2, figsize=(13, 0.3 * len(counts) + 3), gridspec_kw={"width_ratios": [1, 1]}
    )
    axes[0].hist(s.confidence, bins=40, range=(0, 1), color="#3b75af")
    thr = float(s.info.get("unassigned_threshold", 0.5))
    axes[0].axvline(thr, color="#c0392b", ls="--", label=f"threshold {thr:g}")
    axes[0].set_xlabel("confidence (probability of the predicted type)")
    axes[0].set_ylabel("cells")
    axes[0].legend()
    axes[0].set_title("Confidence")
    predicted = [c for c in counts.index if c != UNASSIGNED]
    data = [s.confidence[(s.labels == c).to_numpy()] for c in predicted]
    if predicted:
        axes[1].boxplot(data, orientation="horizontal", tick_labels=predicted, showfliers=False)
        axes[1].set_xlabel("confidence")
        axes[1].set_title("Confidence by label")
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
    axes[1].tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    out["confidence"] = _png(fig)

    table = s.gene_means if s.gene_means is not None else s.gene_counts
    types = [c for c in predicted if table is not None and c in table.index]
    shares = s.gene_means is None  # top genes only: shares of cells, 0..1, not attributions
    if table is not None and types:
        out["genes"] = _bars(
            table,
            types,
            top,
            "share of the type's cells with the gene among their top genes (for the call)"
            if shares
            else "mean attribution",
            counts,
        )
        chosen: list[str] = []
        for c in types:
            row = table.loc[c]
            for g in row.abs().sort_values(ascending=False).index[:3]:
                if g not in chosen:
                    chosen.append(g)
        heat = table.loc[types, chosen]
        fig, ax = plt.subplots(figsize=(0.38 * len(chosen) + 3, 0.45 * len(types) + 1.5))
        lim = float(np.abs(heat.to_numpy()).max()) or 1.0
        # shares run 0..1 on a sequential scale; signed attributions on a diverging one
        cmap, low, high = ("Blues", 0.0, 1.0) if shares else ("RdBu_r", -lim, lim)
        im = ax.imshow(heat.to_numpy(), aspect="auto", cmap=cmap, vmin=low, vmax=high)
        ax.set_xticks(range(len(chosen)), chosen, rotation=90, fontsize=8)
        names = [f"{t} (n={counts[t]:,})" for t in types]
        ax.set_yticks(range(len(types)), names, fontsize=8)
        fig.colorbar(im, ax=ax, label="share of cells" if shares else "mean attribution")
        ax.set_title("Top genes by cell type")
        out["heatmap"] = _png(fig)
    if s.program_means is not None and types:
        out["programs"] = _bars(
            s.program_means, types, min(top, 8), "mean program attribution", counts
        )
    return out


def _bars(table: pd.DataFrame, types: list[str], top: int, xlabel: str, counts: pd.Series) -> str:
    """A panel per type (titled with its number of cells) of its ``top`` rows by |value|."""
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(types) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.2 * cols, 0.28 * top * rows + 1.2 * rows), squeeze=False
    )
    for ax, c in zip(axes.ravel(), types, strict=False):
        row = table.loc[c]
        best = row.abs().sort_values(ascending=False).index[:top]
        values = row[best].to_numpy()[::-1]
        ax.barh(list(best)[::-1], values, color=np.where(values >= 0, "#c0392b", "#2e86c1"))
        ax.set_title(f"{c} (n={counts[c]:,})", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes.ravel()[len(types) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def write_report(src: str | Path, out: str | Path, top: int = 10) -> Path:
    """Write a self-contained HTML report (PNG figures inlined) for an annotated file."""
    s = summarise(src)
    figs = figures(s, top)
    info = s.info
    gm = info.get("gene_matching", {})
    rows = [
        ("file", str(src)),
        ("cells", f"{len(s.labels):,}"),
        ("model", f"{info.get('model')} (version {info.get('model_version')})"),
        ("attribution method", str(info.get("attribution_method"))),
        ("input read as", str(info.get("input_kind"))),
        ("unassigned threshold", str(info.get("unassigned_threshold"))),
        ("novelty threshold", str(info.get("novelty_threshold", "none (model without a score)"))),
        ("model genes found", f"{gm.get('n_found')} of {gm.get('n_model_genes')}"),
        ("unassigned cells", f"{(s.labels == UNASSIGNED).mean():.1%}"),
    ]
    # what makes the answer less reliable comes first, before any number or picture
    warned = [str(w) for w in info.get("warnings", [])]
    shares = s.gene_means is None
    captions = {
        "composition": "Label composition (Unassigned: below the confidence threshold, or "
        "further from every known type than the novelty threshold allows).",
        "confidence": "How confident the calls are, overall and by label.",
        "genes": (
            "Per cell type (n: its cells), the genes most often among its cells' evidence for "
            "the call: the share of the type's cells that name the gene (annotate with "
            "--attributions full for mean attributions, for and against)."
            if shares
            else "Per cell type (n: its cells), the genes that most drove its calls (red: for "
            "the type, blue: against), their attributions averaged over the cells called that "
            "type."
        ),
        "programs": "Per cell type, the gene programs (gene sets) that most drove its calls.",
        "heatmap": (
            "Share of each type's cells naming each type's top genes (0 to 1)."
            if shares
            else "Mean attribution of each type's top genes, across all types (red: for, "
            "blue: against)."
        ),
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cellexplain report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "td{padding:2px 12px}img{max-width:100%}figcaption{color:#555;margin-bottom:2em}"
        "</style></head><body><h1>cellexplain report</h1>",
        *(
            f"<p style='background:#fde8e8;padding:8px'><b>Warning:</b> {html.escape(w)}</p>"
            for w in warned
        ),
        "<table>",
        *(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows),
        "</table>",
    ]
    for name, png in figs.items():
        parts.append(
            f"<figure><img alt='{name}' src='data:image/png;base64,{png}'>"
            f"<figcaption>{html.escape(captions[name])}</figcaption></figure>"
        )
    parts.append("</body></html>")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out


def write_pngs(src: str | Path, folder: str | Path, top: int = 10) -> list[Path]:
    """The report's figures as PNG files in ``folder``."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in figures(summarise(src), top).items():
        p = d / f"{name}.png"
        p.write_bytes(base64.b64decode(png))
        paths.append(p)
    return paths
