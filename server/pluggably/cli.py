"""`pluggably`: the operator's command line.

One module, one argparse tree: `pluggably <group> <command>`. Each group is a function that adds
its commands to the tree (`_add_keys`); a command is a function from the parsed arguments to an
exit code. The groups that call a running gateway (`models`, `storage`, `artifacts`) are in
cli_remote.py; they add exit codes 3 (not authenticated or allowed) and 4 (gateway unreachable).

Exit codes: 0 done, 1 not found, 2 usage or configuration error. Errors go to stderr as one line.
The admin commands work on the key store file directly; a running server sees a change on its
next call.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from pluggably.cli_remote import add_artifacts, add_models, add_storage
from pluggably.core.context import KeyLimits
from pluggably.security import scopes as scope_table
from pluggably.security.keys import KeyRecord, KeyStore, KeyStoreError

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2

DEFAULT_STORE = Path("var/keys.db")
DEFAULT_SCOPES = (scope_table.GENERATE, scope_table.MODELS_READ)
DEV_KEY_NAME = "dev"

Command = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """Ends a command with `code` and one line on stderr."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# -- shared plumbing ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _store_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the top level and on every command, so both `pluggably --store F keys list` and
    # `pluggably keys list --store F` work; a command's default must not undo the top level's.
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--store",
        metavar="PATH",
        default=default,
        help="key store file (default: $PLUGGABLY_AUTH__STORE, else the config's auth.store, "
        f"else {DEFAULT_STORE})",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="config file whose auth.store to use (default: $PLUGGABLY_CONFIG)",
    )


