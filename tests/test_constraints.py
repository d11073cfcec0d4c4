"""constraints.txt, the versions the suite passed with: every direct dependency pinned inside its
pyproject range, every install path installing through it, and this environment being it."""

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = (ROOT / "constraints.txt").read_text()


def pins(section: str = "") -> dict[str, str]:
    """name -> version of the lock's pins (section 'pins': what make test installs)."""
    text = LOCK.split("# ---- ")
    chosen = [part for part in text if part.startswith(section)] if section else text
    found = {}
    for part in chosen:
        for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", part, re.M):
            found[canonicalize_name(name)] = version
    return found


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["gpu"]]


def test_every_direct_dependency_is_pinned_inside_its_range():
    locked = pins()
    for requirement in direct_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in constraints.txt (run make lock)"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name}=={locked[name]} outside pyproject's {requirement}")


@pytest.mark.skipif(bool(os.environ.get("LORAFLOW_LATEST")),
                    reason="make test-latest runs on the newest versions, not the lock's")
def test_this_environment_has_the_locked_versions():
    """make test installed through the lock: a package at another version here means an install
    path that bypassed it (or a lock edited by hand without make lock)."""
    off = {}
    for name, version in pins("pins").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            off[name] = (version, "not installed")
            continue
        if Version(installed).public != Version(version).public:  # 2.13.0+cpu is 2.13.0
            off[name] = (version, installed)
    assert off == {}, f"locked vs installed: {off}"


def test_every_install_path_installs_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"^\t\$\(BIN\)/pip install (.*)$", makefile, re.M)
    assert installs and all("-c constraints.txt" in line or "==" in line for line in installs)
    assert sum("-c constraints.txt" in line for line in installs) == 2  # torch, then loraflow
    docker = (ROOT / "infra" / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md constraints.txt" in docker
    assert "-c constraints.txt '.[ray]'" in docker and "grep '^torch==' constraints.txt" in docker
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # which builds .venv by the lock
