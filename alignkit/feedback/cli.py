"""Collect human feedback: labeling app, simulated panels, AI judge, agreement stats, exports."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from alignkit.errors import InputError

DEFAULT_DB = "sqlite:///alignkit-label.db"
GOLD_HELP = "length (longer is better), sentiment (VADER compound), or metadata:KEY (scores in item metadata)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``alignkit label SUBCOMMAND``; every subcommand takes ``--db URL``."""
    parser.add_argument(
        "--db",
        default=os.environ.get("ALIGNKIT_LABEL_DB", DEFAULT_DB),
        help="sqlite:///FILE (default, WAL) or postgresql://USER@HOST:PORT/DB ($ALIGNKIT_LABEL_DB)",
    )
    sub = parser.add_subparsers(dest="label_command", metavar="SUBCOMMAND", required=True)

    sub.add_parser("init", help="create or upgrade the database schema (Alembic migrations)")

    serve = sub.add_parser("serve", help="run the labeling web app")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--serve-url", help="an alignkit serve endpoint (http://HOST:PORT/v1) for chat mode"
    )
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="larger requests get 413")
    serve.add_argument("--secure-cookies", action="store_true", help="send cookies over HTTPS only")

    project = sub.add_parser("create-project", help="create a project from a prompts JSONL")
    project.add_argument("name")
    project.add_argument(
        "--kind", choices=["pairwise", "ranking", "thumbs", "likert"], default="pairwise"
    )
    project.add_argument(
        "--prompts", help="JSONL rows {prompt, completions} (alignkit sample output)"
    )
    project.add_argument("--overlap", type=int, default=3, help="annotators per item")
    project.add_argument("--guidelines", help="Markdown file shown before labeling")
    project.add_argument("--lease-minutes", type=float, default=15.0)
    project.add_argument(
        "--chat", action="store_true", help="a chat project (thumbs or pairwise, no prompts file)"
    )
    project.add_argument("--chat-model", help="model name to request from the serve endpoint")

    user = sub.add_parser("add-user", help="add a user who can log in")
    user.add_argument("name")
    user.add_argument("--role", choices=["admin", "annotator"], default="annotator")
    user.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )

    simulate = sub.add_parser("simulate", help="fill a project with a simulated annotator panel")
    simulate.add_argument("project")
    simulate.add_argument("--annotators", type=int, default=5)
    simulate.add_argument(
        "--careless", type=float, default=0.0, help="share of careless annotators"
    )
    simulate.add_argument(
        "--adversarial", type=float, default=0.0, help="share of adversarial annotators"
    )
    simulate.add_argument(
        "--temperature", type=float, default=1.0, help="Bradley-Terry noise in gold units"
    )
    simulate.add_argument("--gold", default="length", help=GOLD_HELP)
    simulate.add_argument("--seed", type=int, default=0)

    stats = sub.add_parser("stats", help="print the agreement report of a project")
    stats.add_argument("project")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    export = sub.add_parser(
        "export", help="write training data (TRL pairs or unpaired rows) as JSONL"
    )
    export.add_argument("project")
    export.add_argument("--out", required=True, help="output JSONL path")
    export.add_argument("--format", choices=["pairs", "unpaired"], default="pairs")
    export.add_argument("--ties", choices=["drop", "keep"], default="drop")
    export.add_argument("--aggregate", choices=["majority", "bt", "pl", "none"], default="majority")
    export.add_argument(
        "--min-agreement", type=float, default=0.0, help="minimum majority share per item"
    )
    export.add_argument(
        "--exclude-flagged", action="store_true", help="drop too-fast / low-agreement annotators"
    )
    export.add_argument("--annotator", help="only this user's judgments (e.g. their chat ratings)")


def _open_store(url: str):  # noqa: ANN202 - Store, imported lazily to keep --help fast
    from alignkit.feedback.store import Store

    return Store(url)


def _read_text(path: str | None) -> str:
    if path is None:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read ({err})", path=path) from None


