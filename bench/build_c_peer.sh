#!/usr/bin/env bash
# Build the C peer for the benchmarks: QEMU's own vfio-user server (x-vfio-user-server, with
# libvfio-user inside), from Debian's `qemu` source package.
#
#   bash bench/build_c_peer.sh            # build (or say it is already built) and print the binary
#   QEMU_SRC_VERSION=1:10.2.2+ds-1 SUITE=sid bash bench/build_c_peer.sh
#
# Everything lives under ${XDG_CACHE_HOME:-~/.cache}/pyvfio-user/c-peer/ (or $PYVFIO_CPEER_DIR):
#   apt/      private apt state and sources (deb-src of $SUITE): the host's apt config is untouched
#   dl/       the .dsc, .orig.tar.xz and .debian.tar.xz fetched with `apt-get source --download-only`
#   src/      the unpacked source (dpkg-source -x; Debian's patches applied)
#   venv/     meson >= 1.5, ninja and pycotap from PyPI
#   build/    the build; the binary is build/qemu-system-x86_64
#   stamp     written last; when it matches the recipe a second run does nothing
#
# Host packages needed (installed with apt-get when missing and run as root; this is the only
# change to the host): build-essential pkg-config libglib2.0-dev libpixman-1-dev libjson-c-dev
# libcmocka-dev python3-venv flex bison xz-utils dpkg-dev.
#
# --enable-kvm is needed at build time only: hw/remote/Kconfig makes MULTIPROCESS (the x-remote
# machine) depend on KVM. The peer itself runs no vCPU, so it works on a host without /dev/kvm.
#
# One x86_64 target (about 1,400 ninja steps) took 7 minutes on an otherwise quiet 2-core machine
# and 15 while other builds shared it. The source and the build are never committed.
set -euo pipefail

QEMU_SRC_VERSION=${QEMU_SRC_VERSION:-1:10.2.2+ds-1}
SUITE=${SUITE:-sid}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=${PYVFIO_CPEER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvfio-user/c-peer}
CONFIGURE_FLAGS=(--target-list=x86_64-softmmu --enable-multiprocess --enable-vfio-user-server
                 --disable-docs --without-default-features --disable-download --disable-werror
                 --disable-install-blobs --enable-kvm)
HOST_PACKAGES=(build-essential pkg-config libglib2.0-dev libpixman-1-dev libjson-c-dev
               libcmocka-dev python3-venv flex bison xz-utils dpkg-dev)
RECIPE="4 $QEMU_SRC_VERSION $SUITE ${CONFIGURE_FLAGS[*]}"
BIN="$ROOT/build/qemu-system-x86_64"

say() { printf 'build_c_peer: %s\n' "$*" >&2; }
run() { say "+ $*"; "$@"; }

if [[ -x "$BIN" && -f "$ROOT/stamp" && "$(cat "$ROOT/stamp")" == "$RECIPE" ]]; then
    say "already built ($RECIPE)"
    echo "$BIN"
    exit 0
fi

# 1. Host build dependencies.
missing=()
for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        say "missing host packages: ${missing[*]} (install them with apt-get as root)"
        exit 1
    fi
    run apt-get update -q
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# 2. Source, through a private apt (own sources.list, state, cache; empty dpkg status).
mkdir -p "$ROOT"/apt/{state/lists/partial,cache/archives/partial,etc/parts} "$ROOT/dl"
: > "$ROOT/apt/state/status"
: > "$ROOT/apt/etc/preferences"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $KEYRING ]] || KEYRING=/usr/share/keyrings/debian-archive-keyring.pgp
echo "deb-src [signed-by=$KEYRING] $MIRROR $SUITE main" > "$ROOT/apt/etc/sources.list"
A="$ROOT/apt"
APT_OPTS=(-o "Dir::State=$A/state" -o "Dir::State::status=$A/state/status"
          -o "Dir::Etc::SourceList=$A/etc/sources.list" -o "Dir::Etc::SourceParts=$A/etc/parts"
          -o "Dir::Etc::Preferences=$A/etc/preferences" -o "Dir::Etc::PreferencesParts=$A/etc/parts"
          -o "Dir::Cache=$A/cache" -o Debug::NoLocking=1)
[[ $(id -u) -eq 0 ]] && APT_OPTS+=(-o APT::Sandbox::User=root)

upstream=${QEMU_SRC_VERSION#*:}          # 10.2.2+ds-1
dsc="qemu_${upstream}.dsc"
if [[ ! -f "$ROOT/dl/$dsc" ]]; then
    run apt-get "${APT_OPTS[@]}" -q update
    (cd "$ROOT/dl" && run apt-get "${APT_OPTS[@]}" -q source --download-only "qemu=$QEMU_SRC_VERSION")
fi
[[ -f "$ROOT/dl/$dsc" ]] || { say "apt-get source did not produce $dsc"; exit 1; }

src_stamp="$ROOT/src/.pyvfio-source"
if [[ ! -f "$src_stamp" || "$(cat "$src_stamp")" != "$QEMU_SRC_VERSION" ]]; then
    run rm -rf "$ROOT/src" "$ROOT/build"
    # apt already checked the files against the signed Sources index.
    run dpkg-source --no-check -x "$ROOT/dl/$dsc" "$ROOT/src"
    echo "$QEMU_SRC_VERSION" > "$src_stamp"
fi
if [[ ! -f "$ROOT/src/subprojects/libvfio-user/meson.build" ]]; then
    say "this source package does not ship subprojects/libvfio-user: cannot build the vfio-user server"
    exit 1
fi

# 3. meson >= 1.5 (Debian 12 has 1.0) in a private venv, visible to QEMU's own pyvenv.
if [[ ! -x "$ROOT/venv/bin/meson" ]]; then
    run python3 -m venv "$ROOT/venv"
    run "$ROOT/venv/bin/pip" install -q 'meson>=1.5' ninja 'pycotap>=1.1'
fi

# 4. Configure and build one target.
mkdir -p "$ROOT/build"
cd "$ROOT/build"
if [[ ! -f build.ninja || "$(cat .pyvfio-configure 2>/dev/null)" != "$RECIPE" ]]; then
    run env PATH="$ROOT/venv/bin:$PATH" "$ROOT/src/configure" --python="$ROOT/venv/bin/python3" \
        "${CONFIGURE_FLAGS[@]}"
    echo "$RECIPE" > .pyvfio-configure
fi
run env PATH="$ROOT/venv/bin:$PATH" ninja -j"$(nproc)" qemu-system-x86_64

"$BIN" -machine help | grep -q x-remote || { say "built QEMU has no x-remote machine"; exit 1; }
"$BIN" -object help | grep -q x-vfio-user-server || { say "built QEMU has no x-vfio-user-server"; exit 1; }
"$BIN" -device help | grep -q '"edu"' || { say "built QEMU has no edu device"; exit 1; }
echo "$RECIPE" > "$ROOT/stamp"
say "built $("$BIN" --version | head -1)"
echo "$BIN"
