"""The README's commands as written: every bash block is run by a test or says which test covers
what it does (a site's bucket, tracking server or cluster stands in for this machine's)."""
import os
import re
import sqlite3
import subprocess

import httpx
import pytest

from scripts.demo import wait_ready
from tests.conftest import REPO, readme_blocks, readme_commands

# The blocks run in other modules, where what they need (the demo checkout) is built anyway.
RUN_ELSEWHERE = {"Using the parts": "tests/test_pipeline.py::test_the_readme_commands_run_as_written",
                 "Clinical outputs: whole slides, whole CT series, scores, masks back to annotators":
                     "tests/test_pipeline.py::test_the_clinical_outputs_commands_run_as_written"}
RUN_HERE = ("The Foundry portal (`portal/`)", "A recipe that learns on CPU (`configs/small-cpu.yaml`)")


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


def test_every_mlflow_run_in_the_readme_names_its_experiment():
    commands = [c for heading, _, _ in readme_blocks() for c in readme_commands(heading) if "mlflow run " in c]
    assert commands and all("--experiment-name " in c for c in commands), [c for c in commands if "--experiment-name" not in c]


def test_a_failed_demo_step_ends_in_one_line(capfd):
    from scripts.demo import sh

    with pytest.raises(SystemExit) as stopped:
        sh("python", "-c", "import sys; sys.exit('bad input: named here')")
    assert str(stopped.value) == "demo: stopped, the command above ended with exit code 1"
    assert capfd.readouterr().err.strip() == "bad input: named here"
