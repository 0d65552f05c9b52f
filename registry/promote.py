"""Move an alias (``staging``, ``production``) to a model version through gates, or roll it back,
leaving an audit record on the version each time.

    python -m registry.promote models:/demo-backbone/3 --alias production --reason "beats v2 on kNN"
    python -m registry.promote --rollback demo-backbone --alias production --reason "v3 misreads scanner B"

Gates, in order: lineage complete; training data passed validation; a model built on a registered
parent (a head on its backbone) only when that parent holds the same alias; evaluation metrics no
worse than the current holder's beyond the thresholds of ``configs/promotion.yaml``.

Two promotions of one alias at once cannot both win: each holds a registry-wide lock while it
moves the alias (a lock is a registered model, and the registry refuses a second one of the same
name on any backend), and a promotion whose comparison was made against a holder that has since
changed is refused.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from registry.lineage import (
    EVAL_PREFIX,
    Lineage,
    alias_holder,
    equals,
    parse_model_uri,
    resolve_version,
    version_uri,
)

AUDIT_PREFIX = "vf.audit."
ALIASES = ("staging", "production")
DEFAULT_GATES = Path(__file__).resolve().parents[1] / "configs" / "promotion.yaml"
LOWER_IS_BETTER = ("cluster.dbi", "regression.mae")
LOCK_PREFIX = "vf-lock."


class PromotionRefused(RuntimeError):
    def __init__(self, gate: str, detail: str):
        super().__init__(f"promotion refused by gate '{gate}': {detail}")
        self.gate = gate


@dataclass(frozen=True)
class MetricGate:
    metric: str
    max_drop: float

    def check(self, candidate: float, holder: float) -> str | None:
        """Why ``candidate`` fails against ``holder``, or None."""
        if self.metric in LOWER_IS_BETTER:
            if candidate > holder + self.max_drop:
                return f"{self.metric} {candidate:.4f} > holder's {holder:.4f} + {self.max_drop} (lower is better)"
        elif candidate < holder - self.max_drop:
            return f"{self.metric} {candidate:.4f} < holder's {holder:.4f} - {self.max_drop}"
        return None


def load_gates(path: str | Path = DEFAULT_GATES) -> dict[str, list[MetricGate]]:
    """Metric gates per model kind; a malformed entry is named by file and key."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    gates = {}
    for kind, metrics in data.items():
        if kind not in ("backbone", "head") or not isinstance(metrics, dict):
            raise ValueError(f"{path}: {kind}: expected 'backbone' or 'head' mapping metric -> {{max_drop: number}}")
        gates[kind] = []
        for metric, spec in metrics.items():
            drop = spec.get("max_drop") if isinstance(spec, dict) else None
            if not isinstance(drop, (int, float)) or isinstance(drop, bool) or drop < 0:
                raise ValueError(f"{path}: {kind}.{metric}.max_drop: expected a number >= 0, got {drop!r}")
            gates[kind].append(MetricGate(metric, float(drop)))
    return gates


def version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """Evaluation metrics of a version: its source run's, overridden by ``evaluate``'s tags."""
    metrics = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    metrics.update({k.removeprefix(EVAL_PREFIX): float(v) for k, v in mv.tags.items()
                    if k.startswith(EVAL_PREFIX) and k != f"{EVAL_PREFIX}run_id"})
    return metrics


def check_gates(client: MlflowClient, mv: ModelVersion, alias: str, holder: ModelVersion | None,
                gates: dict[str, list[MetricGate]]) -> dict:
    """Raise PromotionRefused naming the first failing gate; return the metric comparison."""
    uri = version_uri(mv)
    try:
        lineage = Lineage.from_tags(mv.tags)
    except LookupError as exc:
        raise PromotionRefused("lineage complete", f"{uri}: {exc}") from None
    if not lineage.validation_success:
        raise PromotionRefused("data validation", f"{uri} was trained on data that failed {lineage.validation_suite}")
    if lineage.parent.startswith("models:/"):
        parent_name, parent_version, _ = parse_model_uri(lineage.parent)
        parent_holder = alias_holder(client, parent_name, alias)
        if parent_holder is None or str(parent_holder.version) != parent_version:
            held = f"version {parent_holder.version}" if parent_holder else "not set"
            raise PromotionRefused("parent promoted", f"{uri} is built on {lineage.parent}, but @{alias} of "
                                                      f"{parent_name} is {held}; promote the parent first")
    comparison = {}
    if holder is None or str(holder.version) == str(mv.version):
        return comparison
    candidate, incumbent = version_metrics(client, mv), version_metrics(client, holder)
    for gate in gates.get(lineage.kind, []):
        if gate.metric not in candidate:
            hint = f"; run `mlflow run . -e evaluate -P model={uri}`" if lineage.kind == "backbone" else ""
            raise PromotionRefused("metrics", f"{uri} has no {gate.metric} to compare with @{alias}{hint}")
        if gate.metric not in incumbent:
            continue
        failure = gate.check(candidate[gate.metric], incumbent[gate.metric])
        if failure:
            raise PromotionRefused("metrics", f"{uri} regresses against @{alias} (version {holder.version}): {failure}")
        comparison[gate.metric] = {"candidate": candidate[gate.metric], "holder": incumbent[gate.metric]}
    return comparison


