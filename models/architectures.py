"""Interpretable classifiers (torch; training and export only).

Every architecture is the same shape of network, so one attribution graph serves all of them:

    x (log1p CP10k, [n, G]) -> standardise -> first linear layer (optionally masked)
      -> ReLU -> [Linear -> ReLU]* -> Linear -> logits [n, C]

* ``linear``: no hidden layer (softmax regression); attributions are exact.
* ``mlp``: dense hidden layers.
* ``programs``: the first layer is masked so that each of its first ``n_programs`` units sees only
  the genes of one gene set; ``n_free`` more units see every gene, so genes outside all sets
  still reach the classifier.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

Arch = Literal["linear", "mlp", "programs"]
ARCHS: tuple[Arch, ...] = ("linear", "mlp", "programs")


@dataclass
class ArchConfig:
    """Sizes of a network. ``hidden`` are the dense layers after the first layer's ReLU."""

    arch: Arch
    n_genes: int
    n_classes: int
    first_width: int | None = None  # mlp: first hidden width; programs: n_programs + n_free
    hidden: list[int] = field(default_factory=list)
    n_programs: int = 0
    n_free: int = 0
    dropout: float = 0.2
    #: members of a seed ensemble held side by side (:func:`ensemble`): every width is this many
    #: times the member's; the program units come first, member after member
    ensemble: int = 1


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 mask ``[out, in]``."""

    mask: torch.Tensor

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.clone().to(self.weight.dtype))
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask


class Standardize(nn.Module):
    """``(x - mean) * scale`` per gene, with fixed statistics from the training split."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale


class CellClassifier(nn.Module):
    """Standardisation followed by ``net``, an ``nn.Sequential`` of Linear/ReLU/Dropout.

    Each ReLU is its own module (Captum's DeepLift requires it).
    """

    def __init__(
        self,
        config: ArchConfig,
        mean: np.ndarray,
        scale: np.ndarray,
        program_mask: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.standardize = Standardize(
            torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(scale, dtype=torch.float32)
        )
        layers: list[nn.Module] = []
        G, C = config.n_genes, config.n_classes
        if config.arch == "linear":
            layers.append(nn.Linear(G, C))
        else:
            if config.arch == "programs":
                if program_mask is None:
                    raise ValueError("programs architecture needs a program mask")
                k = config.ensemble
                width = k * (config.n_programs + config.n_free)
                full = np.ones((width, G), dtype=np.float32)
                full[: k * config.n_programs] = np.tile(program_mask, (k, 1))
                layers.append(MaskedLinear(G, width, torch.as_tensor(full)))
            else:
                width = int(config.first_width or 256) * config.ensemble
                layers.append(nn.Linear(G, width))
            sizes = [width, *(h * config.ensemble for h in config.hidden)]
            layers += [nn.ReLU(), nn.Dropout(config.dropout)]
            for a, b in itertools.pairwise(sizes):
                layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(config.dropout)]
            layers.append(nn.Linear(sizes[-1], C))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, C]`` for ``x`` ``[n, G]`` (log1p CP10k values of the model's genes)."""
        return self.net(self.standardize(x))

    @property
    def first_layer(self) -> nn.Linear:
        first = self.net[0]
        assert isinstance(first, nn.Linear)
        return first

    def dense_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The network as ``[(W [out, in], b [out]), ...]`` in float64, ReLU between layers.

        Standardisation is folded into the first layer and the program mask applied, so the
        list alone computes the same logits from raw model input ``x``.
        """
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for i, lin in enumerate(linears):
            W = (
                (lin.effective_weight() if isinstance(lin, MaskedLinear) else lin.weight)
                .detach()
                .double()
                .numpy()
            )
            b = lin.bias.detach().double().numpy()
            if i == 0:
                scale = self.standardize.scale.detach().double().numpy()
                mean = self.standardize.mean.detach().double().numpy()
                W = W * scale[None, :]
                b = b - W @ mean
            out.append((W.copy(), b.copy()))
        return out


def ensemble(
    members: list[CellClassifier], program_mask: np.ndarray | None = None
) -> CellClassifier:
    """One network computing the mean of the members' logits (same architecture and
    standardisation, different weights): their units side by side, block-diagonal hidden
    layers, the last layer's weights divided by their number. Attributions are linear in the
    explained function, so the network's (IG, DeepLIFT) are the mean of the members'. Program
    models keep their program units first: member 1's, member 2's, ..., then the free units."""
    k = len(members)
    cfg = members[0].config
    if k == 1:
        return members[0]
    combined = CellClassifier(
        dataclasses.replace(cfg, ensemble=k),
        members[0].standardize.mean.numpy(),
        members[0].standardize.scale.numpy(),
        program_mask,
    )
    linears = [[m for m in member.net if isinstance(m, nn.Linear)] for member in members]
    target = [m for m in combined.net if isinstance(m, nn.Linear)]

    def units(layer: int, member: int) -> np.ndarray:
        """Where member ``member``'s units of Linear ``layer`` sit in the combined layer."""
        n = linears[0][layer].out_features
        if layer == 0 and cfg.arch == "programs":
            p, f = cfg.n_programs, cfg.n_free
            return np.r_[member * p + np.arange(p), k * p + member * f + np.arange(f)]
        return member * n + np.arange(n)

    with torch.no_grad():
        for layer, lin in enumerate(target):
            lin.weight.zero_()
            lin.bias.zero_()
            last = layer == len(target) - 1
            for i in range(k):
                src = linears[i][layer]
                rows = np.arange(lin.out_features) if last else units(layer, i)
                cols = np.arange(lin.in_features) if layer == 0 else units(layer - 1, i)
                scale = 1.0 / k if last else 1.0
                r, c = torch.as_tensor(rows), torch.as_tensor(cols)
                lin.weight[r[:, None], c[None, :]] += src.weight * scale
                lin.bias[r] += src.bias * scale
    return combined.eval()
