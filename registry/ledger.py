"""The promotion ledger: an append-only, hash-chained table that only the promotion service writes.

Each record (an alias move, an evaluation the gate ran) is one row: its sequence number, its JSON
body, the hash of the previous row and its own (SHA-256 over both), and an HMAC of that hash with
``VF_AUDIT_KEY``. Whoever reads the ledger verifies the whole chain first: a missing, altered,
reordered or unsigned row makes it unreadable (``LedgerBroken``), never a reason to trust an older
row. A reader also remembers the newest row it verified, so rows removed from the end are noticed.

Where it lives is ``VF_AUDIT_DB`` (a SQLAlchemy URL): on a team's stack a PostgreSQL database in
which the promotion service's role may only SELECT and INSERT and the service's only SELECT;
without it, a SQLite file beside an embedded MLflow store (``sqlite:///…/mlflow.db`` ->
``vf-audit.db``). The ledger is also the promotion lock: ``Ledger.exclusive`` holds a PostgreSQL
advisory lock (SQLite's write lock) for the whole move, so no object anyone else can create blocks
a promotion, and a crashed holder's lock ends with its connection.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from dinomx.errors import UserError

DB_ENV = "VF_AUDIT_DB"
KEY_ENV = "VF_AUDIT_KEY"
GENESIS = "0" * 64
# The one advisory lock key of promotions (any 64-bit number no other part of the database uses).
LOCK_KEY = 0x7666_6761_7465  # "vfgate"
_WRITE = "vf_ledger_write"  # execution option of the connection that holds the lock

metadata = sa.MetaData()
records = sa.Table(
    "vf_ledger", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(64), nullable=False),
)


class LedgerUnavailable(UserError, RuntimeError):
    """The ledger is not configured or cannot be reached."""


class LedgerBroken(UserError, RuntimeError):
    """The ledger's chain does not verify: nothing in it may be trusted."""


class LedgerBusy(RuntimeError):
    """Another promotion held the ledger's lock for longer than the wait."""


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    model: str
    version: str
    alias: str
    body: dict
    hash: str
    signature: str


def audit_key() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def default_url(tracking_uri: str) -> str:
    """``VF_AUDIT_DB``, else a SQLite file beside an embedded tracking store."""
    if os.environ.get(DB_ENV):
        return os.environ[DB_ENV]
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        folder = Path(unquote(tracking_uri.removeprefix("sqlite:///"))).parent
    elif parsed.scheme in ("", "file"):
        folder = Path(unquote(parsed.path or tracking_uri))
    else:
        raise LedgerUnavailable(f"{DB_ENV}: not set; with the tracking server {tracking_uri} the promotion ledger must be "
                                "named (postgresql://… of the promotion service's role; the service: a read-only role)")
    return f"sqlite:///{folder.resolve() / 'vf-audit.db'}"


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def _signature(digest: str, key: bytes | None) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest() if key else ""


def signed(entry_hash: str, signature: str, key: bytes | None) -> bool:
    return key is None or hmac.compare_digest(signature, _signature(entry_hash, key))


