"""Run qemu's own iotests with imagecore and `nbdsrv qemu-nbd` and compare each run with the real tools.

Every mode (a format and protocol of `./check`) runs once with Debian's qemu-img/qemu-nbd 7.2 (the baseline,
cached under var/iotests/results) and once with each of ours: `imagecore` as QEMU_IMG_PROG, and `nbdsrv
qemu-nbd` as QEMU_NBD_PROG in the -nbd modes. A test that passes in the baseline and fails with ours fails the
comparison unless tests/iotests/expected-failures.txt lists it with its reason; a listed test that now passes
is reported as stale and also fails the comparison, so that the file only shrinks (--prune deletes those
lines). See docs/iotests.md. Standard library only: it runs before anything else is installed.

    tests/iotests/runner.py [--modes qcow2,raw,...] [--runs imagecore,qemu-nbd] [--selection ci|quick|TESTS]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "iotests"
EXPECTED = HERE / "expected-failures.txt"
CI_SELECTION = HERE / "ci-tests.txt"

# mode name -> ./check arguments
MODES: dict[str, list[str]] = {
    "qcow2": ["-qcow2"],
    "raw": ["-raw"],
    "raw-nbd": ["-raw", "-nbd"],
    "qcow2-nbd": ["-qcow2", "-nbd"],
    # the formats users migrate from (vmdk, and issue 12's): imagecore is the only program of ours there
    "vmdk": ["-vmdk"],
    "vdi": ["-vdi"],
    "vpc": ["-vpc"],
    "vhdx": ["-vhdx"],
    "qed": ["-qed"],
    "qcow": ["-qcow"],
    "parallels": ["-parallels"],
    "luks": ["-luks"],
}
# our runs: which program of the pair is ours, and the modes where that program is exercised
RUNS: dict[str, tuple[str, ...]] = {
    "imagecore": tuple(MODES),
    "qemu-nbd": ("raw-nbd", "qcow2-nbd"),
}
TAP_LINE = re.compile(r"^(not ok|ok) (\S+) (\S+)( # SKIP)?\s*$")


def log(msg: str) -> None:
    print(msg, flush=True)


def workdir() -> Path:
    return Path(os.environ.get("NBDSRV_IOTESTS_DIR", ROOT / "var" / "iotests"))


def checkout_dir() -> Path:
    """This checkout's own runs and program wrappers (var/ may be shared by several checkouts)."""
    return workdir() / "checkouts" / hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]


def iotests_dir() -> Path:
    return workdir() / "src" / "tests" / "qemu-iotests"


