#!/bin/sh
# Stage 2 of the test VM: PID 1 in the assembled root (the host's userland, read-only under a tmpfs
# overlay; see tests/vm/init). Sets up what a lab needs, loads the modules in tests/vm/modules, runs
# pytest from the checkout's .venv with the arguments in /kubenet-vm/run.env, writes pytest's exit code
# to /kubenet-vm/rc and powers off. Whatever labs the tests build live and die inside this VM.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
LANG=C.UTF-8
export PATH HOME LANG
run=/kubenet-vm

stop() {
  sync
  # From PID 1, without init: the kernel powers the machine off and qemu exits.
  busybox poweroff -f 2>/dev/null || echo o > /proc/sysrq-trigger
  sleep 10
}

die() {
  echo "kubenet-vm: $*"
  stop
}

. "$run/run.env"
[ -x "$KVM_CHECKOUT/.venv/bin/python" ] || die "$KVM_CHECKOUT/.venv/bin/python missing: run ./install.sh --test on the host"

# Fresh, guest-only copies of what is per-boot on a real machine (/run and /tmp: stage 1, under the
# checkout).
mkdir -p /run/lock /run/netns
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || true
hostname kubenet-vm
ip link set lo up
dmesg -n 1  # kernel messages would interleave with pytest's output on the console

# The kernel's modules, from the runner's cache (on the host root) at the path modprobe expects.
mkdir -p "/lib/modules/$KVM_KVER"
mount --bind "$KVM_MODULES" "/lib/modules/$KVM_KVER" || die "cannot bind $KVM_MODULES"
list=${KUBENET_VM_MODULES:-$KVM_CHECKOUT/tests/vm/modules}  # another list: to find what a lab needs
modules=$(sed 's/#.*//' "$list")
# shellcheck disable=SC2086  # one word per module
modprobe -a $modules || die "modprobe failed ($list)"

venv="$KVM_CHECKOUT/.venv"  # read-only (stage 1); the rest of the checkout is read-write
cd "$KVM_CHECKOUT" || die "no checkout at $KVM_CHECKOUT"
echo "kubenet-vm: kernel $(uname -r), $(nproc) CPUs, up $(cut -d' ' -f1 /proc/uptime) s; pytest $*"
# pytest gets SIGINT shortly before the runner would kill the VM, so that it still prints what failed
# so far (timeout(1) then exits 124, which the runner reports as the timeout). PID 1 (this shell) reaps
# the processes labs leave behind while it waits.
up=$(cut -d. -f1 /proc/uptime)
budget=$((KVM_TIMEOUT - up - 45))
[ "$budget" -gt 0 ] || budget=1
timeout -s INT -k 20 "$budget" "$venv/bin/python" -m pytest "$@"
rc=$?
# Killed 20 s after the SIGINT (137), pytest has timed out all the same.
[ "$rc" -eq 137 ] && [ "$(cut -d. -f1 /proc/uptime)" -ge $((up + budget)) ] && rc=124
echo "$rc" > "$run/rc"
stop
