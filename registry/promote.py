"""Move an alias (``staging``, ``production``) to a model version through gates, or roll it back,
leaving a record in the promotion ledger each time.

    python -m registry.promote models:/demo-backbone/3 --alias production --reason "beats v2 on kNN"
    python -m registry.promote models:/demo-backbone/4 --with models:/demo-head/7 --alias production --reason "..."
    python -m registry.promote --rollback demo-backbone --with demo-head --alias production --reason "v3 misreads scanner B"

Who may move an alias is decided first, for every model the move touches (the named one and each
``--with``), by one ``authorize`` function: the portal's family rights there; from the command line
the tracking server's own permissions. Then the cheap refusals: each version's lineage complete,
and for the set as a whole, a model built on a registered parent (a head on its backbone) only
when that parent holds the same alias afterwards, and no holder of the alias left built on a
version the set replaces (a new backbone moves with a head trained on it). Then for each version:
its training data passes its suite when the promotion service fetches it from the platform's DVC
remote and validates it (``registry.data_check``); the promotion service's own evaluation of the
version on the family's evaluation split (``registry.evidence``), from which it recomputes whether
a backbone learned (its kNN against the same architecture at random init); the absolute floors of
``configs/promotion.yaml``; metrics no worse than the current holder's on the same split beyond
its thresholds. Validations and evaluations already in the ledger are not run again. Rollbacks
pass the same consistency gates.

Two promotions at once cannot both win: each moves its aliases holding the ledger's lock, which
only the promotion service can take, and a promotion whose comparison was made against a holder
that has since changed is refused.
"""
from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dinomx.errors import UserError, run_command
from registry import audit
from registry.data_check import DataCheck, DataUnavailable, vouch
from registry.evidence import Evaluation, EvaluationSplit, evaluate_for_gate, recorded
from registry.ledger import Ledger, LedgerBusy
from registry.lineage import (
    BadModelReference,
    Lineage,
    alias_holder,
    describe_version,
    equals,
    parse_model_uri,
    resolve_version,
    version_uri,
)
from registry.mlflow_service import MlflowService, family_of

ALIASES = ("staging", "production")
DEFAULT_GATES = Path(__file__).resolve().parents[1] / "configs" / "promotion.yaml"
LOWER_IS_BETTER = ("cluster.dbi", "regression.mae")
RANDOM_INIT_KNN = "random_init.knn.accuracy"
# What a move passed, in order: recorded with it, shown in the portal and the version's description.
PROMOTION_GATES = ["authorized", "lineage complete", "parent promoted", "dependants", "data validation", "evidence",
                   "learning", "floor", "metrics", "exclusive"]
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

    def check(self, candidate: float, holder: float) -> str | None:
        """Why ``candidate`` fails against ``holder``, or None."""
        if self.metric in LOWER_IS_BETTER:
            if candidate > holder + self.max_drop:
                return f"{self.metric} {candidate:.4f} > holder's {holder:.4f} + {self.max_drop} (lower is better)"
        elif candidate < holder - self.max_drop:
            return f"{self.metric} {candidate:.4f} < holder's {holder:.4f} - {self.max_drop}"
        return None

    def floor(self, value: float) -> str | None:
        """Why the version's own ``value`` of this metric is past the floor, or None."""
        if self.minimum is None:
            return None
        worse = value > self.minimum if self.metric in LOWER_IS_BETTER else value < self.minimum
        return f"{self.metric} {value:.4f} is past the floor {self.minimum}" if worse else None


@dataclass(frozen=True)
class Gates:
    """What a promotion is judged by (``configs/promotion.yaml``): metric gates per model kind,
    the split the promotion service evaluates on, and by how much a backbone's kNN must beat the
    same architecture at random init to count as learned (None: not judged)."""

    metrics: dict[str, list[MetricGate]] = field(default_factory=dict)
    split: EvaluationSplit | None = None
    min_gain: float | None = None
    family_splits: dict[str, EvaluationSplit] = field(default_factory=dict)  # a family's own, where it has one

    def split_of(self, model: str) -> EvaluationSplit | None:
        return self.family_splits.get(family_of(model), self.split)


