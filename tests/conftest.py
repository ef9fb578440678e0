from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import logging
import os
import subprocess
import sys
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_test_process():
    """Under pytest-xdist, each test process (and every process a test starts) computes on one thread:
    two processes of two spinning OpenMP threads each on two cores run slower than one thread each."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    import torch

    before = torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    os.environ.pop("OMP_NUM_THREADS", None)


@pytest.fixture(scope="session", autouse=True)
def data_root_of_the_session(tmp_path_factory):
    """$SEARCH_DATA in a temporary directory: nothing a test decodes or caches lands in the user's data root;
    and $XDG_STATE_HOME too: the records of checked data files stay out of the user's state directory."""
    names = ("SEARCH_DATA", "XDG_STATE_HOME")
    before = {k: os.environ.get(k) for k in names}
    os.environ["SEARCH_DATA"] = str(tmp_path_factory.mktemp("data-root"))
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory built by the first test process of the run that asks for it and reused by the
    others (pytest-xdist's workers share the parent of their temporary directories): expensive
    fixtures (trained checkpoints) are paid once per run, not once per process."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            path.mkdir(exist_ok=True)
            build(path)
            done.touch()
    return path


def start_worker(name: str, url: str, cwd: Path, env: dict, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """A `search worker` process on study `name` at `url`, its output piped (text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "search", "worker", "--study", name, "--no-report"],
        cwd=cwd,
        env={**env, "SEARCH_STORAGE": url},
        text=True,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m search ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "search", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def run_inline(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m search ARGS` run in this process: the same stdout, stderr (log lines included) and
    exit code as `run_cli`, without a new interpreter's seconds of imports. For tests of what a
    command prints and does; `run_cli` where the process itself is the subject (signals, exit
    codes of a crash, environments, several processes)."""
    from search import cli as search_cli

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    here = Path.cwd()
    saved = {k: os.environ.get(k) for k in env or {}}
    try:
        os.environ.update(env or {})
        os.chdir(cwd or here)
        root.addHandler(handler)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = search_cli.main(list(args))
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        root.removeHandler(handler)
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["search", *args], code, out.getvalue(), err.getvalue())


def wsgi_get(app, path: str) -> tuple[str, bytes]:
    """GET `path` from a WSGI app in-process: (status line, body)."""
    env: dict = {}
    setup_testing_defaults(env)
    env.update(
        PATH_INFO=path, QUERY_STRING="", REQUEST_METHOD="GET", **{"wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr}
    )
    status = []
    body = b"".join(app(env, lambda s, h, *a: status.append(s)))
    return status[0], body


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_recipe(name: str = "tiny", **over) -> dict:
    """A digits study that runs in seconds on a CPU."""
    r = {
        "study": {"name": name, "n_trials": 3, "sampler": {"name": "random"}, "pruner": "none", "seed": 0},
        "data": {"dataset": "digits", "max_samples": 300},
        "pool": ["mini_cnn"],
        "space": {
            "preset": "quick",
            "overrides": {"optimizer": "adamw", "lr": {"low": 0.002, "high": 0.005, "log": True}, "batch_size": [32]},
        },
        "train": {"epochs": 2},
        "hardware": {"device": "cpu"},
    }
    for key, value in over.items():
        r[key] = {**r.get(key, {}), **value} if isinstance(value, dict) else value
    return r


def pool_trial(
    study: optuna.Study,
    value: float | list[float] | None,
    label: str = "mini_cnn",
    *,
    params: dict[str, Any] | None = None,
    dists: dict[str, BaseDistribution] | None = None,
    attrs: dict[str, Any] | None = None,
    state: TrialState = TrialState.COMPLETE,
    **more: Any,
) -> FrozenTrial:
    """A finished trial of pool entry `label`, made with Optuna's create_trial (no training), added to
    `study` and returned as stored. Its params are `model` = label and `params`, over `dists` (by default
    the model's alone; a study's trials must share them); its user attributes the pool label and `attrs`.
    `value`: a number, a list (several objectives) or None (a trial that did not complete); `more` goes
    to create_trial (system_attrs, intermediate_values)."""
    values = None if value is None else value if isinstance(value, list) else [value]
    study.add_trial(
        create_trial(
            state=state,
            values=values,
            params={"model": label, **(params or {})},
            distributions=dists or {"model": CategoricalDistribution([label])},
            user_attrs={"pool_label": label, **(attrs or {})},
            **more,
        )
    )
    return study.get_trials(deepcopy=False)[-1]


def timeless(history: list[dict]) -> list[dict]:
    """A fit's per-epoch records less what the machine's speed decides (seconds, images/s): what two
    runs of one configuration must repeat exactly."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def fake_network(monkeypatch, payload: bytes, fail_first: int = 0) -> list[str]:
    """A network that serves `payload` to the data cache after `fail_first` connection resets, with no
    waits between retries; returns the URLs asked for."""
    from search.data import cache

    calls: list[str] = []

    def open_url(url, timeout=60.0):
        calls.append(url)
        if len(calls) <= fail_first:
            raise urllib.error.URLError("connection reset")
        return io.BytesIO(payload)

    monkeypatch.delenv("SEARCH_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cache, "_network_up", lambda host: True)
    monkeypatch.setattr(cache, "_open_url", open_url)
    monkeypatch.setattr(cache.time, "sleep", lambda s: None)
    return calls


@pytest.fixture(scope="session")
def demo_study(tmp_path_factory) -> Path:
    """A finished 3-trial study, run once through the CLI; returns its working directory."""
    cwd = tmp_path_factory.mktemp("demo")
    write_recipe(cwd / "tiny.yaml", tiny_recipe())
    proc = run_inline("run", "tiny.yaml", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd


def pytest_collection_finish(session):
    """Everything the collection imported (torch, Optuna, the test modules: millions of objects)
    moves to the collector's permanent generation: the full collections the harness makes after
    every trial and every out-of-memory step (search.workers.run_one, search.train) then scan
    what the tests made, not all that once more (seconds a collection in a test process)."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the end-to-end tests (marked slow) run first in every test process, and
    the many short ones fill their last minutes, instead of one long test running alone at the
    end. `--dist worksteal` hands each of the n processes one contiguous share of the list (sizes
    as its scheduler cuts them), and an idle process takes work from the end of another's share:
    each share is its turn of the slow tests (dealt round-robin in file order) followed by short
    ones. The same stable order in every process, as xdist requires."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    n = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    quick = [item for item in items if item.get_closest_marker("slow") is None]
    ordered: list[pytest.Item] = []
    left = len(items)
    for i in range(n):
        size = left // (n - i)  # what worksteal's first distribution sends to its i-th process
        share = slow[i::n][:size]
        ordered += share + quick[: size - len(share)]
        del quick[: size - len(share)]
        left -= size
    ordered += quick + [item for item in slow if item not in ordered]
    items[:] = ordered
