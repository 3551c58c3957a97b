""".ci/floors.py: the lowest versions pyproject.toml allows, as pip constraints."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "floors.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_floors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


floors = _load()


def _run(pyproject: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--pyproject", str(pyproject), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _pyproject(
    tmp_path: Path, dependencies: str, test: str = "", build: str = '"setuptools>=77.0.1"'
) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(
        f"[build-system]\nrequires = [{build}]\n\n"
        f'[project]\nname = "x"\nversion = "1"\ndependencies = [{dependencies}]\n\n'
        f"[project.optional-dependencies]\ntest = [{test}]\n"
    )
    return path


def test_every_requirement_of_the_real_pyproject_is_pinned_at_its_floor() -> None:
    completed = _run(ROOT / "pyproject.toml")
    assert completed.returncode == 0, completed.stderr
    pins = dict(line.split("==") for line in completed.stdout.splitlines())
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    texts = [*data["build-system"]["requires"], *project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        texts.extend(extra)
    for text in texts:
        floor = floors.floor_of(text, "test")
        assert pins[floor.name] == floor.version, text
    assert {"aiohttp", "prometheus-client", "pyyaml", "cryptography", "bcrypt"} <= set(pins)


def test_a_new_dependency_is_picked_up_with_its_floor(tmp_path: Path) -> None:
    path = _pyproject(
        tmp_path,
        '"aiohttp>=3.9.1,<4", "dnspython~=2.6", "aiosmtplib[uvloop]>=3.0.1",'
        " \"uvloop>=0.19; sys_platform != 'win32'\"",
        '"pytest>=8.1,>=8.2"',
    )
    completed = _run(path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [
        "aiohttp==3.9.1",
        "aiosmtplib==3.0.1",  # constraints take no extras
        "dnspython==2.6",
        "pytest==8.2",  # the higher of two lower bounds is the one pip must honour
        "setuptools==77.0.1",
        'uvloop==0.19 ; sys_platform != "win32"',
    ]
    build = _run(path, "--build")
    assert build.stdout.splitlines() == ["setuptools==77.0.1"]


@pytest.mark.parametrize(
    ("dependencies", "test", "message"),
    [
        ('"types-PyYAML"', "", "'types-PyYAML' has no floor"),
        ('"aiohttp>3.9"', "", "'aiohttp>3.9' has no floor"),
        ('"aiohttp<4"', "", "'aiohttp<4' has no floor"),
        ('"aiohttp>=3.9,!=3.9"', "", "the floor 3.9 is itself excluded"),
        ('"aiohttp==3.*"', "", "a wildcard is not a floor"),
        ('"x @ https://example.invalid/x.whl"', "", "is a URL requirement"),
        ('"bcrypt>=4"', '"bcrypt>=4.1"', "the lower one could never be tested"),
        ('"not a requirement!"', "", "is not a valid requirement"),
    ],
)
def test_floors_that_cannot_be_tested_are_refused(
    tmp_path: Path, dependencies: str, test: str, message: str
) -> None:
    completed = _run(_pyproject(tmp_path, dependencies, test))
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert message in completed.stderr
    assert str(tmp_path / "pyproject.toml") in completed.stderr


def test_the_same_floor_in_two_groups_is_one_pin(tmp_path: Path) -> None:
    completed = _run(_pyproject(tmp_path, '"bcrypt>=3.1.4"', '"bcrypt>=3.1.4.0"'))
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["bcrypt==3.1.4", "setuptools==77.0.1"]
