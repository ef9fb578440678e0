"""`python -m search COMMAND`: one handler per subcommand, dispatched by a dict.

User mistakes raise SearchError: printed as one line on stderr, exit code 2; so do argparse's own
(an unknown command or option, a value of the wrong type), with the closest match. `validate`
exits 3 where the recipe is valid but files it needs are missing here (see `_verdict`).
About 750 lines: one short handler and one argparse block per command, and the one-line form of
argparse's errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from search.errors import SearchError, did_you_mean, one_of

MISSING_FILES = 3  # `validate`: the recipe is valid, but files it needs are not on this machine yet


def _recipe(args: argparse.Namespace):
    from search.recipe import load_recipe

    return load_recipe(args.recipe, args.set or ())


def cmd_validate(args: argparse.Namespace) -> int:
    """The recipe, its search space, and every check that needs no training: storage (scheme,
    ${VAR}, reachability), dataset, weights. Missing files are listed as a checklist. Nothing
    is written, downloaded or decoded."""
    from search import space, storage
    from search.datasets import channels
    from search.pool import parse_pool
    from search.text import table

    recipe = _recipe(args)
    s = recipe.study
    url = s.storage or storage.default_storage(s.name)
    say = _sayer(args)
    say(f"recipe {args.recipe}: ok")
    say(
        f"study {s.name}: {s.n_trials} trials, {s.direction} val {s.metric}, sampler {s.sampler.name}, "
        f"pruner {s.pruner.name}, storage {storage.where(url)}"  # the host, before check_storage connects
    )
    say(f"data {recipe.data.dataset}; train {recipe.train.epochs} epochs")
    if s.rank is not None:
        r = recipe.rank
        say(
            f"rank before the search by {r.by} on {r.max_images} train images: keep {s.rank.keep or 'all'}"
            f"{', baselines in rank order first' if s.rank.order else ''}"
        )
    print("pool:")
    entries = parse_pool(recipe.pool)
    print(
        "\n".join(
            table(
                ["entry", "weight source", "ImageNet overlap"],
                [[e.label, e.source, e.overlap] for e in entries],
                wide=args.wide,
                indent="  ",
                sep="  ",
            )
        )
    )
    print(f"search space (preset {recipe.space.preset}):")
    for line in space.describe(
        recipe.space, recipe.train, entries, channels(recipe.data)
    ).splitlines():  # `model {labels}` of a long pool wraps under itself
        say(line, indent=" " * 21)
    missing, problems = _offline_checks(recipe, entries)
    try:
        if not storage.check_storage(url, connect=not args.offline):
            say(f"not checked (--offline): that the storage at {storage.where(url)} answers; nothing was contacted")
    except SearchError as e:
        problems.insert(0, str(e))
    return _verdict(missing, problems, "validate", args.recipe)


def _sayer(args: argparse.Namespace) -> Callable[..., None]:
    """print, a long line wrapped to 100 columns (unless --wide), continuation lines indented."""
    from search.text import wrap

    def say(line: str, indent: str = "  ") -> None:
        print(line if getattr(args, "wide", False) else "\n".join(wrap(line, indent=indent)))

    return say


def _offline_checks(recipe, entries) -> tuple[list, list[str]]:
    """(missing files, problems) of the dataset and the pool's weights, without any download."""
    from search import data, weights

    missing, problems = [], []
    try:
        missing += data.check(recipe.data)
    except SearchError as e:
        problems.append(str(e))
    for entry in entries:
        if not entry.pretrained:
            continue
        try:
            found = weights.cached_file(entry)
            if found is not None:
                weights.safe_load(found, mmap=True)
            elif (m := weights.missing(entry)) is not None:
                missing.append(m)
        except SearchError as err:
            problems.append(str(err))
    return missing, problems


