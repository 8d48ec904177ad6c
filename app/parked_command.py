"""``python -m app parked list|show|replay|purge|migrate``: the parked queue for an operator
(docs/parked-messages.md, "The tool").

Exit status 0 done, 1 the broker failed (the output says how far it got), another session holds
the parked queue, ``migrate`` found workers running, or ``purge --save`` could not write; 2 bad
usage (an unknown or ambiguous id, no confirmation, a save file that cannot be opened). Reports
go to standard output; progress and summaries go to standard error. ``purge`` writes each removed
message to ``--save FILE`` (one JSON line, on disk before the message is acked), never to
standard output: a reader that stops early would otherwise lose what was acked.

``python -m app health`` imports this module to build the parser, so pika and the adapter are
imported inside the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from app.argument_types import positive_int
from app.parked_format import describe, summary, table, to_json, whole

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


class SaveFailed(Exception):
    """``purge --save`` could not write a message to its file (exit status 1; not acked)."""


class SaveFile:
    """``purge --save FILE``: each removed message as one JSON line, flushed and fsynced before
    the message is acked. Opened for append before the queue is read; only a regular file (a
    FIFO or a device is refused without blocking). A line that could not be written whole is cut
    off again, so the file holds whole lines only, whatever failed."""

    def __init__(self, path: str) -> None:
        self.path = path
        # O_NONBLOCK: opening a FIFO for writing would wait for a reader, for ever. O_RDWR: the
        # last byte is read to see whether an earlier run left a line cut.
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
        try:
            status = os.fstat(self._fd)
            if not stat.S_ISREG(status.st_mode):
                raise OSError(f"{path} is not a regular file (a copy must be fsynced)")
            if status.st_size and os.pread(self._fd, 1, status.st_size - 1) != b"\n":
                # An earlier run's last line was cut: end it, so the next line stays whole.
                self._write_all(b"\n")
                os.fsync(self._fd)
        except OSError:
            os.close(self._fd)
            raise

    def save(self, line: str) -> None:
        """Append ``line`` and make it durable; ``SaveFailed`` when that fails (the file is
        cut back to what it held before)."""
        before = None
        try:
            before = os.fstat(self._fd).st_size
            self._write_all((line + "\n").encode("utf-8"))
            os.fsync(self._fd)
        except OSError as exc:
            if before is not None:
                try:
                    os.ftruncate(self._fd, before)
                    os.fsync(self._fd)
                except OSError:
                    pass  # the next open ends the cut line
            raise SaveFailed(f"could not save {self.path}: {exc!r}") from exc

    def _write_all(self, data: bytes) -> None:
        while data:
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        """Close the file; a failure here cannot lose a message (each was fsynced)."""
        try:
            os.close(self._fd)
        except OSError:
            pass


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
    from adapters.rabbitmq.parked import BROKER_ERRORS

    if hasattr(args, "selection_usage"):
        given = sum((bool(args.ids), args.all, args.generation_id is not None))
        if given != 1:
            args.selection_usage("give one of: ID ..., --all, --generation-id N")  # exits 2
    if args.parked_command == "purge" and not args.dry_run and not (args.save or args.discard):
        args.selection_usage("give --save FILE (keep a copy of each) or --discard")  # exits 2
    if args.parked_command in ("replay", "purge", "migrate") and not may_change(args):
        print(
            f"parked {args.parked_command}: no terminal to confirm on; add --yes (or --dry-run)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    queue = parked_queue(settings, args.timeout)
    where = f"{settings.rabbitmq_host}:{settings.rabbitmq_port}"
    progress = Progress()
    failed = start(queue, args, progress, where)
    if failed is not None:
        progress.close()
        return failed
    try:
        return int(COMMANDS[args.parked_command](queue, args, progress))
    except UsageError as exc:
        print(f"parked {args.parked_command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SaveFailed as exc:
        print(
            f"parked {args.parked_command}: {exc}; {progress.done} of {progress.total} purged"
            " (each saved first); the rest, this one included, are still parked",
            file=sys.stderr,
        )
        return EXIT_BROKER_FAILED
    except BROKER_ERRORS as exc:
        print(
            f"parked {args.parked_command}: the broker at {where} failed after {progress.done}"
            f" of {progress.total}: {exc!r}",
            file=sys.stderr,
        )
        return EXIT_BROKER_FAILED
    finally:
        queue.close()
        progress.close()


def parked_queue(settings: Settings, timeout: float) -> ParkedQueue:
    """The parked queue of the settings, not yet open."""
    # pylint: disable=import-outside-toplevel
    from adapters.rabbitmq.parked import ParkedQueue
    from adapters.rabbitmq.queues import Queues, retry_ladder

    queues = Queues(
        settings.rabbitmq_queue,
        retry_ladder(
            settings.rabbitmq_retry_delay_seconds, settings.rabbitmq_retry_max_delay_seconds
        ),
        parked_max_messages=settings.rabbitmq_parked_max_messages,
        parked_ttl_seconds=settings.rabbitmq_parked_ttl_seconds,
    )
    return ParkedQueue(
        host=settings.rabbitmq_host,
        port=settings.rabbitmq_port,
        user=settings.rabbitmq_user,
        password=settings.rabbitmq_pass.get_secret_value(),
        vhost=settings.rabbitmq_vhost,
        queues=queues,
        timeout=timeout,
        heartbeat=settings.rabbitmq_heartbeat_seconds,
    )


def start(
    queue: ParkedQueue, args: argparse.Namespace, progress: Progress, where: str
) -> int | None:
    """Open ``purge --save``'s file, then the session (its lock taken); the exit status when
    either cannot be, else None."""
    # pylint: disable-next=import-outside-toplevel
    from adapters.rabbitmq.parked import BROKER_ERRORS, ParkedQueueBusy

    if getattr(args, "save", None) and not args.dry_run:
        try:  # before anything is read: a copy that cannot be kept must not cost a message
            progress.save_file = SaveFile(args.save)
        except OSError as exc:
            print(f"parked purge: cannot open {args.save}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    # The tool says in one line what failed; pika's own error logs would repeat it at length.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        queue.open()
    except ParkedQueueBusy as exc:
        print(f"parked {args.parked_command}: {exc}", file=sys.stderr)
        return EXIT_BROKER_FAILED
    except BROKER_ERRORS as exc:
        print(f"parked: RabbitMQ at {where} is not reachable: {exc!r}", file=sys.stderr)
        return EXIT_BROKER_FAILED
    return None


class Progress:
    """How far a command got: ``done`` of ``total``; and where ``purge --save`` writes."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0
        self.save_file: SaveFile | None = None

    def close(self) -> None:
        """Close the save file, if any."""
        if self.save_file is not None:
            self.save_file.close()


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
    if verb == "replay":
        where = f"to {queue.queues.name}"
    elif progress.save_file is not None:
        where = f"each saved to {progress.save_file.path} first"
    else:
        where = "discarded: no copy kept"
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
    """Remove the selected messages, each saved whole first with ``--save`` (on disk before its
    ack), or discarded with ``--discard``."""
    save_file = progress.save_file

    def purge(message: ParkedMessage) -> None:
        if save_file is not None:
            save_file.save(to_json(whole(message)))
        queue.purge(message)

    return _act(queue, args, progress, "purge", purge)


