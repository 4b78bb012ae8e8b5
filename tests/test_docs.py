"""The documentation stays true: the CLI reference matches the parser, every `medseg` command and option the
docs show exists, relative links resolve, and the fenced blocks marked ``test`` (fast) or ``test-slow`` run.

Marking a block: an info string with the word ``test`` (```` ```bash test ```` or ```` ```python test ````)
runs it in the default suite; ``test-slow`` only with ``-m slow``. The blocks of one page run in order in one
temporary folder (with ``pipelines/`` linked in), with this environment's ``medseg`` first on PATH and
``$SHARED_DATA`` set to ../shared/data (a page whose blocks use it is skipped when that folder is absent).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "docker" / "README.md", ROOT / "README.md"]
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
_INLINE = re.compile(r"(?<!`)`(medseg [^`]+)`(?!`)")


@dataclass
class Block:
    page: Path
    lang: str
    marks: set[str]
    code: str


def _blocks(page: Path) -> list[Block]:
    out = []
    for info, code in _FENCE.findall(page.read_text()):
        words = info.split()
        out.append(Block(page, words[0] if words else "", set(words[1:]), code))
    return out


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------ reference
def test_cli_reference_is_up_to_date() -> None:
    if sys.version_info >= (3, 13):
        pytest.skip("argparse formats help differently from Python 3.13; docs/cli.md is generated with 3.11")
    from medseg.cli.reference import cli_reference

    expected = cli_reference()
    actual = (DOCS / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is stale: run `.venv/bin/python -m medseg.cli.reference > docs/cli.md`"


# ------------------------------------------------------------------------------------------------ commands
def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from medseg.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices)


def _medseg_invocations(code: str) -> list[list[str]]:
    """Argument lists after every `medseg` (or `docker run ... medseg:TAG`) in shell text."""
    code = code.replace("\\\n", " ")
    found = []
    for line in code.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in prose-like text: not a command
            continue
        for i, tok in enumerate(tokens):
            is_cli = tok == "medseg" or tok.endswith("/bin/medseg")
            # `docker run [options] medseg:TAG ARGS` (not `docker build -t medseg:TAG`, not another entrypoint)
            is_image = (re.fullmatch(r"medseg:[\w.-]+", tok) is not None and "run" in tokens[:i]
                        and "--entrypoint" not in tokens[:i])
            if is_cli or is_image:
                args = []
                for t in tokens[i + 1:]:
                    if t in ("&&", "||", ";", "|", ">", ">>", "2>&1") or t.startswith((">", "2>")):
                        break
                    args.append(t)
                found.append(args)
    return found


def _all_invocations() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for block in _blocks(page):
            if block.lang in ("bash", "sh", "shell", "console", ""):
                out += [(_rel(page), args) for args in _medseg_invocations(block.code)]
        prose = _FENCE.sub("", text)
        for span in _INLINE.findall(prose):
            out += [(_rel(page), args) for args in _medseg_invocations(span)]
    return out


def _check(args: list[str], top: argparse.ArgumentParser, subs: dict[str, argparse.ArgumentParser]) -> str | None:
    """None when ``medseg ARGS`` names a real subcommand and only its real options, else the problem."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i].split("=")[0] not in top._option_string_actions:
            return f"unknown global option {args[i]}"
        i += 1
    if i == len(args):
        return None  # `medseg --version`, `medseg --help`
    name = args[i]
    if re.fullmatch(r"[A-Z]+:?", name):
        return None  # a placeholder such as `medseg CMD` in prose
    if name not in subs:
        return f"unknown command {name!r} (commands: {', '.join(subs)})"
    options = subs[name]._option_string_actions
    for tok in args[i + 1:]:
        if tok == "--":
            break
        if tok.startswith("-") and not re.fullmatch(r"-\d.*", tok) and tok.split("=")[0] not in options:
            return f"{name}: unknown option {tok}"
    return None