def _verdict(missing: list, problems: list[str], command: str, recipe: str) -> int:
    """Print the checklist of missing files and one line per problem.

    Exit code: 0 with neither; 2 with a problem, or with files `prefetch` could not fetch; for
    `validate`, MISSING_FILES (3) when the recipe is valid and only files are missing here, so a
    script can tell "fix the recipe" (2) from "fetch first" (3).
    """
    from search.reach import checklist
    from search.text import command as cmd
    from search.text import wrap

    prefetch = cmd(f"prefetch {recipe}")
    if missing:
        print(checklist(missing))
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not missing:
        return 2 if problems else 0
    fetch = f"download each URL to its path, or run `{prefetch}` with internet and copy them over"
    if command == "validate" and not problems:
        line = f"validate: the recipe is valid; {len(missing)} file(s) it needs are not here yet, listed above: {fetch}"
        print("\n".join(wrap(line)))
        return MISSING_FILES
    print(f"error: {command}: {len(missing)} file(s) missing, listed above; {fetch}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from search import storage, workers
    from search import study as st
    from search.recipe import MAX_WORKERS

    recipe = _recipe(args)
    url = recipe.study.storage or storage.default_storage(recipe.study.name)
    n_workers = workers.default_workers(recipe) if args.workers is None else args.workers
    if not 0 <= n_workers <= MAX_WORKERS:
        raise SearchError(
            f"run --workers {n_workers}: give 0 (only create the study) to {MAX_WORKERS} local worker processes"
        )
    _sayer(args)(f"storage: {storage.where(url)}")  # where a password goes, before it is sent
    st.check_all(recipe, url)  # nothing is written before every check passed
    study = st.open_study(recipe, url, force=args.force)
    st.start_clock(study, recipe)
    if n_workers == 0:
        print(
            f"study {recipe.study.name} is ready in {storage.mask(url)}; start workers with:\n"
            f"  {workers.resume_command(recipe, url)}"
        )
        return 0
    return _work(recipe, study, url, args, n_workers)


def _storage_arg(args: argparse.Namespace) -> str:
    url = args.storage or os.environ.get("SEARCH_STORAGE")
    if not url:
        raise SearchError(f"{args.command}: no storage; give --storage URL or set SEARCH_STORAGE")
    return url


def cmd_worker(args: argparse.Namespace) -> int:
    from search import storage
    from search import study as st

    url = _storage_arg(args)
    if not args.no_report:  # the workers of `run --workers`: their run said it once
        _sayer(args)(f"storage: {storage.where(url)}")  # where a password goes, before it is sent
    recipe, study = st.load_stored(url, args.study)
    return _work(recipe, study, url, args)


def cmd_fail_stale(args: argparse.Namespace) -> int:
    from search import study as st
    from search import workers

    url = _storage_arg(args)
    recipe, study = st.load_stored(url, args.study)
    floor = 2 * recipe.study.heartbeat
    if args.older_than < floor:
        raise SearchError(
            f"fail-stale --older-than {args.older_than:g}: live trials beat every {recipe.study.heartbeat} s "
            f"(study.heartbeat), so anything under {floor} s would fail trials that are running; give "
            f"--older-than {floor} or more"
        )
    failed = workers.fail_stale(study, args.older_than)
    print(
        f"failed {len(failed)} stale trial(s){': ' + ', '.join(map(str, failed)) if failed else ''}; "
        "each is queued again for the next worker"
    )
    return 0


def _work(recipe, study, url: str, args: argparse.Namespace, n_workers: int = 1) -> int:
    from search import report, workers
    from search import study as st
    from search.outage import EXIT_STORAGE_GONE, StorageGone
    from search.record import study_attrs

    try:
        if n_workers > 1:
            if workers.run_workers(recipe, url, n_workers, quiet=args.quiet):
                return 1
        else:
            st.work(recipe, study, quiet=args.quiet)
    except KeyboardInterrupt as e:
        print(
            f"\ninterrupted ({e or 'SIGINT'}): the running trial is queued again and resumes after its last "
            f"finished epoch.\nresume with: {workers.resume_command(recipe, url)}",
            file=sys.stderr,
        )
        return 130 if str(e) in ("", "SIGINT") else 143
    except StorageGone as e:
        print(
            f"error: {e}; this worker stops, its running trial keeps its saved state and is queued again "
            f"by the next sweep.\nresume with: {workers.resume_command(recipe, url)}",
            file=sys.stderr,
        )
        return EXIT_STORAGE_GONE
    if not args.quiet and not getattr(args, "no_report", False):
        wide = getattr(args, "wide", False)
        print(report.leaderboard_text(study, recipe, wide=wide))
        if study_attrs(study).get("rank"):
            print("\n" + report.rank_text(study, recipe, wide=wide))
        print(f"\nbrowse it (with its artifacts): {dashboard_command(recipe, url)}")
        if recipe.tracking.mlflow:
            from search import tracking
            from search.storage import dir_of

            uri = tracking.mlflow_uri(recipe.tracking, dir_of(study))
            print(f"follow it in MLflow: {tracking.ui_command(uri or '')}")
    return 0


def dashboard_command(recipe, url: str) -> str:
    """The `dashboard` command for this study, as it works from the user's shell."""
    from search import storage
    from search.text import command

    default = url == storage.default_storage(recipe.study.name)
    return command(f"dashboard {recipe.study.name}" + ("" if default else f" --storage '{storage.mask(url)}'"))


def cmd_models(args: argparse.Namespace) -> int:
    """Built-ins (or one timm name) with their weights, source, overlap, input size and parameters.

    Parameters are counted with an ImageNet head (1,000 classes, 3 channels; mini_cnn 10 classes)
    unless --classes / --channels give the data's shape, which is what a study's leaderboard counts.
    """
    from search.models import catalog

    bad_size = args.size is not None and args.size < 8
    if (args.classes is not None and args.classes < 2) or args.channels not in (None, 1, 3) or bad_size:
        raise SearchError(
            f"models: --classes {args.classes} --channels {args.channels} --size {args.size}: give "
            "2 or more classes, 1 (gray) or 3 (RGB) channels and 8 px or more"
        )
    out = catalog(args.name, classes=args.classes, channels=args.channels, size=args.size)
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.csv:
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(out[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(out)
    else:
        _print_models(out, args)
    return 0


def _print_models(out: list[dict], args: argparse.Namespace) -> None:
    """The `models` table, its numbered notes, and what the parameter counts assume."""
    from search.report import short_count
    from search.text import table, wrap

    notes = list(dict.fromkeys(r["note"] for r in out if r["note"]))  # numbered below the table
    rows = [
        [
            r["label"],
            r["weights"],
            r["source"],
            r["overlap"],
            r["resolution"],
            f"{r['params']:,}" if args.wide else short_count(r["params"]),
            notes.index(r["note"]) + 1 if r["note"] else "",
        ]
        for r in out
    ]
    header = ["model", "weights", "source", "overlap", "input", "params", "note"]
    right = [False, False, False, False, True, True, True]
    print("\n".join(table(header, rows, right=right, wide=args.wide, sep="  ")))
    for i, n in enumerate(notes):
        print("\n".join(wrap(f"{i + 1:>2}  {n}", 10**6 if args.wide else 100, indent="    ")))
    if args.classes or args.channels or args.size:
        note = (
            f"params: counted for {args.classes or '1,000 (ImageNet)'} classes, {args.channels or 3} "
            f"channel(s), entries that follow the data at {args.size or 224} px."
        )
    else:
        note = (
            "params: counted with an ImageNet head (1,000 classes; mini_cnn 10), 3 channels, 224 px; a study "
            "counts them at its data's shape, as its leaderboard does: --classes 10 --channels 1 --size 8 "
            "gives digits' counts. input 'data': the entry follows the images' size."
        )
    print("\n".join(wrap(note, 10**6 if args.wide else 100)))


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Fill the weight caches and the data root; what cannot be fetched is listed, not just the first."""
    from search import data, weights
    from search.pool import parse_pool

    recipe = _recipe(args)
    missing, problems = [], []
    for e in parse_pool(recipe.pool):
        if not e.pretrained:
            print(f"{e.label}: no pretrained weights")
            continue
        try:
            print(f"{e.label}: {weights.check(e)}")
        except SearchError as err:
            m = weights.missing(e)
            missing.append(m) if m else problems.append(str(err))
    try:
        wanted = data.check(recipe.data)
        try:
            summary = data.load_data(recipe.data, recipe.study.seed).summary()
            print(f"data {summary};\n  cached under {data.data_root(recipe.data)}")  # a path: a line of its own
        except SearchError as err:
            if not wanted:
                raise
            missing += wanted  # the download was impossible: on the checklist
            if "missing" not in str(err):
                problems.append(str(err))
    except SearchError as err:
        problems.append(str(err))
    return _verdict(missing, problems, "prefetch", args.recipe)


def cmd_rank(args: argparse.Namespace) -> int:
    import time

    from search import rank
    from search.data import data_root, load_data
    from search.pool import parse_pool
    from search.study import preflight

    recipe = _recipe(args)
    start = time.perf_counter()
    preflight(parse_pool(recipe.pool))  # missing weights: one line, exit 2, before any work
    data = load_data(recipe.data, recipe.study.seed)
    cfg = recipe.rank
    n_train, n_val = min(len(data.train), cfg.max_images), min(len(data.val), cfg.max_val_images)
    print(f"{data.summary()}\nranking {len(recipe.pool)} entries on {n_train} train / {n_val} val images")
    rows = rank.rank_pool(
        recipe,
        data,
        on_row=None
        if args.quiet
        else lambda r: print(
            f"  {r['entry']}: {r['status']}"
            + (f" {r['seconds']:.1f}s" if r["seconds"] is not None else "")
            + (" (cached)" if r["cached"] else "")
            + (f" - {r['note']}" if r["status"] == "failed" else "")
        ),
    )
    print(rank.table(rows, cfg.by, n_train, n_val))
    print(
        f"{time.perf_counter() - start:.1f} s in all; features cached under\n"
        f"  {data_root(recipe.data) / 'rank-features'}"
    )
    if args.json:
        import json as _json
        from pathlib import Path

        from search.files import write_text

        write_text(Path(args.json), _json.dumps(rows, indent=2))
    return 0


def _stored(args: argparse.Namespace):
    from search import storage
    from search import study as st

    url = args.storage or storage.default_storage(args.study)
    recipe, study = st.load_stored(url, args.study)
    return recipe, study, url, storage.study_dir(args.study, storage.url_file(url))


def cmd_report(args: argparse.Namespace) -> int:
    from search import report
    from search.record import study_attrs, versions_line
    from search.text import wrap

    recipe, study, _, directory = _stored(args)
    print(report.report_text(study, recipe, top=max(1, recipe.study.top_k), wide=args.wide))
    extra = report.selection_text(study, recipe, wide=args.wide)
    if extra:
        print("\n" + extra)
    if study_attrs(study).get("rank"):
        print("\n" + report.rank_text(study, recipe, wide=args.wide))
    files = report.write_report(study, recipe, directory / "report")
    created = study_attrs(study).get("versions")
    if created:
        print(f"\ncreated with {versions_line(created)}")
    print()
    print("\n".join(wrap(f"wrote {directory / 'report'}/: {', '.join(f.name for f in files)}")))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search import selection
    from search.files import write_text
    from search.text import command
    from search.trials import label, value

    recipe, study, _, _ = _stored(args)
    if args.pick:
        t = selection.pick(study, recipe, args.pick)
        rule = f"best val {recipe.study.metric} on the Pareto front under {args.pick}"
    elif len(recipe.study.names) > 1:
        selection.best_trial(study, recipe)  # no complete trial: that error first
        print(selection.pareto_text(study, recipe, wide=args.wide), file=sys.stderr)
        raise SearchError(
            f"study '{study.study_name}' has {len(recipe.study.names)} objectives: choose a trial "
            "of the Pareto front above with a condition, e.g. "
            f"--pick '{recipe.study.names[1]}<=VALUE'"
        )
    else:
        t, rule = selection.best_choice(study, recipe)
    write_text(Path(args.out), selection.best_yaml(study, recipe, t, rule, path=args.out))
    say = _sayer(args)
    say(f"best trial {t.number} ({label(t)}, val {recipe.study.metric} {value(t):.4f}) -> {args.out}")
    say(f"rule: {rule}")
    print(f"retrain and test it once:\n  {command('retrain ' + args.out)}")  # whole: it is pasted
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    from search import confirm, confirmed, selection

    recipe, study, _, _ = _stored(args)
    cfg = recipe.study.confirm
    top_k = args.top_k if args.top_k is not None else (cfg.top_k if cfg else 3)
    seeds = args.seeds if args.seeds is not None else (cfg.seeds if cfg else 3)
    if top_k < 1 or seeds < 2:
        raise SearchError(
            f"confirm: --top-k {top_k} --seeds {seeds}: need top-k >= 1 and seeds >= 2 (the search's own run is seed 1)"
        )
    selection.best_trial(study, recipe)  # a study without a complete trial has nothing to confirm
    queued = confirm.enqueue(study, top_k, seeds)
    print(
        f"confirming the top {top_k} configurations over {seeds} seeds: {queued} runs queued in study "
        f"'{confirmed.companion_name(study.study_name)}'"
    )
    confirm.run(recipe, study, quiet=args.quiet)
    print(selection.confirmed_text(study, recipe, wide=args.wide))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from search.retrain import Stopped, retrain

    if args.seeds < 1:
        raise SearchError(f"retrain --seeds {args.seeds}: give 1 or more final models to train")
    try:
        retrain(_recipe(args), args.storage, seeds=args.seeds, tta=args.tta)
    except Stopped as e:
        print(e.message, file=sys.stderr)
        return 130 if e.signal_name == "SIGINT" else 143
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search import export

    if args.trial is not None:
        src = export.from_trial(args.run, args.trial, args.storage)
    else:
        src = export.from_retrain(Path(args.run))
    say = _sayer(args)
    export.export(src, Path(args.out) if args.out else None, tolerance=args.tolerance, bench_runs=args.bench, say=say)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search import predict  # onnxruntime, numpy and Pillow: no torch on this path

    if args.top_k < 1:
        raise SearchError(f"predict --top-k {args.top_k}: give 1 or more classes per image")
    rows = predict.predict(args.model, args.images, args.top_k)
    if args.csv:
        predict.write_csv(rows, Path(args.csv))
    if not args.quiet:
        print("\n".join(predict.lines(rows)))
    if args.csv:
        print(f"wrote {args.csv}: {len(rows)} rows (path, top1, p1, ...)")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from search import artifacts, storage
    from search.reach import is_loopback

    _, _, url, directory = _stored(args)
    from search import dashboard

    where = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"  # IPv6 bracketed
    if not is_loopback(args.host):
        # optuna-dashboard's API has no authentication: say what anyone on the network may do.
        may = (
            "change, finish and delete studies, trials, notes and artifacts"
            if args.allow_writes
            else "read every trial and artifact"
        )
        print(
            f"warning: optuna-dashboard has no authentication; anyone who reaches {where} "
            f"can {may} in {storage.mask(url)}. Keep it on "
            "a private network, or serve on 127.0.0.1 and reach it through an SSH tunnel.",
            file=sys.stderr,
        )
    writes = "writes allowed" if args.allow_writes else "read-only: --allow-writes to change the study or its artifacts"
    print(
        f"optuna-dashboard on http://{where}/dashboard/ with artifacts from\n"
        f"  {directory / 'artifacts'}   ({writes}; Ctrl-C to stop)"
    )
    dashboard.serve(
        storage.open_storage(url, heartbeat=None),
        artifacts.ServedStore(artifacts.store_for(directory), writable=args.allow_writes),
        args.host,
        args.port,
        args.allow_writes,
        args.allow_host,
    )
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from search import proxy

    url = args.storage or os.environ.get("SEARCH_STORAGE")
    if not url:
        raise SearchError(
            "proxy: no storage; give --storage DATABASE_URL (e.g. postgresql+psycopg://USER:PASS@HOST/DB)"
        )
    return proxy.serve(url, args.host, args.port, args.threads)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "worker": cmd_worker,
    "fail-stale": cmd_fail_stale,
    "validate": cmd_validate,
    "models": cmd_models,
    "prefetch": cmd_prefetch,
    "rank": cmd_rank,
    "report": cmd_report,
    "best": cmd_best,
    "confirm": cmd_confirm,
    "retrain": cmd_retrain,
    "export": cmd_export,
    "predict": cmd_predict,
    "dashboard": cmd_dashboard,
    "proxy": cmd_proxy,
}


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like a recipe's (the subcommands' parsers are of
    this class too: argparse makes them with the parent's)."""

    def error(self, message: str) -> NoReturn:
        raise SearchError(usage_error(self.prog, message))


def usage_error(prog: str, message: str) -> str:
    """argparse's message as one line: what was wrong, the allowed values (closest first), the fix."""
    choice = re.fullmatch(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        allowed = [c.strip(" '") for c in choice.group(3).split(",")]
        what = (
            "command" if choice.group(1) in ("COMMAND", "command", "{" + ",".join(allowed) + "}") else choice.group(1)
        )
        bad = choice.group(2)
        hint = did_you_mean(bad, allowed, cutoff=0.6)  # short words: a swapped pair of letters is 0.67 alike
        return f"{prog}: unknown {what} '{bad}'{hint}; allowed: {one_of(allowed)}"
    number = re.fullmatch(r"argument (\S+): invalid (int|float) value: '([^']*)'", message)
    if number:
        kind = "a whole number" if number.group(2) == "int" else "a number"
        return f"{prog} {number.group(1)}: '{number.group(3)}' is not {kind}; e.g. {number.group(1)} 4"
    typed = re.fullmatch(r"argument (\S+): (.*)", message)  # a type's own message (study names)
    if typed:
        return f"{prog} {typed.group(1)}: {typed.group(2)}"
    return f"{prog}: {message}; see `{prog} --help`"


def study_name(text: str) -> str:
    """A study name given on the command line, held to the recipe's rule: it names files under studies/."""
    from search.recipe import STUDY_NAME

    if not re.fullmatch(STUDY_NAME, text):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a study name: letters, digits, '_', '.' and '-', starting with a letter or digit "
            "(as study.name in a recipe)"
        )
    return text


# ---------------------------------------------------------------------------
# each command's arguments


def _wide(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--wide",
        action="store_true",
        help="names in full and exact counts: lines may pass 100 columns (tables are also written as CSV)",
    )


def _quiet(sp: argparse.ArgumentParser, help: str | None = None) -> None:
    sp.add_argument("-q", "--quiet", action="store_true", help=help)


def _with_recipe(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("recipe", help="recipe YAML file")
    sp.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe value (repeatable)")


def _by_name(sp: argparse.ArgumentParser) -> None:
    """A stored study named on the command line (report, best, dashboard, confirm)."""
    sp.add_argument("study", type=study_name, help="study name")
    sp.add_argument("--storage", help="storage URL (default sqlite:///studies/STUDY.db)")


def _joined(sp: argparse.ArgumentParser) -> None:
    """A study joined by URL and name, its recipe read from the storage (worker, fail-stale)."""
    sp.add_argument("--storage", help="storage URL of the study (default: $SEARCH_STORAGE)")
    sp.add_argument("--study", required=True, type=study_name, help="study name")


def _run_args(sp: argparse.ArgumentParser) -> None:
    _with_recipe(sp)
    sp.add_argument("--force", action="store_true", help="continue a study even if its recipe changed")
    _quiet(sp)
    _wide(sp)
    sp.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local worker processes (default hardware.workers; "
        "GPUs round-robin; 0: only create the study, start workers elsewhere)",
    )


def _validate_args(sp: argparse.ArgumentParser) -> None:
    _with_recipe(sp)
    _wide(sp)
    sp.add_argument(
        "--offline",
        action="store_true",
        help="contact nothing: no database server, no download, no network (says what it did not check)",
    )


def _rank_args(sp: argparse.ArgumentParser) -> None:
    _with_recipe(sp)
    _quiet(sp, "only the ranked table")
    sp.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def _worker_args(sp: argparse.ArgumentParser) -> None:
    _joined(sp)
    _quiet(sp)
    sp.add_argument("--no-report", action="store_true", help="no leaderboard at the end (workers of `run --workers`)")
    _wide(sp)


def _fail_stale_args(sp: argparse.ArgumentParser) -> None:
    _joined(sp)
    sp.add_argument(
        "--older-than",
        type=float,
        required=True,
        metavar="SECONDS",
        help="fail RUNNING trials with no heartbeat for this long",
    )


def _models_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", nargs="?", help="e.g. timm/convnext_tiny.fb_in22k")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--csv", action="store_true", help="the table as CSV")
    _wide(sp)
    sp.add_argument("--classes", type=int, metavar="N", help="count parameters with an N-class head (the data's)")
    sp.add_argument("--channels", type=int, metavar="C", help="count parameters for C input channels (1 or 3)")
    sp.add_argument("--size", type=int, metavar="PX", help="input size of the entries that follow the data")


def _report_args(sp: argparse.ArgumentParser) -> None:
    _by_name(sp)
    _wide(sp)


def _best_args(sp: argparse.ArgumentParser) -> None:
    _report_args(sp)
    sp.add_argument("--out", default="best.yaml", help="recipe file to write (default best.yaml)")
    sp.add_argument(
        "--pick",
        metavar="CONDITION",
        help="several objectives: the best primary metric on "
        "the Pareto front under CONDITION, e.g. 'latency_ms<=5' (comma: and)",
    )


def _dashboard_args(sp: argparse.ArgumentParser) -> None:
    sp.description = (
        "optuna-dashboard on a study, with its artifacts. Its API has no authentication, so it "
        "is served read-only (pages, trials, artifacts) unless --allow-writes, and answers only "
        "requests that name it: its address, localhost, or an --allow-host name. It listens on "
        "127.0.0.1 unless told otherwise."
    )
    _by_name(sp)
    sp.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other warns: for a private network only)",
    )
    sp.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    sp.add_argument(
        "--allow-writes",
        action="store_true",
        help="let the dashboard change the study: tell, attributes, notes, rename, delete, "
        "artifact uploads and deletions (default: served read-only)",
    )
    sp.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the dashboard is reached by besides its address and localhost "
        "(e.g. the machine's name behind a tunnel or proxy); repeatable",
    )


