"""The reliability suite: integration's harness and fixtures, the short and long forms,
and the record of each test that reliability/report.py turns into docs/reliability.md.

- integration/ is on sys.path (reliability/__init__.py puts it there, as pytest
  does for integration's own tests): `from harness import ...` and
  `from load import ...` work here as there. integration/conftest.py is loaded
  once under its own module name and its fixtures (`procs`, `go_server`,
  `short_tmp`, `server_cmd`) are re-exported, so a reliability test starts
  processes, and is checked for leftovers, exactly like an integration test.
- Forms: the short form (the default, run by CI through `python3 -m pytest`)
  and the long form, `HUPT_RELIABILITY=long`: 1,000 soak reloads instead of
  100, storms ten times as big, the fuzzers' "hupt-long" hypothesis profile.
  `HUPT_SOAK_RELOADS=N` sets the soak's reloads alone (either form).
- Each test fills a `record` (reloads, requests, failures, hupt's fds and RSS
  at the start and at the end, notes); at the end of the session the records
  of the tests that ran, with their outcome and duration, are written to
  reliability/.last-run.json (git-ignored) for reliability/report.py.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from reliability.common import FORM, Record

INTEGRATION = Path(__file__).resolve().parent.parent / "integration"


def _integration_conftest() -> Any:
    """integration/conftest.py as a module of its own (not as "conftest": that name is
    the repository's root conftest's, or integration's if pytest loaded it already)."""
    name = "hupt_integration_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, INTEGRATION / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_integration = _integration_conftest()
procs = _integration.procs
short_tmp = _integration.short_tmp
go_server = _integration.go_server
server_cmd = _integration.server_cmd

# The fuzzers' budgets (FORM.fuzz_profile). Each example is a live exchange with a
# running hupt (milliseconds, more on a loaded machine): no deadline; failing examples
# are printed to reproduce them, not stored in a database in the repository.
for _name, _examples in (("hupt-short", 300), ("hupt-long", 3000)):
    settings.register_profile(_name, max_examples=_examples, deadline=None, database=None,
                              print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])

RESULTS = Path(__file__).resolve().parent / ".last-run.json"
_STARTED = time.time()
_RESULTS: list[dict[str, Any]] = []
_RECORD = pytest.StashKey[Record]()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Record:
    """What this test measured, for the report (filled in by the test)."""
    r = Record()
    request.node.stash[_RECORD] = r
    return r


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # As integration's conftest does: `procs` prints the logs of a failed test.
    setattr(item, f"report_{report.when}", report)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        record = item.stash.get(_RECORD, Record())
        outcome: str = report.outcome
        if hasattr(report, "wasxfail"):  # a known issue, marked: say which
            outcome = "xpassed" if report.passed else "xfailed"
            record.note(f"known issue: {report.wasxfail}")
        _RESULTS.append({"test": item.nodeid.split("::", 1)[-1],
                         "file": item.nodeid.split("::", 1)[0],
                         "outcome": outcome, "duration_s": round(report.duration, 2),
                         **record.as_dict()})
    elif report.when == "teardown" and not report.passed and _RESULTS:
        # A failure at teardown (processes left behind) fails the test too.
        for r in _RESULTS:
            if r["test"] == item.nodeid.split("::", 1)[-1]:
                r["outcome"] = "failed"
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _RESULTS:
        return
    doc = {
        "form": FORM.as_dict(),
        "started": datetime.datetime.fromtimestamp(_STARTED, datetime.UTC)
        .strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.time() - _STARTED, 1),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version()},
        "tests": _RESULTS,
    }
    try:
        RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    except OSError as e:  # a read-only checkout: the tests' outcome stands
        print(f"reliability: could not write {RESULTS}: {e}", file=sys.stderr)
