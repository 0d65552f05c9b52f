import atexit
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Embedded defaults for every test: no telemetry, no hub access.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "True",
    "GX_ANALYTICS_ENABLED": "False",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(key, value)
# The tools the tests drive (dvc, mlflow, bentoml) are those of the interpreter running them.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
# A site key of the test session's own, outside every checkout: ingestion pseudonymises with it,
# and its mapping back is written beside it.
_SITE = Path(tempfile.mkdtemp(prefix="vf-site-"))
atexit.register(shutil.rmtree, _SITE, ignore_errors=True)
os.environ["VF_SITE_KEY"] = str(_SITE / "site-key")
os.environ.pop("VF_PSEUDONYM_MAP", None)

import boto3  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from data.privacy import new_key  # noqa: E402
from data.synthetic import generate  # noqa: E402
from deploy.stack import PARTS, Stack  # noqa: E402
from dinomx.config import DinoMXConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
new_key(Path(os.environ["VF_SITE_KEY"]))
BUCKET = "hospital"


def readme_blocks() -> list[tuple[str, str | None, list[str]]]:
    """The README's bash blocks: (the heading above, why no test runs it or None, its commands with
    continuation lines joined)."""
    blocks, heading = [], ""
    text = (REPO / "README.md").read_text()
    for match in re.finditer(r"^(#{2,3} [^\n]+)$|(?:<!-- not run by the tests: ([^\n]+?) -->\n)?```bash\n(.*?)```", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ")
            continue
        lines = re.sub(r"\\\n\s*", "", match.group(3)).splitlines()
        blocks.append((heading, match.group(2), [line for line in lines if line.strip()]))
    return blocks


def readme_commands(heading: str) -> list[str]:
    """The commands of the bash block under ``heading``."""
    (commands,) = [commands for title, _, commands in readme_blocks() if title == heading]
    return commands


def pseudonym(relative: str, clear: int = 0) -> str:
    """The name ingestion gives the raw file at ``relative`` with this session's site key, its
    first ``clear`` folders kept (declared classes)."""
    from data.privacy import Pseudonyms

    return Pseudonyms.load().path(Path(relative), clear).as_posix()


def copy_checkout(checkout: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) as a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    for git in (["init", "-q"], ["add", "-A"], ["-c", "user.name=ci", "-c", "user.email=ci@x", "commit", "-qm", "test"]):
        subprocess.run(["git", *git], cwd=checkout, check=True, capture_output=True)
    return checkout


def pytest_configure(config):
    """Torch's threads shared out among the pytest-xdist workers, before they start (they inherit it),
    as is every process a test starts: otherwise each takes a thread per core, and OpenMP threads spin
    while they wait for a core another worker holds (measured: the suite took 1.45x as long)."""
    workers = getattr(config.option, "numprocesses", None)
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


@pytest.fixture(autouse=True)
def mlflow_state_stays_with_its_test():
    """``mlflow.set_experiment`` and a run's launch set process-wide state (the active experiment,
    ``MLFLOW_EXPERIMENT_ID`` and ``MLFLOW_RUN_ID`` in the environment) that would send a later
    test's runs, and every subprocess it starts, to an experiment of another store."""
    import mlflow.tracking.fluent as fluent

    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(saved)
    fluent._active_experiment_id = None


@pytest.fixture(autouse=True)
def no_child_process_outlives_its_test():
    """A multiprocessing child left running (a DataLoader worker that ignores SIGTERM) makes the
    interpreter's exit wait on it forever: CI would hang after the last test instead of failing one."""
    before = set(multiprocessing.active_children())
    yield
    left = [child for child in multiprocessing.active_children() if child not in before]
    for child in left:
        child.kill()
    assert not left, f"child processes outlived the test: {left}"


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, once: MLflow's migrations take seconds a store."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def mlflow_store(tmp_path, _empty_mlflow_store) -> str:
    """A tracking URI of a new, empty SQLite store of the test's own: a copy of the migrated one,
    whose Default experiment keeps its artifacts where a store made here would (``./mlruns``)."""
    import sqlite3

    path = tmp_path / "mlflow.db"
    shutil.copy(_empty_mlflow_store, path)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (str(Path.cwd() / "mlruns" / "0"),))
    connection.close()
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def _validated_template(tmp_path_factory) -> Path:
    """A checkout with the demo data built, validated (`dvc repro`) and pushed to its DVC remote,
    where the promotion service fetches it to validate it again; never run in, only copied (DVC and
    git keep paths relative to the checkout, so a copy is a checkout of its own)."""
    checkout = copy_checkout(tmp_path_factory.mktemp("validated-template") / "vision-foundry")
    subprocess.run(["dvc", "repro"], cwd=checkout, check=True, capture_output=True)
    subprocess.run(["dvc", "push"], cwd=checkout, check=True, capture_output=True)
    return checkout


