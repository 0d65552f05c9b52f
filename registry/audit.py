"""Audit records of alias moves, and the proof that an alias was moved through the gates.

Every promotion or rollback writes one record per moved version, as a ``vf.audit.<alias>.<time>``
tag on that version. On a team's tracking server whoever may register versions into a model may
also set its aliases and tags (MLflow 3.17 asks the same EDIT permission for all three), so a tag
alone proves nothing: the promotion service signs each record with ``VF_AUDIT_KEY`` (HMAC-SHA256
over the record), and a service started with the key follows an alias only to a version whose
latest record for that alias is signed and names it. Without a key (one person's embedded setup)
records are written and checked unsigned.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from registry.lineage import equals
from registry.mlflow_service import AUDIT_PREFIX

KEY_ENV = "VF_AUDIT_KEY"
SIGNATURE = "signature"


def audit_key() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def _digest(record: dict, key: bytes) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != SIGNATURE}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(record: dict, key: bytes | None) -> dict:
    return {**record, SIGNATURE: _digest(record, key)} if key else dict(record)


def signed_by(record: dict, key: bytes) -> bool:
    return isinstance(record.get(SIGNATURE), str) and hmac.compare_digest(record[SIGNATURE], _digest(record, key))


def write(client: MlflowClient, mv: ModelVersion, record: dict, key: bytes | None = None) -> dict:
    now = datetime.now(timezone.utc)
    record = sign({**record, "time": now.isoformat()}, key if key is not None else audit_key())
    # A random suffix keeps two records written in the same microsecond apart.
    tag = f"{AUDIT_PREFIX}{record['alias']}.{now:%Y%m%dT%H%M%S%fZ}.{uuid.uuid4().hex[:6]}"
    client.set_model_version_tag(mv.name, mv.version, tag, json.dumps(record))
    return record


def trail(client: MlflowClient, name: str, alias: str | None = None, key: bytes | None = None) -> list[dict]:
    """Every audit record of ``name`` (optionally one alias), oldest first; a tag that is not a
    record (hand-written, truncated) is left out rather than trusted, and so, given ``key``, is
    every record it did not sign."""
    records = []
    for mv in client.search_model_versions(equals("name", name)):
        for tag, value in mv.tags.items():
            if not tag.startswith(AUDIT_PREFIX):
                continue
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if not (isinstance(record, dict) and isinstance(record.get("time"), str)):
                continue
            if (alias is None or record.get("alias") == alias) and (key is None or signed_by(record, key)):
                records.append(record)
    return sorted(records, key=lambda r: r["time"])


def version_history(client: MlflowClient, mv: ModelVersion) -> list[dict]:
    """The records of moves to this version (any alias), oldest first."""
    return [r for r in trail(client, mv.name) if str(r.get("version")) == str(mv.version)]


def unaudited_reason(client: MlflowClient, mv: ModelVersion, alias: str, key: bytes | None) -> str | None:
    """Why ``mv`` holding ``alias`` was not put there by the gates, or None when it was: the latest
    record of the alias must name this version (and, with a key, carry a valid signature)."""
    records = trail(client, mv.name, alias, key)
    if not records:
        return (f"models:/{mv.name}/{mv.version} holds @{alias} but no {'signed ' if key else ''}promotion record "
                "exists: the alias was moved outside the gates (e.g. in the MLflow UI)")
    last = records[-1]
    if str(last.get("version")) != str(mv.version):
        return (f"models:/{mv.name}/{mv.version} holds @{alias}, but the gates last moved it to version "
                f"{last.get('version')} ({last.get('action')} by {last.get('user')} at {last.get('time')}): "
                "the alias was moved outside the gates")
    return None
