#!/usr/bin/env bash
# The README's two commands, on a fresh Debian 12 machine, as root:
#
#   ./sandboxd.sh serve [--port N ...]   install what is missing, build the base template, and serve
#                                        the E2B API + sandbox proxy on 127.0.0.1:3000
#   ./sandboxd.sh test  [pytest args]    install what is missing, lint (ruff) and type-check (mypy),
#                                        then run the test suite
#
# Installing is idempotent and fast when nothing is missing: apt only runs for absent packages,
# pip only when pyproject.toml changed since the last install.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"

# runsc: gVisor; debootstrap: the base template; nftables/iproute2: per-sandbox networks;
# tini: PID 1 of every sandbox; busybox-static: the libc-free test template; gcc/libc6-dev: the
# gVisor statx shim; python3-venv: our venv; skopeo/umoci: FROM OCI images in Dockerfile
# templates; qemu-system-x86/qemu-utils/lz4: the microVM runtime (guest kernel, snapshots).
# Tests only: docker-registry, the loopback registry the template tests pull from; dnsmasq-base,
# the DNS server that resolves the test domain for the SDK release matrix (tests/sdk_matrix);
# chromium/chromium-driver, the headless browser the web console tests (tests/console) click through;
# nodejs/npm (from Debian unless a node and npm are already on PATH): the base template's npm is
# fetched with the host's npm client, and the JS SDK releases of the matrix run on it.
# postgresql: the cluster's store; the tests start throwaway servers of it (sandboxd/testing/postgres.py),
# never the system's own cluster.
APT_PACKAGES=(runsc debootstrap nftables iproute2 e2fsprogs tini busybox-static gcc libc6-dev
              python3 python3-venv ca-certificates util-linux procps skopeo umoci
              qemu-system-x86 qemu-utils lz4)
TEST_APT_PACKAGES=(docker-registry dnsmasq-base chromium chromium-driver postgresql)
command -v node >/dev/null && command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "sandboxd needs root (namespaces, mounts, gVisor): run it with sudo" >&2
    exit 1
  fi
}

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing apt packages: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

# gVisor from bookworm-backports (0.0~20240729: the systrap platform, far cheaper system calls
# than bookworm's 2022 build); only runsc is pinned there, everything else stays on bookworm.
RUNSC_MIN_VERSION=0.0~20240729
install_runsc() {
  local have
  have=$(dpkg-query -W -f='${Version}' runsc 2>/dev/null || true)
  if [ -n "$have" ] && dpkg --compare-versions "$have" ge "$RUNSC_MIN_VERSION"; then
    return
  fi
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" != bookworm ]; then
    return  # other releases: their own runsc (sandboxd probes which platform it runs)
  fi
  echo "==> installing runsc >= $RUNSC_MIN_VERSION from bookworm-backports" >&2
  cat > /etc/apt/sources.list.d/sandboxd-backports.sources <<'SRC'
# sandboxd: runsc (gVisor) from bookworm-backports; only runsc is pinned there (preferences.d/sandboxd-runsc)
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat > /etc/apt/preferences.d/sandboxd-runsc <<'PIN'
Package: runsc
Pin: release n=bookworm-backports
Pin-Priority: 990
PIN
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends runsc >&2
}

install_venv() {
  local stamp="$venv/.sandboxd-installed"
  if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating venv $venv" >&2
    python3 -m venv "$venv"
  fi
  if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    echo "==> installing sandboxd and its test dependencies into the venv" >&2
    "$venv/bin/pip" install -q --upgrade pip >&2
    "$venv/bin/pip" install -q -e "$here[test]" >&2
    touch "$stamp"
  fi
}

cmd=${1:-serve}
[ $# -gt 0 ] && shift
case "$cmd" in
  serve)
    need_root; install_apt; install_runsc; install_venv
    exec "$venv/bin/sandboxd" serve "$@"
    ;;
  test)
    need_root; install_apt "${TEST_APT_PACKAGES[@]}"; install_runsc; install_venv
    cd "$here"
    # lint and types first: seconds (both cache), and a finding fails the run like a test would
    "$venv/bin/ruff" check --quiet src tests benchmarks
    "$venv/bin/mypy" --no-error-summary
    exec "$venv/bin/pytest" "$@"
    ;;
  *)
    echo "usage: $0 serve [--host H] [--port P] [--data-dir D] | test [pytest args]" >&2
    exit 2
    ;;
esac
