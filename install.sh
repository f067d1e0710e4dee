#!/usr/bin/env bash
# Sets up everything kubenet-lab needs on a Debian or Ubuntu machine, as root, idempotently:
# the Debian packages (Mininet for mnexec and its Python module, iproute2, FRR, ...) and a Python
# virtual environment in .venv with the project installed in it. Used by the README, .ci/run and the
# Vagrantfile alike.
#
# Why a venv of Debian's own python3, seeing Mininet through a .pth file: Mininet's Python module only
# comes with Debian's `mininet` package (PyPI has a 2020 pre-release without mnexec). A venv made with
# --system-site-packages would also expose every other Debian Python package and make the environment
# depend on whatever the machine has; a .pth pointing at a folder that holds nothing but a link to the
# `mininet` package exposes exactly that one module.
#
# ./install.sh          what labs need
# ./install.sh --test   also what the test suite needs (vagrant, qemu and busybox for the test VM)
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo ./install.sh): it installs Debian packages" >&2
  exit 3
fi

packages=(
  mininet bridge-utils net-tools iproute2 iputils-ping procps psmisc coreutils util-linux
  python3 python3-venv python3-pip
  iptables nftables conntrack ipset ipvsadm tcpdump iperf3 curl frr ethtool dnsmasq-base nginx-light bind9-dnsutils
  graphviz
  clang libbpf-dev bpftool  # the cilium profile: BPF C compiled with clang, loaded through libbpf
  musl-tools nodejs gcc libc6-dev
)
# --test: vagrant (to validate the Vagrantfile) and the test VM's pieces (tests/vm: qemu in software
# emulation, busybox for its initramfs, kmod for depmod and the guest's modprobe; the kernel itself is
# fetched by tests/vm/run with apt-get download on first use, into /var/cache/kubenet-lab/vm); Debian's
# chromium, its driver and a font for the browser tests of `lab ui` (Selenium drives them: no browser
# download).
[ "$with_tests" = 1 ] && packages+=(vagrant qemu-system-x86 busybox-static kmod containernetworking-plugins
                                   chromium chromium-driver fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # The lab runs FRR, nginx and dnsmasq inside its own namespaces; their packaged services must not
  # start in the machine's own namespace on install (policy-rc.d refuses every service start).
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  # No recommends: Mininet recommends Open vSwitch, which this project does not use (LinuxBridge).
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The packaged services are not used: each lab node runs its own zebra/bgpd, nginx, dnsmasq.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  for unit in frr nginx; do
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
fi

python=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mnsrc=$("$python" -c 'import mininet, os; print(os.path.dirname(mininet.__file__))')
mkdir -p .venv/mininet-only
ln -sfn "$mnsrc" .venv/mininet-only/mininet
echo "$here/.venv/mininet-only" > "$site/debian-mininet.pth"

.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c 'import mininet.net, pyroute2, yaml, pydantic, starlette, uvicorn'
# The project's own bytecode, written now: pip compiles what it installs, but an editable install leaves
# the sources here, and a shell with PYTHONDONTWRITEBYTECODE set (common in containers) would otherwise
# compile every module on every `lab` command (one-pod `lab apply`: 0.27 s with bytecode, 0.80 s without).
.venv/bin/python -m compileall -q -j 0 -x '/(\.venv|\.git|\.vagrant|build)/' "$here"
# the cilium profile's BPF objects, compiled once into the cache keyed by their sources' hash
.venv/bin/python -c 'from cilium import build; build.compile_all()' 
# The DNS clients `lab dns-count --resolver` and `lab bench dns` run in pods: musl-gcc (musl-tools) and gcc
# build images/dnsclient/dnsclient.c once into /var/cache/kubenet-lab/dnsclient/<source hash>/ (rebuilt
# only when the source changes; also built on first use).
.venv/bin/python -c 'from images import dnsclient; print("install.sh: DNS clients", dnsclient.binary("musl"), dnsclient.binary("glibc"))'
echo "install.sh: ready. Run labs with $here/.venv/bin/lab (or: source .venv/bin/activate)"
