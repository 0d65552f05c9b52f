"""The service as it ships: a Bento built from the repository, and the Kubernetes manifest."""
import json
import os
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO


@pytest.mark.slow  # bentoml build
def test_bentoml_build_packages_the_service(tmp_path):
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    build = subprocess.run(["bentoml", "build", "--output", "tag"], cwd=REPO, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    tag = re.search(r"vision-foundry:\w+", build.stdout).group(0)
    info = json.loads(subprocess.run(["bentoml", "get", tag, "-o", "json"], env={**os.environ, **env},
                                     capture_output=True, text=True, check=True).stdout)
    assert info["service"] == "serving.service:VisionFoundry"
    routes = {r["name"]: r for r in info["schema"]["routes"]}
    assert {"embed", "classify", "segment", "regress", "attention", "reload"} <= set(routes)
    bento = tmp_path / "bentoml/bentos/vision-foundry" / tag.split(":")[1]
    assert (bento / "src/serving/service.py").is_file() and (bento / "src/dinomx/probes.py").is_file()
    assert (bento / "src/serving/static/docs.html").is_file()  # the API page the service answers at / and /docs
    assert "torch==2.13.0" in (bento / "env/python/requirements.in").read_text()


def test_kubernetes_manifest_runs_the_service_with_probes():
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "deploy/k8s/vision-foundry.yaml").read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["ports"][0]["containerPort"] == 3000
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    # The read-only identity and the ledger's reader, without which no alias is followed.
    assert "vision-foundry-registry" in {source["secretRef"]["name"] for source in container["envFrom"]}
    service_code = (REPO / "serving/service.py").read_text()
    for variable in (e["name"] for e in container["env"] if e["name"].startswith("VF_")):
        assert f'"{variable}"' in service_code, variable  # every knob the manifest sets is one the service reads
