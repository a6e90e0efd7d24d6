"""The environment is the locked one: every package requirements.lock pins is installed at exactly that version,
so a result made here can be made again (`make lock` re-pins; CI installs from the lock)."""

import re
from importlib import metadata

from chai.paths import ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)")


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_lock_pins_the_project_dependencies():
    locked = pins()
    for name in ("transformers", "lm-eval", "hydra-core", "omegaconf", "accelerate", "pytest"):
        assert name in locked, f"{name} is not pinned in requirements.lock"
    assert "torch" not in locked  # installed first by scripts/install.sh, as the build that fits the machine


def test_installed_versions_equal_the_lock():
    wrong = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed packages differ from requirements.lock (locked, installed): {wrong}; run make install"
