"""The package as pip sees it: the sdist and the wheel built from this tree.

Built once for the module (python -m build: the sdist, then the wheel from the
sdist, so a file the sdist forgot breaks the wheel), from a copy of the tree
so that nothing is written into the checkout.  Without the network when the
installed setuptools is recent enough for pyproject's build-system (the test
extra installs it), otherwise in an isolated environment pip fills.

Asserted: the MIT licence file is in both, with PEP 639 metadata
(License-Expression, License-File, no legacy License field or licence
classifier); the classifiers; the version; the console script; the README as
long description with no relative link (PyPI has nowhere to resolve one
against); the man page in the wheel's data (PREFIX/share/man/man1); the
changelog in the sdist.
"""

from __future__ import annotations

import email.message
import email.parser
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import trove_classifiers

import hupt

REPO = Path(__file__).resolve().parent.parent
NAME = f"hupt-{hupt.__version__}"
# Left out of the copy the package is built from: caches, build output, git.
_IGNORED = (".git", ".build", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
            ".ruff_cache", ".pytest_cache")

pytestmark = pytest.mark.slow


@dataclass
class Built:
    wheel: zipfile.ZipFile
    sdist: tarfile.TarFile
    metadata: email.message.Message

    def wheel_text(self, name: str) -> str:
        return self.wheel.read(name).decode()

    def sdist_text(self, name: str) -> str:
        f = self.sdist.extractfile(f"{NAME}/{name}")
        assert f is not None, name
        return f.read().decode()


def _backend_is_installed() -> bool:
    """Whether the installed setuptools meets pyproject's build-system requirement."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    (setuptools_req,) = [r for r in requires if r.startswith("setuptools")]
    needed = re.fullmatch(r"setuptools>=(\d+)", setuptools_req)
    assert needed is not None, setuptools_req
    try:
        have = int(installed_version("setuptools").split(".")[0])
    except Exception:
        return False
    return have >= int(needed.group(1))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if importlib.util.find_spec("build") is None:
        pytest.fail("python -m build is missing: pip install '.[test]'", pytrace=False)
    tmp = tmp_path_factory.mktemp("pkg")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*_IGNORED))
    offline = ["--no-isolation"] if _backend_is_installed() else []
    r = subprocess.run([sys.executable, "-m", "build", *offline, "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with (zipfile.ZipFile(out / f"{NAME}-py3-none-any.whl") as wheel,
          tarfile.open(out / f"{NAME}.tar.gz") as sdist):
        metadata = email.parser.Parser().parsestr(
            wheel.read(f"{NAME}.dist-info/METADATA").decode())
        yield Built(wheel, sdist, metadata)


def test_the_license_file_is_in_the_wheel_and_the_sdist(built: Built) -> None:
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert built.wheel_text(f"{NAME}.dist-info/licenses/LICENSE") == license_text
    assert built.sdist_text("LICENSE") == license_text


def test_license_metadata_is_pep_639(built: Built) -> None:
    m = built.metadata
    assert tuple(int(x) for x in m["Metadata-Version"].split(".")) >= (2, 4)
    assert m["License-Expression"] == "MIT"
    assert m.get_all("License-File") == ["LICENSE"]
    assert m["License"] is None  # the deprecated free-text field
    assert not [c for c in m.get_all("Classifier", []) if c.startswith("License ::")]
    pkg_info = email.parser.Parser().parsestr(built.sdist_text("PKG-INFO"))
    assert pkg_info["License-Expression"] == "MIT"


def test_classifiers_version_and_entry_point(built: Built) -> None:
    m = built.metadata
    classifiers = m.get_all("Classifier", [])
    for wanted in ("Operating System :: POSIX :: Linux", "Environment :: Console",
                   "Programming Language :: Python :: 3.11",
                   "Programming Language :: Python :: 3.12",
                   "Programming Language :: Python :: 3.13"):
        assert wanted in classifiers, (wanted, classifiers)
    assert any(c.startswith("Topic :: System ::") for c in classifiers), classifiers
    unknown = set(classifiers) - trove_classifiers.classifiers  # PyPI refuses these
    assert not unknown, unknown
    assert m["Name"] == "hupt" and m["Version"] == hupt.__version__
    assert m["Requires-Python"] == ">=3.11"
    for url in m.get_all("Project-URL", []):
        assert re.fullmatch(r"[^,]+, https://\S+", url), url
    entry_points = built.wheel_text(f"{NAME}.dist-info/entry_points.txt")
    assert "hupt = hupt.cli:main" in entry_points


def test_the_long_description_has_no_relative_link(built: Built) -> None:
    m = built.metadata
    assert m["Description-Content-Type"] == "text/markdown"
    body = m.get_payload()
    assert isinstance(body, str) and body.startswith("# hupt")
    targets = re.findall(r"\]\(([^)\s]*)\)", body) + re.findall(r'href="([^"]*)"', body)
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative, relative


def test_the_man_page_is_installed_where_man_finds_it(built: Built) -> None:
    page = (REPO / "docs" / "hupt.1").read_text()
    assert built.wheel_text(f"{NAME}.data/data/share/man/man1/hupt.1") == page
    assert built.sdist_text("docs/hupt.1") == page


def test_the_sdist_has_the_changelog_and_what_the_tests_need(built: Built) -> None:
    names = set(built.sdist.getnames())
    for wanted in ("CHANGELOG.md", "README.md", "pyproject.toml", "conftest.py",
                   "docs/hupt-notify.service", "tests/test_packaging.py",
                   "integration/harness.py"):
        assert f"{NAME}/{wanted}" in names, wanted
    assert f"## {hupt.__version__}" in built.sdist_text("CHANGELOG.md")
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
