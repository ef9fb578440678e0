"""The README's and the reference's commands work as written: every `python -m search` line of a code
block in the README and in each page of docs/, run in an activated shell after the demo, in the
order the README gives them and then page after page in the order the README links the pages.

The demo recipe is made small (3 trials of 1 epoch on 150 images, mini_cnn only), and so is the
README's first study of your own (on a generated image folder). Every command is the page's line,
comment and all. The dashboard goes through bash in an activated environment, as a user types it,
and serves from its own process on a free port; the others run in this one (a new interpreter would
cost seconds of imports each and test nothing more), each distinct command once. A command that
needs what this machine has not (a placeholder such as NAME, a database server, a dataset download,
another study) is parsed instead: its command, options and values must still exist as printed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from search import cli
from search.errors import SearchError
from tests.conftest import ROOT, run_inline

README = ROOT / "README.md"
FIRST_HOUR = 300  # lines of README at most: the reference lives in docs/
OWN_STUDY = "A first study of your own"
# What makes a command one to parse rather than run here, and why.
ELSEWHERE = {
    "NAME": "a placeholder",
    "URL": "a placeholder",
    "recipe.yaml": "an example's own recipe",
    "recipes/cifar10.yaml": "CIFAR-10 is a download",
    "postgresql+psycopg:": "a database server elsewhere",
    "grpc:": "a storage proxy elsewhere",
    "digits_pareto": "the study of `make pareto` (minutes of training)",
}


def section(text: str, name: str) -> str:
    return re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)


def commands(text: str) -> list[str]:
    """The command lines of the code blocks in `text` (a '$ ' prompt dropped, '\\' lines joined)."""
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", "", block)
        out += [
            line.removeprefix("$ ")
            for line in joined.splitlines()
            if line.removeprefix("$ ").startswith("python -m search ")
        ]
    return out


def linked_pages() -> list[Path]:
    """The docs/ pages, in the order the README links them."""
    names = re.findall(r"\]\(docs/([\w-]+\.md)\)", README.read_text())
    return [ROOT / "docs" / n for n in dict.fromkeys(names)]


def elsewhere(cmd: str) -> str | None:
    words = shlex.split(cmd, comments=True)
    return next((why for mark, why in ELSEWHERE.items() if any(mark in w for w in words)), None)


def activated_env(tmp: Path) -> dict[str, str]:
    """What `. .venv/bin/activate` gives: the environment's bin first on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp),
    }


def small_demo(cwd: Path) -> None:
    recipe = yaml.safe_load((ROOT / "recipes" / "digits.yaml").read_text())
    recipe["study"].update(n_trials=3, sampler={"name": "tpe", "n_startup_trials": 2})
    recipe["data"]["max_samples"] = 150
    recipe["pool"] = ["mini_cnn"]
    recipe["train"]["epochs"] = 1
    (cwd / "recipes").mkdir()
    (cwd / "recipes" / "digits.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def small_own_study(cwd: Path) -> None:
    """The README's recipe for your own images, saved where it says, made small (2 trials of 1 epoch,
    mini_cnn only: no weights to fetch), and an image folder of 3 classes of 12 PNGs where it points."""
    text = section(README.read_text(), OWN_STUDY)
    recipe = yaml.safe_load(re.search(r"^```yaml\n(.*?)^```", text, re.S | re.M).group(1))
    path = re.search(r"save this\s+recipe as `([^`]+)`", text).group(1)
    recipe["study"]["n_trials"] = 2
    recipe["train"]["epochs"] = 1
    recipe["pool"] = ["mini_cnn"]
    (cwd / path).write_text(yaml.safe_dump(recipe, sort_keys=False))
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs", "owls"):
        folder = cwd / recipe["data"]["dataset"].removeprefix("folder:") / label
        folder.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_the_readme_is_the_first_hour_and_links_every_page_of_the_reference():
    lines = README.read_text().splitlines()
    assert len(lines) <= FIRST_HOUR, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert len(pages) >= 8 and pages == {p.name for p in linked_pages()}, sorted(pages)


def test_links_and_images_point_at_files_and_headings_that_exist():
    """Every relative link of the README and the docs pages: the file exists, and so does the
    heading an anchor names (GitHub's anchors: lower case, punctuation dropped, spaces as '-')."""

    def anchors(path: Path) -> set[str]:
        heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}

    bad = []
    for page in [README, *linked_pages()]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.is_file() or (anchor and anchor not in anchors(dest)):
                bad.append(f"{page.relative_to(ROOT)}: {target}")
    assert bad == []


