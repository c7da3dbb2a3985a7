"""Provisioning: the playbooks as Ansible itself reads them, and real ansible-runner runs.

Only roles that are cheap once installed are run for real (common, mongodb's local gate); the
rest are checked by Ansible's own parsers and apt's own package index.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sysconfig
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from gaia import provision

ANSIBLE_BIN = Path(sysconfig.get_path("scripts"))
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="apt installs need root")


def _ansible(tool: str, *args: str) -> str:
    """Run one of the venv's Ansible command-line tools from the playbooks directory."""
    done = subprocess.run(
        [str(ANSIBLE_BIN / tool), *args],
        cwd=provision.PLAYBOOKS,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def _inventory(path: Path) -> dict[str, Any]:
    """The inventory as Ansible resolves it: groups, hosts and their variables."""
    listed: dict[str, Any] = json.loads(_ansible("ansible-inventory", "-i", str(path), "--list"))
    return listed


def _local_inventory_with(tmp_path: Path, **host_vars: Any) -> Path:
    """The local inventory with extra variables for localhost, written under tmp_path."""
    inventory = yaml.safe_load(provision.LOCAL_INVENTORY.read_text())
    inventory["all"]["hosts"]["localhost"].update(host_vars)
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def _playbook_roles() -> list[dict[str, Any]]:
    """The role entries of provision.yml's single play."""
    (play,) = yaml.safe_load(provision.PLAYBOOK.read_text())
    roles: list[dict[str, Any]] = play["roles"]
    return roles


def test_local_inventory_is_this_machine_over_a_local_connection() -> None:
    listed = _inventory(provision.LOCAL_INVENTORY)
    assert listed["all"]["children"] == ["ungrouped"]
    assert listed["ungrouped"]["hosts"] == ["localhost"]
    localhost = listed["_meta"]["hostvars"]["localhost"]
    assert localhost["ansible_connection"] == "local"
    assert localhost["ansible_python_interpreter"] == "{{ ansible_playbook_python }}"


def test_cloudlab_inventory_has_replicas_clients_and_rdma_settings() -> None:
    path = provision.PLAYBOOKS / "inventory" / "cloudlab.yml"
    listed = _inventory(path)
    replicas, clients = listed["replicas"]["hosts"], listed["clients"]["hosts"]
    assert len(replicas) >= 3
    assert clients
    assert not set(replicas) & set(clients)
    assert all(host.endswith(".example.cloudlab.us") for host in replicas + clients)
    node = listed["_meta"]["hostvars"][replicas[0]]
    assert node["gaia_rdma_hardware"] is True
    assert isinstance(node["gaia_rdma_device"], str)
    assert isinstance(node["gaia_rdma_gid_index"], int)


def test_every_playbook_role_has_a_directory_a_tag_and_a_proof() -> None:
    entries = _playbook_roles()
    names = tuple(entry["role"] for entry in entries)
    assert names == provision.ROLES == tuple(provision.required_commands())
    for entry in entries:
        assert entry["tags"] == [entry["role"]], "`invoke setup --only ROLE` selects by tag"
        assert (provision.PLAYBOOKS / "roles" / entry["role"] / "tasks" / "main.yml").is_file()
    assert set(provision.TEST_ROLES) <= set(provision.LOCAL_ROLES) <= set(provision.ROLES)


def test_a_tag_selects_only_its_role() -> None:
    listing = _ansible(
        "ansible-playbook", "-i", str(provision.LOCAL_INVENTORY), "provision.yml",
        "--list-tasks", "--tags", "redis,etcd",
    )
    tasks = [line for line in listing.splitlines() if "TAGS: [" in line and "play #" not in line]
    assert any("TAGS: [redis]" in line for line in tasks)
    assert any("TAGS: [etcd]" in line for line in tasks)
    assert all(any(tag in line for tag in ("[redis]", "[etcd]", "[always]")) for line in tasks)


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="not a Debian-family machine")
def test_role_packages_are_debian_packages() -> None:
    wanted: set[str] = set()
    for role in provision.ROLES:
        defaults = provision.PLAYBOOKS / "roles" / role / "defaults" / "main.yml"
        wanted.update(yaml.safe_load(defaults.read_text()).get(f"{role}_packages", []))
    assert {"redis-server", "memcached", "zookeeper", "etcd-server"} <= wanted
    shown = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *sorted(wanted)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    found = {line.split(":", 1)[1].strip() for line in shown.stdout.splitlines()
             if line.startswith("Package:")}
    assert found == wanted, shown.stderr


