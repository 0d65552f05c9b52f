"""Promotion gates on metrics, rollback, the promotion ledger and concurrent promotions, on a real
SQLite registry with lightweight model versions (lineage tags and a run with metrics; no model
files needed): the promotion service's evaluations are recorded in its ledger as
``registry.evidence`` records them after running ``evaluate``."""
import json
import os
import signal
import threading

import mlflow
import pytest
import sqlalchemy as sa
from mlflow import MlflowClient

from registry import audit
from registry.audit import trail as audit_trail
from registry.data_check import DataCheck
from registry.data_check import record as record_validation
from registry.data_check import recorded as recorded_validation
from registry.evidence import Evaluation, record
from registry.ledger import KEY_ENV, Ledger, LedgerBroken
from registry.lineage import Lineage, LineageError, RegistryUnavailable, alias_holder, equals, lineage_chain
from registry.lineage import main as lineage_main
from registry.mlflow_service import EVAL_PREFIX, EVAL_RUN_ID, Tag
from registry.promote import (
    Gates,
    MetricGate,
    PromotionRefused,
    ledger_of,
    load_gates,
    promote,
    rollback,
)
from registry.promote import main as promote_main
from scripts.demo import free_port

# What every version here was trained on, as the promotion service found it when it validated it.
VALIDATED = DataCheck("m.dir", "data/x", "he_tiles", {"tile_size": 32}, True, 10, [])
GATES = Gates({"backbone": [MetricGate("knn.accuracy", 0.01)],
               "head": [MetricGate("head.accuracy", 0.0), MetricGate("regression.mae", 0.005)]})


@pytest.fixture()
def client(mlflow_store):
    mlflow.set_tracking_uri(mlflow_store)
    yield MlflowClient(mlflow_store)
    mlflow.set_tracking_uri(None)


def register(client: MlflowClient, name: str, kind: str = "backbone", metrics: dict | None = None,
             parent: str = "scratch", eval_tags: dict | None = None, evaluated: dict | None = None,
             **lineage_fields) -> str:
    """A version with complete lineage (``lineage_fields`` set more of it); ``eval_tags``: the
    metrics of a researcher's evaluate run of it (the run, its id on the version, the ``vf.eval.*``
    tags); ``evaluated``: the promotion service's evaluation of it, recorded in its ledger, where
    its validation of the data (``VALIDATED``) is too."""
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics or {})
    lineage = Lineage(kind=kind, source_run_id=run.info.run_id, parent=parent, data_path="data/x", data_md5="m.dir",
                      data_source="dvc.lock:ingest", data_remote="", validation_suite="he_tiles",
                      validation_success=True, validation_report="r", git_commit="c" * 40, git_dirty=False,
                      config_sha256="s", data_output="data/x", validation_dataset="data/x",
                      validation_parameters=json.dumps(VALIDATED.parameters), **lineage_fields)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = str(client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                              tags=lineage.tags()).version)
    if eval_tags is not None:
        with mlflow.start_run() as evaluation:
            mlflow.log_metrics(eval_tags)
            mlflow.set_tags({Tag.ENTRY_POINT: "evaluate", Tag.EVALUATED_MODEL: f"models:/{name}/{version}"})
        for key, value in {**{EVAL_PREFIX + k: repr(v) for k, v in eval_tags.items()},
                           EVAL_RUN_ID: evaluation.info.run_id}.items():
            client.set_model_version_tag(name, version, key, value)
    if recorded_validation(ledger_of(client).entries(), VALIDATED) is None:
        record_validation(ledger_of(client), VALIDATED, f"models:/{name}/{version}")
    if evaluated is not None:
        mv = client.get_model_version(name, version)
        record(ledger_of(client), Evaluation(f"models:/{name}/{version}", "data/eval", "e.dir", "gate-run", evaluated), mv)
    return version


def holder(client, name, alias="production"):
    return str(client.get_model_version_by_alias(name, alias).version)