def test_documented_commands_and_options_exist() -> None:
    top, subs = _parsers()
    invocations = _all_invocations()
    assert len(invocations) > 50, f"only {len(invocations)} medseg commands found in the docs: is the parser broken?"
    problems = [f"{page}: medseg {' '.join(args)}: {err}" for page, args in invocations
                if (err := _check(args, top, subs))]
    assert not problems, "\n".join(problems)
    used = {args[next((j for j, a in enumerate(args) if not a.startswith("-")), 0)] for _, args in invocations if args}
    missing = sorted(set(subs) - used)
    assert not missing, f"commands no page shows in use: {missing}"


def test_the_checker_rejects_what_does_not_exist() -> None:
    top, subs = _parsers()
    assert _check(["predict", "-i", "a", "-o", "b", "-m", "c", "--no-tta"], top, subs) is None
    assert _check(["-v", "crossval", "--config", "x.yaml", "--time-budget=5"], top, subs) is None
    assert "unknown option --gpus" in _check(["predict", "--gpus", "1"], top, subs)
    assert "unknown command 'fit'" in _check(["fit", "data"], top, subs)
    assert "unknown global option" in _check(["--verbose-ish", "info", "x"], top, subs)
    got = _medseg_invocations('docker run --rm --gpus all -v /a:/data/in medseg:gpu predict -i /data/in \\\n  -o /x')
    assert got == [["predict", "-i", "/data/in", "-o", "/x"]]
    assert _medseg_invocations("docker run --entrypoint python medseg:gpu -c 'import torch'") == []
    assert _medseg_invocations("docker build -f docker/Dockerfile -t medseg:gpu --build-arg A=b .") == []
    assert _medseg_invocations("medseg info a.nii.gz | head -n 3  # comment --x") == [["info", "a.nii.gz"]]


# ------------------------------------------------------------------------------------------------ links
def test_relative_links_resolve() -> None:
    bad = []
    for page in PAGES:
        text = _FENCE.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                bad.append(f"{_rel(page)}: link to {target} does not resolve")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------------ running
def _runnable(slow: bool) -> list[Path]:
    return [p for p in PAGES if any(("test-slow" in b.marks) if slow else ("test" in b.marks) for b in _blocks(p))]


def _run_page(page: Path, tmp_path: Path, *, include_slow: bool) -> None:
    blocks = [b for b in _blocks(page) if "test" in b.marks or (include_slow and "test-slow" in b.marks)]
    assert blocks
    if any("SHARED_DATA" in b.code for b in blocks) and not SHARED_DATA.exists():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent")
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "SHARED_DATA": str(SHARED_DATA), "MPLBACKEND": "Agg", "COLUMNS": "100"}
    for n, block in enumerate(blocks):
        if block.lang == "python":
            cmd = [sys.executable, "-c", block.code]
        elif block.lang in ("bash", "sh"):
            cmd = ["bash", "-euo", "pipefail", "-c", block.code]
        else:
            raise AssertionError(f"{_rel(page)}: block {n} in {block.lang!r} cannot be run; use bash or python")
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1800 if include_slow else 300)
        assert proc.returncode == 0, (f"{_rel(page)} block {n} failed ({proc.returncode}):\n{block.code}\n"
                                      f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("page", _runnable(slow=False), ids=_rel)
def test_doc_blocks_run(page: Path, tmp_path: Path) -> None:
    _run_page(page, tmp_path, include_slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", _runnable(slow=True), ids=_rel)
def test_doc_slow_blocks_run(page: Path, tmp_path: Path) -> None:
    _run_page(page, tmp_path, include_slow=True)


def test_pages_have_runnable_blocks() -> None:
    """The promise of docs/index.md: the key pages carry runnable examples (so the runner has work to do)."""
    fast = {_rel(p) for p in _runnable(slow=False)}
    slow = {_rel(p) for p in _runnable(slow=True)}
    assert {"docs/getting-started.md", "docs/python-api.md", "docs/data-layouts.md"} <= fast
    assert {"docs/getting-started.md", "docs/tutorials/hippocampus-3d.md"} <= slow
