"""Print the lowest versions pyproject.toml allows, as a pip constraints file.

    python .ci/floors.py              # constraints: every floor, one NAME==VERSION a line
    python .ci/floors.py --build      # the build-system requirements at their floors

CI installs the package with `pip install -c` on the first output into a second
virtualenv and runs the tests there, so that a floor which is too low fails CI instead
of a user's install (see .ci/floor-check.sh). Every requirement of [build-system],
[project] dependencies and every optional-dependencies extra takes part, so a new
dependency is checked at its floor without editing this script.

Rules it enforces (a violation exits 2 with the requirement named):
- every requirement has a floor (>=, ~= or ==): one without cannot be tested;
- the floor is written as the exact release (">=77.0.1", not ">=77" when 77.0.0 was
  never released): pip is then asked for exactly that release and fails if it does not
  exist, rather than this script guessing from an index;
- one package has one floor across groups: if the test extra said bcrypt>=4.1 and the
  dependencies bcrypt>=4, installing both would never test 4.

Transitive dependencies are not pinned: they float to what pip picks for the floors.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_FLOOR_OPERATORS = frozenset({">=", "~=", "=="})


class FloorError(Exception):
    """A requirement whose floor cannot be tested; the message names it."""


@dataclass(frozen=True)
class Floor:
    name: str  # canonical (PEP 503) name
    version: str  # as written in pyproject.toml
    marker: str | None
    group: str

    def constraint(self) -> str:
        # Constraints take no extras, so only the name: aiohttp[speedups]>=3 pins aiohttp.
        line = f"{self.name}=={self.version}"
        return f"{line} ; {self.marker}" if self.marker else line


def floor_of(text: str, group: str) -> Floor:
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        raise FloorError(f"{group}: {text!r} is not a valid requirement: {exc}") from exc
    if requirement.url:
        raise FloorError(f"{group}: {text!r} is a URL requirement; it has no floor to test")
    lows = [spec for spec in requirement.specifier if spec.operator in _FLOOR_OPERATORS]
    if not lows:
        raise FloorError(f"{group}: {text!r} has no floor; write the lowest tested version as >=X")
    if any("*" in spec.version for spec in lows):
        raise FloorError(f"{group}: {text!r}: a wildcard is not a floor")
    low = max(lows, key=lambda spec: Version(spec.version))
    if not requirement.specifier.contains(low.version, prereleases=True):
        raise FloorError(f"{group}: {text!r}: the floor {low.version} is itself excluded")
    marker = str(requirement.marker) if requirement.marker else None
    return Floor(canonicalize_name(requirement.name), low.version, marker, group)


def read_floors(pyproject: Path) -> tuple[list[Floor], list[Floor]]:
    """(build-system floors, project floors), the latter from dependencies and extras."""
    with pyproject.open("rb") as handle:
        data = tomllib.load(handle)
    build = [floor_of(text, "build-system") for text in data["build-system"]["requires"]]
    project = data["project"]
    floors = [floor_of(text, "dependencies") for text in project.get("dependencies", [])]
    for extra, texts in project.get("optional-dependencies", {}).items():
        floors.extend(floor_of(text, f"extra {extra}") for text in texts)
    return build, floors


def merged(floors: list[Floor]) -> list[Floor]:
    """One floor per package (and marker); differing floors for one package are an error."""
    seen: dict[tuple[str, str | None], Floor] = {}
    for floor in floors:
        key = (floor.name, floor.marker)
        earlier = seen.setdefault(key, floor)
        if Version(earlier.version) != Version(floor.version):
            raise FloorError(
                f"{floor.name}: floor {earlier.version} in {earlier.group} but"
                f" {floor.version} in {floor.group}; the lower one could never be tested"
            )
    return sorted(seen.values(), key=lambda floor: floor.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--build", action="store_true", help="print the build-system requirements at floor"
    )
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    try:
        build, project = read_floors(args.pyproject)
        lines = [floor.constraint() for floor in merged(build if args.build else build + project)]
    except FloorError as exc:
        print(f"{args.pyproject}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
