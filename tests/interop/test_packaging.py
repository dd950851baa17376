"""Packaging: `python -m build` makes an sdist and a wheel (the wheel built from the sdist, so the sdist is
complete), the wheel installs with pip into a fresh venv of Debian's Python, and the installed commands run
from there, not from the checkout: `--version` prints pyproject.toml's version, `imagecore info` reads an
image, `nbdsrv serve --image` serves it to qemu-io.

The build and the dependencies come from pip's index (or its find-links); when pip cannot reach them, the
wheel is installed with --no-deps into a venv that also sees this venv's site-packages (after its own, so
the wheel's packages are the ones imported), and the test says so in its output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import REPO, SYSTEM_PYTHON, peer, run

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# the packages pyproject.toml ships, so that a new one cannot be left out of the copy
PACKAGES = tuple(p.rstrip("*") for p in tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"]["find"]["include"])
SOURCES = ("pyproject.toml", "README.md", *PACKAGES)


@dataclass
class Installed:
    dist: Path
    venv: Path
    how: str

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def clean_env() -> dict[str, str]:
    """The environment of an operator's shell: no PYTHONPATH pointing at the checkout, no venv on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return env


def sh(*args: str | os.PathLike[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=clean_env(),
                       timeout=timeout)
    assert p.returncode == 0, f"{args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    pytest.importorskip("build", reason="python -m build needs the build package (scripts/setup installs it)")
    top = tmp_path_factory.mktemp("packaging")
    # A copy of what a clone has, so that the build writes its egg-info and build/ there, not in the checkout.
    src = top / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    dist = top / "dist"
    sh(sys.executable, "-m", "build", "--outdir", dist, src, cwd=top, timeout=300)
    venv = top / "venv"
    sh(SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv, cwd=top)
    wheel = next(dist.glob("*.whl"))
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True,
                       text=True, cwd=top, env=clean_env(), timeout=300)
    how = "pip install WHEEL (dependencies from pip's index)"
    if p.returncode != 0:
        print(f"pip could not install the wheel's dependencies ({p.stderr.strip()[-300:]}); "
              "installing it with --no-deps beside this venv's site-packages")
        sh(venv / "bin" / "pip", "install", "-q", "--no-deps", wheel, cwd=top)
        own = run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        (Path(own.stdout.decode().strip()) / "zz-project-venv.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n")
        how = "pip install --no-deps WHEEL, dependencies from the project venv"
    yield Installed(dist, venv, how)


def test_build_gives_an_sdist_and_a_wheel_with_every_module(installed: Installed) -> None:
    sdists = list(installed.dist.glob(f"nbdsrv-{VERSION}.tar.gz"))
    wheels = list(installed.dist.glob(f"nbdsrv-{VERSION}-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(installed.dist.iterdir())
    modules = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    with tarfile.open(sdists[0]) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert modules <= in_sdist, modules - in_sdist
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= in_sdist
    with zipfile.ZipFile(wheels[0]) as z:
        in_wheel = set(z.namelist())
        entry_points = z.read(f"nbdsrv-{VERSION}.dist-info/entry_points.txt").decode()
    assert modules <= in_wheel, modules - in_wheel
    assert "imagecore = imagecore.cli:main" in entry_points
    assert "nbdsrv = nbdsrv.__main__:main" in entry_points


def test_installed_commands_run_from_the_venv(installed: Installed, tmp_path: Path) -> None:
    print(installed.how)
    where = sh(installed.bin("python"), "-c", "import imagecore, nbdsrv; print(imagecore.__file__); "
               "print(nbdsrv.__file__)", cwd=tmp_path).stdout.split()
    assert all(w.startswith(str(installed.venv)) for w in where), where
    assert sh(installed.bin("nbdsrv"), "--version", cwd=tmp_path).stdout == f"nbdsrv {VERSION}\n"
    out = sh(installed.bin("imagecore"), "--version", cwd=tmp_path).stdout
    assert out.splitlines()[0] == f"imagecore version {VERSION} (nbdsrv {VERSION})"

    img = tmp_path / "disk.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", img)
    ours = json.loads(sh(installed.bin("imagecore"), "info", "--output=json", img, cwd=tmp_path).stdout)
    theirs = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
    assert ours == theirs

    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen([installed.bin("nbdsrv"), "serve", "--listen", f"unix:{sock}",
                               "--image", str(img)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "nbdsrv did not listen within 20 s"
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        out = run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 1M",
                  uri).stdout.decode()
        assert "Pattern verification failed" not in out, out
        assert out.count("read 65536/65536") == 1 and "1048576/1048576" in out, out
    finally:
        server.terminate()
        _, err = server.communicate(timeout=20)
    assert server.returncode == 0 and b"Traceback" not in err, err


def test_pipx_installs_the_wheel(installed: Installed, tmp_path: Path) -> None:
    pipx = shutil.which("pipx")
    if pipx is None:
        pytest.skip("pipx is not installed (an optional way to install; pip is tested above)")
    home, bindir = tmp_path / "pipx-home", tmp_path / "pipx-bin"
    env = dict(clean_env(), PIPX_HOME=str(home), PIPX_BIN_DIR=str(bindir))
    wheel = next(installed.dist.glob("*.whl"))
    p = subprocess.run([pipx, "install", "--python", SYSTEM_PYTHON, str(wheel)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p
    assert subprocess.run([str(bindir / "nbdsrv"), "--version"], capture_output=True, text=True,
                          env=env).stdout == f"nbdsrv {VERSION}\n"