def package_version(name: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "missing"


# --- the programs under test --------------------------------------------------------------------------------


def venv_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def write_tool(path: Path, module: str, call: str) -> Path:
    """A console-script-like wrapper that runs this checkout (not whatever is installed in the venv).

    It is a Python script named as the program it stands for, so the program sees the same argv[0] as it
    would installed or linked under that name (messages start with it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"#!{venv_python()}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"from {module} import main\n"
        f"sys.exit({call})\n"
    )
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    return path


def imagecore_prog() -> Path:
    return write_tool(checkout_dir() / "tools" / "imagecore" / "qemu-img", "imagecore.cli", "main()")


def nbdsrv_qemu_nbd_prog() -> Path | None:
    """`nbdsrv qemu-nbd` as one program, or None when this checkout has no such command yet."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run([venv_python(), "-m", "nbdsrv", "qemu-nbd", "--help"], capture_output=True,
                              text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    return write_tool(checkout_dir() / "tools" / "nbdsrv" / "qemu-nbd", "nbdsrv.__main__",
                      "main(['qemu-nbd', *sys.argv[1:]])")


# --- ./check ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    results: dict[str, str] = field(default_factory=dict)  # test -> pass | fail | not run
    elapsed: float = 0.0


def check_env(img: str, nbd: str, scratch: Path, sock: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(var, None)
    env.update(
        QEMU_PROG=str(workdir() / "bin" / "qemu-system-x86_64"),
        QEMU_IMG_PROG=img,
        QEMU_IO_PROG="/usr/bin/qemu-io",
        QEMU_NBD_PROG=nbd,
        QSD_PROG="/usr/bin/qemu-storage-daemon",
        TEST_DIR=str(scratch),
        SOCK_DIR=str(sock),
    )
    return env


def list_tests(selection: list[str]) -> list[str]:
    """The test names that ./check would run for a selection (its own dry run)."""
    env = check_env("/usr/bin/qemu-img", "/usr/bin/qemu-nbd", Path("/nonexistent"), Path("/nonexistent"))
    proc = subprocess.run(["/usr/bin/python3", "./check", "-n", *selection], cwd=iotests_dir(), env=env,
                          capture_output=True, text=True, check=True)
    return [Path(line).name for line in proc.stdout.split()]


def stop_leftovers(paths: list[Path]) -> None:
    """Stop servers that a failed test left running (--fork'ed qemu-nbd): those serving this run's files."""
    marks = [str(p) for p in paths]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                pass


def run_check(name: str, mode: str, img: str, nbd: str, tests: list[str], jobs: int) -> RunResult:
    """Run ./check once; its TAP output, stderr (diffs) and scratch files stay under var/iotests/runs."""
    out = checkout_dir() / "runs" / name / mode
    scratch = out / "scratch"
    shutil.rmtree(out, ignore_errors=True)
    scratch.mkdir(parents=True)
    # a short folder: Unix socket paths are limited to 108 bytes
    sock = Path(tempfile.mkdtemp(prefix="iot-"))
    env = check_env(img, nbd, scratch, sock)
    # ./check keeps the time of each passing test here; starting it empty leaves this run's times alone
    times = iotests_dir() / ".last-elapsed-cache"
    times.unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(out / "tap.log", "w") as tap, open(out / "stderr.log", "w") as err:
        subprocess.run(["/usr/bin/python3", "./check", "-tap", "-j", str(jobs), *MODES[mode], *tests],
                       cwd=iotests_dir(), env=env, stdout=tap, stderr=err, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    if times.exists():
        shutil.copy(times, out / "elapsed.json")
    stop_leftovers([scratch, sock])
    shutil.rmtree(sock, ignore_errors=True)
    results: dict[str, str] = {}
    for line in (out / "tap.log").read_text(errors="replace").splitlines():
        m = TAP_LINE.match(line)
        if m:
            results[m.group(3)] = "not run" if m.group(4) else ("pass" if m.group(1) == "ok" else "fail")
    for t in tests:
        results.setdefault(t, "fail")  # a test that never reported (the harness died) did not pass
    return RunResult(results, elapsed)


def run_with_retry(name: str, mode: str, img: str, nbd: str, tests: list[str], jobs: int,
                   retry: set[str] | None = None) -> tuple[RunResult, list[str]]:
    """One run, then the failures among `retry` (default all tests) once more: the machine is shared and a
    timing-sensitive test may fail once under load. Returns the result and the tests that passed only on
    the second try."""
    res = run_check(name, mode, img, nbd, tests, jobs)
    again = sorted(t for t, s in res.results.items() if s == "fail" and (retry is None or t in retry))
    flaky: list[str] = []
    if again:
        second = run_check(name + "-retry", mode, img, nbd, again, jobs)
        res.elapsed += second.elapsed
        for t in again:
            if second.results.get(t) == "pass":
                res.results[t] = "pass"
                flaky.append(t)
    return res, flaky


# --- the baseline cache -------------------------------------------------------------------------------------


def baseline_key() -> dict[str, str]:
    src = workdir() / "src" / ".nbdsrv-source-version"
    return {
        "qemu-utils": package_version("qemu-utils"),
        "qemu-system-x86": package_version("qemu-system-x86"),
        "source": src.read_text().strip() if src.exists() else "?",
    }


def baseline(mode: str, tests: list[str], jobs: int, refresh: bool) -> tuple[dict[str, str], str]:
    """The real tools' result for each test, from the cache where it has them (same package versions)."""
    path = workdir() / "results" / f"baseline-{mode}.json"
    key = baseline_key()
    cached: dict[str, str] = {}
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            cached = data["results"]
    missing = [t for t in tests if t not in cached]
    note = f"cached ({len(tests) - len(missing)} tests)"
    if missing:
        # no second try here: a baseline failure only leaves that test out of the comparison
        res = run_check("baseline", mode, "/usr/bin/qemu-img", "/usr/bin/qemu-nbd", missing, jobs)
        cached.update(res.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "results": cached}, indent=1, sort_keys=True) + "\n")
        note = f"ran {len(missing)} tests in {res.elapsed:.0f}s"
        if len(missing) < len(tests):
            note += f", {len(tests) - len(missing)} cached"
    return {t: cached[t] for t in tests}, note


# --- expected failures --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    run: str
    mode: str
    test: str
    reason: str
    lineno: int


def read_expected(path: Path) -> dict[tuple[str, str, str], Entry]:
    """`RUN MODE TEST reason...` per line; `#` starts a comment line. A malformed line is an error."""
    entries: dict[tuple[str, str, str], Entry] = {}
    if not path.exists():
        return entries
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) < 4 or parts[0] not in RUNS or parts[1] not in RUNS[parts[0]]:
            raise SystemExit(f"{path}:{n}: expected 'RUN MODE TEST reason' with RUN in {sorted(RUNS)} "
                             f"and a mode of that run: {line!r}")
        key = (parts[0], parts[1], parts[2])
        if key in entries:
            raise SystemExit(f"{path}:{n}: {' '.join(key)} is listed twice")
        entries[key] = Entry(parts[0], parts[1], parts[2], parts[3].strip(), n)
    return entries


