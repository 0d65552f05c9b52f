"""Move an alias (``staging``, ``production``) to a model version through gates, or roll it back,
leaving an audit record on the version each time.

    python -m registry.promote models:/demo-backbone/3 --alias production --reason "beats v2 on kNN"
    python -m registry.promote models:/demo-backbone/4 --with models:/demo-head/7 --alias production --reason "..."
    python -m registry.promote --rollback demo-backbone --with demo-head --alias production --reason "v3 misreads scanner B"

Gates, in order, for each version of the set: lineage complete; training data passed validation;
evaluation metrics no worse than the current holder's beyond the thresholds of
``configs/promotion.yaml``. Then for the set as a whole: a model built on a registered parent (a
head on its backbone) only when that parent holds the same alias afterwards, and no holder of the
alias left built on a version the set replaces (a new backbone moves with a head trained on it).
Rollbacks pass the same consistency gates.

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
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dinomx.errors import UserError, run_command
from registry.lineage import (
    BadModelReference,
    Lineage,
    alias_holder,
    equals,
    parse_model_uri,
    resolve_version,
    version_uri,
)
from registry.mlflow_service import AUDIT_PREFIX, MlflowService, Tag, evaluation_metrics

ALIASES = ("staging", "production")
DEFAULT_GATES = Path(__file__).resolve().parents[1] / "configs" / "promotion.yaml"
LOWER_IS_BETTER = ("cluster.dbi", "regression.mae")
LOCK_PREFIX = "vf-lock."


class PromotionRefused(UserError, RuntimeError):
    def __init__(self, gate: str, detail: str):
        super().__init__(f"promotion refused by gate '{gate}': {detail}")
        self.gate = gate


class GatesFileError(UserError, ValueError):
    """The promotion thresholds file is malformed."""


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
            raise GatesFileError(f"{path}: {kind}: expected 'backbone' or 'head' mapping metric -> {{max_drop: number}}")
        gates[kind] = []
        for metric, spec in metrics.items():
            drop = spec.get("max_drop") if isinstance(spec, dict) else None
            if not isinstance(drop, (int, float)) or isinstance(drop, bool) or drop < 0:
                raise GatesFileError(f"{path}: {kind}.{metric}.max_drop: expected a number >= 0, got {drop!r}")
            gates[kind].append(MetricGate(metric, float(drop)))
    return gates


def version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """Evaluation metrics of a version: its source run's, overridden by ``evaluate``'s tags."""
    metrics = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    metrics.update(evaluation_metrics(mv.tags))
    return metrics


def check_gates(client: MlflowClient, mv: ModelVersion, alias: str, holder: ModelVersion | None,
                gates: dict[str, list[MetricGate]]) -> dict:
    """Raise PromotionRefused naming the first failing gate of ``mv`` alone (lineage, data,
    metrics); return the metric comparison. How it fits the versions around it is
    ``check_consistency``'s."""
    uri = version_uri(mv)
    lineage = _lineage(mv)
    if not lineage.validation_success:
        raise PromotionRefused("data validation", f"{uri} was trained on data that failed {lineage.validation_suite}")
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


def _lineage(mv: ModelVersion) -> Lineage:
    try:
        return Lineage.from_tags(mv.tags)
    except LookupError as exc:
        raise PromotionRefused("lineage complete", f"{version_uri(mv)}: {exc}") from None


def check_consistency(client: MlflowClient, moves: dict[str, ModelVersion], alias: str,
                      holders: dict[str, ModelVersion | None]) -> None:
    """Refuse a set of alias moves (model name -> new holder; ``holders``: the current ones)
    after which some holder of ``alias`` would be built on a version that does not hold it: a
    head whose backbone is not promoted (parent gate), or a promoted head left on the backbone
    this set replaces (dependants gate). Every new server would refuse such a set."""
    def after(name: str) -> ModelVersion | None:
        return moves[name] if name in moves else alias_holder(client, name, alias)

    for name, mv in moves.items():
        lineage = _lineage(mv)
        if lineage.parent.startswith("models:/"):
            parent_name, parent_version, _ = parse_model_uri(lineage.parent)
            parent_holder = after(parent_name)
            if parent_holder is None or str(parent_holder.version) != parent_version:
                held = f"version {parent_holder.version}" if parent_holder else "not set"
                raise PromotionRefused("parent promoted", f"{version_uri(mv)} is built on {lineage.parent}, but @{alias} "
                                                          f"of {parent_name} is {held}; promote the parent first "
                                                          f"(or with it: --with {lineage.parent})")
        previous = holders.get(name)
        if previous is None or str(previous.version) == str(mv.version):
            continue
        for dependant in client.search_model_versions(equals("tags.`vf.parent`", version_uri(previous))):
            current = after(dependant.name)
            if current is None or _lineage(current).parent != version_uri(previous):
                continue
            built_on_new = sorted((version_uri(v) for v in client.search_model_versions(
                equals("tags.`vf.parent`", version_uri(mv))) if v.name == dependant.name), key=_version_key)
            hint = (f"promote one of {', '.join(built_on_new)} with it (--with)" if built_on_new else
                    f"no version of {dependant.name} is built on {version_uri(mv)} yet: train one (`heads`) first")
            raise PromotionRefused("dependants", f"{version_uri(current)} holds @{alias} and is built on "
                                                 f"{version_uri(previous)}, which {version_uri(mv)} would replace; {hint}")


def _version_key(uri: str) -> tuple[str, int]:
    name, _, version = uri.rpartition("/")
    return name, int(version)