@contextmanager
def alias_lock(client: MlflowClient, name: str, alias: str, wait_s: float = 30.0, stale_s: float = 300.0):
    """Exclusive right to move ``name@alias``. Creating a registered model is atomic on every
    registry backend, so the lock is one; a lock older than ``stale_s`` (a crashed holder) is broken."""
    lock = f"{LOCK_PREFIX}{name}.{alias}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"vf.kind": "lock", "vf.owner": getpass.getuser(), "vf.token": token},
                                           description=f"held while {name}@{alias} moves; deleted after")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            try:
                held = client.get_registered_model(lock)
                if time.time() * 1000 - held.creation_timestamp > stale_s * 1000:
                    client.delete_registered_model(lock)
                    continue
            except MlflowException:
                continue  # released between our attempts
            if time.monotonic() > deadline:
                raise PromotionRefused("exclusive", f"another promotion of {name}@{alias} holds {lock}") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        try:
            # A lock broken as stale now belongs to someone else: leave it to them.
            if client.get_registered_model(lock).tags.get("vf.token") == token:
                client.delete_registered_model(lock)
        except MlflowException:
            pass


def _audit(client: MlflowClient, mv: ModelVersion, record: dict) -> dict:
    now = datetime.now(timezone.utc)
    record = {**record, "time": now.isoformat()}
    # A random suffix keeps two records written in the same microsecond apart.
    key = f"{AUDIT_PREFIX}{record['alias']}.{now:%Y%m%dT%H%M%S%fZ}.{uuid.uuid4().hex[:6]}"
    client.set_model_version_tag(mv.name, mv.version, key, json.dumps(record))
    return record


def audit_trail(client: MlflowClient, name: str, alias: str | None = None) -> list[dict]:
    """Every audit record of ``name`` (optionally one alias), oldest first."""
    records = []
    for mv in client.search_model_versions(equals("name", name)):
        for key, value in mv.tags.items():
            if key.startswith(AUDIT_PREFIX):
                record = json.loads(value)
                if alias is None or record["alias"] == alias:
                    records.append(record)
    return sorted(records, key=lambda r: r["time"])


def promote(client: MlflowClient, model_uri: str, alias: str, reason: str, user: str | None = None,
            gates: dict[str, list[MetricGate]] | None = None) -> dict:
    if alias not in ALIASES:
        raise ValueError(f"alias: expected one of {ALIASES}, got {alias!r}")
    mv = resolve_version(client, model_uri)
    gates = load_gates() if gates is None else gates
    seen = alias_holder(client, mv.name, alias)
    comparison = check_gates(client, mv, alias, seen, gates)
    with alias_lock(client, mv.name, alias):
        holder = alias_holder(client, mv.name, alias)
        if (holder and holder.version) != (seen and seen.version):
            raise PromotionRefused("exclusive", f"@{alias} of {mv.name} moved to version "
                                                f"{holder.version if holder else None} while this promotion "
                                                "was checked; run it again to compare with the new holder")
        client.set_registered_model_alias(mv.name, alias, mv.version)
        return _audit(client, mv, {
            "action": "promote", "alias": alias, "model": mv.name, "version": str(mv.version),
            "previous": str(seen.version) if seen else None, "user": user or getpass.getuser(),
            "reason": reason, "metrics": comparison,
        })


def rollback(client: MlflowClient, name: str, alias: str, reason: str, user: str | None = None) -> dict:
    """Give ``alias`` back to the version that held it before the current holder was promoted."""
    with alias_lock(client, name, alias):
        holder = alias_holder(client, name, alias)
        if holder is None:
            raise PromotionRefused("rollback", f"@{alias} of {name} is not set; nothing to roll back")
        promotions = [r for r in audit_trail(client, name, alias)
                      if r["action"] == "promote" and r["version"] == str(holder.version)]
        if not promotions or promotions[-1]["previous"] is None:
            raise PromotionRefused("rollback", f"{name}@{alias} (version {holder.version}) has no previous holder")
        target = client.get_model_version(name, promotions[-1]["previous"])
        client.set_registered_model_alias(name, alias, target.version)
        return _audit(client, target, {
            "action": "rollback", "alias": alias, "model": name, "version": str(target.version),
            "previous": str(holder.version), "user": user or getpass.getuser(), "reason": reason,
        })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Promote a registered model version to an alias through gates")
    parser.add_argument("model", help="models:/<name>/<version|latest> or models:/<name>@<alias>; "
                                      "with --rollback, the registered model name")
    parser.add_argument("--alias", required=True, choices=ALIASES)
    parser.add_argument("--reason", required=True, help="why; kept in the audit record")
    parser.add_argument("--rollback", action="store_true", help="give the alias back to its previous holder")
    parser.add_argument("--gates", default=str(DEFAULT_GATES), help="metric thresholds (YAML)")
    args = parser.parse_args(argv)
    client = MlflowClient()
    try:
        if args.rollback:
            record = rollback(client, args.model, args.alias, args.reason)
        else:
            record = promote(client, args.model, args.alias, args.reason, gates=load_gates(args.gates))
    except (PromotionRefused, LookupError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    previous = f" (previously version {record['previous']})" if record["previous"] else ""
    print(f"{record['model']}@{record['alias']} -> version {record['version']}{previous} [{record['action']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
