"""Check everything before writing anything: unsafe weight files, unofficial data files, bad
datasets and storages are refused by `run`, `worker` and `validate` with exit 2, leaving no
study, schema or file behind; `prefetch` and `validate` list every missing file."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
import torchvision.models as tvm

from search import sampling, text, weights
from search.data import records
from search.errors import SearchError
from search.pool import parse_entry
from search.trials import STALE_REASON
from tests.conftest import pool_trial, run_inline, tiny_recipe, write_recipe
from tests.test_data import write_folder, write_medmnist
from tests.test_storage import database
from tests.weights_cache import torchvision_checkpoint


class RunsCode:
    """Unpickling this calls os.system: what a crafted weights file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": RunsCode(marker)}, path)
    return path


def offline_env(tmp_path: Path) -> dict[str, str]:
    return {
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "SEARCH_OFFLINE": "1",
        "SEARCH_DATA": str(tmp_path / "data"),
    }


def in_process(monkeypatch, capsys, tmp_path: Path, cwd: Path, *args: str) -> tuple[int, str, str]:
    """`python -m search ARGS` in this process (cheaper than a new interpreter), offline like offline_env."""
    from search import cli

    for k, v in offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def left_behind(cwd: Path) -> list[str]:
    """What a refused command wrote in its working directory (the recipe aside)."""
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.name != "r.yaml")


# ---------------------------------------------------------------------------
# weights: never unpickle code