def _cmd_init(args: argparse.Namespace) -> int:
    from alignkit.feedback.db import schema_revision

    store = _open_store(args.db)
    print(f"database ready: {args.db} (schema {schema_revision(store.engine)})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from alignkit.feedback.web.app import create_app

    store = _open_store(args.db)
    app = create_app(
        store,
        serve_url=args.serve_url,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        secure_cookies=args.secure_cookies,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _cmd_create_project(args: argparse.Namespace) -> int:
    from alignkit.feedback.validation import read_prompts_file

    store = _open_store(args.db)
    guidelines = _read_text(args.guidelines)
    lease_seconds = int(args.lease_minutes * 60)
    if args.chat:
        k = {"thumbs": 1, "pairwise": 2}.get(args.kind)
        if k is None:
            raise InputError("chat projects rate with thumbs or pairwise", field="kind")
        project = store.create_project(
            args.name, args.kind, k, 1, guidelines, lease_seconds, "chat", args.chat_model
        )
        print(f"created chat project {project.name!r} (id {project.id})")
        return 0
    if not args.prompts:
        raise InputError("is required (or use --chat)", field="--prompts")
    items = read_prompts_file(args.prompts, 2 if args.kind == "pairwise" else None)
    project = store.create_project(
        args.name, args.kind, len(items[0].completions), args.overlap, guidelines, lease_seconds
    )
    added = store.add_items(project.id, items)
    print(f"created project {project.name!r} (id {project.id}) with {added} items")
    return 0


def _cmd_add_user(args: argparse.Namespace) -> int:
    from alignkit.feedback.accounts import add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
    user = add_user(_open_store(args.db), args.name, args.role, password)
    print(f"added {user.role} {user.name!r}")
    return 0


def gold_function(spec: str):  # noqa: ANN201 - simulate.GoldFn
    """The gold scorer named on the command line (see ``--gold``)."""
    if spec == "length":
        return lambda prompt, completions: [float(len(c)) for c in completions]
    if spec == "sentiment":
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = SentimentIntensityAnalyzer()
        return lambda prompt, completions: [
            analyzer.polarity_scores(c)["compound"] for c in completions
        ]
    if spec.startswith("metadata:"):
        raise InputError("is handled per item", field="--gold")  # see _metadata_gold
    raise InputError(f"unknown gold scorer {spec!r} ({GOLD_HELP})", field="--gold")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from alignkit.feedback.accounts import ensure_user
    from alignkit.feedback.simulate import make_panel, simulate_judgments

    store = _open_store(args.db)
    project = store.project(args.project)
    items = store.items(project.id)
    if args.gold.startswith("metadata:"):
        key = args.gold.split(":", 1)[1]
        gold_by_prompt = {}
        for item in items:
            if not isinstance(item.metadata.get(key), list):
                raise InputError(
                    f"has no list {key!r} in its metadata", path=f"item {item.item_id!r}"
                )
            gold_by_prompt[json.dumps([item.prompt, item.completions])] = item.metadata[key]

        def gold(prompt, completions):  # noqa: ANN001, ANN202
            return gold_by_prompt[json.dumps([prompt, tuple(completions)])]
    else:
        gold = gold_function(args.gold)
    panel = make_panel(args.annotators, args.careless, args.adversarial, args.seed)
    for member in panel:
        ensure_user(store, member.name)
    judgments = simulate_judgments(
        items,
        gold,
        panel,
        project.kind,
        min(project.overlap, len(panel)),
        args.temperature,
        args.seed,
    )
    stored = refused = 0
    for judgment in judgments:  # the same lease + submit path as people
        try:
            store.lease_item(project.id, judgment.annotator, judgment.item_id)
            store.submit_judgment(project.id, judgment.annotator, judgment)
            stored += 1
        except InputError:
            refused += 1
    print(
        f"stored {stored} simulated judgments from {len(panel)} annotators ({refused} refused: overlap full or judged)"
    )
    return 0


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def _cmd_stats(args: argparse.Namespace) -> int:
    from alignkit.feedback.exporting import project_report

    store = _open_store(args.db)
    project = store.project(args.project)
    report = project_report(store, project.id)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    progress = store.progress(project.id)
    print(
        f"project {project.name}: {progress.items} items, {progress.judgments} judgments, "
        f"{progress.complete_items} complete (overlap {project.overlap})"
    )
    for name, value in report.alpha.items():
        print(f"krippendorff_alpha[{name}]  {_fmt(value)}")
    for name, value in report.fleiss.items():
        print(f"fleiss_kappa[{name}]  {_fmt(value)}  ({report.fleiss_units[name]} units)")
    print(
        f"{'annotator':<20} {'judgments':>9} {'agreement':>9} {'mean_kappa':>10} {'median_s':>8}  flags"
    )
    for q in report.ranked():
        flags = ",".join(
            f for f, on in (("too_fast", q.too_fast), ("low_agreement", q.low_agreement)) if on
        )
        print(
            f"{q.annotator:<20} {q.n_judgments:>9} {_fmt(q.agreement):>9} {_fmt(q.mean_kappa):>10} "
            f"{_fmt(q.median_seconds):>8}  {flags}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from alignkit.feedback.aggregate import write_jsonl
    from alignkit.feedback.exporting import export_rows

    store = _open_store(args.db)
    project = store.project(args.project)
    if (
        args.annotator is not None
        and store.progress(project.id).by_annotator.get(args.annotator) is None
    ):
        raise InputError(
            f"has no judgments in project {project.name!r}",
            field="--annotator",
            path=args.annotator,
        )
    rows = export_rows(
        store,
        project.id,
        args.format,
        args.ties,
        args.aggregate,
        args.min_agreement,
        args.exclude_flagged,
        args.annotator,
    )
    count = write_jsonl(rows, args.out)
    print(f"wrote {count} {args.format} rows to {args.out}")
    return 0


COMMANDS = {
    "init": _cmd_init,
    "serve": _cmd_serve,
    "create-project": _cmd_create_project,
    "add-user": _cmd_add_user,
    "simulate": _cmd_simulate,
    "stats": _cmd_stats,
    "export": _cmd_export,
}


def main(args: argparse.Namespace) -> int:
    """Run one ``alignkit label`` subcommand."""
    return COMMANDS[args.label_command](args)
