"""``python -m app parked list|show|replay|purge|migrate``: the parked queue for an operator
(docs/parked-messages.md, "The tool").

Exit status 0 done, 1 the broker failed (the output says how far it got), 2 bad usage (an
unknown or ambiguous id, no confirmation). Reports go to standard output (``purge`` prints each
removed message there, one JSON line); progress and summaries go to standard error.

``python -m app health`` imports this module to build the parser, so pika and the adapter are
imported inside the command.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import select
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from adapters.rabbitmq.parked import ParkedMessage, ParkedQueue
    from app.settings import Settings

EXIT_DONE = 0
EXIT_BROKER_FAILED = 1
EXIT_USAGE = 2
MIN_ID_PREFIX = 4
ID_LENGTH = 12
PAST = {"replay": "replayed", "purge": "purged"}


class UsageError(Exception):
    """A selection the queue cannot satisfy (exit status 2)."""


def id_prefix(text: str) -> str:
    """An argparse type: 4 to 12 hexadecimal characters, lowercased."""
    value = text.strip().lower()
    if not MIN_ID_PREFIX <= len(value) <= ID_LENGTH or any(
        c not in "0123456789abcdef" for c in value
    ):
        raise argparse.ArgumentTypeError(
            f"an id is {MIN_ID_PREFIX} to {ID_LENGTH} hexadecimal characters, got {text!r}"
        )
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def match_ids(prefixes: Iterable[str], messages: Sequence[ParkedMessage]) -> list[ParkedMessage]:
    """The messages the id prefixes name, in queue order. Each prefix must name exactly one id
    (copies sharing an id, the same body parked at the same instant, are all selected)."""
    chosen: set[str] = set()
    for prefix in prefixes:
        ids = {message.id for message in messages if message.id.startswith(prefix)}
        if not ids:
            raise UsageError(f"no parked message has an id starting with {prefix!r}")
        if len(ids) > 1:
            raise UsageError(f"{prefix!r} is ambiguous: {', '.join(sorted(ids))}")
        chosen |= ids
    return [message for message in messages if message.id in chosen]


def select_messages(
    args: argparse.Namespace, messages: Sequence[ParkedMessage]
) -> list[ParkedMessage]:
    """The messages ``args`` select: ids, ``--all`` or ``--generation-id``."""
    if args.all:
        return list(messages)
    if args.generation_id is not None:
        chosen = [m for m in messages if m.generation_id == args.generation_id]
        if not chosen:
            raise UsageError(f"no parked message has generation_id {args.generation_id}")
        return chosen
    return match_ids(args.ids, messages)


def body_fields(body: bytes) -> dict[str, str]:
    """``{"body": text}`` when the body is UTF-8, else ``{"body_base64": ...}``."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def json_value(value: Any) -> Any:
    """A ``json.dumps`` default for header and property values."""
    if isinstance(value, bytes):
        return body_fields(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return repr(value)


def outcome_value(text: str | None) -> Any:
    """The decided outcome parsed when it is JSON (it is cut when large), else the text."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def summary(message: ParkedMessage) -> dict[str, Any]:
    """The fields ``list`` shows."""
    return {
        "id": message.id,
        "parked_at": message.parked_at,
        "generation_id": message.generation_id,
        "task_id": message.task_id,
        "reason": message.reason,
        "attempts": message.attempts,
        "decided_outcome": outcome_value(message.decided_outcome),
    }


def whole(message: ParkedMessage) -> dict[str, Any]:
    """Everything about one message: ``show --json`` and each line ``purge`` prints."""
    return {
        **summary(message),
        "original_queue": message.original_queue,
        "handbacks": message.handbacks,
        "decided_outcome_full_size": message.outcome_full_size,
        "properties": message.property_values,
        "headers": message.headers,
        **body_fields(message.body),
    }


def to_json(fields: dict[str, Any]) -> str:
    """One JSON line."""
    return json.dumps(fields, default=json_value, ensure_ascii=False)


def outcome_brief(text: str | None) -> str:
    """The decided outcome in a few words for ``list``: its kind and error code."""
    outcome = outcome_value(text)
    if isinstance(outcome, dict):
        words = [str(outcome[key]) for key in ("kind", "error_code") if outcome.get(key)]
        return " ".join(words) or "?"
    return "-" if outcome is None else str(outcome)[:20]


def table(messages: Sequence[ParkedMessage]) -> list[str]:
    """``list``'s lines, one per message, under a header line."""
    rows = [("ID", "PARKED AT", "GENERATION", "TASK_ID", "ATTEMPTS", "OUTCOME", "REASON")]
    for message in messages:
        rows.append(
            (
                message.id,
                message.parked_at or "-",
                str(message.generation_id if message.generation_id is not None else "-"),
                message.task_id or "-",
                str(message.attempts if message.attempts is not None else "-"),
                outcome_brief(message.decided_outcome),
                " ".join((message.reason or "-").split())[:100],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]) for row in rows]


