"""The evidence a promotion gate reads: evaluations the promotion service ran itself.

Before an alias moves, the promotion service runs the ``evaluate`` entry point on the candidate
(and, where its ledger has none on the same data, on the current holder) against the family's
evaluation split named in the gates file (``evaluation:``), as its own identity and into its own
experiment (``vf-gate``, which researchers may only read). The metrics, the run and the split's DVC
md5 go into the promotion ledger; a gate compares candidate and holder only on the same md5. A
researcher's own evaluate runs, the ``vf.eval.*`` tags and a training run's ``vf.learned`` stay
information: nothing the person asking for a promotion can write is read as evidence.

    python -m registry.evidence models:/demo-backbone/3     # run and record it ahead of a promotion
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from tempfile import TemporaryDirectory

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from dinomx.errors import UserError, run_command
from registry.ledger import Entry, Ledger
from registry.lineage import resolve_version, version_uri
from registry.mlflow_service import MlflowService

PROJECT = Path(__file__).resolve().parents[1]
GATE_EXPERIMENT = "vf-gate"
EVALUATION = "evaluation"


class EvaluationFailed(UserError, RuntimeError):
    """The promotion service's own evaluation of a version did not complete."""


@dataclass(frozen=True)
class EvaluationSplit:
    """The family's evaluation split, in the promotion service's checkout: ``<data>/train`` fits
    a backbone's probes, ``<data>/val`` scores; DVC names its version."""

    data: str
    validation_report: str
    knn_k: int = 20


@dataclass(frozen=True)
class Evaluation:
    model: str
    data: str
    data_md5: str
    run_id: str
    metrics: dict[str, float]
    # A backbone's drift reference, which the service watches its inputs against: {uri, sha256}.
    reference: dict | None = None


def recorded(entries: list[Entry], mv: ModelVersion, data_md5: str | None = None) -> Evaluation | None:
    """The newest evaluation the ledger holds of ``mv`` (on ``data_md5`` when given)."""
    uri = version_uri(mv)
    for entry in reversed(entries):
        if entry.kind == EVALUATION and entry.body.get("model") == uri and data_md5 in (None, entry.body.get("data_md5")):
            body = entry.body
            return Evaluation(uri, body["data"], body["data_md5"], body["run_id"], body["metrics"], body.get("reference"))
    return None


def run_module(module: str, args: list[str], env: dict[str, str] | None = None,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` of this checkout, as the promotion service runs its checks: in a
    process of its own, so a check's imports and memory end with it. ``env``: the whole environment
    (default: this process's)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or os.getcwd(), env=env,
                          capture_output=True, text=True)


def last_words(done: subprocess.CompletedProcess) -> str:
    """What a finished check said last, for a refusal's one line."""
    return (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1][:500]


def run_evaluation(mv: ModelVersion, split: EvaluationSplit) -> Evaluation:
    """The ``evaluate`` entry point on ``mv``, run by this process's identity into ``vf-gate``;
    its numbers are read from the file it writes, not from the run, which others may read."""
    uri = version_uri(mv)
    with TemporaryDirectory(prefix="vf-gate-") as tmp:
        out = Path(tmp) / "metrics.json"
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
        done = run_module("projects.evaluate", ["--model", uri, "--data", split.data, "--validation-report",
                                                split.validation_report, "--knn-k", str(split.knn_k),
                                                "--metrics-out", str(out), "--tag-version", "no"],
                          env={**env, "MLFLOW_EXPERIMENT_NAME": GATE_EXPERIMENT})
        if done.returncode or not out.is_file():
            raise EvaluationFailed(f"{uri}: the promotion service's evaluation on {split.data} failed: {last_words(done)}")
        result = json.loads(out.read_text())
    return Evaluation(uri, result["data"], result["data_md5"], result["run_id"],
                      {k: float(v) for k, v in result["metrics"].items()}, result.get("reference"))


def record(ledger: Ledger, evaluation: Evaluation, mv: ModelVersion) -> Entry:
    with ledger.exclusive() as appender:
        return appender.append({"kind": EVALUATION, "model": evaluation.model, "version": str(mv.version), "alias": "",
                                "data": evaluation.data, "data_md5": evaluation.data_md5, "run_id": evaluation.run_id,
                                "metrics": evaluation.metrics, "reference": evaluation.reference,
                                "time": datetime.now(timezone.utc).isoformat()})


def evaluate_for_gate(ledger: Ledger, mv: ModelVersion, split: EvaluationSplit) -> Evaluation:
    """A fresh evaluation of ``mv`` by the promotion service, recorded in the ledger."""
    evaluation = run_evaluation(mv, split)
    record(ledger, evaluation, mv)
    return evaluation


def main(argv: list[str] | None = None) -> int:
    from registry.promote import DEFAULT_GATES, ledger_of, load_gates

    parser = argparse.ArgumentParser(description="Run the promotion service's evaluation of a version and record it")
    parser.add_argument("model", help="models:/<name>/<version>")
    parser.add_argument("--gates", default=str(DEFAULT_GATES), help="the gates file naming the evaluation split")
    args = parser.parse_args(argv)

    def go() -> None:
        client: MlflowClient = MlflowService().client
        gates = load_gates(args.gates)
        mv = resolve_version(client, args.model)
        split = gates.split_of(mv.name)
        if split is None:
            raise EvaluationFailed(f"{args.gates}: names no evaluation split (evaluation:)")
        evaluation = evaluate_for_gate(ledger_of(client), mv, split)
        print(f"{evaluation.model} on {evaluation.data} (md5 {evaluation.data_md5}), run {evaluation.run_id}:")
        for key, value in sorted(evaluation.metrics.items()):
            print(f"  {key} {value:.4f}")

    return run_command("evidence", go)


if __name__ == "__main__":
    sys.exit(main())
