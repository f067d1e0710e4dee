"""The test VM's runner (tests/vm), checked without booting anything: the guest scripts parse, the
initramfs archive is what the kernel reads, pytest's arguments survive the trip through sh, the VM gets no
network, and the timeout kills the emulator. The module list is resolved against the fetched kernel when
one is cached (the VM stage of .ci/run fetches it)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.vm import runner


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int]]:
    """name -> (mode, data, rdev) from a newc cpio archive: a reader written from the format's description."""
    entries, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + i * 8:pos + 14 + i * 8], 16) for i in range(13)]
        mode, size, rmajor, rminor, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert not data[pos:].strip(b"\0")
            return entries
        entries[name] = (mode, data[pos:pos + size], os.makedev(rmajor, rminor))
        pos += size
        pos += -pos % 4


@pytest.mark.parametrize("script,shell", [("init", "busybox"), ("guest.sh", "sh")])
def test_guest_scripts_are_valid_sh(script: str, shell: str) -> None:
    require_tool(shell)
    argv = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
    proc = subprocess.run([*argv, str(runner.VM_DIR / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_cpio_archive_reads_back_with_a_console_device_and_symlinks() -> None:
    entries = [("bin", stat.S_IFDIR | 0o755, b"", 0), ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0),
               ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)), ("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n", 0)]
    back = parse_newc(runner.cpio_newc(entries))
    assert back == {name: (mode, data, rdev) for name, mode, data, rdev in entries}


def test_pytest_arguments_and_ci_survive_sh_quoting(tmp_path: Path) -> None:
    args = ["-m", "fullkernel and not slow", "-k", "it's $(reboot) `x`", "--", "a b", ""]
    prepared = runner.Prepared(runner.Kernel("6.1.0-99-amd64", tmp_path), tmp_path / "initramfs.cpio")
    env = {"CI": "true", "KUBENET_X": "1", "HOME": "/home/someone", "KUBENET_TEST_VM": "0"}
    (tmp_path / "run.env").write_text(runner.run_env(prepared, args, env, columns=100))
    shown = subprocess.run(["sh", "-c", '. "$0"; printf "%s\\0" "$@"; env', str(tmp_path / "run.env")],
                           capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    argv, _, environ = shown.rpartition("\0")
    assert argv.split("\0") == args
    assert {"CI=true", "KUBENET_X=1", "KUBENET_TEST_VM=1", "COLUMNS=100"} <= set(environ.splitlines())
    assert "HOME=/home/someone" not in environ


def test_the_vm_has_no_network_and_only_the_checkout_and_run_folder_writable(tmp_path: Path) -> None:
    prepared = runner.Prepared(runner.Kernel("6.1.0-99-amd64", tmp_path), tmp_path / "initramfs.cpio")
    argv = runner.qemu_argv(prepared, tmp_path, 2048)
    assert argv[argv.index("-nic") + 1] == "none"
    assert not {"-net", "-netdev", "-device"} & set(argv)
    shares = [argv[i + 1] for i, a in enumerate(argv) if a == "-virtfs"]
    assert [s for s in shares if "readonly=on" not in s] == [
        f"local,path={runner.REPO},mount_tag=checkout,security_model=passthrough,multidevs=remap",
        f"local,path={tmp_path},mount_tag=run,security_model=passthrough,multidevs=remap"]
    assert "local,path=/,mount_tag=hostroot," in shares[0]


def fake_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str, timeout: float = 30) -> int:
    """runner.boot with a shell script in qemu's place (it gets the run folder as $1)."""
    monkeypatch.setattr(runner, "qemu_argv", lambda prepared, run_dir, memory: ["sh", "-c", script, "qemu", str(run_dir)])
    prepared = runner.Prepared(runner.Kernel("6.1.0-99-amd64", tmp_path), tmp_path / "initramfs.cpio")
    return runner.boot(prepared, ["-q"], timeout, 2048)


def test_the_guests_exit_code_is_the_runners(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert fake_boot(monkeypatch, tmp_path, 'printf "guest says hi\\r\\n"; grep -q "set -- -q" "$1/run.env" && echo 3 > "$1/rc"') == 3
    assert b"guest says hi\n" in capfdbinary.readouterr().out


def test_a_guest_without_a_result_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(runner.VmError, match="reported no pytest result") as err:
        fake_boot(monkeypatch, tmp_path, "exit 0")
    assert err.value.code == runner.EXIT_NO_RESULT


def test_the_timeout_kills_the_emulator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(runner.VmError, match="timed out after .* s; qemu killed") as err:
        fake_boot(monkeypatch, tmp_path, f'echo $$ > {pid_file}; exec sleep 60', timeout=0.3)
    assert err.value.code == runner.EXIT_TIMEOUT
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_runner_options_come_before_pytests(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--vm-help"]) == 0
    assert "tests/vm/run -m fullkernel -q" in capsys.readouterr().out
    assert runner.main(["--vm-timeout=soon"]) == 2


def test_busybox_is_static() -> None:
    require_tool("busybox")
    assert runner.busybox().exists()
    assert not runner.is_static(Path(sys.executable).resolve())  # a dynamically linked program


def test_the_module_lists_resolve_against_the_fetched_kernel() -> None:
    require_tool("modprobe")
    cached = runner.cached_kernels(runner.cache_dir())
    if not cached:
        pytest.skip(f"no kernel fetched into {runner.cache_dir()} yet (tests/vm/run --vm-prepare fetches it)")
    kernel = cached[-1]
    boot = runner.show_depends(kernel, runner.BOOT_MODULES)
    assert [path.name for path, _ in boot][-1] == "overlay.ko" and len(boot) == len({p for p, _ in boot})
    assert all(path.is_file() for path, _ in boot)
    loaded = {path.name.removesuffix(".ko") for path, _ in runner.show_depends(kernel, runner.module_names())}
    assert {"ip_vs", "dummy", "ipip", "sch_netem", "br_netfilter"} <= loaded


def test_run_folders_of_killed_runners_are_removed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f"kubenet-vm-{dead}-abc").mkdir()
    (tmp_path / f"kubenet-vm-{os.getpid()}-def").mkdir()
    new = runner.run_folder()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"kubenet-vm-{os.getpid()}-def", new.name])
