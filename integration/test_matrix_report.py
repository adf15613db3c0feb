"""The README's compatibility table is the one integration/matrix_report.py makes from
the kept results (docs/matrix-results.json): same rows, same modes, same figures,
and every cell hupt can run was measured, with 0 failed requests."""

from __future__ import annotations

import dataclasses

import matrix_report
from matrix import MODES, SERVERS


def test_the_readme_table_is_generated_from_the_kept_results() -> None:
    results = matrix_report.load(matrix_report.KEPT)
    text = matrix_report.README.read_text()
    assert matrix_report.readme_section(text) == matrix_report.section(results), (
        "README's compatibility table differs from the generator's: run "
        "`python3 integration/matrix_report.py --update` after a matrix run")


def test_every_runnable_cell_was_measured_without_a_failure() -> None:
    cells = matrix_report.load(matrix_report.KEPT)["cells"]
    for spec in SERVERS:
        for mode in MODES:
            if spec.pending is not None or not isinstance(spec.cell(mode), tuple):
                continue
            figures = cells.get(spec.name, {}).get(mode)
            assert figures is not None, f"{spec.name} in {mode} mode: not measured"
            assert figures["failed"] == 0 and figures["same_socket"], (spec.name, mode, figures)
            assert figures["reloads"] >= 3 and figures["requests"] > 50, (spec.name, mode)


def test_a_table_row_per_server_and_a_column_per_mode() -> None:
    table = matrix_report.table({"cells": {}})
    lines = table.splitlines()
    assert lines[0] == "| server | how it runs | fork | exec | attach |"
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [s.name for s in SERVERS]
    # Every row runs now: a pending one says where it is built, as a made-up one shows.
    assert not [s.name for s in SERVERS if s.pending is not None]
    made_up = dataclasses.replace(SERVERS[0], pending="branch elsewhere")
    assert matrix_report.cell_text(made_up, "fork", None) == "pending (branch elsewhere)"
    assert "not measured" in table