def describe(message: ParkedMessage) -> list[str]:
    """``show``'s text: the fields, the properties, every header, the outcome, the body."""
    fields = whole(message)
    lines = [f"id: {message.id}"]
    for key in ("parked_at", "generation_id", "task_id", "reason", "original_queue"):
        lines.append(f"{key}: {fields[key] if fields[key] is not None else '-'}")
    lines.append(f"attempts: {fields['attempts']}  handbacks: {fields['handbacks']}")
    lines.append("properties:")
    lines += [f"  {name}: {value}" for name, value in fields["properties"].items()]
    lines.append("headers:")
    lines += [f"  {name}: {to_json(value)}" for name, value in fields["headers"].items()]
    outcome = message.decided_outcome
    if outcome is not None:
        cut = message.outcome_full_size
        lines.append("decided outcome" + (f" (cut, {cut} bytes in full):" if cut else ":"))
        lines.append(f"  {outcome}")
    if "body" in fields:
        lines += ["body:", fields["body"]]
    else:
        lines += ["body (not UTF-8, base64):", fields["body_base64"]]
    return lines


def confirmed(question: str, stdin: TextIO, keep_alive: Callable[[], None]) -> bool:
    """Ask ``question`` on standard error and read y/N, serving the connection meanwhile."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    while not select.select([stdin], [], [], 1.0)[0]:
        keep_alive()
    return stdin.readline().strip().lower() in ("y", "yes")


def may_change(args: argparse.Namespace) -> bool:
    """Whether the command may go on to change the queues without asking: ``--dry-run`` and
    ``--yes`` need no question; otherwise only a terminal can answer."""
    return args.dry_run or args.yes or sys.stdin.isatty()


def run_parked(settings: Settings, args: argparse.Namespace) -> int:
    """Open the parked queue, run the subcommand, give back what it held."""
    # pylint: disable=import-outside-toplevel
    from adapters.rabbitmq.parked import BROKER_ERRORS, ParkedQueue
    from adapters.rabbitmq.queues import Queues, retry_ladder

    if hasattr(args, "selection_usage"):
        given = sum((bool(args.ids), args.all, args.generation_id is not None))
        if given != 1:
            args.selection_usage("give one of: ID ..., --all, --generation-id N")  # exits 2
    if args.parked_command in ("replay", "purge", "migrate") and not may_change(args):
        print(
            f"parked {args.parked_command}: no terminal to confirm on; add --yes (or --dry-run)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    queues = Queues(
        settings.rabbitmq_queue,
        retry_ladder(
            settings.rabbitmq_retry_delay_seconds, settings.rabbitmq_retry_max_delay_seconds
        ),
        parked_max_messages=settings.rabbitmq_parked_max_messages,
        parked_ttl_seconds=settings.rabbitmq_parked_ttl_seconds,
    )
    queue = ParkedQueue(
        host=settings.rabbitmq_host,
        port=settings.rabbitmq_port,
        user=settings.rabbitmq_user,
        password=settings.rabbitmq_pass.get_secret_value(),
        vhost=settings.rabbitmq_vhost,
        queues=queues,
        timeout=args.timeout,
        heartbeat=settings.rabbitmq_heartbeat_seconds,
    )
    where = f"{settings.rabbitmq_host}:{settings.rabbitmq_port}"
    # The tool says in one line what failed; pika's own error logs would repeat it at length.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        queue.open()
    except BROKER_ERRORS as exc:
        print(f"parked: RabbitMQ at {where} is not reachable: {exc!r}", file=sys.stderr)
        return EXIT_BROKER_FAILED
    progress = Progress()
    try:
        return int(COMMANDS[args.parked_command](queue, args, progress))
    except UsageError as exc:
        print(f"parked {args.parked_command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BROKER_ERRORS as exc:
        print(
            f"parked {args.parked_command}: the broker at {where} failed after {progress.done}"
            f" of {progress.total}: {exc!r}",
            file=sys.stderr,
        )
        return EXIT_BROKER_FAILED
    finally:
        queue.close()


class Progress:
    """How far a command got: ``done`` of ``total``."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0