@pytest.mark.slow
def test_a_crafted_pickle_in_the_torchvision_cache_is_refused_and_never_run(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth", marker)
    cwd = tmp_path / "work"
    cwd.mkdir()
    write_recipe(cwd / "r.yaml", tiny_recipe(pool=["resnet_18"]))
    proc = run_inline("run", "r.yaml", cwd=cwd, env=offline_env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"weights file {path} needs code to be unpickled, and is refused" in lines[0]
    assert "(it would call posix.system)" in lines[0] or "(it would call os.system)" in lines[0]
    assert re.search(r"delete it and run `\S*python\S* -m search prefetch RECIPE` again", lines[0])
    assert not marker.exists() and left_behind(cwd) == []
    for command in ("validate", "prefetch"):
        code, _, err = in_process(monkeypatch, capsys, tmp_path, cwd, command, "r.yaml")
        assert code == 2 and f"weights file {path} needs code to be unpickled" in err, (command, err)
        assert not marker.exists()
    # build_model (what a trial calls) refuses it too
    from search.models import build_model

    with pytest.raises(SearchError, match="needs code to be unpickled"):
        build_model("resnet_18", num_classes=10, in_chans=3, resolution=32)
    assert not marker.exists()


@pytest.mark.slow
def test_a_crafted_pickle_in_the_hugging_face_cache_is_refused_and_never_run(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    path = crafted(repo / "snapshots" / ("0" * 40) / "pytorch_model.bin", marker)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    cwd = tmp_path / "work"
    cwd.mkdir()
    write_recipe(cwd / "r.yaml", tiny_recipe(pool=["timm/resnet18.a1_in1k"]))
    proc = run_inline("run", "r.yaml", cwd=cwd, env=offline_env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert f"weights file {path} needs code to be unpickled" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists() and left_behind(cwd) == []
    code, _, err = in_process(monkeypatch, capsys, tmp_path, cwd, "validate", "r.yaml")
    assert code == 2 and f"weights file {path} needs code to be unpickled" in err
    assert not marker.exists()


def test_plain_checkpoints_load_weights_only_in_both_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = torchvision_checkpoint(tmp_path / "torch", "resnet18-f37072fd.pth", tvm.resnet18())
    got = weights.source_state(parse_entry("resnet_18"))
    assert got.keys() == src.keys() and torch.equal(got["conv1.weight"], src["conv1.weight"])
    # timm from a pytorch_model.bin (no safetensors): read weights_only as well.
    import timm

    model = timm.create_model("resnet18")
    snap = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("1" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("1" * 40)
    torch.save(model.state_dict(), snap / "pytorch_model.bin")
    got = weights.source_state(parse_entry("timm/resnet18.a1_in1k"))
    assert torch.equal(got["conv1.weight"], model.state_dict()["conv1.weight"])
    with pytest.raises(SearchError, match=r"weights file .*junk.pth cannot be read"):
        (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
        weights.safe_load(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------
# data: the published checksum, before training


@pytest.mark.slow
def test_a_medmnist_file_with_a_wrong_checksum_is_refused_before_training(tmp_path, monkeypatch, capsys):
    env = offline_env(tmp_path)
    (tmp_path / "data").mkdir()
    write_medmnist(tmp_path / "data" / "pathmnist.npz", 28, 3, 9)
    cwd = tmp_path / "work"
    cwd.mkdir()
    write_recipe(cwd / "r.yaml", tiny_recipe(data={"dataset": "pathmnist"}))
    code, _, err = in_process(monkeypatch, capsys, tmp_path, cwd, "validate", "r.yaml")
    assert code == 2 and "expected a8b06965200029087d5bd730944a56c1" in err
    assert (tmp_path / "data" / "pathmnist.npz").is_file()  # validate only looks
    proc = run_inline("run", "r.yaml", cwd=cwd, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "pathmnist.npz has md5" in proc.stderr and "(the published checksum): not the official file" in proc.stderr
    assert "epoch" not in proc.stdout and left_behind(cwd) == []
    assert "delete it and run `python -m search prefetch RECIPE`" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["pathmnist.npz"]  # checked, not touched


# ---------------------------------------------------------------------------
# refused cases leave nothing behind, and validate refuses them too

REFUSED = {
    "chestmnist": ({"data": {"dataset": "chestmnist"}}, r"chestmnist is multi-label"),
    "missing folder": ({"data": {"dataset": "folder:/nonexistent/images"}}, r"/nonexistent/images is not a directory"),
    "missing weights": ({"pool": ["resnet_18"]}, r"resnet18-f37072fd.pth .*prefetch"),
    "missing data offline": ({"data": {"dataset": "bloodmnist"}}, r"bloodmnist.npz is missing \(offline mode"),
    "unknown scheme": ({"study": {"storage": "mongodb://127.0.0.1/x"}}, r"study.storage: unsupported URL 'mongodb"),
    "unset variable": (
        {"study": {"storage": "postgresql+psycopg://postgres:${SEARCH_NO_SUCH_VAR}@127.0.0.1/test"}},
        r"environment variable SEARCH_NO_SUCH_VAR .* is not set",
    ),
    "unreachable server": (
        {"study": {"storage": "postgresql+psycopg://postgres@127.0.0.1:1/test"}},
        r"study.storage: cannot open postgresql\+psycopg://postgres@127.0.0.1:1/test",
    ),
    "unwritable sqlite path": (
        {"study": {"storage": "sqlite:///r.yaml/x.db"}},
        r"cannot create r.yaml/x.db: .*r.yaml is not a writable directory",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_run_leaves_nothing_and_validate_refuses_it_too(tmp_path, monkeypatch, capsys, case):
    over, message = REFUSED[case]
    cwd = tmp_path / "work"
    cwd.mkdir()
    write_recipe(cwd / "r.yaml", tiny_recipe(**over))
    run = run_inline("run", "r.yaml", cwd=cwd, env=offline_env(tmp_path))
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert left_behind(cwd) == [] and not (tmp_path / "data").exists()  # no studies/, no .db, no data
    code, out, err = in_process(monkeypatch, capsys, tmp_path, cwd, "validate", "r.yaml")
    if case in (
        "missing weights",
        "missing data offline",
    ):  # the recipe is valid: validate lists the file and says so, with its own exit code
        assert code == 3 and "validate: the recipe is valid; 1 file(s) it needs are not here yet" in out
        assert err == "" and re.search(message.split(" ")[0], out), out
    else:
        assert code == 2 and re.search(message, err), err
    assert left_behind(cwd) == []


@pytest.fixture
def fresh_pg():
    """A new, empty PostgreSQL database of this test's own; dropped afterwards."""
    with database("postgres") as url:
        yield url


def tables(url: str) -> list[str]:
    engine = sqlalchemy.create_engine(url)
    try:
        return sqlalchemy.inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.mark.slow
def test_refusals_leave_a_fresh_postgresql_database_empty(tmp_path, fresh_pg):
    write_recipe(tmp_path / "r.yaml", tiny_recipe(study={"storage": fresh_pg}, data={"dataset": "chestmnist"}))
    assert run_inline("run", "r.yaml", cwd=tmp_path).returncode == 2
    assert tables(fresh_pg) == []
    proc = run_inline("worker", "--storage", fresh_pg, "--study", "nosuch", cwd=tmp_path)
    assert proc.returncode == 2 and "no study 'nosuch'" in proc.stderr and "studies there: none" in proc.stderr
    assert tables(fresh_pg) == []
    # The corrected recipe is then accepted: no stale study with the bad recipe in the way.
    write_recipe(tmp_path / "r.yaml", tiny_recipe(study={"storage": fresh_pg, "n_trials": 1}, train={"epochs": 1}))
    proc = run_inline("run", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "studies" in tables(fresh_pg)


@pytest.mark.slow
def test_a_worker_on_an_empty_sqlite_file_or_journal_creates_nothing(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    proc = run_inline("worker", "--storage", f"sqlite:///{empty}", "--study", "nosuch", cwd=tmp_path)
    assert proc.returncode == 2 and "no study 'nosuch'" in proc.stderr
    assert empty.stat().st_size == 0
    with sqlite3.connect(empty) as db:
        assert db.execute("select name from sqlite_master").fetchall() == []
    journal = tmp_path / "j" / "study.log"
    proc = run_inline("worker", "--storage", f"journal:{journal}", "--study", "nosuch", cwd=tmp_path)
    assert proc.returncode == 2 and "no study 'nosuch'" in proc.stderr
    assert not journal.parent.exists()


@pytest.mark.slow
@pytest.mark.parametrize("blob", [b"study:\n  name: caf\xe9\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"])
def test_a_recipe_that_is_not_utf8_text_is_one_line(tmp_path, blob):
    (tmp_path / "r.yaml").write_bytes(blob)
    for command in ("validate", "run"):
        proc = run_inline(command, "r.yaml", cwd=tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "r.yaml: not a text recipe" in lines[0] and "UTF-8" in lines[0]


# ---------------------------------------------------------------------------
# the offline checklist


def test_prefetch_and_validate_list_every_missing_file_offline(tmp_path, monkeypatch, capsys):
    write_folder(tmp_path / "unused")  # a file that is there is not listed
    write_recipe(
        tmp_path / "r.yaml", tiny_recipe(pool=["resnet_18", "vit_tiny", "mini_cnn"], data={"dataset": "pathmnist_64"})
    )
    for command in ("prefetch", "validate"):
        code, out, err = in_process(monkeypatch, capsys, tmp_path, tmp_path, command, "r.yaml")
        assert code == (2 if command == "prefetch" else 3), err  # validate: a valid recipe, files to fetch
        assert "3 file(s) missing on this machine" in out
        assert f"resnet_18 weights [46.8 MB]: {tmp_path / 'torch/hub/checkpoints/resnet18-f37072fd.pth'}" in out
        assert "from https://download.pytorch.org/models/resnet18-f37072fd.pth" in out
        hf = tmp_path / "hf" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "snapshots"
        assert f"vit_tiny weights [22.9 MB]: {hf}/<revision>/model.safetensors" in out
        assert (
            "from https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k/resolve/main/model.safetensors"
        ) in out
        assert f"data pathmnist_64 [up to 1.3 GB]: {tmp_path / 'data' / 'pathmnist_64.npz'}" in out
        assert "from https://zenodo.org/records/10519652/files/pathmnist_64.npz?download=1" in out
        assert "mini_cnn weights" not in out
        fetch = (
            f"download each URL to its path, or run `{text.command('prefetch r.yaml')}` with internet "
            "and copy them over"
        )
        if command == "prefetch":
            assert err.strip().splitlines() == [f"error: prefetch: 3 file(s) missing, listed above; {fetch}"]
        else:
            assert err == "" and " ".join(out.split()).endswith(  # wrapped at 100 columns
                f"validate: the recipe is valid; 3 file(s) it needs are not here yet, listed above: {fetch}"
            )
        assert max(len(line) for line in out.splitlines()) <= 100 or "from https://" in out
    assert left_behind(tmp_path) == [
        "unused",
        "unused/cat",
        "unused/cat/0.png",
        "unused/cat/1.png",
        "unused/cat/2.png",
        "unused/cat/3.png",
        "unused/dog",
        "unused/dog/0.png",
        "unused/dog/1.png",
        "unused/dog/2.png",
        "unused/dog/3.png",
    ]


def test_prefetch_fetches_every_file_when_connected(tmp_path, monkeypatch, capsys):
    """The network is mocked; the downloads land in the real caches, the data checksum-verified."""
    import dataclasses
    import hashlib
    import io
    import socket

    import huggingface_hub
    import timm
    import torch.hub

    from search import cli
    from search.data import cache, medmnist
    from tests.weights_cache import hf_checkpoint

    for k, v in offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SEARCH_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda self: None})())
    monkeypatch.setattr(cache, "_network_up", lambda host: True)
    write_medmnist(tmp_path / "pathmnist.npz", 28, 3, 9)
    blob = (tmp_path / "pathmnist.npz").read_bytes()
    path = medmnist.MEDMNIST["pathmnist"]
    md5 = (hashlib.md5(blob).hexdigest(), *path.md5[1:])
    monkeypatch.setitem(medmnist.MEDMNIST, "pathmnist", dataclasses.replace(path, md5=md5))
    urls = []
    monkeypatch.setattr(cache, "_open_url", lambda url, timeout=60.0: urls.append(url) or io.BytesIO(blob))
    monkeypatch.setattr(
        torch.hub,
        "download_url_to_file",
        lambda url, dst, progress=True: urls.append(url) or torch.save(tvm.resnet18().state_dict(), dst),
    )

    def fake_hf(repo_id, filename, cache_dir=None, **kw):
        urls.append(f"hf:{repo_id}")
        hf_checkpoint(Path(cache_dir), repo_id, timm.create_model("vit_tiny_patch16_224"))
        return str(Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf)
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(pool=["resnet_18", "vit_tiny"], data={"dataset": "pathmnist"})
    )
    assert cli.main(["prefetch", str(recipe)]) == 0
    assert len(urls) == 3 and urls[2].startswith("https://zenodo.org/")
    assert "data pathmnist: 30 train / 10 val / 12 test" in capsys.readouterr().out
    assert not list((tmp_path / "data").glob(".*.verified"))  # nothing in the data root vouches for a file
    assert records.read_record(tmp_path / "data" / "pathmnist.npz")["md5"]  # this machine's record does
    monkeypatch.setenv("SEARCH_OFFLINE", "1")
    assert cli.main(["validate", str(recipe)]) == 0 and len(urls) == 3


# ---------------------------------------------------------------------------
# counting: min_trials holds for every pruner


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband", "median"])
def test_min_trials_holds_off_every_pruner(pruner):
    """Ask/tell, no model: a trial far worse than the completed ones is kept while fewer than
    min_trials completed, and pruned once they have. (reduction_factor 10 over 9 epochs: Hyperband
    has one bracket, so every trial competes with every other.)"""
    from optuna.trial import TrialState

    from search.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        tiny_recipe(
            study={"pruner": {"name": pruner, "min_trials": 3, "warmup_epochs": 1, "reduction_factor": 10}},
            train={"epochs": 9},
        )
    )
    if pruner == "hyperband":
        assert isinstance(sampling.make_pruner(recipe), optuna.pruners.HyperbandPruner)  # TPE's bracket handling
    study = optuna.create_study(
        direction="maximize", pruner=sampling.make_pruner(recipe), sampler=optuna.samplers.RandomSampler(seed=0)
    )

    def worse_than_all(value: float) -> bool:
        t = study.ask()
        for step in range(1, 10):
            t.report(value, step)
            if t.should_prune():
                study.tell(t, state=TrialState.PRUNED)
                return True
        study.tell(t, value)
        return False

    kept = [worse_than_all(0.9 + i / 100) for i in range(2)]  # 2 good trials complete
    assert worse_than_all(0.1) is False  # only 2 completed (< min_trials): not pruned, it completes
    assert kept == [False, False]
    assert worse_than_all(0.05) is True  # 3 completed now: the pruner judges again


def test_the_leaderboard_shows_not_counted_trials_apart_from_failures():
    from optuna.trial import TrialState

    from search import report
    from search.recipe import recipe_from_dict

    recipe = recipe_from_dict(tiny_recipe())
    study = optuna.create_study(direction="maximize")

    def add(state, reason=None, value=None):
        pool_trial(study, value, state=state, attrs={"fail_reason": reason} if reason else {})

    add(TrialState.COMPLETE, value=0.9)
    add(TrialState.FAIL, "diverged (loss nan)")  # the trial's own failure: counts
    add(TrialState.FAIL, "interrupted")
    add(TrialState.FAIL, "study total reached")
    add(TrialState.FAIL, STALE_REASON)
    [row] = report.leaderboard(study, recipe)
    assert (row["complete"], row["failed"], row["not_counted"]) == (1, 1, 3)
    board = report.leaderboard_text(study, recipe)
    head, _, group, line = board.splitlines()[1:5]
    assert head.split()[6:8] == ["failed", "n/c"] and line.split()[5:7] == ["1", "3"]
    assert group == "weight source not recorded:"  # trials made without their entry's attributes
    assert board.splitlines()[-1].startswith("n/c: not counted toward n_trials")
    assert "| not counted |" in report.markdown(study, recipe)
