"""Pin an overlay to one Bento: its image tag and the exact model versions it carries.

    python deploy/pin.py deploy/overlays/cpu cellexplain:VERSION [--image registry/lab/cellexplain]

writes ``OVERLAY/release/kustomization.yaml``, a kustomize Component the overlay includes: the
image (``images:``, tagged with the Bento's version: never ``latest``), the models the Bento
carries named with their versions in the container's ``CELLEXPLAIN_MODELS`` (a pod can only
serve what its image holds, and the pod template says which, so a rollback restores both), and
an ``app.kubernetes.io/version`` label on the pods.
``make pin`` runs it for the newest Bento; docs/deploy.md, "Roll out a new model", uses it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HEADER = """\
# Written by `make pin` (deploy/pin.py) from the Bento {bento}:
# the image and the model versions this overlay deploys. Commit it with the release; roll
# back by checking out the previous one and applying (docs/deploy.md, "Roll out a new model").
"""
#: what a committed overlay holds before its first pin: applying it fails to pull, loudly
UNPINNED = "unpinned-run-make-pin"


def component(base_image: str, image: str, version: str, models: list[str]) -> dict:
    """The release Component for a Bento ``version`` serving ``models`` (``name:version``)."""
    return {
        "apiVersion": "kustomize.config.k8s.io/v1alpha1",
        "kind": "Component",
        "images": [{"name": base_image, "newName": image, "newTag": version}],
        "labels": [
            {
                "pairs": {"app.kubernetes.io/version": version},
                "includeSelectors": False,
                "includeTemplates": True,
            }
        ],
        # in the pod template, beside the image: `kubectl rollout undo` restores both
        "patches": [
            {
                "target": {"kind": "Deployment", "name": "cellexplain"},
                "patch": yaml.safe_dump(
                    [
                        {
                            "op": "add",
                            "path": "/spec/template/spec/containers/0/env/-",
                            "value": {"name": "CELLEXPLAIN_MODELS", "value": ",".join(models)},
                        }
                    ],
                    sort_keys=False,
                ),
            }
        ],
    }


def bento_models(tag: str) -> tuple[str, str, list[str], bool]:
    """A stored Bento's name, version, the ``name:version`` of every model it carries, and
    whether it runs on GPUs (``onnxruntime-gpu`` among its requirements)."""
    import bentoml

    bento = bentoml.get(tag)
    reqs = Path(bento.path) / "env" / "python" / "requirements.txt"
    gpu = reqs.is_file() and "onnxruntime-gpu" in reqs.read_text().lower()
    models = [str(m.tag) for m in bento.info.models]
    return bento.tag.name, str(bento.tag.version), models, gpu


def wants_gpu(overlay: Path) -> bool:
    """Whether the overlay's patches give the pods a GPU (``nvidia.com/gpu``)."""
    return any("nvidia.com/gpu" in p.read_text() for p in overlay.glob("*.yaml"))


def write(overlay: Path, bento: str, image: str | None = None) -> Path:
    """Write ``overlay/release/kustomization.yaml`` for the stored Bento ``bento``."""
    name, version, models, gpu = bento_models(bento)
    if not models:
        raise SystemExit(f"pin: {bento} carries no model")
    if gpu != wants_gpu(overlay):
        kind, other = ("a GPU", "the gpu") if gpu else ("a CPU", "a CPU")
        raise SystemExit(
            f"pin: {bento} is {kind} Bento and {overlay} is not {other} overlay: pin "
            f"cellexplain-gpu:<version> to deploy/overlays/gpu (make pin OVERLAY=gpu) and "
            f"cellexplain:<version> to deploy/overlays/cpu"
        )
    # the base's Deployment names its image `cellexplain`; the Bento's name is the image's
    doc = component("cellexplain", image or name, version, models)
    out = overlay / "release" / "kustomization.yaml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(HEADER.format(bento=bento) + yaml.safe_dump(doc, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overlay", type=Path, help="a folder under deploy/overlays")
    p.add_argument("bento", help="the Bento's tag, e.g. cellexplain:ayfiathrf6oikax4")
    p.add_argument("--image", help="the image's registry path (default: the Bento's name)")
    args = p.parse_args(argv)
    if not (args.overlay / "kustomization.yaml").is_file():
        print(f"pin: {args.overlay} is not a kustomize overlay", file=sys.stderr)
        return 2
    out = write(args.overlay, args.bento, args.image)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