def _confirm_args(sp: argparse.ArgumentParser) -> None:
    _report_args(sp)
    sp.add_argument("--top-k", type=int, help="configurations to confirm (default study.confirm, else 3)")
    sp.add_argument(
        "--seeds", type=int, help="seeds per configuration, its search run included (default study.confirm, else 3)"
    )
    _quiet(sp)


def _proxy_args(sp: argparse.ArgumentParser) -> None:
    sp.description = (
        "Optuna's gRPC storage proxy in front of one SQL database: workers use "
        "--storage grpc://HOST:PORT and the database sees at most --threads connections. "
        "The protocol is unauthenticated: keep it on a private network."
    )
    sp.add_argument("--storage", help="database URL (default: $SEARCH_STORAGE); ${VAR} taken from the environment")
    sp.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines, on a private network only)",
    )
    sp.add_argument("--port", type=int, default=13000, help="port to listen on (default 13000)")
    sp.add_argument("--threads", type=int, default=10, help="server threads = most database connections (default 10)")


def _retrain_args(sp: argparse.ArgumentParser) -> None:
    _with_recipe(sp)
    sp.add_argument("--storage", help="storage URL of the study to record on (default: the recipe's)")
    sp.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train N final models (seeds study.seed .. +N-1), each tested once (default 1)",
    )
    sp.add_argument(
        "--tta",
        choices=["flip"],
        help="also report the test metrics with test-time augmentation (flip: the image and its mirror)",
    )


