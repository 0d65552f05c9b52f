"""Audit records of alias moves, and the proof that an alias was moved through the gates.

The record of every promotion or rollback (one per moved version) is a row of the promotion ledger
(``registry.ledger``), which only the promotion service writes and every reader verifies as a
chain. MLflow shows a copy, a ``vf.audit.<alias>.<time>`` tag on the version carrying the row's
sequence number, hash and signature, for the UI; on a team's server whoever may edit a model could
rewrite that copy, so nothing is decided from it. The service follows an alias only to the version
named by the ledger's newest record for that alias, and refuses when the ledger does not verify or
lacks a record MLflow's signed copy shows.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from registry.ledger import Appender, Entry, Ledger, signed
from registry.mlflow_service import AUDIT_PREFIX

MOVES = ("promote", "rollback")


def write(ledger: Appender, client: MlflowClient, mv: ModelVersion, record: dict) -> dict:
    """Append ``record`` (an alias move of ``mv``) to the ledger, then copy it onto the version."""
    now = datetime.now(timezone.utc)
    entry = ledger.append({**record, "kind": record["action"], "version": str(mv.version), "time": now.isoformat()})
    mirror = {**entry.body, "seq": entry.seq, "hash": entry.hash, "signature": entry.signature}
    client.set_model_version_tag(mv.name, mv.version, f"{AUDIT_PREFIX}{record['alias']}.{now:%Y%m%dT%H%M%S%fZ}.{entry.seq}",
                                 json.dumps(mirror))
    return entry.body


def trail(ledger: Ledger | list[Entry], name: str, alias: str | None = None) -> list[dict]:
    """Every verified move of ``name`` (optionally of one alias), oldest first."""
    entries = ledger.entries() if isinstance(ledger, Ledger) else ledger
    return [e.body for e in entries if e.kind in MOVES and e.model == name and (alias is None or e.alias == alias)]


def mirrored_history(mv: ModelVersion) -> list[dict]:
    """The copies of the records of moves to this version on the version itself, oldest first:
    what the version's description shows; information, not proof."""
    records = []
    for tag, value in mv.tags.items():
        if tag.startswith(AUDIT_PREFIX):
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("time"), str):
                records.append(record)
    return sorted(records, key=lambda r: r["time"])


def unaudited_reason(ledger: Ledger, mv: ModelVersion, alias: str) -> str | None:
    """Why ``mv`` holding ``alias`` was not put there by the gates, or None when it was: the ledger
    verifies, holds every record its signed copies in MLflow name, and its newest record for the
    alias names this version. Raises ``LedgerBroken`` / ``LedgerUnavailable`` when it cannot tell."""
    entries = ledger.entries()
    for record in mirrored_history(mv):
        seq = record.get("seq")
        if (ledger.key and isinstance(seq, int) and seq > len(entries) and isinstance(record.get("hash"), str)
                and isinstance(record.get("signature"), str) and signed(record["hash"], record["signature"], ledger.key)):
            return (f"the ledger ends at record {len(entries)}, but MLflow shows record {seq} signed by the promotion "
                    "service: records were removed from the ledger")
    moves = trail(entries, mv.name, alias)
    if not moves:
        return (f"models:/{mv.name}/{mv.version} holds @{alias} but the ledger has no promotion to it: the alias was "
                "moved outside the gates (e.g. in the MLflow UI)")
    last = moves[-1]
    if str(last.get("version")) != str(mv.version):
        return (f"models:/{mv.name}/{mv.version} holds @{alias}, but the gates last moved it to version "
                f"{last.get('version')} ({last.get('action')} by {last.get('user')} at {last.get('time')}): "
                "the alias was moved outside the gates")
    return None