def prune(path: Path, stale: list[Entry]) -> None:
    drop = {e.lineno for e in stale}
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for n, line in enumerate(lines, 1) if n not in drop))


# --- the comparison -----------------------------------------------------------------------------------------


def first_diff_lines(name: str, mode: str, test: str, limit: int = 8) -> str:
    for base in (checkout_dir() / "runs" / f"{name}-retry" / mode, checkout_dir() / "runs" / name / mode):
        bad = list((base / "scratch").glob(f"**/{test}.out.bad"))
        if bad:
            fmt = MODES[mode][0].lstrip("-")
            names = [f"{test}.out.{fmt}", f"{test}.out", f"tests/{test}.out.{fmt}", f"tests/{test}.out"]
            found = [iotests_dir() / n for n in names if (iotests_dir() / n).exists()]
            expected = found[0] if found else Path("/dev/null")
            proc = subprocess.run(["diff", "-u", str(expected), str(bad[0])], capture_output=True, text=True)
            lines = proc.stdout.splitlines()[2:]
            more = "\n      ..." if len(lines) > limit else ""
            return "\n".join(f"      {x}" for x in lines[:limit]) + more
    return "      (no .out.bad)"


def selection_tests(selection: str, modes: list[str]) -> dict[str, list[str]]:
    """The tests of each mode: ``ci`` reads tests/iotests/ci-tests.txt (``MODE: TEST TEST ...`` lines, a
    mode may have several), ``quick`` is ./check's quick group, anything else names tests for every mode."""
    if selection == "ci":
        out: dict[str, list[str]] = {m: [] for m in modes}
        for n, line in enumerate(CI_SELECTION.read_text().splitlines(), 1):
            line = line.split("#")[0].strip()
            if not line:
                continue
            mode, sep, names = line.partition(":")
            if not sep or mode.strip() not in MODES:
                raise SystemExit(f"{CI_SELECTION}:{n}: expected 'MODE: TEST ...', MODE in {sorted(MODES)}")
            if mode.strip() in out:
                out[mode.strip()] += names.split()
        return out
    tests = list_tests(["-g", "quick"]) if selection == "quick" else selection.replace(",", " ").split()
    return {m: list(tests) for m in modes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of: " + ", ".join(RUNS))
    p.add_argument("--selection", default=os.environ.get("NBDSRV_IOTESTS_SELECTION", "ci"),
                   help="'ci' (tests/iotests/ci-tests.txt), 'quick' (./check -g quick) or test names")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")))
    p.add_argument("--qemu-img", default=os.environ.get("NBDSRV_IOTESTS_QEMU_IMG"),
                   help="our qemu-img (default: a wrapper that runs this checkout's imagecore)")
    p.add_argument("--qemu-nbd", default=os.environ.get("QEMU_NBD_PROG"),
                   help="our qemu-nbd (default: this checkout's `nbdsrv qemu-nbd`; env QEMU_NBD_PROG)")
    p.add_argument("--refresh-baseline", action="store_true", help="rerun the real tools even if cached")
    p.add_argument("--prune", action="store_true", help="delete stale lines from the expected-failures file")
    p.add_argument("--expected", type=Path, default=EXPECTED)
    p.add_argument("--no-prepare", action="store_true", help="do not run tests/iotests/prepare.sh first")
    args = p.parse_args(argv)

    modes = [m for m in args.modes.split(",") if m]
    runs = [r for r in args.runs.split(",") if r]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    for r in runs:
        if r not in RUNS:
            p.error(f"unknown run {r!r}")
    expected = read_expected(args.expected)
    if not args.no_prepare:
        subprocess.run([str(HERE / "prepare.sh")], check=True)
    selected = selection_tests(args.selection, modes)
    log(f"iotests: selection {args.selection} ({', '.join(f'{m} {len(t)}' for m, t in selected.items())} "
        f"tests), -j{args.jobs}")

    progs: dict[str, tuple[str, str] | None] = {}
    if "imagecore" in runs:
        progs["imagecore"] = (args.qemu_img or str(imagecore_prog()), "/usr/bin/qemu-nbd")
    if "qemu-nbd" in runs:
        nbd = args.qemu_nbd or nbdsrv_qemu_nbd_prog()
        progs["qemu-nbd"] = ("/usr/bin/qemu-img", str(nbd)) if nbd else None

    unexpected: list[tuple[str, str, str]] = []
    stale: list[Entry] = []
    summary: list[str] = []
    report: dict[str, object] = {"selection": selected, "modes": {}}
    t_start = time.monotonic()
    for mode in modes:
        tests = selected[mode]
        if not tests:
            continue
        base, note = baseline(mode, tests, args.jobs, args.refresh_baseline)
        passing = sorted(t for t, s in base.items() if s == "pass")
        log(f"baseline {mode}: {len(passing)} pass, "
            f"{sum(s == 'fail' for s in base.values())} fail, "
            f"{sum(s == 'not run' for s in base.values())} not run [{note}]")
        for run in runs:
            if mode not in RUNS[run]:
                continue
            prog = progs[run]
            if prog is None:
                line = (f"{run} {mode}: SKIPPED: this checkout has no `nbdsrv qemu-nbd` command "
                        "(give one with --qemu-nbd or QEMU_NBD_PROG)")
                log(line)
                summary.append(line)
                continue
            # a second try for the unexpected failures only: the listed ones fail every time
            retry = {t for t in passing if (run, mode, t) not in expected}
            res, flaky = run_with_retry(run, mode, prog[0], prog[1], passing, args.jobs, retry)
            ok = [t for t in passing if res.results.get(t) == "pass"]
            exp_fail, unexp = [], []
            for t in passing:
                key = (run, mode, t)
                if res.results.get(t) == "pass":
                    if key in expected:
                        stale.append(expected[key])
                elif key in expected:
                    exp_fail.append(t)
                else:
                    unexp.append(t)
                    unexpected.append(key)
            line = (f"{run} {mode}: {len(ok)} of {len(passing)} baseline-passing tests pass "
                    f"({len(exp_fail)} expected failures, {len(unexp)} unexpected, "
                    f"{sum(1 for k in stale if (k.run, k.mode) == (run, mode))} stale) in {res.elapsed:.0f}s")
            if flaky:
                line += f"; passed only on retry: {' '.join(flaky)}"
            log(line)
            summary.append(line)
            report["modes"][f"{run} {mode}"] = {  # type: ignore[index]
                "baseline_pass": passing, "pass": ok, "expected": exp_fail, "unexpected": unexp,
                "flaky": flaky, "elapsed": round(res.elapsed), "results": res.results,
            }
            for t in unexp:
                log(f"  UNEXPECTED {run} {mode} {t}: passes with the real tool, fails with ours; "
                    f"diff ({checkout_dir() / 'runs' / run / mode}):\n{first_diff_lines(run, mode, t)}")

    out = checkout_dir() / "report.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    log("")
    log("iotests summary:")
    for line in summary:
        log("  " + line)
    if unexpected:
        log(f"FAIL: {len(unexpected)} unexpected failures (fix them, or list them with their reason in "
            f"{args.expected.relative_to(ROOT) if args.expected.is_relative_to(ROOT) else args.expected}):")
        for key in unexpected:
            log(f"  {' '.join(key)}")
    if stale:
        log(f"{'pruned' if args.prune else 'FAIL'}: {len(stale)} listed expected failures now pass; "
            "the file only shrinks, delete these lines (or rerun with --prune):")
        for e in stale:
            log(f"  line {e.lineno}: {e.run} {e.mode} {e.test} {e.reason}")
        if args.prune:
            prune(args.expected, stale)
    log(f"report: {out}; {time.monotonic() - t_start:.0f}s in all")
    return 1 if unexpected or (stale and not args.prune) else 0


if __name__ == "__main__":
    sys.exit(main())