def cmd_list(queue: ParkedQueue, args: argparse.Namespace, _progress: Progress) -> int:
    """The count, then one line (or JSON object) per message, oldest first."""
    count = queue.count()
    messages = queue.scan(args.limit)
    queue.release()
    if count is None:
        print(f"{queue.queues.parked} does not exist: nothing parked", file=sys.stderr)
        return EXIT_DONE
    shown = f" (the first {len(messages)}; --limit to see more)" if len(messages) < count else ""
    print(f"{count} parked in {queue.queues.parked}{shown}", file=sys.stderr if args.json else None)
    for line in (to_json(summary(m)) for m in messages) if args.json else table(messages):
        print(line)
    return EXIT_DONE


def cmd_show(queue: ParkedQueue, args: argparse.Namespace, _progress: Progress) -> int:
    """One message whole (every copy sharing the id)."""
    messages = match_ids([args.id], queue.scan())
    queue.release()
    for message in messages:
        if args.json:
            print(to_json(whole(message)))
        else:
            print("\n".join(describe(message)))
    return EXIT_DONE


def _act(
    queue: ParkedQueue,
    args: argparse.Namespace,
    progress: Progress,
    verb: str,
    act: Callable[[ParkedMessage], None],
) -> int:
    selected = select_messages(args, queue.scan())
    progress.total = len(selected)
    where = queue.queues.name if verb == "replay" else "the parked queue"
    for message in selected:
        generation = (
            f" (generation {message.generation_id})" if message.generation_id is not None else ""
        )
        print(f"{'would ' if args.dry_run else ''}{verb} {message.id}{generation}", file=sys.stderr)
    if not selected:
        print(f"nothing to {verb}: {queue.queues.parked} is empty", file=sys.stderr)
        return EXIT_DONE
    if args.dry_run:
        print(f"dry run: {len(selected)} would be {PAST[verb]}; nothing changed", file=sys.stderr)
        return EXIT_DONE
    if not args.yes and not confirmed(
        f"{verb} {len(selected)} parked message(s) ({where})?",
        sys.stdin,
        lambda: queue.keep_alive(0.1),
    ):
        print(f"parked {verb}: not confirmed; nothing changed", file=sys.stderr)
        return EXIT_USAGE
    for message in selected:
        act(message)
        progress.done += 1
    print(f"{PAST[verb]} {progress.done} of {progress.total}", file=sys.stderr)
    return EXIT_DONE


def cmd_replay(queue: ParkedQueue, args: argparse.Namespace, progress: Progress) -> int:
    """Publish the selected messages to the job queue, each acked here once confirmed there."""
    return _act(queue, args, progress, "replay", queue.replay)


def cmd_purge(queue: ParkedQueue, args: argparse.Namespace, progress: Progress) -> int:
    """Remove the selected messages, each printed whole on standard output first."""

    def purge(message: ParkedMessage) -> None:
        print(to_json(whole(message)), flush=True)
        queue.purge(message)

    return _act(queue, args, progress, "purge", purge)