def test_a_regressing_candidate_is_refused_and_a_close_one_passes(client):
    v1 = register(client, "m-backbone", evaluated={"knn.accuracy": 0.80})
    promote(client, f"models:/m-backbone/{v1}", "production", "first", gates=GATES)
    worse = register(client, "m-backbone", evaluated={"knn.accuracy": 0.78})
    with pytest.raises(PromotionRefused, match=r"regresses against @production \(version 1\) on data/eval: knn.accuracy 0.7800 < "
                                               r"holder's 0.8000 - 0.01") as refused:
        promote(client, f"models:/m-backbone/{worse}", "production", "try", gates=GATES)
    assert refused.value.gate == "metrics" and holder(client, "m-backbone") == v1
    close = register(client, "m-backbone", evaluated={"knn.accuracy": 0.795})
    [record] = promote(client, f"models:/m-backbone/{close}", "production", "within tolerance", gates=GATES)
    assert holder(client, "m-backbone") == close
    assert record["metrics"] == {"knn.accuracy": {"candidate": 0.795, "holder": 0.80}} and record["previous"] == v1
    assert record["evaluation"] == {"run_id": "gate-run", "data": "data/eval", "data_md5": "e.dir",
                                    "metrics": {"knn.accuracy": 0.795}}


def test_lower_is_better_metrics_of_heads_from_the_services_evaluation_not_their_training_run(client):
    backbone = register(client, "h-backbone", evaluated={"knn.accuracy": 0.9})
    promote(client, f"models:/h-backbone/{backbone}", "staging", "base", gates=GATES)
    parent = f"models:/h-backbone/{backbone}"
    first = register(client, "h-head", "head", evaluated={"head.accuracy": 0.9, "regression.mae": 0.10}, parent=parent)
    promote(client, f"models:/h-head/{first}", "staging", "first head", gates=GATES)
    worse_mae = register(client, "h-head", "head", {"head.accuracy": 0.99, "regression.mae": 0.01}, parent=parent,
                         evaluated={"head.accuracy": 0.95, "regression.mae": 0.12})
    with pytest.raises(PromotionRefused, match=r"regression.mae 0.1200 > holder's 0.1000 \+ 0.005 \(lower is better\)"):
        promote(client, f"models:/h-head/{worse_mae}", "staging", "try", gates=GATES)


def test_without_the_services_evaluation_nothing_moves_whatever_the_researcher_logged(client):
    v1 = register(client, "e-backbone", evaluated={"knn.accuracy": 0.8})
    promote(client, f"models:/e-backbone/{v1}", "staging", "first", gates=GATES)
    # The researcher's own evaluate run of v2 (0.95) and its vf.eval.* tags are information only.
    mine = register(client, "e-backbone", eval_tags={"knn.accuracy": 0.95})
    with pytest.raises(PromotionRefused, match=r"models:/e-backbone/2 has no evaluation by the promotion service, and the "
                                               r"gates file names no evaluation split") as refused:
        promote(client, f"models:/e-backbone/{mine}", "staging", "try", gates=GATES)
    assert refused.value.gate == "evidence" and holder(client, "e-backbone", "staging") == v1
    # Nor is a holder's evaluation on another split a comparison.
    record(ledger_of(client), Evaluation(f"models:/e-backbone/{mine}", "data/other", "other.dir", "gate-run",
                                         {"knn.accuracy": 0.95}), client.get_model_version("e-backbone", mine))
    with pytest.raises(PromotionRefused, match=r"models:/e-backbone/1 has no evaluation by the promotion service"):
        promote(client, f"models:/e-backbone/{mine}", "staging", "try", gates=GATES)


