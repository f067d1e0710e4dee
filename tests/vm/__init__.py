"""The test VM: the tests this machine's kernel cannot run (IPVS, IP-in-IP, dummy devices, netem), run
for real under Debian's stock kernel in qemu.

    tests/vm/run -m fullkernel -q       # the kernel-gated subset (CI runs this after the main suite)
    tests/vm/run tests/integration/test_seed.py -q
    tests/vm/run --vm-help

What it is: Debian's `linux-image-amd64` kernel (fetched with `apt-get download`, unpacked, never
installed), booted by qemu in software emulation with a small initramfs built here from busybox-static
and the virtio, 9p and overlay modules. The guest's root is this machine's own root filesystem, shared
read-only over 9p under a tmpfs overlay, so the guest has exactly the host's tools, Python and .venv,
and nothing it writes reaches the host except in the checkout (shared read-write, so pytest's cache and
results land there; .venv is mounted read-only inside). The VM has no network device: no test can reach
anything but the labs it builds inside the VM, and those die with it.

Pieces:
- run        the command (Debian's python3; runs runner.main)
- runner.py  fetch and cache the kernel, build the initramfs, boot, stream the console, enforce the
             timeout, return the guest's pytest exit code
- init       stage 1, PID 1 of the initramfs: mount the overlay root, the checkout, the run folder
- guest.sh   stage 2, PID 1 in that root: /run, /tmp, /dev/pts, loopback, modules, pytest, power off
- modules    what stage 2 loads with one `modprobe -a`

Selecting the VM subset: mark a test `@pytest.mark.fullkernel` (registered in setup.cfg) and gate it on
a probe of the feature with `require_kernel(ok, reason)` below: on a kernel without the feature (like
this machine's) it skips with the reason, inside the VM it fails, so the VM run can never pass by
skipping.
"""
from __future__ import annotations

import os

# Set by tests/vm/guest.sh for everything it runs.
IN_TEST_VM = os.environ.get("KUBENET_TEST_VM") == "1"


def require_kernel(ok: bool, reason: str) -> None:
    """Gate a test on a kernel feature: skip with `reason` on a kernel without it, fail in the test VM,
    whose kernel must have it."""
    import pytest

    if ok:
        return
    if IN_TEST_VM:
        pytest.fail(f"the test VM's kernel should have it: {reason}")
    pytest.skip(reason)