def cmd_migrate(queue: ParkedQueue, args: argparse.Namespace, _progress: Progress) -> int:
    """Give the parked queue the arguments of the settings (docs/parked-messages.md, Migrating),
    only while no worker consumes the job queue."""
    # pylint: disable-next=import-outside-toplevel
    from adapters.rabbitmq.parked_migration import (
        MigrationConflict,
        ParkedMigration,
        WorkersRunning,
    )

    migration = ParkedMigration(queue)
    parked, holding = queue.queues.parked, migration.holding_queue
    state = migration.state()
    bounds = arguments_text(queue.queues.parked_arguments)
    if state.done:
        print(f"{parked} has {bounds}; nothing to migrate", file=sys.stderr)
        return EXIT_DONE
    if state.parked is not None and not state.bounded:
        plan = (
            f"move the {state.parked} messages of {parked} (its arguments are not {bounds})"
            f" to {holding}, declare it again, and move them back"
        )
    else:
        plan = f"move the {state.holding} messages of {holding} back to {parked} ({bounds})"
    workers = WorkersRunning(queue.queues.name, state.consumers) if state.consumers else None
    if args.dry_run:
        return migrate_dry_run(plan, queue.queues.name, state.consumers, workers)
    try:
        if workers is not None:
            raise workers
        print(f"migrate: {plan}", file=sys.stderr)
        if not args.yes and not confirmed("migrate?", sys.stdin, lambda: queue.keep_alive(0.1)):
            print("parked migrate: not confirmed; nothing changed", file=sys.stderr)
            return EXIT_USAGE
        result = migration.run()
    except (MigrationConflict, WorkersRunning) as exc:
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
    print(f"{parked} has {bounds}", file=sys.stderr)
    return EXIT_DONE


def migrate_dry_run(plan: str, job_queue: str, consumers: int, workers: Exception | None) -> int:
    """What ``migrate`` would do, and whether it would refuse now (then exit status 1)."""
    print(f"dry run: would {plan}; nothing changed", file=sys.stderr)
    print(f"{job_queue} has {consumers} consumer(s)", file=sys.stderr)
    if workers is not None:
        print(f"parked migrate would refuse now: {workers}", file=sys.stderr)
        return EXIT_BROKER_FAILED
    return EXIT_DONE


def arguments_text(arguments: dict[str, Any]) -> str:
    """The parked queue's arguments in words: ``the bounds {...}``, or none at all."""
    if not arguments:
        return "no arguments (no bounds, as versions before the bounds declare it)"
    return f"the bounds {json.dumps(arguments)}"


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
        ("purge", "remove parked messages, each saved whole (JSON) with --save FILE first"),
    ):
        action = actions.add_parser(name, help=helps)
        # One of the three (checked in run_parked: argparse cannot group a list of positionals).
        action.add_argument("ids", nargs="*", type=id_prefix, metavar="ID")
        action.add_argument("--all", action="store_true", help="every message parked now")
        action.add_argument("--generation-id", type=int, help="those whose data has this id")
        action.set_defaults(selection_usage=action.error)
        _add_change_flags(action)
        if name == "purge":
            keep = action.add_mutually_exclusive_group()
            keep.add_argument(
                "--save",
                metavar="FILE",
                help="append each removed message (one JSON line) to FILE, on disk before it is"
                " removed",
            )
            keep.add_argument("--discard", action="store_true", help="remove without a copy")

    migrate = actions.add_parser(
        "migrate", help="give the parked queue the bounds of RABBITMQ_PARKED_* settings"
    )
    _add_change_flags(migrate)
    for action in actions.choices.values():
        action.add_argument("--timeout", type=float, default=10.0, help="broker timeout (seconds)")


def _add_change_flags(action: argparse.ArgumentParser) -> None:
    action.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    action.add_argument("--yes", action="store_true", help="do not ask for confirmation")
