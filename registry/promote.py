"""Move an alias (``staging``, ``production``) to a model version through gates, or roll it back,
leaving an audit record on the version each time.

    python -m registry.promote models:/demo-backbone/3 --alias production --reason "beats v2 on kNN"
    python -m registry.promote models:/demo-backbone/4 --with models:/demo-head/7 --alias production --reason "..."
    python -m registry.promote --rollback demo-backbone --with demo-head --alias production --reason "v3 misreads scanner B"

Who may move an alias is decided first, for every model the move touches (the named one and each
``--with``), by one ``authorize`` function: the portal's family rights there; from the command line
the tracking server's own permissions. Gates, in order, for each version of the set: lineage
complete; training data passed validation; recorded evaluation (backbones: an ``evaluate`` run;
heads: the metrics of their ``heads`` run), also when no version holds the alias yet; a training run
that did not learn (``vf.learned``, from its online kNN against step 0) is refused; the absolute
floors of ``configs/promotion.yaml`` (a backbone's kNN above the same architecture at random
init, which ``evaluate`` records); metrics no worse than the current holder's beyond its
thresholds. Then for the set as a whole: a model built on a registered parent (a
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
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dinomx.errors import UserError, run_command
from registry import audit
from registry.lineage import (
    BadModelReference,
    Lineage,
    RegistryUnavailable,
    alias_holder,
    describe_version,
    equals,
    parse_model_uri,
    resolve_version,
    version_uri,
)
from registry.mlflow_service import EVAL_RUN_ID, MlflowService, Tag

ALIASES = ("staging", "production")
DEFAULT_GATES = Path(__file__).resolve().parents[1] / "configs" / "promotion.yaml"
LOWER_IS_BETTER = ("cluster.dbi", "regression.mae")
LOCK_PREFIX = "vf-lock."
# What a move passed, in order: recorded with it, shown in the portal and the version's description.
PROMOTION_GATES = ["authorized", "lineage complete", "data validation", "learning", "evidence", "floor", "metrics",
                   "parent promoted", "dependants", "exclusive"]
ROLLBACK_GATES = ["authorized", "parent promoted", "dependants", "exclusive"]
# Raises when the current user may not move aliases of the named registered model.
Authorize = Callable[[str], None]


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
    minimum: float | None = None  # absolute floor
    above: str | None = None  # another metric of the same version it must exceed (a baseline)

    def check(self, candidate: float, holder: float) -> str | None:
        """Why ``candidate`` fails against ``holder``, or None."""
        if self.metric in LOWER_IS_BETTER:
            if candidate > holder + self.max_drop:
                return f"{self.metric} {candidate:.4f} > holder's {holder:.4f} + {self.max_drop} (lower is better)"
        elif candidate < holder - self.max_drop:
            return f"{self.metric} {candidate:.4f} < holder's {holder:.4f} - {self.max_drop}"
        return None

    def floor(self, metrics: dict[str, float]) -> str | None:
        """Why the version's own metrics fall below this gate's floors, or None."""
        value = metrics[self.metric]
        worse = (lambda a, b: a > b) if self.metric in LOWER_IS_BETTER else (lambda a, b: a < b)
        if self.minimum is not None and worse(value, self.minimum):
            return f"{self.metric} {value:.4f} is past the floor {self.minimum}"
        if self.above is not None:
            if self.above not in metrics:
                return f"no {self.above} recorded to compare {self.metric} with (evaluate records it)"
            if not worse(metrics[self.above], value):
                return f"{self.metric} {value:.4f} does not beat {self.above} {metrics[self.above]:.4f}"
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
            if not isinstance(spec, dict) or set(spec) - {"max_drop", "min", "above"}:
                raise GatesFileError(f"{path}: {kind}.{metric}: expected a mapping of max_drop, min, above; got {spec!r}")
            drop, floor, above = spec.get("max_drop"), spec.get("min"), spec.get("above")
            if not isinstance(drop, (int, float)) or isinstance(drop, bool) or drop < 0:
                raise GatesFileError(f"{path}: {kind}.{metric}.max_drop: expected a number >= 0, got {drop!r}")
            if floor is not None and (not isinstance(floor, (int, float)) or isinstance(floor, bool)):
                raise GatesFileError(f"{path}: {kind}.{metric}.min: expected a number, got {floor!r}")
            if above is not None and not isinstance(above, str):
                raise GatesFileError(f"{path}: {kind}.{metric}.above: expected a metric name, got {above!r}")
            gates[kind].append(MetricGate(metric, float(drop), None if floor is None else float(floor), above))
    return gates


def version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """Evaluation metrics of a version, read from runs rather than from tags anyone who may edit the
    model could write: its source run's (a head's ``heads`` run), then its ``evaluate`` run's, which
    must be an evaluate run of this very version."""
    metrics = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    if EVAL_RUN_ID in mv.tags:
        run = client.get_run(mv.tags[EVAL_RUN_ID])
        evaluated = run.data.tags.get(Tag.EVALUATED_MODEL)
        if run.data.tags.get(Tag.ENTRY_POINT) != "evaluate" or evaluated != version_uri(mv):
            raise PromotionRefused("evidence", f"{version_uri(mv)}: {EVAL_RUN_ID} names run {run.info.run_id}, which is not "
                                               f"an evaluate run of this version (it evaluated {evaluated})")
        metrics.update(run.data.metrics)
    return metrics


def check_gates(client: MlflowClient, mv: ModelVersion, alias: str, holder: ModelVersion | None,
                gates: dict[str, list[MetricGate]]) -> dict:
    """Raise PromotionRefused naming the first failing gate of ``mv`` alone (lineage, data,
    evidence, floors, metrics against the holder); return the metric comparison. How it fits the
    versions around it is ``check_consistency``'s."""
    uri = version_uri(mv)
    lineage = _lineage(mv)
    if not lineage.validation_success:
        raise PromotionRefused("data validation", f"{uri} was trained on data that failed {lineage.validation_suite}")
    if mv.run_id and (run := client.get_run(mv.run_id)).data.tags.get(Tag.LEARNED) == "false":
        raise PromotionRefused("learning", f"{uri}: its training run {run.info.run_id} "
                                           f"{run.data.tags.get(Tag.LEARNING, 'did not learn')}")
    kind_gates = gates.get(lineage.kind, [])
    candidate = version_metrics(client, mv)
    if lineage.kind == "backbone" and EVAL_RUN_ID not in mv.tags:
        raise PromotionRefused("evidence", f"{uri} has no recorded evaluation; run `mlflow run . -e evaluate -P model={uri}` "
                                           "first")
    floored = [gate.metric for gate in kind_gates if gate.metric not in candidate and (gate.minimum is not None or gate.above)]
    if kind_gates and (not any(gate.metric in candidate for gate in kind_gates) or floored):
        hint = f"; run `mlflow run . -e evaluate -P model={uri}`" if lineage.kind == "backbone" else ""
        needed = floored or [gate.metric for gate in kind_gates]
        raise PromotionRefused("evidence", f"{uri} has no {' or '.join(needed)} recorded{hint}")
    for gate in kind_gates:
        failure = gate.floor(candidate) if gate.metric in candidate else None
        if failure:
            raise PromotionRefused("floor", f"{uri}: {failure}")
    comparison = {}
    if holder is None or str(holder.version) == str(mv.version):
        return comparison
    incumbent = version_metrics(client, holder)
    for gate in kind_gates:
        if gate.metric not in incumbent:
            continue
        if gate.metric not in candidate:
            raise PromotionRefused("metrics", f"{uri} has no {gate.metric}, which @{alias} (version {holder.version}) has")
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
    registry backend (a unique name in the database), so the lock is one; a lock older than
    ``stale_s`` (a crashed holder) is broken. Whatever the registry answers while others take and
    release the lock, the caller gets the lock or a ``PromotionRefused``, never a raw error."""
    lock = f"{LOCK_PREFIX}{name}.{alias}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={Tag.KIND: "lock", Tag.LOCK_OWNER: getpass.getuser(), Tag.LOCK_TOKEN: token},
                                           description=f"held while {name}@{alias} moves; deleted after")
            break
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise RegistryUnavailable(f"registry: cannot take the lock {lock}: {exc.message}") from None
            try:
                held = client.get_registered_model(lock)
                if time.time() * 1000 - held.creation_timestamp > stale_s * 1000:
                    client.delete_registered_model(lock)
                    continue
            except MlflowException:
                pass  # released between our attempts: try again
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


def tracking_server_decides(name: str) -> None:
    """The command line's authorization: on a team's server its own permissions refuse a user who
    may not edit ``name`` when the alias moves, and only the audit key proves the gates."""


def promote(client: MlflowClient, model_uri: str, alias: str, reason: str, user: str | None = None,
            gates: dict[str, list[MetricGate]] | None = None, together: Sequence[str] = (),
            authorize: Authorize = tracking_server_decides) -> list[dict]:
    """Move ``alias`` to ``model_uri`` and the versions ``together`` with it (a backbone and the
    head built on it) through the gates, as one consistent set: one audit record each, first
    ``model_uri``'s. ``authorize(name)`` is asked for every model the set moves, before anything
    else, and refuses by raising."""
    if alias not in ALIASES:
        raise BadModelReference(f"alias: expected one of {ALIASES}, got {alias!r}")
    for uri in (model_uri, *together):
        authorize(parse_model_uri(uri)[0])
    versions = [resolve_version(client, uri) for uri in (model_uri, *together)]
    if len({mv.name for mv in versions}) < len(versions):
        raise BadModelReference(f"{', '.join(version_uri(mv) for mv in versions)}: one version per model in a set")
    gates = load_gates() if gates is None else gates
    seen = {mv.name: alias_holder(client, mv.name, alias) for mv in versions}
    comparisons = {mv.name: check_gates(client, mv, alias, seen[mv.name], gates) for mv in versions}
    moves = {mv.name: mv for mv in versions}
    check_consistency(client, moves, alias, seen)
    return _move(client, moves, alias, seen, {name: {"action": "promote", "reason": reason, "metrics": comparisons[name],
                                                     "gates": PROMOTION_GATES} for name in moves}, user)


def rollback(client: MlflowClient, name: str, alias: str, reason: str, user: str | None = None,
             together: Sequence[str] = (), authorize: Authorize = tracking_server_decides) -> list[dict]:
    """Give ``alias`` of ``name`` (and of the models ``together`` with it) back to the version that
    held it before the current holder was promoted, through the same authorization and
    consistency gates."""
    if alias not in ALIASES:
        raise BadModelReference(f"alias: expected one of {ALIASES}, got {alias!r}")
    for model in (name, *together):
        authorize(model)
    seen, moves = {}, {}
    for model in (name, *together):
        holder = alias_holder(client, model, alias)
        if holder is None:
            raise PromotionRefused("rollback", f"@{alias} of {model} is not set; nothing to roll back")
        # Only the gates' own records say where to go back to: a forged one would name any version.
        promotions = [r for r in audit.trail(client, model, alias, audit.audit_key())
                      if r.get("action") == "promote" and r.get("version") == str(holder.version)]
        if not promotions or promotions[-1].get("previous") is None:
            raise PromotionRefused("rollback", f"{model}@{alias} (version {holder.version}) has no previous holder")
        seen[model], moves[model] = holder, client.get_model_version(model, promotions[-1]["previous"])
    check_consistency(client, moves, alias, seen)
    return _move(client, moves, alias, seen, {model: {"action": "rollback", "reason": reason, "gates": ROLLBACK_GATES}
                                              for model in moves}, user)


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
        written = [audit.write(client, mv, {
            **records[name], "alias": alias, "model": name, "version": str(mv.version),
            "previous": str(seen[name].version) if seen[name] else None, "user": user or getpass.getuser(),
            "set": [version_uri(other) for other in moves.values()],
        }) for name, mv in moves.items()]
    for mv in moves.values():  # "why is this in production", where MLflow shows the version
        describe_version(client, client.get_model_version(mv.name, mv.version), audit.version_history(client, mv))
    return written


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