def _export_args(sp: argparse.ArgumentParser) -> None:
    sp.description = (
        "RUN is a `retrain` output directory (studies/STUDY/retrain), or a study name with "
        "--trial N for that trial's kept checkpoint. The ONNX model is compared with PyTorch on the whole "
        "test split (a retrain) or validation split (a trial); a difference over --tolerance is an error."
    )
    sp.add_argument("run", help="retrain output directory, or STUDY with --trial")
    sp.add_argument("--trial", type=int, metavar="N", help="export trial N's kept checkpoint of study RUN")
    sp.add_argument("--storage", help="storage URL of the study (with --trial; default sqlite:///studies/STUDY.db)")
    sp.add_argument("--out", metavar="DIR", help="output directory (default: RUN, or studies/STUDY/export/trial-N)")
    sp.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted (default 1e-4)")
    sp.add_argument(
        "--bench",
        nargs="?",
        type=int,
        const=20,
        default=0,
        metavar="RUNS",
        help="CPU latency of onnxruntime and PyTorch eager, batch 1 and 32 (median of RUNS, default 20)",
    )
    _wide(sp)


def _predict_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("model", help="model.onnx from `search export`, or its directory")
    sp.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    sp.add_argument("-k", "--top-k", type=int, default=5, help="classes per image (default 5)")
    sp.add_argument("--csv", metavar="FILE", help="write path, top1, p1, top2, p2, ... per image")
    _quiet(sp, "no per-image lines (with --csv)")


