#!/usr/bin/env bash
# Installs the Debian packages the build and the test guests need, only when missing.
set -euo pipefail

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v ld >/dev/null 2>&1 || need+=(binutils)
command -v make >/dev/null 2>&1 || need+=(make)
# ci/schemathesis.sh: the venv for schemathesis, curl for its last vmm.ping.
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The blocked-snapshot power-fail test mounts a stalling FUSE file system written with fusepy
# (integration-tests/tests/support/stall_fs.py), run by Debian's own python3.
/usr/bin/python3 -c 'import fusepy' >/dev/null 2>&1 || need+=(python3-fusepy)
# arch/tests/acpi_iasl.rs disassembles the ACPI tables with ACPICA's iasl.
command -v iasl >/dev/null 2>&1 || need+=(acpica-tools)
# integration-tests/tests/vhost_user.rs serves a vhost-user-blk disk with qemu-storage-daemon
# (Debian's qemu-utils ships it).
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu-utils)
# integration-tests/tests/virtio_fs.rs serves a virtio-fs share with virtiofsd, which Debian
# bookworm (and its backports) does not ship: it is built from crates.io below, and its build
# links libcap-ng and libseccomp.
if ! command -v virtiofsd >/dev/null 2>&1; then
    dpkg -s libcap-ng-dev >/dev/null 2>&1 || need+=(libcap-ng-dev)
    dpkg -s libseccomp-dev >/dev/null 2>&1 || need+=(libseccomp-dev)
    command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
fi
# nv-bench draws its plot labels with this font (read as a file: no fontconfig needed).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)

if [ ${#need[@]} -gt 0 ]; then
    echo "ci: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "ci: cargo not found; this project needs a Rust toolchain (rustup)" >&2
    exit 1
fi

# virtiofsd (crates.io), pinned; about 3.5 minutes of build on a 2-core machine, once.
VIRTIOFSD_VERSION=1.14.0
if ! command -v virtiofsd >/dev/null 2>&1; then
    echo "ci: building virtiofsd $VIRTIOFSD_VERSION (cargo install)"
    cargo install --locked --quiet virtiofsd --version "$VIRTIOFSD_VERSION"
fi

# schemathesis (PyPI), pinned, in its own venv: ci/schemathesis.sh runs it against a live VMM.
SCHEMATHESIS_VERSION=4.32.5
venv="${NV_CI_VENV:-$HOME/.cache/nv-hypervisor/venv}"
if [ "$("$venv/bin/st" --version 2>/dev/null | awk '{print $NF}')" != "$SCHEMATHESIS_VERSION" ]; then
    echo "ci: installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