def test_rollback_restores_the_previous_holder_and_is_audited(client):
    v1 = register(client, "r-backbone", evaluated={"knn.accuracy": 0.8})
    v2 = register(client, "r-backbone", evaluated={"knn.accuracy": 0.9})
    promote(client, f"models:/r-backbone/{v1}", "production", "first", user="ana", gates=GATES)
    promote(client, f"models:/r-backbone/{v2}", "production", "better", user="ana", gates=GATES)
    [record] = rollback(client, "r-backbone", "production", "v2 misreads scanner B", user="ben")
    assert holder(client, "r-backbone") == v1
    assert (record["action"], record["version"], record["previous"], record["user"]) == ("rollback", v1, v2, "ben")
    trail = audit_trail(ledger_of(client), "r-backbone", "production")
    assert [(r["action"], r["version"], r["previous"]) for r in trail] == [
        ("promote", v1, None), ("promote", v2, v1), ("rollback", v1, v2)]
    assert all(r["user"] and r["time"] and r["reason"] for r in trail)
    with pytest.raises(PromotionRefused, match="has no previous holder"):
        rollback(client, "r-backbone", "production", "again")
    with pytest.raises(PromotionRefused, match="@staging of r-backbone is not set"):
        rollback(client, "r-backbone", "staging", "nothing there")


class _SignallingLedger(Ledger):
    """Signals when a promotion asks for the ledger's lock, i.e. has finished its gates."""

    def __init__(self, url: str, asked: threading.Event):
        super().__init__(url)
        self.asked = asked

    def exclusive(self):
        self.asked.set()
        return super().exclusive()


