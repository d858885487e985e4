#!/usr/bin/env bash
# An arm64 Debian root that stands in for a Raspberry Pi's OS, run on an x86 machine under
# QEMU user-mode emulation, so the torch-free device install can be checked on aarch64
# with a Pi's exact CPU features (tests/test_arm_emulation.py). A Pi 4's Cortex-A72 has no
# dotprod and no i8mm: a wheel built for a newer core dies there with an illegal
# instruction, and `-cpu cortex-a72` makes QEMU refuse those instructions the same way.
#
#   tests/arm_root.sh build DIR              debootstrap DIR once; later calls reuse it
#   tests/arm_root.sh install DIR WHEELHOUSE a fresh venv at /opt/edgekit in DIR, from the
#                                            aarch64 wheels in WHEELHOUSE only (no index)
#   tests/arm_root.sh run DIR CPU CMD...     CMD inside DIR on an emulated CPU (cortex-a72 = Pi 4,
#                                            cortex-a76 = Pi 5)
#
# Needs root and Debian's qemu-user-static, debootstrap and binfmt-support (.ci/run
# installs them). Exit status 77 means this machine cannot do it (not root, a tool
# missing, binfmt_misc not mountable, the Debian mirror unreachable); the last line on
# stderr says why, and the test skips with it.
set -euo pipefail

SUITE=bookworm  # Raspberry Pi OS 12 is bookworm; its python3 is 3.11
PACKAGES=python3,python3-venv,ca-certificates
VENV=/opt/edgekit
WHEELS=/opt/edgekit-wheels
STAMP=.edgekit-arm-root  # written last: a root without it is half-built and is rebuilt

skip() { echo "cannot emulate arm64 here: $*" >&2; exit 77; }

need_tools() {
  [ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot, binfmt_misc)"
  local tool
  for tool in qemu-aarch64-static debootstrap update-binfmts unshare chroot; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (apt-get install qemu-user-static debootstrap binfmt-support)"
  done
}

# The kernel runs aarch64 ELF files through QEMU only once binfmt_misc has the entry. The
# F flag makes the kernel open the interpreter when it is registered, so it need not exist
# inside the root; without it every exec in the chroot would fail.
enable_binfmt() {
  local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || skip "binfmt_misc cannot be mounted (a container without the privilege)"
  fi
  [ -e "$entry" ] || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
    || skip "update-binfmts cannot register qemu-aarch64"
  grep -q '^enabled' "$entry" || skip "the qemu-aarch64 binfmt entry is disabled"
  grep -Eq '^flags: .*F' "$entry" || skip "the qemu-aarch64 binfmt entry lacks the F flag, so a chroot cannot run it"
}

# The first Debian archive this machine's apt uses (not the security one), else Debian's CDN.
debian_mirror() {
  {
    grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
    grep -hsE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
  } | grep -E '/debian/?$' | head -n 1 || true
}

build() {
  local dir=$1
  [ "$(realpath -m "$dir")" != / ] || { echo "refusing to build over /" >&2; exit 2; }
  need_tools
  enable_binfmt
  local recipe="debootstrap --arch=arm64 --variant=minbase --include=$PACKAGES $SUITE"
  if [ -f "$dir/$STAMP" ] && [ "$(cat "$dir/$STAMP")" = "$recipe" ]; then
    return 0
  fi
  local mirror
  mirror=$(debian_mirror)
  mirror=${mirror:-http://deb.debian.org/debian}
  python3 - "$mirror/dists/$SUITE/Release" 2>/dev/null <<'EOF' || skip "the Debian mirror $mirror does not answer"
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=30).read(1)
EOF
  # Built beside DIR and renamed into place, so an interrupted build never looks finished.
  rm -rf "$dir" "$dir.new"
  mkdir -p "$(dirname "$dir")"
  # 4.5-6 min and ~300 MB on a 2-core x86 machine (measured): mostly the mirror and each
  # package's maintainer scripts under emulation.
  debootstrap --arch=arm64 --variant=minbase --include=$PACKAGES $SUITE "$dir.new" "$mirror" >"$dir.log" 2>&1 \
    || { tail -n 20 "$dir.log" >&2; echo "debootstrap failed (log: $dir.log)" >&2; exit 1; }
  echo "$recipe" >"$dir.new/$STAMP"
  mv "$dir.new" "$dir"
}