def cmd_migrate(queue: ParkedQueue, args: argparse.Namespace, _progress: Progress) -> int:
    """Give the parked queue the bounds of the settings (docs/parked-messages.md, Migrating)."""
    # pylint: disable-next=import-outside-toplevel
    from adapters.rabbitmq.parked import MigrationConflict

    parked, holding = queue.queues.parked, queue.holding_queue
    state = queue.migration_state()
    bounds = json.dumps(queue.queues.parked_arguments)
    if state.done:
        print(f"{parked} has the bounds {bounds}; nothing to migrate", file=sys.stderr)
        return EXIT_DONE
    if state.parked is not None and not state.bounded:
        plan = (
            f"move the {state.parked} messages of {parked} (its arguments are not {bounds}) to"
            f" {holding}, declare it with the bounds, and move them back"
        )
    else:
        plan = f"move the {state.holding} messages of {holding} back to {parked} ({bounds})"
    if args.dry_run:
        print(f"dry run: would {plan}; nothing changed", file=sys.stderr)
        return EXIT_DONE
    print(f"migrate: {plan}", file=sys.stderr)
    if not args.yes and not confirmed("migrate?", sys.stdin, lambda: queue.keep_alive(0.1)):
        print("parked migrate: not confirmed; nothing changed", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = queue.migrate()
    except MigrationConflict as exc:
        print(f"parked migrate: {exc}", file=sys.stderr)
        return EXIT_BROKER_FAILED
    print(
        f"moved {result.moved_out} to {holding} and {result.moved_back} back to {parked}",
        file=sys.stderr,
    )
    if result.left_in_holding:
        print(
            f"parked migrate: {parked} is full; {result.left_in_holding} message(s) stay in"
            f" {holding}: make room (replay or purge) or raise RABBITMQ_PARKED_MAX_MESSAGES,"
            " then run migrate again",
            file=sys.stderr,
        )
        return EXIT_BROKER_FAILED
    print(f"{parked} has the bounds {bounds}", file=sys.stderr)
    return EXIT_DONE


COMMANDS: dict[str, Callable[[ParkedQueue, argparse.Namespace, Progress], int]] = {
    "list": cmd_list,
    "show": cmd_show,
    "replay": cmd_replay,
    "purge": cmd_purge,
    "migrate": cmd_migrate,
}


def add_parked(commands: Any) -> None:
    """Register ``parked`` and its subcommands on the CLI's subparsers."""
    parked = commands.add_parser(
        "parked", help="list, show, replay, purge or migrate the parked messages"
    )
    parked.set_defaults(handler=run_parked)
    actions = parked.add_subparsers(dest="parked_command", required=True)

    listing = actions.add_parser("list", help="the count, then one line per parked message")
    listing.add_argument("--limit", type=positive_int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object per message")

    show = actions.add_parser("show", help="one parked message whole")
    show.add_argument("id", type=id_prefix, help="its id, or a unique prefix (4+ characters)")
    show.add_argument("--json", action="store_true")

    for name, helps in (
        ("replay", "publish parked messages to RABBITMQ_QUEUE again"),
        ("purge", "remove parked messages, printing each one whole (JSON) on standard output"),
    ):
        action = actions.add_parser(name, help=helps)
        # One of the three (checked in run_parked: argparse cannot group a list of positionals).
        action.add_argument("ids", nargs="*", type=id_prefix, metavar="ID")
        action.add_argument("--all", action="store_true", help="every message parked now")
        action.add_argument("--generation-id", type=int, help="those whose data has this id")
        action.set_defaults(selection_usage=action.error)
        _add_change_flags(action)

    migrate = actions.add_parser(
        "migrate", help="give the parked queue the bounds of RABBITMQ_PARKED_* settings"
    )
    _add_change_flags(migrate)
    for action in actions.choices.values():
        action.add_argument("--timeout", type=float, default=10.0, help="broker timeout (seconds)")


def _add_change_flags(action: argparse.ArgumentParser) -> None:
    action.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    action.add_argument("--yes", action="store_true", help="do not ask for confirmation")
