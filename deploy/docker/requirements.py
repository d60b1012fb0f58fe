"""Print the project's pinned requirements for an image: the base ones and those of some extras.

Images install their dependencies before the source is copied in, so a code
change does not reinstall torch; this reads the lists from pyproject.toml,
the one place they are declared (constraints.txt still pins the rest):

    python requirements.py search > requirements.txt            # base + [search]
    python requirements.py encoder --only torch,torchvision     # just those two
    python requirements.py encoder --without torch,torchvision  # all but those
    python requirements.py --no-base dev --only grpcio-tools
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name: 'Open_Clip.Torch' -> 'open-clip-torch'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot read a project name in {requirement!r}")
    return canonical(match.group(1))


def requirements(
    pyproject: dict,
    extras: Sequence[str],
    *,
    base: bool = True,
    only: Sequence[str] = (),
    without: Sequence[str] = (),
) -> list[str]:
    """The requirement lines of the base dependencies (unless base=False) and of `extras`."""
    project = pyproject["project"]
    declared = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in declared]
    if unknown:
        raise ValueError(f"unknown extras {unknown}; pyproject.toml declares {sorted(declared)}")
    lines = list(project.get("dependencies", [])) if base else []
    for extra in extras:
        lines += declared[extra]
    names = [project_name(line) for line in lines]
    wanted, unwanted = {canonical(n) for n in only}, {canonical(n) for n in without}
    missing = (wanted | unwanted) - set(names)
    if missing:
        raise ValueError(f"{sorted(missing)} are not among the requirements chosen")
    return [
        line
        for line, name in zip(lines, names, strict=True)
        if (not wanted or name in wanted) and name not in unwanted
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to add")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--no-base", action="store_true", help="leave out the base dependencies")
    parser.add_argument("--only", default="", help="comma-separated project names to keep")
    parser.add_argument("--without", default="", help="comma-separated project names to drop")
    args = parser.parse_args(argv)
    try:
        lines = requirements(
            tomllib.loads(args.pyproject.read_text()),
            args.extras,
            base=not args.no_base,
            only=[n for n in args.only.split(",") if n],
            without=[n for n in args.without.split(",") if n],
        )
    except (OSError, ValueError, KeyError) as error:
        print(f"requirements.py: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