def test_the_pages_list_the_commands_they_promise():
    readme = commands(README.read_text())
    assert len(readme) >= 14 and not [c for c in readme if elsewhere(c)], readme
    assert readme[0] == "python -m search validate recipes/digits.yaml       # check a recipe, print the search space"
    assert [c.split("#")[0].split()[3] for c in commands(section(README.read_text(), OWN_STUDY))] == [
        "validate",
        "prefetch",
        "run",
        "report",
    ]
    docs = [c for page in linked_pages() for c in commands(page.read_text())]
    assert len(docs) >= 12 and sum(not elsewhere(c) for c in docs) >= 4, docs


def test_every_command_named_in_the_text_exists():
    """`python -m search NAME` in running text, not only in code blocks: NAME is a command (unless
    the page shows it as the mistake it is: "unknown command 'NAME'")."""
    texts = [" ".join(p.read_text().split()) for p in [README, *linked_pages()]]
    named = {
        m for t in texts for m in re.findall(r"python -m search ([a-z-]+)", t) if f"unknown command '{m}'" not in t
    }
    assert {"prefetch", "fail-stale", "models", "rank", "proxy"} <= named
    missing = []
    for name in sorted(named):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                cli.parser().parse_args([name, "--help"])
            except SearchError:
                missing.append(name)
            except SystemExit as e:
                if e.code != 0:
                    missing.append(name)
    assert missing == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard(cmd: str, cwd: Path, env: dict) -> None:
    """The dashboard serves forever: it must answer on its port, then it is stopped. The port is a
    free one (given with --port), so a server already on 8080 does not answer in its place."""
    port = free_port()
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {cmd.split('#')[0].strip()} --port {port}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else cmd
                time.sleep(1)
        assert '"study_name": "digits"' in body
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"optuna-dashboard on http://127.0.0.1:{port}/dashboard/ with artifacts from" in out


def _inline(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The page's line as its shell would split it (comment dropped), run in this process."""
    words = shlex.split(cmd, comments=True)
    assert words[:3] == ["python", "-m", "search"], cmd
    return run_inline(*words[3:], cwd=cwd, env=env)


def _parses(cmd: str) -> None:
    """The command, its options and their values exist as printed (the CLI's own parser)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.parser().parse_args(shlex.split(cmd, comments=True)[3:])
        except (SystemExit, SearchError) as e:
            pytest.fail(f"{cmd!r} no longer parses: {e} {err.getvalue()[-500:]}")


@pytest.mark.slow
def test_every_command_of_the_readme_and_the_docs_works_as_written_after_the_demo(tmp_path):
    """The demo, then every command in the README's order, then each docs page's, on the same
    study: the dashboard through bash in an activated environment (it serves), the others in this
    process; a command printed on two pages runs once."""
    env = activated_env(tmp_path)
    small_demo(tmp_path)
    small_own_study(tmp_path)
    demo = _inline("python -m search run recipes/digits.yaml", tmp_path, env)  # `make demo`, activated
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "browse it (with its artifacts): python -m search dashboard digits" in demo.stdout
    walk = [(README, c) for c in commands(README.read_text())]
    walk += [(page, c) for page in linked_pages() for c in commands(page.read_text())]
    suggested, ran, parsed = [], set(), []
    for page, cmd in walk:
        words = tuple(shlex.split(cmd, comments=True))
        if words in ran:
            continue
        ran.add(words)
        if elsewhere(cmd):
            _parses(cmd)
            parsed.append(cmd)
            continue
        if " dashboard " in cmd:
            _dashboard(cmd, tmp_path, env)
            continue
        proc = _inline(cmd, tmp_path, env)
        assert proc.returncode == 0, (page.name, cmd, proc.stdout[-2000:], proc.stderr[-3000:])
        printed = proc.stdout + proc.stderr
        suggested += [m.group(0) for m in re.finditer(r"\S*python\S* -m search \S+", printed)]
        progress = re.compile(r"^(\[[#.]+\] |trial +\d+ |retrain )")  # progress lines: not tables
        assert all(
            len(line) <= 100
            for line in proc.stdout.splitlines()
            if "-m search" not in line and not progress.match(line)
        ), (cmd, proc.stdout)
    assert suggested and all(s.startswith("python -m search ") for s in suggested), suggested
    assert (tmp_path / "best.yaml").is_file() and (tmp_path / "studies" / "digits" / "retrain").is_dir()
    assert (tmp_path / "studies" / "mine" / "report" / "leaderboard.md").is_file()
    assert len(parsed) <= len(ran) // 2, parsed  # most commands run
