"""The Soft-RoCE lane's host side, without booting anything: recipe and cache, the host facts
it reads (kernel, mirror, module lists), the guest's init script, the QEMU command line, the
exit-status protocol and the tree image. `invoke test-rdma` runs the lane itself."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gaia.softroce import image, lane

RECIPE = image.Recipe(kernel="6.1.0-56-amd64", kernel_digest="ab" * 32, mirror="http://m/debian")


def test_the_recipe_key_changes_with_every_input_and_only_then() -> None:
    assert RECIPE.key == dataclasses.replace(RECIPE).key
    changed = [
        dataclasses.replace(RECIPE, kernel_digest="cd" * 32),
        dataclasses.replace(RECIPE, mirror="http://other/debian"),
        dataclasses.replace(RECIPE, packages=(*RECIPE.packages, "procps")),
        dataclasses.replace(RECIPE, init=RECIPE.init + "\n"),
        dataclasses.replace(RECIPE, version=RECIPE.version + 1),
    ]
    assert len({RECIPE.key, *(r.key for r in changed)}) == 1 + len(changed)


def test_a_cached_image_is_reused_and_old_ones_are_pruned(tmp_path: Path) -> None:
    for n, old in enumerate(["old1", "old2"]):
        (tmp_path / old).mkdir()
        (tmp_path / old / "recipe.json").write_text("{}")
        os.utime(tmp_path / old, (n, n))
    (tmp_path / RECIPE.key).mkdir()
    (tmp_path / RECIPE.key / "recipe.json").write_text("{}")
    said: list[str] = []
    got = image.ensure_image(RECIPE, tmp_path, say=said.append)
    assert (got.directory, got.built, said) == (tmp_path / RECIPE.key, False, [])
    assert got.kernel.parent == got.initrd.parent == got.root.parent == got.directory
    image._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        ["old2", RECIPE.key]
    )


def test_the_newest_kernel_with_rdma_rxe_and_a_vmlinuz_is_chosen(tmp_path: Path) -> None:
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version, rxe, vmlinuz in [
        ("6.1.0-9-amd64", True, True),
        ("6.1.0-56-amd64", True, True),
        ("6.1.0-60-amd64", True, False),  # modules left behind by a removed kernel
        ("6.18.0-fc", False, True),  # the running kernel: no rxe module
    ]:
        (modules / version).mkdir(parents=True)
        if rxe:
            (modules / version / image._RXE).parent.mkdir(parents=True)
            (modules / version / image._RXE).touch()
        if vmlinuz:
            (boot / f"vmlinuz-{version}").touch()
    assert image.find_kernel(boot, modules) == "6.1.0-56-amd64"
    with pytest.raises(image.ImageError, match="invoke setup --only softroce"):
        image.find_kernel(boot, tmp_path / "nothing")


def test_the_mirror_comes_from_the_hosts_sources(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "other.list").write_text(
        "deb https://packages.example.com/apt cloud-sdk-bookworm main\n"
    )
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert image.host_mirror("bookworm", apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64] http://oneline.example/debian bookworm main\n"
    )
    assert image.host_mirror("bookworm", apt) == "http://oneline.example/debian"
    assert image.host_mirror("trixie", apt) == image.DEFAULT_MIRROR


def test_module_files_come_from_modprobe_show_depends() -> None:
    listing = [
        "insmod /lib/modules/V/kernel/net/ipv4/udp_tunnel.ko ",
        "builtin crc32c",
        "insmod /lib/modules/V/kernel/drivers/net/dummy.ko numdummies=0",
    ]
    assert image._module_files(listing) == [
        "/lib/modules/V/kernel/net/ipv4/udp_tunnel.ko",
        "/lib/modules/V/kernel/drivers/net/dummy.ko",
    ]


def test_the_guest_init_is_valid_sh_and_reports_through_the_exit_port() -> None:
    subprocess.run(["sh", "-n"], input=image.INIT_SCRIPT, text=True, check=True, timeout=10)
    assert "seek=244" in image.INIT_SCRIPT  # 0xf4, the isa-debug-exit iobase below
    assert f"finish {lane.SETUP_FAILED}" in image.INIT_SCRIPT
    assert lane._MARKER in image.INIT_SCRIPT


def test_qemu_boots_the_cached_root_read_only_with_the_tree_as_second_disk(
    tmp_path: Path,
) -> None:
    built = image.Image(tmp_path / "img", built=False, seconds=0)
    argv = lane.qemu_command(built, tmp_path / "tree.img", lane.GuestSpec(cpus=2))
    line = " ".join(argv)
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "tcg,thread=multi"]
    assert f"file={built.root},format=raw,if=virtio,snapshot=on" in argv
    assert line.index(str(built.root)) < line.index(str(tmp_path / "tree.img"))
    assert "isa-debug-exit,iobase=0xf4,iosize=0x04" in argv
    assert argv[argv.index("-nic") + 1] == "none"  # no network: loopback and rxe0 only
    assert "-no-reboot" in argv  # a guest panic ends QEMU (exit status 0: no result)
    assert "init=/gaia-init panic=-1" in argv[-1]


@pytest.mark.parametrize(
    ("qemu_exit", "reported", "status", "why"),
    [
        (1, 0, 0, ""),
        (3, 1, 1, "tests failed"),
        (11, 5, 5, "collected no tests"),
        (2 * lane.SETUP_FAILED + 1, None, lane.SETUP_FAILED, "rxe0"),
        (1, None, None, "never reported"),  # QEMU's own error exit looks like status 0
        (1, 3, None, "reported 3"),
        (0, None, None, "without reporting a status"),
        (2, None, None, "QEMU failed"),
    ],
)
def test_the_exit_status_protocol(
    qemu_exit: int, reported: int | None, status: int | None, why: str
) -> None:
    got_status, got_why = lane.decode_exit(qemu_exit, reported)
    assert got_status == status
    assert why in got_why if why else got_why == ""


def test_the_reported_status_is_run_shs_last_report_on_the_console() -> None:
    console = [f"{lane.REPORT}1", "[  9.1] rxe: a kernel line", f"{lane.REPORT}0", "reboot"]
    assert lane.reported_status(console) == 0
    assert lane.reported_status([f"{lane.REPORT}x", "login:"]) is None


def test_k_narrows_the_guest_selection_without_widening_it() -> None:
    assert lane.selection() == lane.GUEST_TESTS
    narrowed = lane.selection("wrong_rkey")
    assert narrowed[:-2] == lane.GUEST_TESTS[:-2]
    assert narrowed[-2:] == ("-k", "rdma and (wrong_rkey)")
    command = lane.guest_command(narrowed)
    assert command[:3] == ["python3", "-m", "pytest"]
    assert f"--basetemp={lane.GUEST_BASETEMP}" in command


@pytest.mark.slow
def test_whether_k_selects_any_rdma_test_is_asked_of_pytest_here() -> None:
    """So that invoke test -k does not boot a guest with nothing to run."""
    root = Path(__file__).resolve().parent.parent
    assert lane.selects_any(root, "wrong_rkey")
    assert not lane.selects_any(root, "test_storage")  # a host test: no rdma test matches


@pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs e2fsprogs")
def test_the_tree_image_holds_the_sources_and_the_run_script(tmp_path: Path) -> None:
    source = tmp_path / "repo"
    (source / "gaia" / "__pycache__").mkdir(parents=True)
    (source / "gaia" / "__init__.py").write_text("# gaia\n")
    (source / "gaia" / "__pycache__" / "x.pyc").write_bytes(b"stale")
    (source / "tests").mkdir()
    (source / "pyproject.toml").write_text("[project]\n")
    tree = tmp_path / "tree.img"
    command = ["sh", "-c", f'test "${lane.LANE_ENV}" = {lane.LANE_VALUE} && exit 3', "a and (b)"]
    lane.make_tree_image(source, command, tree)

    def debugfs(request: str) -> str:
        done = subprocess.run(
            ["debugfs", "-R", request, str(tree)],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        return done.stdout

    assert debugfs("cat /gaia/__init__.py") == "# gaia\n"
    run_sh = debugfs("cat /.lane/run.sh")
    assert "'a and (b)'" in run_sh
    ran = subprocess.run(
        ["sh", "-c", run_sh], capture_output=True, text=True, timeout=30, check=False
    )
    assert ran.returncode == 3  # the command saw the lane's variable, and its status came out
    assert lane.reported_status(ran.stdout.splitlines()) == 3
    assert "__pycache__" not in debugfs("ls /gaia")