def _number(value, where: str, minimum: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or (minimum is not None and value < minimum):
        raise GatesFileError(f"{where}: expected a number{f' >= {minimum:g}' if minimum is not None else ''}, got {value!r}")
    return float(value)


def load_gates(path: str | Path = DEFAULT_GATES) -> Gates:
    """The gates file; a malformed entry is named by file and key."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    metrics, split, min_gain, family_splits = {}, None, None, {}
    for kind, spec in data.items():
        if kind == "evaluation":
            if not isinstance(spec, dict):
                raise GatesFileError(f"{path}: evaluation: expected a mapping of data, validation_report, knn_k and "
                                     f"families, got {spec!r}")
            families = spec.get("families", {})
            if not isinstance(families, dict):
                raise GatesFileError(f"{path}: evaluation.families: expected a mapping family -> split, got {families!r}")
            split = _split({k: v for k, v in spec.items() if k != "families"}, f"{path}: evaluation")
            family_splits = {family: _split(own, f"{path}: evaluation.families.{family}") for family, own in families.items()}
        elif kind == "learning":
            if not isinstance(spec, dict) or set(spec) != {"min_gain"}:
                raise GatesFileError(f"{path}: learning: expected {{min_gain: number}}, got {spec!r}")
            min_gain = _number(spec["min_gain"], f"{path}: learning.min_gain")
        elif kind in ("backbone", "head") and isinstance(spec, dict):
            metrics[kind] = []
            for metric, gate in spec.items():
                if not isinstance(gate, dict) or set(gate) - {"max_drop", "min"} or "max_drop" not in gate:
                    raise GatesFileError(f"{path}: {kind}.{metric}: expected a mapping of max_drop and optionally min; "
                                         f"got {gate!r}")
                floor = gate.get("min")
                metrics[kind].append(MetricGate(metric, _number(gate["max_drop"], f"{path}: {kind}.{metric}.max_drop", 0),
                                                None if floor is None else _number(floor, f"{path}: {kind}.{metric}.min")))
        else:
            raise GatesFileError(f"{path}: {kind}: expected one of evaluation, learning, backbone, head (backbone and "
                                 "head: a mapping metric -> {max_drop: number})")
    return Gates(metrics, split, min_gain, family_splits)


def _split(spec, where: str) -> EvaluationSplit:
    if not isinstance(spec, dict) or set(spec) - {"data", "validation_report", "knn_k"} or \
            not all(isinstance(spec.get(k), str) and spec[k] for k in ("data", "validation_report")):
        raise GatesFileError(f"{where}: expected a mapping of data, validation_report (paths) and optionally knn_k; "
                             f"got {spec!r}")
    knn_k = _number(spec.get("knn_k", 20), f"{where}.knn_k", 1)
    if knn_k != int(knn_k):
        raise GatesFileError(f"{where}.knn_k: expected a whole number, got {knn_k:g}")
    return EvaluationSplit(spec["data"], spec["validation_report"], int(knn_k))


def check_gates(mv: ModelVersion, alias: str, holder: ModelVersion | None, gates: Gates,
                candidate: Evaluation, incumbent: Evaluation | None) -> dict:
    """Raise PromotionRefused naming the first failing gate of ``mv`` alone (learning, evidence,
    floors, metrics against the holder, all from the promotion service's evaluations); return the
    metric comparison. Lineage and data are ``check_lineage``'s; how it fits the versions around
    it is ``check_consistency``'s."""
    uri, kind = version_uri(mv), _lineage(mv).kind
    measured = candidate.metrics
    if kind == "backbone" and gates.min_gain is not None:
        if "knn.accuracy" not in measured or RANDOM_INIT_KNN not in measured:
            raise PromotionRefused("learning", f"{uri}: the evaluation of run {candidate.run_id} has no knn.accuracy "
                                               f"and {RANDOM_INIT_KNN} to tell whether it learned")
        gain = measured["knn.accuracy"] - measured[RANDOM_INIT_KNN]
        if gain <= gates.min_gain:
            raise PromotionRefused("learning", f"{uri} did not learn: kNN {measured['knn.accuracy']:.4f} against "
                                               f"{measured[RANDOM_INIT_KNN]:.4f} for the same architecture at random "
                                               f"init on {candidate.data} ({gain:+.4f}, needs more than {gates.min_gain:+g})")
    kind_gates = gates.metrics.get(kind, [])
    # A gated metric the version cannot have (a head without a regression probe has no MAE) is
    # skipped, but not all of them, and never one with a floor.
    floored = [gate.metric for gate in kind_gates if gate.metric not in measured and gate.minimum is not None]
    if kind_gates and (floored or not any(gate.metric in measured for gate in kind_gates)):
        raise PromotionRefused("evidence", f"{uri}: the promotion service's evaluation (run {candidate.run_id}) has no "
                                           f"{' or '.join(floored or [gate.metric for gate in kind_gates])}")
    for gate in kind_gates:
        if gate.metric in measured and (failure := gate.floor(measured[gate.metric])):
            raise PromotionRefused("floor", f"{uri}: {failure}")
    comparison = {}
    if holder is None or str(holder.version) == str(mv.version):
        return comparison
    for gate in kind_gates:
        if gate.metric not in incumbent.metrics:
            continue
        if gate.metric not in measured:
            raise PromotionRefused("metrics", f"{uri} has no {gate.metric}, which @{alias} (version {holder.version}) has")
        failure = gate.check(measured[gate.metric], incumbent.metrics[gate.metric])
        if failure:
            raise PromotionRefused("metrics", f"{uri} regresses against @{alias} (version {holder.version}) on "
                                              f"{candidate.data}: {failure}")
        comparison[gate.metric] = {"candidate": measured[gate.metric], "holder": incumbent.metrics[gate.metric]}
    return comparison


def check_lineage(mv: ModelVersion) -> None:
    """The version's lineage is complete and does not itself say its data failed validation."""
    lineage = _lineage(mv)
    if not lineage.validation_success:
        raise PromotionRefused("data validation", f"{version_uri(mv)} was trained on data that failed "
                                                  f"{lineage.validation_suite}")


def check_training_data(ledger: Ledger, mv: ModelVersion) -> DataCheck:
    """The data ``mv`` was trained on passes its suite when the promotion service validates it
    (``registry.data_check``), whatever the version's lineage says."""
    uri = version_uri(mv)
    try:
        check = vouch(ledger, mv)
    except DataUnavailable as exc:
        raise PromotionRefused("data validation", str(exc)) from None
    if not check.success:
        shown = "; ".join(line.strip() for line in check.failures[:3])
        raise PromotionRefused("data validation", f"{uri} was trained on {check.dataset} (md5 {check.data_md5}), which "
                                                  f"fails {check.suite} when the promotion service validates it: {shown}")
    return check


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


def tracking_server_decides(name: str) -> None:
    """The command line's authorization: on a team's server its own permissions refuse a user who
    may not edit ``name`` when the alias moves, and only the audit key proves the gates."""


def ledger_of(client: MlflowClient) -> Ledger:
    """The promotion ledger of the registry ``client`` talks to (``VF_AUDIT_DB``)."""
    return Ledger.from_env(client._tracking_client.tracking_uri)


def promote(client: MlflowClient, model_uri: str, alias: str, reason: str, user: str | None = None,
            gates: Gates | None = None, together: Sequence[str] = (),
            authorize: Authorize = tracking_server_decides, ledger: Ledger | None = None) -> list[dict]:
    """Move ``alias`` to ``model_uri`` and the versions ``together`` with it (a backbone and the
    head built on it) through the gates, as one consistent set: one ledger record each, first
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
    ledger = ledger or ledger_of(client)
    ledger.check_writable()  # before validations and evaluations run for someone who could not record them
    for mv in versions:
        check_lineage(mv)
    seen = {mv.name: alias_holder(client, mv.name, alias) for mv in versions}
    moves = {mv.name: mv for mv in versions}
    check_consistency(client, moves, alias, seen)  # before any evaluation: the cheap refusals first
    data = {mv.name: check_training_data(ledger, mv) for mv in versions}
    records = {}
    for mv in versions:
        candidate, incumbent = _evidence(ledger, mv, seen[mv.name], gates)
        records[mv.name] = {"action": "promote", "reason": reason, "gates": PROMOTION_GATES,
                            "metrics": check_gates(mv, alias, seen[mv.name], gates, candidate, incumbent),
                            # What the move was decided on: the service's own validation and evaluation.
                            "validation": {"data": data[mv.name].dataset, "data_md5": data[mv.name].data_md5,
                                           "suite": data[mv.name].suite, "rows": data[mv.name].rows},
                            "evaluation": {"run_id": candidate.run_id, "data": candidate.data,
                                           "data_md5": candidate.data_md5, "metrics": _judged(candidate, gates)}}
    return _move(client, ledger, moves, alias, seen, records, user)


def _judged(evaluation: Evaluation, gates: Gates) -> dict[str, float]:
    """The metrics of ``evaluation`` some gate reads."""
    read = {gate.metric for kind in gates.metrics.values() for gate in kind} | {"knn.accuracy", RANDOM_INIT_KNN}
    return {k: v for k, v in evaluation.metrics.items() if k in read}


def _evidence(ledger: Ledger, mv: ModelVersion, holder: ModelVersion | None,
              gates: Gates) -> tuple[Evaluation, Evaluation | None]:
    """The promotion service's evaluations of ``mv`` and of the alias's holder on the same split:
    the ledger's where it has them, else run now (``registry.evidence``)."""
    def evaluate(version: ModelVersion, data_md5: str | None = None) -> Evaluation:
        if (known := recorded(ledger.entries(), version, data_md5)) is not None:
            return known
        split = gates.split_of(version.name)
        if split is None:
            raise PromotionRefused("evidence", f"{version_uri(version)} has no evaluation by the promotion service, and "
                                               "the gates file names no evaluation split to run one on (evaluation:)")
        return evaluate_for_gate(ledger, version, split)

    candidate = evaluate(mv)
    if holder is None or str(holder.version) == str(mv.version):
        return candidate, None
    return candidate, evaluate(holder, candidate.data_md5)


def rollback(client: MlflowClient, name: str, alias: str, reason: str, user: str | None = None,
             together: Sequence[str] = (), authorize: Authorize = tracking_server_decides,
             ledger: Ledger | None = None) -> list[dict]:
    """Give ``alias`` of ``name`` (and of the models ``together`` with it) back to the version that
    held it before the current holder was promoted, through the same authorization and
    consistency gates."""
    if alias not in ALIASES:
        raise BadModelReference(f"alias: expected one of {ALIASES}, got {alias!r}")
    for model in (name, *together):
        authorize(model)
    ledger = ledger or ledger_of(client)
    entries = ledger.entries()
    seen, moves = {}, {}
    for model in (name, *together):
        holder = alias_holder(client, model, alias)
        if holder is None:
            raise PromotionRefused("rollback", f"@{alias} of {model} is not set; nothing to roll back")
        # Only the ledger says where to go back to: a record anyone else wrote would name any version.
        promotions = [r for r in audit.trail(entries, model, alias)
                      if r.get("action") == "promote" and r.get("version") == str(holder.version)]
        if not promotions or promotions[-1].get("previous") is None:
            raise PromotionRefused("rollback", f"{model}@{alias} (version {holder.version}) has no previous holder")
        seen[model], moves[model] = holder, client.get_model_version(model, promotions[-1]["previous"])
    check_consistency(client, moves, alias, seen)
    return _move(client, ledger, moves, alias, seen, {model: {"action": "rollback", "reason": reason,
                                                              "gates": ROLLBACK_GATES} for model in moves}, user)


def _move(client: MlflowClient, ledger: Ledger, moves: dict[str, ModelVersion], alias: str,
          seen: dict[str, ModelVersion | None], records: dict[str, dict], user: str | None) -> list[dict]:
    """Move every alias of the set holding the ledger's lock, refusing if any holder changed since
    the gates compared against it; the records are committed with the lock's release."""
    try:
        with ledger.exclusive() as appender:
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
            written = [audit.write(appender, client, mv, {
                **records[name], "alias": alias, "model": name, "previous": str(seen[name].version) if seen[name] else None,
                "user": user or getpass.getuser(), "set": [version_uri(other) for other in moves.values()],
            }) for name, mv in moves.items()]
    except LedgerBusy as exc:
        raise PromotionRefused("exclusive", f"{exc}; try again") from None
    for mv in moves.values():  # "why is this in production", where MLflow shows the version
        current = client.get_model_version(mv.name, mv.version)
        describe_version(client, current, audit.mirrored_history(current))
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
            if evaluation := record.get("evaluation"):
                measured = ", ".join(f"{k} {v:.3f}" for k, v in sorted(evaluation["metrics"].items()))
                print(f"  on the promotion service's evaluation (run {evaluation['run_id']}, {evaluation['data']} "
                      f"md5 {evaluation['data_md5']}): {measured}")

    return run_command("promote", move, also=(MlflowException,))


if __name__ == "__main__":
    sys.exit(main())