def test_missing_reports_roles_by_their_commands_and_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "bin" / "gaia-test-tool"
    data = tmp_path / "share" / "gaia-test-data"
    monkeypatch.setattr(
        provision,
        "_PROOF",
        MappingProxyType({"by_command": (tool.name,), "by_path": (str(data),)}),
    )
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    assert provision.missing(["by_command", "by_path"]) == ["by_command", "by_path"]
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    assert provision.missing(["by_command"]) == ["by_command"], "not executable: not a command"
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    data.parent.mkdir()
    data.touch()
    assert provision.missing(["by_command", "by_path"]) == []


@pytest.mark.skipif(shutil.which("mongod") is not None, reason="this host has mongod")
def test_mongodb_is_missing_here_and_not_a_local_default() -> None:
    assert provision.missing(["mongodb"]) == ["mongodb"]
    assert "mongodb" not in provision.LOCAL_ROLES


def test_unknown_roles_are_refused_before_anything_runs() -> None:
    with pytest.raises(provision.ProvisionError, match=r"unknown role.*nosuch"):
        provision.provision(["redis", "nosuch"])
    with pytest.raises(provision.ProvisionError, match="unknown role"):
        provision.missing(["nosuch"])


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(400)
@as_root
def test_common_role_installs_and_a_second_run_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the venv on PATH, as `./invoke` runs: provision() must find ansible-playbook.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    provision.provision(["common"], quiet=True)
    assert provision.missing(["common"]) == []
    again = provision.provision(["common"], quiet=True)
    assert again.roles == ("common",)
    assert again.changed == 0
    assert again.seconds < 120


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(240)
@as_root
def test_mongodb_role_explains_by_default_and_fails_clearly_when_required(
    tmp_path: Path,
) -> None:
    assert provision.provision(["mongodb"], quiet=True).changed == 0
    if shutil.which("mongod") is not None:
        pytest.skip("this host has mongod: the role's failure path cannot be shown here")
    required = _local_inventory_with(tmp_path, gaia_install_mongodb=True)
    with pytest.raises(provision.ProvisionError, match=r"does not package\s+MongoDB"):
        provision.provision(["mongodb"], inventory=required, quiet=True)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_failing_task_is_reported_with_its_name_and_message(tmp_path: Path) -> None:
    broken = _local_inventory_with(tmp_path, ansible_python_interpreter="/nonexistent/python3")
    with pytest.raises(provision.ProvisionError) as error:
        provision.provision(["common"], inventory=broken, quiet=True)
    message = str(error.value)
    assert "localhost: task 'Gathering Facts' failed" in message
    assert "/nonexistent/python3" in message
    assert "full log:" in message


def test_system_pyverbs_is_linked_into_a_site_directory_once(tmp_path: Path) -> None:
    system = tmp_path / "dist-packages" / "pyverbs"
    system.mkdir(parents=True)
    site = tmp_path / "site-packages"
    site.mkdir()
    assert provision.link_system_pyverbs(site, system) is None, "no extension modules yet"
    (system / f"device{sysconfig.get_config_var('EXT_SUFFIX')}").touch()
    pth = provision.link_system_pyverbs(site, system)
    assert pth == site / "gaia-system-pyverbs.pth"
    linked = site / pth.read_text().strip() / "pyverbs"
    assert linked.resolve() == system.resolve()
    before = sorted(p.name for p in site.rglob("*"))
    assert provision.link_system_pyverbs(site, system) == pth
    assert sorted(p.name for p in site.rglob("*")) == before
    assert provision.link_system_pyverbs(site, tmp_path / "absent") is None