def test_concurrent_promotions_of_one_alias_cannot_both_win(client):
    ledger = ledger_of(client)
    v1 = register(client, "c-backbone", evaluated={"knn.accuracy": 0.80})
    promote(client, f"models:/c-backbone/{v1}", "production", "first", gates=GATES)
    candidates = [register(client, "c-backbone", evaluated={"knn.accuracy": a}) for a in (0.85, 0.86)]
    outcomes, asked = {}, [threading.Event(), threading.Event()]

    def attempt(index: int, version: str) -> None:
        try:
            outcomes[version] = promote(client, f"models:/c-backbone/{version}", "production", "race", gates=GATES,
                                        ledger=_SignallingLedger(ledger.url, asked[index]))[0]
        except PromotionRefused as exc:
            outcomes[version] = exc

    # Both compare against v1, then meet at the lock this test holds; it lets them through together.
    with ledger.exclusive():
        threads = [threading.Thread(target=attempt, args=(i, v)) for i, v in enumerate(candidates)]
        for thread in threads:
            thread.start()
        assert all(event.wait(30) for event in asked)
    for thread in threads:
        thread.join(60)
    winners = [v for v, o in outcomes.items() if isinstance(o, dict)]
    losers = [o for o in outcomes.values() if isinstance(o, PromotionRefused)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert losers[0].gate == "exclusive" and "while this promotion was checked" in str(losers[0])
    assert holder(client, "c-backbone") == winners[0]


def test_a_held_lock_refuses_after_waiting_and_no_one_elses_object_is_a_lock(client):
    version = register(client, "s-backbone", evaluated={"knn.accuracy": 0.8})
    ledger = ledger_of(client)
    with ledger.exclusive():
        with pytest.raises(PromotionRefused, match="another promotion held the ledger for over 0 s") as refused:
            promote(client, f"models:/s-backbone/{version}", "staging", "r", gates=GATES, ledger=Ledger(ledger.url, wait_s=0.3))
    assert refused.value.gate == "exclusive" and alias_holder(client, "s-backbone", "staging") is None
    # What used to be the lock, a registered model anyone could create, blocks nothing.
    client.create_registered_model("vf-lock.s-backbone.staging")
    promote(client, f"models:/s-backbone/{version}", "staging", "r", gates=GATES)
    assert holder(client, "s-backbone", "staging") == version


def test_gate_file_errors_name_the_key(tmp_path):
    shipped = load_gates()  # the shipped configs/promotion.yaml is valid and names the service's split
    assert shipped.metrics["backbone"][0] == MetricGate("knn.accuracy", 0.01) and shipped.min_gain == 0.0
    assert shipped.split.data == "data/demo/images" and shipped.split.knn_k == 20
    own = tmp_path / "own.yaml"
    own.write_text("evaluation: {data: d, validation_report: r, families: {ct: {data: ct/images, validation_report: cr}}}\n")
    families = load_gates(own)
    assert families.split_of("ct-backbone").data == "ct/images" and families.split_of("colon-head").data == "d"
    bad = tmp_path / "gates.yaml"
    for text, error in (("head:\n  linear.accuracy: {max_drop: lots}\n",
                         r"gates.yaml: head.linear.accuracy.max_drop: expected a number >= 0, got 'lots'"),
                        ("heads:\n  x: {max_drop: 0}\n", "heads: expected one of evaluation, learning, backbone, head"),
                        ("evaluation: {data: d}\n", "evaluation: expected a mapping of data, validation_report"),
                        ("evaluation: {data: d, validation_report: r, knn_k: 2.5}\n", "evaluation.knn_k: expected a whole"),
                        ("learning: {min_gain: yes}\n", r"learning.min_gain: expected a number, got True"),
                        ("evaluation: {data: d, validation_report: r, families: {ct: {data: c}}}\n",
                         "evaluation.families.ct: expected a mapping of data, validation_report")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=error):
            load_gates(bad)


def test_a_lineage_cycle_is_reported_not_walked_forever(client, capsys):
    first = register(client, "loop-a", parent="models:/loop-b/1")
    register(client, "loop-b", parent=f"models:/loop-a/{first}")
    with pytest.raises(LineageError, match="lineage cycle: models:/loop-a/1 -> models:/loop-b/1 -> models:/loop-a/1"):
        lineage_chain(client, "models:/loop-a/1")
    assert lineage_main(["models:/loop-a/1"]) == 2
    assert "lineage cycle" in capsys.readouterr().err


def test_search_filters_refuse_values_that_would_rewrite_them():
    assert equals("name", "demo-backbone") == "name = 'demo-backbone'"
    for hostile in ("x' OR name LIKE '%", "x\\", "x\nname = 'y'"):
        with pytest.raises(ValueError, match="may not hold quotes"):
            equals("name", hostile)


BACKBONE_GATES = Gates({"backbone": GATES.metrics["backbone"]})


def test_a_backbone_moves_only_with_a_head_built_on_it_and_rolls_back_with_it(client, capsys):
    b1 = register(client, "d-backbone", evaluated={"knn.accuracy": 0.8})
    h1 = register(client, "d-head", kind="head", parent=f"models:/d-backbone/{b1}", evaluated={})
    [record] = promote(client, f"models:/d-backbone/{b1}", "production", "first", gates=BACKBONE_GATES)
    assert record["set"] == [f"models:/d-backbone/{b1}"]
    promote(client, f"models:/d-head/{h1}", "production", "first", gates=BACKBONE_GATES)
    b2 = register(client, "d-backbone", evaluated={"knn.accuracy": 0.9})
    # Alone, the new backbone would leave the production head on the old one: every new server
    # would refuse that set, so the promotion is refused, naming the head.
    with pytest.raises(PromotionRefused, match=rf"models:/d-head/{h1} holds @production and is built on "
                                               rf"models:/d-backbone/{b1}.*no version of d-head is built on") as refused:
        promote(client, f"models:/d-backbone/{b2}", "production", "alone", gates=BACKBONE_GATES)
    assert refused.value.gate == "dependants" and holder(client, "d-backbone") == b1
    h2 = register(client, "d-head", kind="head", parent=f"models:/d-backbone/{b2}", evaluated={})
    with pytest.raises(PromotionRefused, match=rf"promote one of models:/d-head/{h2} with it"):
        promote(client, f"models:/d-backbone/{b2}", "production", "alone", gates=BACKBONE_GATES)
    with pytest.raises(PromotionRefused, match=rf"@production of d-backbone is version {b1}; promote the parent first"):
        promote(client, f"models:/d-head/{h2}", "production", "head alone", gates=BACKBONE_GATES)
    records = promote(client, f"models:/d-backbone/{b2}", "production", "together", gates=BACKBONE_GATES,
                      together=[f"models:/d-head/{h2}"])
    assert [(r["model"], r["version"], r["previous"]) for r in records] == [("d-backbone", b2, b1), ("d-head", h2, h1)]
    assert (holder(client, "d-backbone"), holder(client, "d-head")) == (b2, h2)

    with pytest.raises(PromotionRefused, match=rf"models:/d-head/{h2} holds @production and is built on"):
        rollback(client, "d-backbone", "production", "backbone alone")
    assert holder(client, "d-backbone") == b2
    assert promote_main(["d-backbone", "--rollback", "--with", "d-head", "--alias", "production", "--reason", "r"]) == 0
    assert (holder(client, "d-backbone"), holder(client, "d-head")) == (b1, h1)
    assert "d-head@production -> version 1 (previously version 2) [rollback]" in capsys.readouterr().out


def test_command_line_errors_are_one_line_and_exit_2(client, capsys):
    assert promote_main(["models:/nothing/999", "--alias", "staging", "--reason", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promote: models:/nothing/999: ") and err.count("\n") == 1 and "Traceback" not in err
    assert lineage_main(["not-a-uri"]) == 2
    assert capsys.readouterr().err == "lineage: 'not-a-uri': expected models:/<name>/<version> or models:/<name>@<alias>\n"


def test_an_unset_alias_is_not_an_unreachable_registry(client, monkeypatch):
    register(client, "u-backbone")
    assert alias_holder(client, "u-backbone", "production") is None
    assert alias_holder(client, "no-such-model", "production") is None
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(RegistryUnavailable, match="registry: cannot read u-backbone@production"):
        alias_holder(down, "u-backbone", "production")


def test_floors_hold_for_a_first_promotion_and_learning_is_the_services_verdict(client):
    floors = Gates({"backbone": [MetricGate("knn.accuracy", 0.01), MetricGate("linear.accuracy", 0.01, minimum=0.5)]},
                   min_gain=0.0)
    no_baseline = register(client, "f-backbone", evaluated={"knn.accuracy": 0.7, "linear.accuracy": 0.7})
    with pytest.raises(PromotionRefused, match="has no knn.accuracy and random_init.knn.accuracy") as refused:
        promote(client, f"models:/f-backbone/{no_baseline}", "production", "try", gates=floors)
    assert refused.value.gate == "learning"
    # The training run says it learned (anyone who may edit it can say so): the service measured otherwise.
    fell = register(client, "f-backbone", evaluated={"knn.accuracy": 0.60, "random_init.knn.accuracy": 0.61,
                                                     "linear.accuracy": 0.7})
    client.set_tag(client.get_model_version("f-backbone", fell).run_id, Tag.LEARNED, "true")
    with pytest.raises(PromotionRefused, match=r"did not learn: kNN 0.6000 against 0.6100 for the same architecture at "
                                               r"random init on data/eval \(-0.0100") as low:
        promote(client, f"models:/f-backbone/{fell}", "production", "try", gates=floors)
    assert low.value.gate == "learning"
    weak = register(client, "f-backbone", evaluated={"knn.accuracy": 0.8, "random_init.knn.accuracy": 0.4})
    with pytest.raises(PromotionRefused, match=r"the promotion service's evaluation \(run gate-run\) has no linear.accuracy"):
        promote(client, f"models:/f-backbone/{weak}", "production", "try", gates=floors)
    weak = register(client, "f-backbone", evaluated={"knn.accuracy": 0.8, "random_init.knn.accuracy": 0.4,
                                                     "linear.accuracy": 0.45})
    with pytest.raises(PromotionRefused, match=r"linear.accuracy 0.4500 is past the floor 0.5") as floor:
        promote(client, f"models:/f-backbone/{weak}", "production", "try", gates=floors)
    assert floor.value.gate == "floor"
    # And a training run that says it did not learn is information too: the service's kNN decides.
    good = register(client, "f-backbone", evaluated={"knn.accuracy": 0.8, "random_init.knn.accuracy": 0.4,
                                                     "linear.accuracy": 0.8})
    client.set_tag(client.get_model_version("f-backbone", good).run_id, Tag.LEARNED, "false")
    promote(client, f"models:/f-backbone/{good}", "production", "learned", gates=floors)
    assert holder(client, "f-backbone") == good


def test_every_model_a_set_moves_is_authorized_before_anything_moves(client):
    backbone = register(client, "a-backbone", evaluated={"knn.accuracy": 0.9})
    head = register(client, "a-head", "head", evaluated={"head.accuracy": 0.9}, parent=f"models:/a-backbone/{backbone}")
    asked = []

    def only_a_backbone(name: str) -> None:
        asked.append(name)
        if name != "a-backbone":
            raise PromotionRefused("authorized", f"not {name}")

    with pytest.raises(PromotionRefused, match="not a-head"):
        promote(client, f"models:/a-backbone/{backbone}", "production", "r", gates=GATES,
                together=[f"models:/a-head/{head}"], authorize=only_a_backbone)
    assert asked == ["a-backbone", "a-head"] and alias_holder(client, "a-backbone", "production") is None
    promote(client, f"models:/a-backbone/{backbone}", "production", "r", gates=GATES, together=[f"models:/a-head/{head}"])
    with pytest.raises(PromotionRefused, match="not a-head"):
        rollback(client, "a-backbone", "production", "r", together=["a-head"], authorize=only_a_backbone)


def test_an_alias_moved_outside_the_gates_is_told_apart_and_mlflows_copy_of_the_audit_proves_nothing(client, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "gate-secret")
    v1 = register(client, "s-backbone", evaluated={"knn.accuracy": 0.8})
    v2 = register(client, "s-backbone", evaluated={"knn.accuracy": 0.9})
    promote(client, f"models:/s-backbone/{v1}", "production", "first", gates=GATES)
    ledger = ledger_of(client)
    assert audit.unaudited_reason(ledger, client.get_model_version("s-backbone", v1), "production") is None
    client.set_registered_model_alias("s-backbone", "production", v2)  # the MLflow UI's alias pencil
    moved = client.get_model_version("s-backbone", v2)
    assert "the gates last moved it to version 1" in audit.unaudited_reason(ledger, moved, "production")
    # Rewriting MLflow's copy of the record (same tag, new value) changes nothing the service reads.
    [tag] = [k for k in client.get_model_version("s-backbone", v1).tags if k.startswith("vf.audit.production.")]
    client.set_model_version_tag("s-backbone", v1, tag, "overwritten")
    forged = {"action": "promote", "alias": "production", "model": "s-backbone", "version": v2, "previous": v1,
              "user": "mallory", "time": "2099-01-01T00:00:00+00:00", "seq": 99, "hash": "0" * 64, "signature": "f" * 64}
    client.set_model_version_tag("s-backbone", v2, "vf.audit.production.2099", json.dumps(forged))
    assert "the gates last moved it to version 1" in audit.unaudited_reason(ledger, client.get_model_version("s-backbone", v2),
                                                                            "production")
    # Nor does a forged record steer a rollback: only the ledger names a previous holder.
    with pytest.raises(PromotionRefused, match="version 2\\) has no previous holder"):
        rollback(client, "s-backbone", "production", "back to what the forger named")


def _tamper(ledger: Ledger, statement: str, **values) -> None:
    """What someone with write access to the ledger's database (not the promotion service) does."""
    with ledger.engine.begin() as connection:
        connection.execute(sa.text(statement), values)


def test_a_missing_altered_reordered_or_unsigned_ledger_record_stops_the_service_trusting_any(client, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "gate-secret")
    v1 = register(client, "t-backbone", evaluated={"knn.accuracy": 0.8})
    v2 = register(client, "t-backbone", evaluated={"knn.accuracy": 0.9})
    promote(client, f"models:/t-backbone/{v1}", "production", "first", gates=GATES)
    promote(client, f"models:/t-backbone/{v2}", "production", "second", gates=GATES)
    service = Ledger(ledger_of(client).url, b"gate-secret")  # the service's reader: it remembers what it verified
    newest = client.get_model_version("t-backbone", v2)
    assert audit.unaudited_reason(service, newest, "production") is None
    rows = service.entries()
    assert [e.kind for e in rows] == ["validation", "evaluation", "evaluation", "promote", "promote"]

    def refused(match: str) -> None:
        with pytest.raises(LedgerBroken, match=match):
            audit.unaudited_reason(Ledger(service.url, b"gate-secret"), newest, "production")

    _tamper(service, "UPDATE vf_ledger SET body = replace(body, '\"second\"', '\"third\"') WHERE seq = 5")
    refused("ledger record 5 was altered after it was written")
    _tamper(service, "UPDATE vf_ledger SET body = :body WHERE seq = 5", body=json.dumps(rows[4].body, sort_keys=True,
                                                                                       separators=(",", ":")))
    assert audit.unaudited_reason(Ledger(service.url, b"gate-secret"), newest, "production") is None  # put back
    _tamper(service, "UPDATE vf_ledger SET seq = -seq WHERE seq IN (4, 5)")
    _tamper(service, "UPDATE vf_ledger SET seq = 5 WHERE seq = -4")
    _tamper(service, "UPDATE vf_ledger SET seq = 4 WHERE seq = -5")
    refused("ledger record 4 does not follow record 3: records were reordered or replaced")
    _tamper(service, "DELETE FROM vf_ledger WHERE seq >= 4")
    with pytest.raises(LedgerBroken, match="the ledger ends at record 3, but record 5 was read before"):
        audit.unaudited_reason(service, newest, "production")
    # A fresh reader sees the signed copy MLflow shows of a record the ledger no longer has.
    assert "MLflow shows record 5 signed by the promotion service" in audit.unaudited_reason(
        Ledger(service.url, b"gate-secret"), newest, "production")
    # A row written by anyone without the key, however well chained, is not the service's.
    entry = Ledger(service.url, None)
    with entry.exclusive() as appender:
        appender.append({"kind": "promote", "model": "t-backbone", "version": v2, "alias": "production"})
    refused("ledger record 4 is not signed by the promotion service")


def test_a_runs_life_ends_once_and_the_part_that_knows_best_keeps_its_word(client):
    from dinomx.interrupt import REQUEUE_EXIT_CODE, Interrupted, exit_code
    from registry.mlflow_service import MlflowService, Outcome

    service = MlflowService(mlflow.get_tracking_uri())
    run = client.create_run("0").info.run_id
    assert service.finish(run, Outcome.REQUEUED) and service.status(run) == "SCHEDULED"
    assert service.finish(run, Outcome.FAILED, "out of memory") and service.status(run) == "FAILED"
    tags = client.get_run(run).data.tags
    assert tags[Tag.ERROR] == "out of memory" and tags[Tag.NOTE] == "**Failed:** out of memory"
    assert not service.finish(run, Outcome.FINISHED) and service.status(run) == "FAILED"  # already ended: kept
    # Resumed, the run goes on without the earlier launch's error (a training's run carries its entry point).
    client.set_tag(run, Tag.ENTRY_POINT, "pretrain")
    with service.start_or_continue(run) as (_, continuing):
        assert continuing and Tag.ERROR not in client.get_run(run).data.tags
    killed = client.create_run("0").info.run_id
    service.finish(killed, Outcome.KILLED)
    # A preempted job's run ended KILLED by its process; Slurm, requeueing it, knows better.
    assert service.finish(killed, Outcome.REQUEUED, also_ended=("KILLED",)) and service.status(killed) == "SCHEDULED"
    with mlflow.start_run() as active:  # the process's own open run leaves the fluent stack too
        assert service.finish(active.info.run_id, Outcome.KILLED)
    assert mlflow.active_run() is None and service.status(active.info.run_id) == "KILLED"
    # One exit-code rule for both command lines: only the time-limit warning asks to be requeued.
    assert exit_code(Interrupted(3, "ckpt", signal.SIGUSR1)) == REQUEUE_EXIT_CODE == 75
    assert exit_code(Interrupted(3, "ckpt", signal.SIGTERM)) == 143


def test_a_versions_description_says_whether_its_training_learned(client):
    from registry.lineage import describe_version

    learned, flat = register(client, "v-backbone"), register(client, "v-backbone")
    for version, verdict in ((learned, "kNN 0.700 -> 0.875 (+0.175 over the network before training)"),
                             (flat, "did not learn: kNN 0.700 -> 0.701 (+0.001 over the network before training); "
                                    "needs at least +0.02")):
        mv = client.get_model_version("v-backbone", version)
        client.set_tag(mv.run_id, Tag.LEARNING, verdict)
        client.set_tag(mv.run_id, Tag.LEARNED, str(version == learned).lower())
        describe_version(client, mv)
    assert "- training: **learned**, kNN 0.700 -> 0.875" in client.get_model_version("v-backbone", learned).description
    assert "- training: **did NOT learn**, kNN 0.700 -> 0.701" in client.get_model_version("v-backbone", flat).description


def test_a_run_in_the_default_experiment_says_how_to_keep_it_with_its_family(client, capsys):
    from projects.tracking import family_experiment, mark_model_training

    with mlflow.start_run(experiment_id="0"):
        mark_model_training("ct")
    note = capsys.readouterr().err
    assert "Default experiment" in note and "mlflow run --experiment-name ct" in note
    with mlflow.start_run(experiment_id=family_experiment("ct")) as run:
        mark_model_training("ct")
    assert capsys.readouterr().err == ""
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "ct" and experiment.tags[Tag.EXPERIMENT_KIND] == "custom_model_development"


@pytest.mark.parametrize("launched", [False, True])
@pytest.mark.parametrize("deleted", ["run", "experiment"])
def test_a_run_deleted_under_an_entry_point_ends_in_one_line(client, capsys, monkeypatch, deleted, launched):
    from projects.tracking import family_experiment, run_entry_point

    experiment = family_experiment("ct")
    if launched:  # as `mlflow run` does: it opens the run and ends it when the command exits
        monkeypatch.setenv("MLFLOW_RUN_ID", client.create_run(experiment).info.run_id)

    def heads():
        with mlflow.start_run(run_id=os.environ.get("MLFLOW_RUN_ID"), experiment_id=experiment) as run:
            mlflow.log_metric("loss", 1.0)
            client.delete_run(run.info.run_id) if deleted == "run" else client.delete_experiment(experiment)
            mlflow.log_metric("loss", 0.5)

    assert run_entry_point("heads", heads) == 2
    said = capsys.readouterr().err.strip().splitlines()
    (run,) = client.search_runs([experiment], run_view_type=3)
    run_id = run.info.run_id
    assert len(said) == 1 and said[0].startswith(f"heads: MLflow run {run_id}: "), said
    assert "nothing more can be logged to it" in said[0] and "was deleted while it ran" in run.data.tags[Tag.ERROR]
    assert run.info.status == "FAILED"
    if deleted == "experiment":
        assert f"mlflow experiments restore --experiment-id {experiment}" in said[0]
        assert client.get_experiment(experiment).lifecycle_stage == "deleted"
    elif launched:
        assert f"mlflow runs delete --run-id {run_id}" in said[0] and run.info.lifecycle_stage == "active"
    else:
        assert f"mlflow runs restore --run-id {run_id}" in said[0] and run.info.lifecycle_stage == "deleted"
    if launched:  # what `mlflow run` does next no longer ends in a traceback of its own
        client.set_terminated(run_id, "FAILED")
