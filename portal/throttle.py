"""Sign-in throttling per account and per address, with exponential backoff.

After ``threshold`` failures in a row (failures older than ``window`` are forgotten), each further
failure locks the key for ``base_s`` doubled per failure, at most ``max_s``. While an account or
an address is locked every attempt is refused, the right password included, so guessing costs
time whatever the guesser spreads over. A success clears its account's failures; an address's
failures only age out, so one valid account cannot reset a guesser's address.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from portal.db import SignInFailures, db, now


@dataclass(frozen=True)
class Throttle:
    account_threshold: int = 5
    address_threshold: int = 20
    base_s: float = 30.0
    max_s: float = 3600.0
    window: timedelta = timedelta(minutes=15)

    def retry_after(self, username: str, address: str) -> int:
        """Seconds until an attempt for ``username`` from ``address`` may be tried; 0 if now."""
        moment = now()
        waits = [(_aware(row.locked_until) - moment).total_seconds() for row in self._rows(username, address)
                 if row.locked_until is not None]
        return max([0, *[int(w) + 1 for w in waits if w > 0]])

    def failed(self, username: str, address: str) -> None:
        moment = now()
        for key, threshold in ((f"user:{username}", self.account_threshold), (f"addr:{address}", self.address_threshold)):
            row = db.session.get(SignInFailures, key) or SignInFailures(key=key, failures=0)
            if row.failures and moment - _aware(row.last_failure) > self.window:
                row.failures, row.locked_until = 0, None
            row.failures += 1
            row.last_failure = moment
            if row.failures >= threshold:
                row.locked_until = moment + timedelta(seconds=min(self.base_s * 2 ** (row.failures - threshold), self.max_s))
            db.session.add(row)
        db.session.commit()

    def succeeded(self, username: str) -> None:
        row = db.session.get(SignInFailures, f"user:{username}")
        if row is not None:
            db.session.delete(row)
            db.session.commit()

    def _rows(self, username: str, address: str) -> list[SignInFailures]:
        keys = (f"user:{username}", f"addr:{address}")
        return [row for key in keys if (row := db.session.get(SignInFailures, key)) is not None]


def _aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their time zone; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
