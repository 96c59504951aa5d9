"""Load an exported model (ONNX + JSON card, never pickle) and run it with onnxruntime.

No torch here: this is what serving and ``--local`` annotation use.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.card import ONNX_FILE, ModelCard, sha256_file
from models.errors import ArtifactError

log = logging.getLogger(__name__)


#: providers that run on a GPU (IO binding pays off there)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

Provider = str | tuple[str, dict[str, Any]]


def available_providers(
    prefer_gpu: bool = True, tensorrt: bool = False, trt_cache_dir: str | Path | None = None
) -> list[Provider]:
    """onnxruntime providers to use, best first, with their options.

    TensorRT (only when asked for and installed; engines cached in ``trt_cache_dir`` so a
    restart does not rebuild them), then CUDA (when onnxruntime-gpu sees a GPU and
    ``prefer_gpu``), then the CPU, which always comes last as the fallback for any node the
    others cannot run.
    """
    have = ort.get_available_providers()
    chosen: list[Provider] = []
    if prefer_gpu and tensorrt and "TensorrtExecutionProvider" in have:
        cache = str(trt_cache_dir or Path(tempfile.gettempdir()) / "cellexplain-trt")
        Path(cache).mkdir(parents=True, exist_ok=True)
        chosen.append(
            (
                "TensorrtExecutionProvider",
                {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": cache,
                },
            )
        )
    if prefer_gpu and "CUDAExecutionProvider" in have:
        # grow the memory arena by what is asked, not in doubling steps: IG at large batches
        # would otherwise reserve up to twice what it needs
        chosen.append(("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}))
    return [*chosen, "CPUExecutionProvider"]


def provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


@dataclass
class Prediction:
    """Outputs of the graph for ``n`` cells (all numpy, float32 unless noted)."""

    logits: np.ndarray  # [n, C]
    probabilities: np.ndarray  # [n, C]
    attributions: np.ndarray  # [n, G]
    explained_class: np.ndarray  # [n] int64
    program_attributions: np.ndarray | None  # [n, P] for program models


class OnnxModel:
    """An exported model, loaded and verified.

    Args:
        directory: folder holding ``model.onnx`` and ``model.json``.
        providers: onnxruntime providers, names or ``(name, options)`` (default:
            :func:`available_providers`).
        intra_op_threads: threads per inference call (0: onnxruntime decides).
        io_binding: bind inputs and outputs explicitly (``None``: when the session runs on a
            GPU provider). Outputs are bound to host memory, so each result crosses from the
            device once, into the array returned.
    """

    def __init__(
        self,
        directory: str | Path,
        providers: Sequence[Provider] | None = None,
        intra_op_threads: int = 0,
        io_binding: bool | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.card = ModelCard.read(self.directory)
        onnx_path = self.directory / ONNX_FILE
        if not onnx_path.is_file():
            raise ArtifactError(f"no ONNX graph at {onnx_path}")
        digest = sha256_file(onnx_path)
        if digest != self.card.onnx.sha256:
            raise ArtifactError(
                f"{onnx_path} has sha256 {digest}, but its model card says {self.card.onnx.sha256}:"
                " the graph was modified or does not belong to this card"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.log_severity_level = 3  # the optional `target` input is an initializer by design
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=list(providers or available_providers())
        )
        self.providers = self.session.get_providers()
        self.io_binding = self.providers[0] in GPU_PROVIDERS if io_binding is None else io_binding
        self._outputs = [o.name for o in self.session.get_outputs()]
        log.info("loaded model %s on %s", self.card.name, self.providers[0])

    @property
    def genes(self) -> list[str]:
        return self.card.genes

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def predict(
        self,
        x: np.ndarray,
        target: np.ndarray | int | None = None,
        batch_size: int = 4096,
    ) -> Prediction:
        """Run the graph on model input.

        Args:
            x: ``[n, n_genes]`` log1p-CP10k values of the model's genes, in card order.
            target: class index to explain, per cell ``[n]`` or one for all; ``None`` or a
                negative value explains the predicted class.
            batch_size: cells per onnxruntime call (bounds memory on large inputs).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.genes):
            raise ValueError(f"x must be [n, {len(self.genes)}], got {list(x.shape)}")
        n = x.shape[0]
        if target is None:
            t = np.full(n, -1, dtype=np.int64)
        else:
            t = np.broadcast_to(np.asarray(target, dtype=np.int64), (n,)).copy()
        if np.any(t >= len(self.classes)):
            raise ValueError(f"target class index out of range (model has {len(self.classes)})")
        parts: list[list[np.ndarray]] = [[] for _ in self._outputs]
        for start in range(0, max(n, 1), batch_size):
            sl = slice(start, start + batch_size)
            res = self._run(x[sl], t[sl])
            for acc, r in zip(parts, res, strict=True):
                acc.append(r)
        out = {name: np.concatenate(p) for name, p in zip(self._outputs, parts, strict=True)}
        return Prediction(
            logits=out["logits"],
            probabilities=out["probabilities"],
            attributions=out["attributions"],
            explained_class=out["explained_class"],
            program_attributions=out.get("program_attributions"),
        )

    def _run(self, x: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
        # `target` is an overridable initializer, which IO binding cannot bind: requests that
        # choose the explained class go through run(); the default (predicted class) binds
        if not self.io_binding or np.any(target >= 0):
            return list(self.session.run(self._outputs, {"x": x, "target": target}))
        binding = self.session.io_binding()
        binding.bind_cpu_input("x", np.ascontiguousarray(x))
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())
