"""The floors in pyproject.toml are the releases with the fixes this server relies on, and
what is installed meets them."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

ROOT = Path(__file__).resolve().parents[1]

#: package -> the first release with what this server relies on (why, above each)
FLOORS = {
    # Part header limits (count and line size): other servers' multipart answers are
    # parsed with it, and its callbacks gather a header's bytes.
    "python-multipart": "0.0.27",
    # Streamed reads decompress only what is asked for (CVE-2025-66471), chained
    # Content-Encodings capped (CVE-2025-66418): federation reads bodies decoded.
    "urllib3": "2.6",
}


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {requirement.name: requirement for requirement in requirements}


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_the_floor_is_the_release_with_the_fix(package: str) -> None:
    requirement = declared()[package]
    floor = Version(FLOORS[package])
    lower_bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert lower_bounds and min(lower_bounds) >= floor, str(requirement)
    assert Version(version(package)) in requirement.specifier


def test_multipart_part_headers_are_bounded() -> None:
    """What the python-multipart floor buys: a peer's endless header line is refused,
    not gathered."""
    body = b"--b\r\nContent-Type: application/json\r\nX-Long: " + b"a" * 10_000
    parser = MultipartParser("b", {"on_header_value": lambda data, start, end: None})
    with pytest.raises(MultipartParseError, match="header size"):
        parser.write(body)
    many = b"--b\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(20))
    with pytest.raises(MultipartParseError, match="header count"):
        MultipartParser("b", {}).write(many)