# /proc/cpuinfo as the Pi shows it, one entry per host CPU (the CPU list in /sys is the
# host's). QEMU 7.2 passes the host's x86 /proc/cpuinfo through, and onnxruntime's cpuinfo,
# finding no ARM processor in it beside a CPU list in /sys, segfaults on import (measured).
# The ISA features the kernels choose by come from AT_HWCAP, which QEMU sets from -cpu.
pi_cpuinfo() {
  local part variant revision features model n i
  case "$1" in
    cortex-a72) part=0xd08 variant=0x0 revision=3 model="Raspberry Pi 4 Model B Rev 1.5"
                features="fp asimd evtstrm crc32 cpuid" ;;
    cortex-a76) part=0xd0b variant=0x4 revision=1 model="Raspberry Pi 5 Model B Rev 1.0"
                features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    *) echo "CPU must be cortex-a72 (Pi 4) or cortex-a76 (Pi 5), not $1" >&2; exit 2 ;;
  esac
  n=$(nproc --all)
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
    printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %d\n\n' "$variant" "$part" "$revision"
  done
  printf 'Model\t\t: %s\n' "$model"
}

# CMD inside DIR as the device would run it: a clean environment (none of the host's pip
# or Python settings), QEMU_CPU picking the emulated core for every process, and /proc
# (with the Pi's cpuinfo), /sys and /dev mounted in a private mount namespace that ends
# with the command, so no mount outlives it. onnxruntime reads the CPU list from /sys.
run() {
  local dir=$1 cpu=$2
  shift 2
  need_tools
  enable_binfmt
  [ -f "$dir/$STAMP" ] || { echo "$dir is not a built root (tests/arm_root.sh build $dir)" >&2; exit 1; }
  mkdir -p "$dir/run/edgekit"
  pi_cpuinfo "$cpu" >"$dir/run/edgekit/cpuinfo-$cpu"
  local chroot
  chroot=$(command -v chroot)  # env -i's PATH below is the root's, without /usr/sbin
  unshare --mount --propagation private -- /bin/sh -c '
    dir=$1 cpu=$2; shift 2
    mount -t proc proc "$dir/proc" && mount --bind "$dir/run/edgekit/cpuinfo-$cpu" "$dir/proc/cpuinfo" \
      && mount --rbind /sys "$dir/sys" && mount --rbind /dev "$dir/dev" || exit 1
    exec "$@"' sh "$dir" "$cpu" \
    env -i QEMU_CPU="$cpu" PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    "$chroot" "$dir" "$@"
}

install_venv() {
  local dir=$1 wheelhouse=$2
  rm -rf "${dir:?}$VENV" "${dir:?}$WHEELS"
  mkdir -p "$dir$WHEELS"
  cp "$wheelhouse"/*.whl "$dir$WHEELS/"
  # The Pi 4's core: pip and the wheels' install must work on the oldest target too.
  run "$dir" cortex-a72 python3 -m venv "$VENV"
  run "$dir" cortex-a72 "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" gemma-edgekit
}

case "${1:-}" in
  build) [ $# = 2 ] || { echo "usage: $0 build DIR" >&2; exit 2; }; build "$2" ;;
  install) [ $# = 3 ] || { echo "usage: $0 install DIR WHEELHOUSE" >&2; exit 2; }; install_venv "$2" "$3" ;;
  run) [ $# -ge 4 ] || { echo "usage: $0 run DIR CPU CMD..." >&2; exit 2; }; run "$2" "$3" "${@:4}" ;;
  *) echo "usage: $0 build DIR | install DIR WHEELHOUSE | run DIR CPU CMD..." >&2; exit 2 ;;
esac
