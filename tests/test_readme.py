"""The README's commands as written: every bash block is run by a test or says which test covers
what it does (a site's bucket, tracking server or cluster stands in for this machine's)."""
import contextlib
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys

import httpx
import pytest
from mlflow import MlflowClient

from registry.lineage import Lineage, format_chain, lineage_chain
from scripts.demo import wait_ready
from tests.conftest import REPO, readme_blocks, readme_commands

# The block run in another module, where what it needs (the demo's promoted head) is built anyway.
RUN_ELSEWHERE = {"Clinical outputs: whole slides, whole CT series, scores, masks back to annotators":
                     "tests/test_pipeline.py::test_the_clinical_outputs_commands_run_as_written"}
RUN_HERE = ("The Foundry portal (`portal/`)", "A recipe that learns on CPU (`configs/small-cpu.yaml`)", "Using the parts")


def test_every_block_is_run_by_a_test_or_names_the_tests_that_cover_it():
    for heading, why_not, _ in readme_blocks():
        assert why_not or heading in RUN_ELSEWHERE or heading in RUN_HERE, f"README block under {heading!r} is run by no test"
        assert not (why_not and heading in (*RUN_ELSEWHERE, *RUN_HERE)), heading


def _project(tmp_path):
    """A folder to paste commands in: the project's configs, nothing built."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    return tmp_path


@pytest.mark.slow
def test_the_small_cpu_recipe_commands(tmp_path):
    project = _project(tmp_path)
    data, train = readme_commands(RUN_HERE[1])
    assert subprocess.run(data, shell=True, cwd=project).returncode == 0
    briefly = f'{train} --overrides "train.epochs=1 train.steps_per_epoch=3 train.eval_every=3 train.log_every=1"'
    run = subprocess.run(briefly, shell=True, cwd=project, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"it 0/3  knn 0\.\d+ \(before training\)", run.stderr) and "it 3/3" in run.stderr, run.stderr[-3000:]
    assert (project / "outputs/small-cpu/backbone/config.json").is_file()


@pytest.mark.slow
def test_the_portal_commands(tmp_path):
    project = _project(tmp_path)
    *admin, serve, _production = readme_commands(RUN_HERE[0])
    env = {**os.environ, "PORTAL_DATABASE_URL": f"sqlite:///{project / 'portal.db'}", "VF_PASSWORD": "a long pass phrase"}
    for command in admin:
        run = subprocess.run(command, shell=True, cwd=project, env=env, capture_output=True, text=True)
        assert run.returncode == 0, (command, run.stderr[-2000:])
    server = subprocess.Popen(serve, shell=True, cwd=project, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready("http://127.0.0.1:8080/login", server, timeout=60)
        signed = httpx.post("http://127.0.0.1:8080/api/login", json={"username": "ana", "password": env["VF_PASSWORD"]})
        assert signed.status_code == 200, signed.text
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    with sqlite3.connect(project / "portal.db") as database:
        families = database.execute('SELECT f.name, f.owner, g.name FROM model_family f JOIN "group" g ON g.id = f.group_id')
        members = database.execute('SELECT g.name, u.username FROM membership m JOIN "group" g ON g.id = m.group_id '
                                   'JOIN user u ON u.id = m.user_id')
        families, members = families.fetchall(), members.fetchall()
    assert families == [("colon", "ana", "pathology")] and members == [("pathology", "ana")]


# Appended to the README's training commands so that they train briefly; nothing else changes.
BRIEFLY = {"-e pretrain": ("overrides=\"", "overrides=\"train.steps_per_epoch=4 "),
           "-e distill": ("teachers=models:/ct-backbone@staging",
                          "teachers=models:/ct-backbone@staging -P overrides=\"train.epochs=1 train.steps_per_epoch=10 "
                          "student.hidden_size=48\"")}


@pytest.mark.slow
def test_the_parts_commands(validated_copy):
    """"Using the parts", command by command in a checkout whose demo data is built and pushed, as a
    reader pastes it into a shell: train, evaluate, fit heads, promote to staging, distill from it,
    show the lineage, serve the staging pair and classify a tile with curl."""
    checkout = validated_copy
    (checkout / ".venv").symlink_to(sys.prefix)
    (checkout / "tile.png").write_bytes(next((checkout / "data/demo/images/val").rglob("*.png")).read_bytes())
    with (checkout / ".git/info/exclude").open("a") as exclude:
        exclude.write(".venv\ntile.png\nserve.log\n")
    script = ["set -euo pipefail"]
    for command in readme_commands("Using the parts"):
        for marker, (old, new) in BRIEFLY.items():
            if marker in command:
                assert old in command, f"the README's {marker} command changed: {command}"
                command = command.replace(old, new)
        if command.split("#")[0].rstrip().endswith("bentoml serve serving.service:VisionFoundry"):
            # The one command that does not end: the README's reader runs the next one in another shell.
            command = (f"{command.split('#')[0]} > serve.log 2>&1 & server=$!\n"
                       "for _ in $(seq 180); do curl -sf localhost:3000/readyz >/dev/null && break; "
                       "kill -0 $server; sleep 1; done")
        script += [f"echo {shlex.quote('>>> ' + command.splitlines()[0][:60])}", command]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV"))}
    shell = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=checkout, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = shell.communicate(timeout=1200)
    finally:  # the server too, whether the block got to the end or not
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGTERM)
    log = stdout[-4000:] + stderr[-4000:] + (checkout / "serve.log").read_text()[-3000:]
    assert shell.returncode == 0, log
    client = MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")
    answer = json.loads(stdout.split(">>> curl")[1].splitlines()[1])
    assert answer["model"] == "models:/ct-head/1" and answer["predictions"][0]["label"], answer
    assert "models:/ct-head/1" in stdout.split(">>> python -m registry.lineage")[1]
    for name in ("ct-backbone", "ct-head"):
        assert str(client.get_model_version_by_alias(name, "staging").version) == "1"
    student = Lineage.from_tags(client.get_model_version("ct-small-backbone", "1").tags)
    assert student.teachers.startswith("models:/ct-backbone") and student.parent == "scratch"
    assert "distill_loss" in client.get_run(student.source_run_id).data.metrics
    assert "distilled from models:/ct-backbone" in format_chain(lineage_chain(client, "models:/ct-small-backbone/1"))
    # Every run the block started sits in its family's experiment, none in MLflow's Default.
    for family, entry_points in {"ct": {"pretrain", "evaluate", "heads"}, "ct-small": {"distill"}}.items():
        runs = client.search_runs([client.get_experiment_by_name(family).experiment_id])
        assert entry_points <= {r.data.tags.get("vf.entry_point", r.data.tags.get("mlflow.project.entryPoint"))
                                for r in runs}, family
    assert "Default experiment" not in stderr


def test_every_mlflow_run_in_the_readme_names_its_experiment():
    commands = [c for heading, _, _ in readme_blocks() for c in readme_commands(heading) if "mlflow run " in c]
    assert commands and all("--experiment-name " in c for c in commands), [c for c in commands if "--experiment-name" not in c]


def test_a_failed_demo_step_ends_in_one_line(capfd):
    from scripts.demo import sh

    with pytest.raises(SystemExit) as stopped:
        sh("python", "-c", "import sys; sys.exit('bad input: named here')")
    assert str(stopped.value) == "demo: stopped, the command above ended with exit code 1"
    assert capfd.readouterr().err.strip() == "bad input: named here"