@pytest.fixture(scope="session")
def validated_checkout(_validated_template, tmp_path_factory) -> Path:
    """A validated checkout shared by the tests that `mlflow run` in it with MLflow stores of their
    own elsewhere (their runs' outputs land in it, which a ``validated_copy`` does not see)."""
    return shutil.copytree(_validated_template, tmp_path_factory.mktemp("validated") / "vision-foundry", symlinks=True)


@pytest.fixture()
def validated_copy(_validated_template, tmp_path) -> Path:
    """A validated checkout of the test's own, to run the README's commands in as a reader would
    (its MLflow store ``mlflow.db`` inside it, files written beside the code)."""
    return shutil.copytree(_validated_template, tmp_path / "vision-foundry", symlinks=True)


@pytest.fixture(scope="session")
def tiles(tmp_path_factory) -> Path:
    """A small generated dataset: <root>/{train,val}/<class>/*.png."""
    return generate(tmp_path_factory.mktemp("tiles") / "images", seed=0, image_size=32, train_per_class=24, val_per_class=8)


# The demo config shrunk for fast tests.
TINY = {"student": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
        "dino_head": {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16},
        "crops": {"local_crops_number": 2},
        "train": {"batch_size": 8, "epochs": 2, "steps_per_epoch": 3, "log_every": 2}}


def sideways_photo(path: Path, width: int = 8, height: int = 4, orientation: int = 6) -> Path:
    """A JPEG as phones store one: ``width`` x ``height`` pixels with a white band down its left
    side, and an EXIF orientation saying how to turn it (6: 90 degrees clockwise, which brings the
    band to the top)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 4] = 255
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, quality=100)
    return path


def tiny_config(**sections) -> DinoMXConfig:
    """``TINY``; keyword arguments override whole keys per section."""
    cfg = DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml").to_dict()
    for section, values in [*TINY.items(), *sections.items()]:
        cfg[section].update(values)
    return DinoMXConfig.from_dict(cfg)


def tiny_overrides(**train) -> str:
    """``TINY`` as the ``overrides`` parameter of the pretrain entry point, with ``train`` keys on top."""
    sections = {**TINY, "train": {**TINY["train"], "eval_every": 0, **train}}
    return " ".join(f"{section}.{key}={value}" for section, values in sections.items() for key, value in values.items())


@pytest.fixture(scope="session")
def stack_root():
    """One team stack for the whole session, its parts started as tests first need them (S3 alone
    for most; PostgreSQL, the MLflow server with auth and the gunicorn portal for the team tests).
    Not under pytest's temporary folder: that is private to root, and PostgreSQL runs as postgres."""
    root = Path(tempfile.mkdtemp(prefix="vf-stack-"))
    root.chmod(0o755)
    stack = Stack(root)
    yield stack
    stack.down()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_stack(stack_root) -> Stack:
    """A real S3 server (SeaweedFS) on loopback, reached by endpoint URL like MinIO would be; it
    checks signatures, presigned ones included."""
    return stack_root.up(("s3",))


@pytest.fixture(scope="session")
def team_stack(stack_root) -> Stack:
    """Every part of a team's deployment: PostgreSQL, S3, ``mlflow server`` with its auth app, the
    portal under four gunicorn workers."""
    return stack_root.up(PARTS)


@pytest.fixture(scope="session")
def s3_endpoint(s3_stack) -> str:
    return s3_stack.s3_endpoint


@pytest.fixture()
def s3(s3_stack, monkeypatch):
    for key, value in s3_stack.s3_env().items():
        if key != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_stack.s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def signed_in_portal(settings):
    """A portal app with an admin, ana (password pw), signed in: (app, test client)."""
    from portal.app import create_app
    from portal.db import User, db

    app = create_app(settings)
    with app.app_context():
        user = User(username="ana", is_admin=True)
        user.set_password("pw")
        db.session.add(user)
        db.session.commit()
    web = app.test_client()
    web.post("/api/login", json={"username": "ana", "password": "pw"})
    return app, web


def portal_with_demo_dataset(settings):
    """``signed_in_portal`` with the demo dataset registered: (app, signed-in test client, dataset id)."""
    app, web = signed_in_portal(settings)
    dataset = web.post("/api/datasets", json={"name": "demo", "prefix": "datasets/demo", "train_path": "data/demo/images/train",
                                              "validation_report": "data/demo/validation/report.json"}).json["id"]
    return app, web, dataset