# Each command's one-line help and its arguments, in the order --help lists them (handlers: COMMANDS).
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": ("run (or continue) the study of a recipe", _run_args),
    "validate": ("check a recipe and print the resolved search space", _validate_args),
    "prefetch": ("download the pool's weights and the dataset into their caches", _with_recipe),
    "rank": ("score the pool's pretrained entries on frozen features (LogME, probe, kNN)", _rank_args),
    "worker": ("join a study from this machine, using the recipe stored in it", _worker_args),
    "fail-stale": ("fail (and queue again) trials without a sign of life, e.g. on journal storage", _fail_stale_args),
    "models": ("list built-in models, or classify a timm name", _models_args),
    "report": ("leaderboard, top trials, CSV/Markdown and plots under studies/STUDY/report/", _report_args),
    "best": ("export the best trial as a recipe that searches nothing", _best_args),
    "dashboard": ("open optuna-dashboard on a study, with its artifacts", _dashboard_args),
    "confirm": ("train the top configurations again with further seeds (never on test)", _confirm_args),
    "proxy": ("serve a study database to many workers (grpc://HOST:PORT storage URLs)", _proxy_args),
    "retrain": ("train a `best` recipe on train+val, evaluate once on the test split", _retrain_args),
    "export": (
        "write a final model as ONNX + safetensors, checked against PyTorch (needs the export extra)",
        _export_args,
    ),
    "predict": ("top-k classes of images with an exported model (onnxruntime; no PyTorch needed)", _predict_args),
}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search", description="Architecture and hyperparameter search for image classifiers.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")  # the list fits 100 columns
    for name, (help, arguments) in SUBCOMMANDS.items():
        arguments(sub.add_parser(name, help=help))
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from search import optuna_api

    optuna_api.quiet()
    try:
        return COMMANDS[args.command](args)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
