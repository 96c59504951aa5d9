#!/usr/bin/env bash
# Build the OCI image of a Bento with podman, needing no image registry: the base is made from
# Debian packages (debootstrap, then `podman import`), the Python packages come from PyPI.
#
#   deploy/image/build.sh [BENTO]        # default cellexplain:latest; make image runs it
#
# Prints the image's name, localhost/<bento name>:<bento version>. Needs root (debootstrap),
# podman and debootstrap (apt-get install podman runc debootstrap). Settings, from the
# environment: BENTOML (the bentoml command), IMAGE_CACHE (.cache/image: the base's rootfs
# tarball, reused), DEBIAN_MIRROR, PODMAN_RUNTIME (runc where installed: crun refuses some
# cgroup setups), SSL_CERT_FILE (a CA bundle the build's downloads should trust).
set -euo pipefail
cd "$(dirname "$0")/../.."

BENTO=${1:-cellexplain:latest}
BENTOML=${BENTOML:-.venv/bin/bentoml}
CACHE=${IMAGE_CACHE:-.cache/image}
SUITE=bookworm  # Python 3.11, the version the Bento's lock file was made for
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/cellexplain-base:$SUITE
RUNTIME=${PODMAN_RUNTIME:-$(command -v runc || true)}
podman() { command podman ${RUNTIME:+--runtime "$RUNTIME"} "$@"; }
# explicit limits: containers may not inherit podman's defaults on every host
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 65536 ] && NOFILE=65536
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit nproc=4096:4096)

say() { echo "image: $*" >&2; }
mkdir -p "$CACHE" && CACHE=$(realpath "$CACHE")

# 1. the base: Debian's python3 on a minimal Debian, from Debian packages only
if ! podman image exists "$BASE"; then
    if [ ! -s "$CACHE/base-$SUITE.tar" ]; then
        say "debootstrap $SUITE (about a minute)"
        rm -rf "$CACHE/rootfs"
        debootstrap --variant=minbase \
            --include=python3,python3-venv,ca-certificates,libstdc++6,libgomp1 \
            "$SUITE" "$CACHE/rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
        rm -rf "$CACHE/rootfs"/var/cache/apt/archives/*.deb "$CACHE/rootfs"/var/lib/apt/lists/*
        tar -C "$CACHE/rootfs" -cf "$CACHE/base-$SUITE.tar" .
        rm -rf "$CACHE/rootfs"
    fi
    say "import $BASE"
    podman import --quiet "$CACHE/base-$SUITE.tar" "$BASE" >/dev/null
fi

# 2. the build context: the Bento as `bentoml export` writes it (models included)
CONTEXT=$CACHE/context
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT/bento"
"$BENTOML" export "$BENTO" "$CACHE/bento.tar" >/dev/null
tar -C "$CONTEXT/bento" -xf "$CACHE/bento.tar"
rm "$CACHE/bento.tar"
# readable by any user: OpenShift runs images under an arbitrary UID (group 0), and BentoML's
# store keeps model folders private to their owner
chmod -R a+rX,go-w "$CONTEXT/bento"
cp deploy/image/Containerfile "$CONTEXT/"
read -r NAME VERSION MODELS < <("${PYTHON:-.venv/bin/python}" - "$CONTEXT/bento/bento.yaml" <<'PY'
import sys, yaml
b = yaml.safe_load(open(sys.argv[1]))
print(b["name"], b["version"], ",".join(m["tag"] for m in b.get("models", [])))
PY
)
IMAGE=localhost/$NAME:$VERSION

# 3. the image
CA=()
if [ -n "${SSL_CERT_FILE:-}" ] && [ -f "$SSL_CERT_FILE" ]; then
    CA=(--volume "$(realpath "$SSL_CERT_FILE"):/etc/ssl/certs/build-ca.crt:ro"
        --build-arg PIP_CERT=/etc/ssl/certs/build-ca.crt)
fi
say "build $IMAGE (models $MODELS)"
podman build --quiet --network host "${ULIMITS[@]}" \
    "${CA[@]}" --build-arg BASE="$BASE" --build-arg BENTO_TAG="$NAME:$VERSION" \
    --build-arg CELLEXPLAIN_MODELS="$MODELS" -t "$IMAGE" -f "$CONTEXT/Containerfile" \
    "$CONTEXT" >&2
rm -rf "$CONTEXT"
echo "$IMAGE"
