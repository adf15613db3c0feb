"""Fixtures for hupt's real-kernel tests: started processes, the static Go servers.

`procs` gives each test a harness.Procs; at teardown every process it started is
stopped (SIGTERM, then SIGKILL) and the test FAILS if any of them, or anything
they spawned, is still alive a few seconds later, or if one ignored SIGTERM.

`go_server` builds servers/goserver once per session with CGO_ENABLED=0 and
checks the ELF has neither PT_INTERP nor PT_DYNAMIC: the point of that server is
to be a static binary. `go_inject_target` builds inject_targets/goserver the
same way. Go's caches go to integration/.build/ (git-ignored; a tmp dir if that
is not writable), GOENV=off and GOTOOLCHAIN=local so the build needs neither
HOME nor the network. Missing Go is a failure, not a skip: CI installs golang-go.

`server_cmd(kind, target)` is the command of a test server by kind
(harness.kind_cmd); the "go" kind builds the Go server first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from harness import PT_DYNAMIC, PT_INTERP, SERVERS, Procs, elf_segment_types, kind_cmd
from load import Target

BUILD = Path(__file__).resolve().parent / ".build"
INJECT_TARGETS = Path(__file__).resolve().parent / "inject_targets"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Keep each phase's report on the item so `procs` can tell whether the test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for s in p.started:
            print(s.log())
    problems = p.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private directory: a unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="hupt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        BUILD.mkdir(exist_ok=True)
        probe = BUILD / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return BUILD
    except OSError:
        return tmp_path_factory.mktemp("go-cache")


def build_static_go(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the Go program in `source` with CGO_ENABLED=0; fail unless the ELF is static."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("`go` not found on PATH: the static Go test server needs the Go toolchain "
                    "(apt-get install golang-go)", pytrace=False)
    cache = _cache_root(tmp_path_factory)
    binary = tmp_path_factory.mktemp(source.name) / "goserver"
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOCACHE": str(cache / "gocache"),
        "GOPATH": str(cache / "gopath"),
        "GOENV": "off",
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOWORK": "off",
        "GO111MODULE": "on",
    }
    built = subprocess.run([go, "build", "-trimpath", "-o", str(binary), "."],
                           cwd=source, env=env, capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        pytest.fail(f"go build failed ({built.returncode}):\n{built.stderr}", pytrace=False)
    segments = elf_segment_types(binary)
    if PT_INTERP in segments or PT_DYNAMIC in segments:
        pytest.fail(f"{binary} is dynamically linked (program headers {segments})", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def go_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the freshly built static goserver binary (servers/goserver)."""
    return build_static_go(SERVERS / "goserver", tmp_path_factory)


@pytest.fixture(scope="session")
def go_inject_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the freshly built static inject_targets/goserver binary."""
    return build_static_go(INJECT_TARGETS / "goserver", tmp_path_factory)


@pytest.fixture
def server_cmd(request: pytest.FixtureRequest) -> Callable[[str, Target], list[str]]:
    """server_cmd(kind, target): harness.kind_cmd, the Go server built when asked for."""
    def make(kind: str, target: Target) -> list[str]:
        go = request.getfixturevalue("go_server") if kind == "go" else None
        return kind_cmd(kind, target, go)

    return make