@contextmanager
def alias_lock(client: MlflowClient, name: str, alias: str, wait_s: float = 30.0, stale_s: float = 300.0):
    """Exclusive right to move ``name@alias``. Creating a registered model is atomic on every
    registry backend, so the lock is one; a lock older than ``stale_s`` (a crashed holder) is broken."""
    lock = f"{LOCK_PREFIX}{name}.{alias}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={Tag.KIND: "lock", Tag.LOCK_OWNER: getpass.getuser(), Tag.LOCK_TOKEN: token},
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
            if client.get_registered_model(lock).tags.get(Tag.LOCK_TOKEN) == token:
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
            gates: dict[str, list[MetricGate]] | None = None, together: Sequence[str] = ()) -> list[dict]:
    """Move ``alias`` to ``model_uri`` and the versions ``together`` with it (a backbone and the
    head built on it) through the gates, as one consistent set: one audit record each, first
    ``model_uri``'s."""
    if alias not in ALIASES:
        raise BadModelReference(f"alias: expected one of {ALIASES}, got {alias!r}")
    versions = [resolve_version(client, uri) for uri in (model_uri, *together)]
    if len({mv.name for mv in versions}) < len(versions):
        raise BadModelReference(f"{', '.join(version_uri(mv) for mv in versions)}: one version per model in a set")
    gates = load_gates() if gates is None else gates
    seen = {mv.name: alias_holder(client, mv.name, alias) for mv in versions}
    comparisons = {mv.name: check_gates(client, mv, alias, seen[mv.name], gates) for mv in versions}
    moves = {mv.name: mv for mv in versions}
    check_consistency(client, moves, alias, seen)
    return _move(client, moves, alias, seen, {name: {"action": "promote", "reason": reason, "metrics": comparisons[name]}
                                              for name in moves}, user)


def rollback(client: MlflowClient, name: str, alias: str, reason: str, user: str | None = None,
             together: Sequence[str] = ()) -> list[dict]:
    """Give ``alias`` of ``name`` (and of the models ``together`` with it) back to the version that
    held it before the current holder was promoted, through the same consistency gates."""
    seen, moves = {}, {}
    for model in (name, *together):
        holder = alias_holder(client, model, alias)
        if holder is None:
            raise PromotionRefused("rollback", f"@{alias} of {model} is not set; nothing to roll back")
        promotions = [r for r in audit_trail(client, model, alias)
                      if r["action"] == "promote" and r["version"] == str(holder.version)]
        if not promotions or promotions[-1]["previous"] is None:
            raise PromotionRefused("rollback", f"{model}@{alias} (version {holder.version}) has no previous holder")
        seen[model], moves[model] = holder, client.get_model_version(model, promotions[-1]["previous"])
    check_consistency(client, moves, alias, seen)
    return _move(client, moves, alias, seen, {model: {"action": "rollback", "reason": reason} for model in moves}, user)


def _move(client: MlflowClient, moves: dict[str, ModelVersion], alias: str, seen: dict[str, ModelVersion | None],
          records: dict[str, dict], user: str | None) -> list[dict]:
    """Move every alias of the set under its lock (taken in name order, so two sets cannot
    deadlock), refusing if any holder changed since the gates compared against it."""
    with ExitStack() as locks:
        for name in sorted(moves):
            locks.enter_context(alias_lock(client, name, alias))
        for name in moves:
            holder = alias_holder(client, name, alias)
            if (holder and holder.version) != (seen[name] and seen[name].version):
                raise PromotionRefused("exclusive", f"@{alias} of {name} moved to version "
                                                    f"{holder.version if holder else None} while this promotion "
                                                    "was checked; run it again to compare with the new holder")
        moved = []
        try:
            for name, mv in moves.items():
                client.set_registered_model_alias(name, alias, mv.version)
                moved.append(name)
        except MlflowException:
            for name in moved:  # half a set is worse than none: put the others back
                if seen[name] is None:
                    client.delete_registered_model_alias(name, alias)
                else:
                    client.set_registered_model_alias(name, alias, seen[name].version)
            raise
        return [_audit(client, mv, {
            **records[name], "alias": alias, "model": name, "version": str(mv.version),
            "previous": str(seen[name].version) if seen[name] else None, "user": user or getpass.getuser(),
            "set": [version_uri(other) for other in moves.values()],
        }) for name, mv in moves.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Promote a registered model version to an alias through gates")
    parser.add_argument("model", help="models:/<name>/<version|latest> or models:/<name>@<alias>; "
                                      "with --rollback, the registered model name")
    parser.add_argument("--alias", required=True, choices=ALIASES)
    parser.add_argument("--reason", required=True, help="why; kept in the audit record")
    parser.add_argument("--rollback", action="store_true", help="give the alias back to its previous holder")
    parser.add_argument("--with", dest="together", action="append", default=[], metavar="MODEL",
                        help="move this one too, as one consistent set (a backbone and the head built on it): "
                             "models:/<name>/<version>, or with --rollback a model name; repeatable")
    parser.add_argument("--gates", default=str(DEFAULT_GATES), help="metric thresholds (YAML)")
    args = parser.parse_args(argv)

    def move() -> None:
        client = MlflowService().client
        if args.rollback:
            records = rollback(client, args.model, args.alias, args.reason, together=args.together)
        else:
            records = promote(client, args.model, args.alias, args.reason, gates=load_gates(args.gates),
                              together=args.together)
        for record in records:
            previous = f" (previously version {record['previous']})" if record["previous"] else ""
            print(f"{record['model']}@{record['alias']} -> version {record['version']}{previous} [{record['action']}]")

    return run_command("promote", move, also=(MlflowException,))


if __name__ == "__main__":
    sys.exit(main())
