"""Move an alias (``staging``, ``production``) to a model version, through gates, with an audit record.

    python -m registry.promote models:/demo-backbone/3 --alias production --reason "beats v2 on kNN"
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.lineage import Lineage, parse_model_uri, resolve_version, version_uri

AUDIT_PREFIX = "vf.audit."


class PromotionRefused(RuntimeError):
    def __init__(self, gate: str, detail: str):
        super().__init__(f"promotion refused by gate '{gate}': {detail}")
        self.gate = gate


def current_holder(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def check_gates(client: MlflowClient, mv, alias: str) -> Lineage:
    try:
        lineage = Lineage.from_tags(mv.tags)
    except LookupError as exc:
        raise PromotionRefused("lineage complete", f"{version_uri(mv)}: {exc}") from None
    if not lineage.validation_success:
        raise PromotionRefused(
            "data validation", f"{version_uri(mv)} was trained on data that failed {lineage.validation_suite}"
        )
    if lineage.parent.startswith("models:/"):
        parent_name, parent_version, _ = parse_model_uri(lineage.parent)
        holder = current_holder(client, parent_name, alias)
        if holder != parent_version:
            raise PromotionRefused(
                "parent promoted",
                f"{version_uri(mv)} is built on {lineage.parent}, but @{alias} of {parent_name} is "
                f"{'version ' + holder if holder else 'not set'}; promote the parent first",
            )
    return lineage


def promote(client: MlflowClient, model_uri: str, alias: str, reason: str, user: str | None = None) -> dict:
    mv = resolve_version(client, model_uri)
    check_gates(client, mv, alias)
    previous = current_holder(client, mv.name, alias)
    client.set_registered_model_alias(mv.name, alias, mv.version)
    now = datetime.now(timezone.utc)
    record = {
        "alias": alias,
        "model": mv.name,
        "version": str(mv.version),
        "previous": previous,
        "user": user or getpass.getuser(),
        "time": now.isoformat(),
        "reason": reason,
    }
    client.set_model_version_tag(mv.name, mv.version, f"{AUDIT_PREFIX}{alias}.{now:%Y%m%dT%H%M%S%fZ}", json.dumps(record))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Promote a registered model version to an alias through gates")
    parser.add_argument("model", help="models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>")
    parser.add_argument("--alias", required=True, choices=["staging", "production"])
    parser.add_argument("--reason", required=True, help="why; kept in the audit record")
    args = parser.parse_args(argv)
    try:
        record = promote(MlflowClient(), args.model, args.alias, args.reason)
    except PromotionRefused as exc:
        print(exc, file=sys.stderr)
        return 2
    previous = f" (previously version {record['previous']})" if record["previous"] else ""
    print(f"{record['model']}@{record['alias']} -> version {record['version']}{previous}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