def store_path(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Path:
    """Where the key store is: --store, $PLUGGABLY_AUTH__STORE, the config, or the default."""
    environ = os.environ if environ is None else environ
    if args.store:
        return Path(args.store)
    if environ.get("PLUGGABLY_AUTH__STORE"):
        return Path(environ["PLUGGABLY_AUTH__STORE"])
    config_file = args.config or environ.get("PLUGGABLY_CONFIG")
    if config_file:
        # Imported only here: the config pulls in every backend kind's section model.
        from pluggably.config import ConfigError, load_config

        try:
            return load_config(config_file, environ).auth.store
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
    return DEFAULT_STORE


def _open_store(args: argparse.Namespace) -> KeyStore:
    try:
        return KeyStore(store_path(args))
    except KeyStoreError as exc:
        raise CommandError(str(exc)) from None


def _write_secret(path: Path, text: str, *, replace: bool) -> None:
    """Writes `text` to `path`, readable by its owner only, all at once: a reader never sees a
    half-written key, and a key never exists on disk with a wider mode."""
    if path.exists() and not replace:
        raise CommandError(f"{path} exists; remove it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- keys ----------------------------------------------------------------------------------------


def _keys_create(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        # Checked before the key is made, so a refusal leaves no key nobody holds.
        raise CommandError(f"{out} exists; remove it or choose another --out")
    expires = (
        None if args.expires_in is None else datetime.now(UTC) + timedelta(days=args.expires_in)
    )
    limits = KeyLimits(
        requests_per_minute=args.rpm, tokens_per_minute=args.tpm, concurrent_streams=args.streams
    )
    with _open_store(args) as store:
        try:
            key, record = store.create(
                args.name,
                args.scope or DEFAULT_SCOPES,
                models=args.model,
                limits=limits,
                expires_at=expires,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if out is not None:
            try:
                _write_secret(out, key + "\n", replace=False)
            except (OSError, CommandError) as exc:
                store.revoke(record.key_id)
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise CommandError(f"cannot write {out}: {reason} (the key was revoked)") from None
    summary = f"{record.prefix} ({record.name}; scopes: {', '.join(record.scopes)})"
    if out is not None:
        print(f"Created key {summary}; it is in {out} (mode 600).")
    else:
        # The key alone on stdout, so that `KEY=$(pluggably keys create ...)` works.
        print(key)
        print(f"Created key {summary}. It is shown only this once.", file=sys.stderr)
    return EXIT_OK


def _fmt_time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _fmt_limits(limits: KeyLimits) -> str:
    parts = [
        f"{label}={value}"
        for label, value in (
            ("rpm", limits.requests_per_minute),
            ("tpm", limits.tokens_per_minute),
            ("streams", limits.concurrent_streams),
        )
        if value is not None
    ]
    return ",".join(parts) or "default"


def _record_json(record: KeyRecord, now: datetime) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "key_id": record.key_id,
        "prefix": record.prefix,
        "name": record.name,
        "scopes": list(record.scopes),
        "models": None if record.models is None else list(record.models),
        "limits": {
            "requests_per_minute": record.limits.requests_per_minute,
            "tokens_per_minute": record.limits.tokens_per_minute,
            "concurrent_streams": record.limits.concurrent_streams,
        },
        "status": record.status(now),
        "created_at": iso(record.created_at),
        "last_used_at": iso(record.last_used_at),
        "expires_at": iso(record.expires_at),
        "revoked_at": iso(record.revoked_at),
    }


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def _keys_list(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        records = store.list(include_revoked=args.all)
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps([_record_json(r, now) for r in records], indent=2))
        return EXIT_OK
    if not records:
        print("No keys." + ("" if args.all else " (--all shows revoked keys too)"))
        return EXIT_OK
    rows = [
        ("ID", "NAME", "SCOPES", "MODELS", "LIMITS", "CREATED", "LAST USED", "EXPIRES", "STATUS")
    ]
    for r in records:
        status = r.status(now)
        if r.revoked_at is not None:
            status = f"revoked {_fmt_time(r.revoked_at)}"
        rows.append(
            (
                r.prefix,
                r.name,
                ",".join(r.scopes),
                "*" if r.models is None else ",".join(r.models) or "(none)",
                _fmt_limits(r.limits),
                _fmt_time(r.created_at),
                _fmt_time(r.last_used_at),
                _fmt_time(r.expires_at),
                status,
            )
        )
    _print_table(rows, sys.stdout)
    print("Times are UTC.")
    return EXIT_OK


def _keys_revoke(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        record = store.get(args.key)
        if record is None:
            # Never echo the argument: it may be a full key pasted by mistake.
            raise CommandError("no such key in the store", EXIT_NOT_FOUND)
        if record.revoked_at is not None:
            print(f"Key {record.prefix} ({record.name}) was already revoked.")
            return EXIT_OK
        store.revoke(record.key_id)
    print(f"Revoked key {record.prefix} ({record.name}); servers refuse it from their next call.")
    return EXIT_OK


def _keys_ensure_dev(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with _open_store(args) as store:
        existing = None
        try:
            existing = store.verify(out.read_text().strip())
        except (OSError, UnicodeDecodeError):
            pass
        if existing is not None:
            print(f"Development key {existing.prefix} is in {out}.")
            return EXIT_OK
        key, record = store.create(DEV_KEY_NAME, [scope_table.ADMIN])
        try:
            _write_secret(out, key + "\n", replace=True)
        except OSError as exc:
            store.revoke(record.key_id)
            raise CommandError(
                f"cannot write {out}: {exc.strerror} (the key was revoked)"
            ) from None
    print(
        f"Created development key {record.prefix} (scope admin) in {out}. Use it with:\n"
        f'  grpcurl -H "authorization: Bearer $(cat {out})" ...\n'
        f'  curl -H "authorization: Bearer $(cat {out})" ...'
    )
    return EXIT_OK


def _add_keys(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = groups.add_parser("keys", help="create, list and revoke API keys")
    commands = keys.add_subparsers(dest="command", metavar="COMMAND", required=True)

    create = commands.add_parser(
        "create",
        help="create a key and print it once",
        description="Creates an API key and prints it once; only its hash is stored. Scopes: "
        + "; ".join(f"{s}: {m}" for s, m in scope_table.SCOPE_MEANINGS.items()),
    )
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--scope",
        action="append",
        metavar="SCOPE",
        help=f"a scope (repeatable; default: {' '.join(DEFAULT_SCOPES)}); "
        f"one of {', '.join(scope_table.SCOPES)}",
    )
    create.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="allow only this model id or provider/* (repeatable; default: every model)",
    )
    create.add_argument("--rpm", type=_positive_int, help="requests per minute")
    create.add_argument("--tpm", type=_positive_int, help="tokens per minute")
    create.add_argument("--streams", type=_positive_int, help="concurrent streams")
    create.add_argument(
        "--expires-in", type=_positive_float, metavar="DAYS", help="expire after DAYS days"
    )
    create.add_argument(
        "--out", metavar="FILE", help="write the key to FILE (mode 600) instead of printing it"
    )
    create.set_defaults(func=_keys_create)

    listing = commands.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_keys_list)

    revoke = commands.add_parser("revoke", help="revoke a key (effective on the next call)")
    revoke.add_argument("key", metavar="KEY_ID_OR_PREFIX", help="the key id or pk_<id>")
    revoke.set_defaults(func=_keys_revoke)

    dev = commands.add_parser(
        "ensure-dev", help="make sure FILE holds a working admin key (what `make run` calls)"
    )
    dev.add_argument("--out", metavar="FILE", default="var/dev-key", help="default: var/dev-key")
    dev.set_defaults(func=_keys_ensure_dev)

    for command in (create, listing, revoke, dev):
        _store_options(command, top=False)


# Each adds one command group.
GROUPS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_keys,
    add_models,
    add_storage,
    add_artifacts,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pluggably", description="Administer a Pluggably gateway."
    )
    _store_options(parser, top=True)
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for add in GROUPS:
        add(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.func
    try:
        return command(args)
    except CommandError as exc:
        print(f"pluggably: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyStoreError as exc:
        print(f"pluggably: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as exc:
        print(f"pluggably: error: key store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader (`| head`) has gone: not an error. Point stdout at nothing so that the
        # interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
