#!/usr/bin/env bash
# Build the CPU variant of docker/Dockerfile WITHOUT a Docker engine or a reachable container registry, then
# run docker/smoke.sh inside it as a RUN step of docker/Containerfile.smoke (podman can build here, not run).
#
#   docker/build-local.sh [--no-smoke]          (from anywhere; slow: several minutes, run it niced)
#
# 1. Base: `debootstrap --variant=minbase bookworm` (Python 3.11, venv, CA certificates), imported as
#    localhost/medseg-base:bookworm; reused when that image exists.
# 2. pip inside the build uses the host's pip configuration: the index settings of `pip config list` (files and
#    PIP_* variables, and its CA bundle) go into a temporary pip.conf mounted at /etc/pip.conf, and every local
#    folder they name (find-links paths, file:// indexes) is mounted read-only at the same path. Build-time
#    mounts are not part of the image, and nothing host-specific is written into the Dockerfile.
# 3. torch: TORCH_SPEC from constraints-cpu.txt (the CPU build the project pins).
# Environment: MEDSEG_IMAGE (default localhost/medseg:cpu), MEDSEG_BASE_IMAGE (default
# localhost/medseg-base:bookworm), MEDSEG_ROOTFS (debootstrap folder, default a temporary one),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), MEDSEG_PODMAN_STORE (podman storage of these builds,
# default /var/tmp/medseg-podman, kept apart from any other podman state), PODMAN (the whole podman command).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${MEDSEG_IMAGE:-localhost/medseg:cpu}"
BASE="${MEDSEG_BASE_IMAGE:-localhost/medseg-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
STORE="${MEDSEG_PODMAN_STORE:-/var/tmp/medseg-podman}"
read -r -a PODMAN <<< "${PODMAN:-podman --storage-driver vfs --root $STORE/root --runroot $STORE/run}"
SMOKE=1
[[ "${1:-}" == "--no-smoke" ]] && SMOKE=0

log() { echo "build-local: $*" >&2; }
need() { command -v "$1" > /dev/null || { log "$1 not found; expected it installed (apt-get install -y $2)"; exit 1; }; }
need "${PODMAN[0]}" podman

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- 1. base image
if "${PODMAN[@]}" image exists "$BASE"; then
    log "reusing base image $BASE"
else
    need debootstrap debootstrap
    ROOTFS="${MEDSEG_ROOTFS:-$WORK/rootfs}"
    if [[ ! -x "$ROOTFS/usr/bin/python3" ]]; then
        log "debootstrap bookworm into $ROOTFS (minutes)"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$ROOTFS" "$MIRROR"
    fi
    log "importing $ROOTFS as $BASE"
    tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import - "$BASE"
fi

# ---------------------------------------------------------------- 2. the host's pip indexes
PIP_CONF="$WORK/pip.conf"
MOUNTS=()
python3 - "$PIP_CONF" > "$WORK/mounts" <<'PY'
import subprocess, sys
from pathlib import Path
from urllib.parse import unquote, urlparse

out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
keys = ("index-url", "extra-index-url", "find-links", "trusted-host", "default-timeout", "cert")
settings: dict[str, str] = {}
for line in out.splitlines():  # scope.key='value'; environment (":env:") wins over files, as in pip
    name, _, value = line.partition("=")
    key = name.rsplit(".", 1)[-1]
    if key in keys and (key not in settings or name.startswith(":env:")):
        settings[key] = value.strip().strip("'\"")
mounts = []  # "host:container" pairs, read-only
for key in ("index-url", "extra-index-url", "find-links"):
    for item in settings.get(key, "").split():
        path = Path(unquote(urlparse(item).path) if item.startswith("file:") else item)
        if path.is_absolute() and path.exists():
            # a file:// simple index links its files relative to itself (../../files/x.whl): mount its parent
            root = path.parent if key != "find-links" else path
            mounts.append(f"{root.resolve()}:{root.resolve()}")
# a CA bundle the host trusts (e.g. for a TLS-intercepting proxy); the base's own bundle does not have it
if settings.get("cert") and Path(settings["cert"]).is_file():
    mounts.append(f"{Path(settings['cert']).resolve()}:/etc/medseg-build-ca.pem")
    settings["cert"] = "/etc/medseg-build-ca.pem"
else:
    settings.pop("cert", None)
Path(sys.argv[1]).write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
print("\n".join(sorted(set(mounts))))
PY
while IFS= read -r pair; do
    [[ -n "$pair" ]] && MOUNTS+=(-v "$pair:ro")
done < "$WORK/mounts"
MOUNTS+=(-v "$PIP_CONF:/etc/pip.conf:ro")
log "pip configuration for the build: $(tr '\n' ' ' < "$PIP_CONF")"

# ---------------------------------------------------------------- 3. build the CPU variant
TORCH_SPEC="$(grep -E '^torch==' "$ROOT/constraints-cpu.txt" | head -n 1)"
log "building $IMAGE FROM $BASE with $TORCH_SPEC"
start=$(date +%s)
"${PODMAN[@]}" build --format docker --isolation chroot --network host --ignorefile "$ROOT/docker/Dockerfile.dockerignore" \
    "${MOUNTS[@]}" -f "$ROOT/docker/Dockerfile" -t "$IMAGE" \
    --build-arg BASE="$BASE" --build-arg TORCH_SPEC="$TORCH_SPEC" "$ROOT"
log "built $IMAGE in $(( $(date +%s) - start )) s"

# What `docker run` would execute: the entrypoint, the user and the volumes (podman run does not work here).
ENTRY="$("${PODMAN[@]}" image inspect --format '{{json .Config.Entrypoint}} {{.Config.User}} {{json .Config.Volumes}}' "$IMAGE")"
log "image config: $ENTRY"
if [[ "$ENTRY" != '["medseg"] 1000:1000 '* ]]; then
    log "FAILED: expected ENTRYPOINT [\"medseg\"] and USER 1000:1000, got $ENTRY"
    exit 1
fi

# ---------------------------------------------------------------- 4. smoke test as a build step
if [[ "$SMOKE" == 1 ]]; then
    start=$(date +%s)
    "${PODMAN[@]}" build --format docker --isolation chroot --network host --ignorefile "$ROOT/docker/Dockerfile.dockerignore" \
        -f "$ROOT/docker/Containerfile.smoke" --build-arg IMAGE="$IMAGE" -t "$IMAGE-smoke" "$ROOT"
    log "smoke test passed in $(( $(date +%s) - start )) s"
    "${PODMAN[@]}" rmi "$IMAGE-smoke" > /dev/null || true
fi
log "done: $IMAGE ($("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes)"
