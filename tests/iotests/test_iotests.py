"""qemu's own iotests against imagecore and `nbdsrv qemu-nbd`, compared with the real tools (docs/iotests.md).

The comparison runs under CI=true, and locally with NBDSRV_IOTESTS=1; the checks of the expected-failures
file always run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.iotests import runner


def in_ci() -> bool:
    return os.environ.get("CI", "") in ("1", "true", "TRUE", "True", "yes")


def test_expected_failures_file_is_well_formed() -> None:
    """Every line names a run, a mode of that run and a test, once, with a reason."""
    entries = runner.read_expected(runner.EXPECTED)
    for e in entries.values():
        assert len(e.reason.split()) >= 2, f"line {e.lineno}: give the reason, not a word: {e.reason!r}"
        assert e.test.replace("-", "").replace("_", "").isalnum(), f"line {e.lineno}: {e.test!r}"


def test_ci_selection_lists_each_test_once() -> None:
    selected = runner.selection_tests("ci", list(runner.MODES))
    for mode, tests in selected.items():
        assert tests, f"tests/iotests/ci-tests.txt selects no {mode} tests"
        assert len(tests) == len(set(tests)), mode


def test_expected_failures_file_rejects_a_line_without_reason(tmp_path: Path) -> None:
    bad = tmp_path / "x.txt"
    bad.write_text("imagecore qcow2 001\n")
    with pytest.raises(SystemExit, match="RUN MODE TEST reason"):
        runner.read_expected(bad)
    bad.write_text("imagecore raw-nbd 001 a reason\nimagecore raw-nbd 001 twice\n")
    with pytest.raises(SystemExit, match="listed twice"):
        runner.read_expected(bad)
    bad.write_text("qemu-nbd qcow2 001 qemu-nbd is not used without -nbd\n")
    with pytest.raises(SystemExit, match="a mode of that run"):
        runner.read_expected(bad)


@pytest.mark.skipif(not (in_ci() or os.environ.get("NBDSRV_IOTESTS") == "1"),
                    reason="qemu's iotests run under CI=true, or with NBDSRV_IOTESTS=1")
@pytest.mark.timeout(2400)
def test_iotests_match_the_real_tools() -> None:
    """A test that passes with qemu-img/qemu-nbd 7.2 passes with ours, or is listed with its reason."""
    proc = subprocess.run([sys.executable, str(runner.HERE / "runner.py")], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    sys.stdout.write(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