class Ledger:
    def __init__(self, url: str, key: bytes | None = None, wait_s: float = 30.0):
        self.url, self.key, self.wait_s = url, key, wait_s
        sqlite = url.startswith("sqlite")
        if sqlite:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = (sa.create_engine(url, connect_args={"timeout": wait_s}, poolclass=sa.pool.NullPool) if sqlite
                       # A pooled connection the database dropped (a restart) is replaced, not failed on.
                       else sa.create_engine(url, pool_pre_ping=True))
        if sqlite:
            # pysqlite's own transaction handling would start writes lazily; the move needs the
            # write lock from its first statement (the recipe in SQLAlchemy's SQLite notes).
            @sa.event.listens_for(self.engine, "connect")
            def _autocommit(dbapi_connection, _record):
                dbapi_connection.isolation_level = None
                # Readers (the service) never wait for a promotion in progress.
                dbapi_connection.execute("PRAGMA journal_mode=WAL")

            @sa.event.listens_for(self.engine, "begin")
            def _begin(connection):
                connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(_WRITE) else "BEGIN")
        self._seen = 0  # the newest row this reader verified

    @classmethod
    def from_env(cls, tracking_uri: str) -> "Ledger":
        """The process's one reader and writer of the ledger of ``tracking_uri``'s registry: one
        connection pool, and one memory of the newest record verified."""
        return _shared(default_url(tracking_uri), audit_key())

    def create(self) -> None:
        """The table, where this identity may create it (the embedded store; the stack creates the
        team's as its owner)."""
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"{DB_ENV}: cannot create the ledger table: {_brief(exc)}") from None

    def entries(self) -> list[Entry]:
        """Every row, oldest first, after verifying the chain up to the newest."""
        try:
            with self.engine.connect() as connection:
                if not sa.inspect(connection).has_table(records.name):
                    rows = []
                else:
                    rows = connection.execute(sa.select(records).order_by(records.c.seq)).all()
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"{DB_ENV}: the promotion ledger cannot be read: {_brief(exc)}") from None
        return self._verify(rows)

    def _verify(self, rows) -> list[Entry]:
        entries, previous = [], GENESIS
        for expected, row in enumerate(rows, start=1):
            where = f"ledger record {row.seq}"
            if row.seq != expected:
                raise LedgerBroken(f"ledger record {expected} is missing (the next one is {row.seq})")
            if row.prev_hash != previous:
                raise LedgerBroken(f"{where} does not follow record {expected - 1}: records were reordered or replaced")
            if chain_hash(previous, row.body) != row.hash:
                raise LedgerBroken(f"{where} was altered after it was written")
            if not signed(row.hash, row.signature, self.key):
                raise LedgerBroken(f"{where} is not signed by the promotion service ({KEY_ENV})")
            try:
                body = json.loads(row.body)
            except ValueError:
                raise LedgerBroken(f"{where} is unreadable") from None
            if [body.get(k) for k in ("kind", "model", "version", "alias")] != [row.kind, row.model, row.version, row.alias]:
                raise LedgerBroken(f"{where}: its columns disagree with its body")
            entries.append(Entry(row.seq, row.kind, row.model, row.version, row.alias, body, row.hash, row.signature))
            previous = row.hash
        if len(entries) < self._seen:
            raise LedgerBroken(f"the ledger ends at record {len(entries)}, but record {self._seen} was read before: "
                               "records were removed")
        self._seen = len(entries)
        return entries

    @contextmanager
    def exclusive(self) -> Iterator["Appender"]:
        """The promotion lock and a way to append under it, committed when the block ends."""
        self.create()
        try:
            with self.engine.connect().execution_options(**{_WRITE: True}) as connection, connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.execute(sa.text(f"SET LOCAL lock_timeout = '{int(self.wait_s * 1000)}ms'"))
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCK_KEY)))
                rows = connection.execute(sa.select(records).order_by(records.c.seq)).all()
                yield Appender(connection, self._verify(rows), self.key)
        except sa.exc.OperationalError as exc:
            if "lock" in str(exc.orig).lower():
                raise LedgerBusy(f"another promotion held the ledger for over {self.wait_s:.0f} s") from None
            raise LedgerUnavailable(f"{DB_ENV}: {_brief(exc)}") from None
        except sa.exc.ProgrammingError as exc:  # a role that may not write it
            raise LedgerUnavailable(f"{DB_ENV}: {_brief(exc)}: only the promotion service appends to the ledger") from None

    def check_writable(self) -> None:
        """Refuses (``LedgerUnavailable``) an identity that could not append, before any gate runs
        work on its behalf."""
        self.create()
        if self.engine.dialect.name != "postgresql":
            return  # the embedded file: whoever can open it writes it
        try:
            with self.engine.connect() as connection:
                allowed = connection.execute(sa.select(sa.func.has_table_privilege(records.name, "INSERT"))).scalar()
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"{DB_ENV}: the promotion ledger cannot be read: {_brief(exc)}") from None
        if not allowed:
            raise LedgerUnavailable(f"{DB_ENV}: permission denied: this identity may not append to the promotion "
                                    "ledger; promotions run as the promotion service")


@functools.cache
def _shared(url: str, key: bytes | None) -> Ledger:
    return Ledger(url, key)


class Appender:
    def __init__(self, connection: sa.Connection, entries: list[Entry], key: bytes | None):
        self.connection, self.entries, self.key = connection, entries, key

    def append(self, body: dict) -> Entry:
        previous = self.entries[-1].hash if self.entries else GENESIS
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        digest = chain_hash(previous, text)
        entry = Entry(len(self.entries) + 1, body["kind"], body["model"], str(body["version"]), body.get("alias", ""),
                      body, digest, _signature(digest, self.key))
        self.connection.execute(records.insert().values(
            seq=entry.seq, kind=entry.kind, model=entry.model, version=entry.version, alias=entry.alias, body=text,
            prev_hash=previous, hash=digest, signature=entry.signature))
        self.entries.append(entry)
        return entry


def _brief(exc: SQLAlchemyError) -> str:
    """The database's own words without the statement or the connection string."""
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300]
