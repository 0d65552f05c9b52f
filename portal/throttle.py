"""Sign-in throttling per account and per address, with exponential backoff, shared by every
portal process through the database.

An attempt is counted before its password is checked: ``admit`` reserves it with one upsert per
key (account, address), which the database serialises on the key's row, and which does nothing
while the key is locked. The attempt that reaches ``threshold`` sets the lock in the same
transaction, so however many attempts arrive at once, across threads, workers and machines, at
most ``threshold`` are ever evaluated. A right password gives its reservations back (the
account's row is cleared, the address's count lowered), so signing in does not count as
guessing; a wrong one keeps them. Each lock lasts ``base_s`` doubled per failure past the
threshold, at most ``max_s``; failures older than ``window`` are forgotten. While an account or an
address is locked every attempt is refused, the right password included.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import case, or_, update
from sqlalchemy.dialects import postgresql, sqlite

from portal.db import SignInFailures, db, now


@dataclass(frozen=True)
class Throttle:
    account_threshold: int = 5
    address_threshold: int = 20
    base_s: float = 30.0
    max_s: float = 3600.0
    window: timedelta = timedelta(minutes=15)

    def admit(self, username: str, address: str) -> int:
        """Reserve one attempt for ``username`` from ``address``: 0 when it may be evaluated, else the
        seconds until one may be tried (nothing is counted then)."""
        moment = _naive_utc()
        try:
            for key, threshold in ((f"addr:{address}", self.address_threshold), (f"user:{username}", self.account_threshold)):
                failures = self._reserve(key, moment)
                if failures is None:
                    db.session.rollback()
                    return self.retry_after(username, address)
                if failures >= threshold:
                    seconds = min(self.base_s * 2 ** (failures - threshold), self.max_s)
                    db.session.execute(update(SignInFailures).where(SignInFailures.key == key)
                                       .values(locked_until=moment + timedelta(seconds=seconds)))
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise
        return 0

    def succeeded(self, username: str, address: str) -> None:
        """The admitted attempt was right: it was no guess."""
        db.session.execute(db.delete(SignInFailures).where(SignInFailures.key == f"user:{username}"))
        db.session.execute(update(SignInFailures).where(SignInFailures.key == f"addr:{address}", SignInFailures.failures > 0)
                           .values(failures=SignInFailures.failures - 1))
        db.session.commit()

    def retry_after(self, username: str, address: str) -> int:
        moment = _naive_utc()
        rows = db.session.scalars(db.select(SignInFailures).where(
            SignInFailures.key.in_((f"user:{username}", f"addr:{address}")))).all()
        waits = [(_naive(row.locked_until) - moment).total_seconds() for row in rows if row.locked_until is not None]
        return max([1, *[int(w) + 1 for w in waits if w > 0]])

    def _reserve(self, key: str, moment: datetime) -> int | None:
        """Count one attempt on ``key`` unless it is locked; the new count, or None when locked."""
        dialect = db.session.get_bind().dialect.name
        insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
        if insert is None:
            raise RuntimeError(f"sign-in throttling needs PostgreSQL or SQLite, not {dialect}")
        table = SignInFailures.__table__
        stale = moment - self.window
        statement = insert(table).values(key=key, failures=1, last_failure=moment, locked_until=None)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.key],
            set_={"failures": case((table.c.last_failure < stale, 1), else_=table.c.failures + 1),
                  "last_failure": moment,
                  "locked_until": None},
            where=or_(table.c.locked_until.is_(None), table.c.locked_until <= moment),
        ).returning(table.c.failures)
        return db.session.execute(statement).scalar_one_or_none()


def _naive_utc() -> datetime:
    """The columns hold UTC without a zone: compared in SQL, a zone-aware value would be shifted by
    the database session's time zone."""
    return now().replace(tzinfo=None)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment
