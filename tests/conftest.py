import os
import sys
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

import pytest  # noqa: E402

from data.synthetic import generate  # noqa: E402
from dinomx.config import DinoMXConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiles(tmp_path_factory) -> Path:
    """A small generated dataset: <root>/{train,val}/<class>/*.png."""
    return generate(tmp_path_factory.mktemp("tiles") / "images", seed=0, image_size=32, train_per_class=24, val_per_class=8)


def tiny_config(**sections) -> DinoMXConfig:
    """The demo config shrunk for fast tests; keyword arguments override whole keys per section."""
    cfg = DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml").to_dict()
    cfg["student"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    cfg["dino_head"].update(out_dim=64, hidden_dim=64, bottleneck_dim=16)
    cfg["crops"].update(local_crops_number=2)
    cfg["train"].update(batch_size=8, epochs=2, steps_per_epoch=3, log_every=2)
    for section, values in sections.items():
        cfg[section].update(values)
    return DinoMXConfig.from_dict(cfg)
