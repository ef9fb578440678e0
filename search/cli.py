"""`python -m search COMMAND`: one handler per subcommand, dispatched by a dict.

User mistakes raise SearchError: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from search.errors import SearchError


def _recipe(args: argparse.Namespace):
    from search.recipe import load_recipe

    return load_recipe(args.recipe, args.set or ())


def cmd_validate(args: argparse.Namespace) -> int:
    from search import space
    from search.pool import parse_pool
    from search.study import default_storage, mask

    recipe = _recipe(args)
    s = recipe.study
    print(f"recipe {args.recipe}: ok")
    print(f"study {s.name}: {s.n_trials} trials, {s.direction} val {s.metric}, sampler {s.sampler.name}, "
          f"pruner {s.pruner.name}, storage {mask(s.storage or default_storage(s.name))}")
    print(f"data {recipe.data.dataset}; train {recipe.train.epochs} epochs")
    print("pool:")
    for e in parse_pool(recipe.pool):
        print(f"  {e.label:<32} source {e.source:<14} overlap {e.overlap}")
    print(f"search space (preset {recipe.space.preset}):")
    print(space.describe(recipe))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from search import study as st

    recipe = _recipe(args)
    url = recipe.study.storage or st.default_storage(recipe.study.name)
    study = st.open_study(recipe, url, force=args.force)
    return _work(recipe, study, url, args)


def cmd_worker(args: argparse.Namespace) -> int:
    from search import study as st

    recipe, study = st.load_stored(args.storage, args.study)
    return _work(recipe, study, args.storage, args)


def _work(recipe, study, url: str, args: argparse.Namespace) -> int:
    from search import report
    from search import study as st

    try:
        st.work(recipe, study, quiet=args.quiet)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'SIGINT'}): the running trial was marked FAIL 'interrupted'.\n"
              f"resume with: {st.resume_command(recipe, url)}", file=sys.stderr)
        return 130 if str(e) in ("", "SIGINT") else 143
    if not args.quiet:
        print(report.leaderboard_text(study, recipe))
        print(f"\nbrowse: optuna-dashboard {st.mask(url)}    (or: python -m search dashboard {recipe.study.name})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from search.pool import BUILTINS, parse_entry

    if args.name:
        rows = [parse_entry(args.name)]
    else:
        rows = [parse_entry(n) for n in BUILTINS] + [parse_entry({"model": n, "pretrained": False}) for n in BUILTINS if BUILTINS[n].default_tag]
    out = []
    for e in rows:
        b = BUILTINS.get(e.arch) if e.builtin else None
        from search.models import build_model, input_resolution

        res = input_resolution(e, None) if (not b or b.resolution) else None
        classes = 10 if e.arch == "mini_cnn" else 1000  # the specification's counts: ImageNet heads
        params = sum(p.numel() for p in build_model({"model": e.model, "pretrained": False}, num_classes=classes,
                                                    in_chans=3, resolution=res or 224).parameters())
        out.append({"label": e.label, "weights": e.tag or "none", "source": e.source, "overlap": e.overlap,
                    "resolution": res or "data", "params": params, "note": b.note if b else ""})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'model':<24} {'weights':<22} {'source':<14} {'overlap':<8} {'input':>6} {'params':>11}  note")
    for r in out:
        print(f"{r['label']:<24} {r['weights']:<22} {r['source']:<14} {r['overlap']:<8} {r['resolution']!s:>6} "
              f"{r['params']:>11,}  {r['note']}")
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    from search import weights
    from search.pool import parse_pool

    recipe = _recipe(args)
    for e in parse_pool(recipe.pool):
        if e.pretrained:
            print(f"{e.label}: {weights.fetch(e)}")
        else:
            print(f"{e.label}: no pretrained weights")
    from search.data import load_data

    load_data(recipe.data, recipe.study.seed)
    print(f"data {recipe.data.dataset}: ready")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from search import report
    from search import study as st

    url = args.storage or st.default_storage(args.study)
    recipe, study = st.load_stored(url, args.study)
    print(report.leaderboard_text(study, recipe))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from search import study as st

    url = args.storage or st.default_storage(args.study)
    st.load_stored(url, args.study)  # the study exists
    from optuna_dashboard import run_server

    print(f"optuna-dashboard on http://{args.host}:{args.port}/dashboard/ (Ctrl-C to stop)")
    run_server(st.open_storage(url, heartbeat=None), host=args.host, port=args.port)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "worker": cmd_worker,
    "validate": cmd_validate,
    "models": cmd_models,
    "prefetch": cmd_prefetch,
    "report": cmd_report,
    "dashboard": cmd_dashboard,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search", description="Architecture and hyperparameter search for image classifiers.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe value (repeatable)")
        return sp

    run = with_recipe("run", "run (or continue) the study of a recipe")
    run.add_argument("--force", action="store_true", help="continue a study even if its recipe changed")
    run.add_argument("-q", "--quiet", action="store_true")
    with_recipe("validate", "check a recipe and print the resolved search space")
    with_recipe("prefetch", "download the pool's weights and the dataset into their caches")
    w = sub.add_parser("worker", help="join a study from this machine, using the recipe stored in it")
    w.add_argument("--storage", required=True, help="storage URL of the study")
    w.add_argument("--study", required=True, help="study name")
    w.add_argument("-q", "--quiet", action="store_true")
    m = sub.add_parser("models", help="list built-in models, or classify a timm name")
    m.add_argument("name", nargs="?", help="e.g. timm/convnext_tiny.fb_in22k")
    m.add_argument("--json", action="store_true")
    for name, help in (("report", "leaderboard of a study"), ("dashboard", "open optuna-dashboard on a study")):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("study", help="study name")
        sp.add_argument("--storage", help="storage URL (default sqlite:///studies/STUDY.db)")
        if name == "dashboard":
            sp.add_argument("--host", default="127.0.0.1")
            sp.add_argument("--port", type=int, default=8080)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
