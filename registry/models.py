"""Log DINO-MX artefacts as MLflow models and register them with their lineage."""
from __future__ import annotations

from importlib.metadata import version

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.pyfunc import PythonModel

from registry.lineage import Lineage, describe_version
from registry.mlflow_service import EVAL_PREFIX, MlflowService, Tag, version_metrics

_RUNTIME_PACKAGES = ("torch", "transformers", "safetensors", "pillow", "numpy", "pandas", "mlflow")


def runtime_requirements() -> list[str]:
    # Stated explicitly: MLflow's inference would load the model in a subprocess to find them.
    return [f"{package}=={version(package)}" for package in _RUNTIME_PACKAGES]


def log_and_register(
    registered_name: str,
    python_model: PythonModel,
    artifacts: dict[str, str],
    lineage: Lineage,
    signature: mlflow.models.ModelSignature,
    input_example: np.ndarray,
    metrics: dict[str, float] | None = None,
) -> ModelVersion:
    """Log the model in the active run, register a new version, tag it with its lineage (and
    ``metrics`` as its evaluation) and describe both in Markdown for the MLflow UI."""
    info = mlflow.pyfunc.log_model(
        name=lineage.kind,
        python_model=python_model,
        artifacts=artifacts,
        signature=signature,
        input_example=input_example,
        pip_requirements=runtime_requirements(),
        tags=lineage.tags(),
        registered_model_name=registered_name,
    )
    client = MlflowService().client
    version_number = str(info.registered_model_version)
    for key, value in lineage.tags().items():
        client.set_model_version_tag(registered_name, version_number, key, value)
    for key, value in version_metrics(metrics or {}).items():
        client.set_model_version_tag(registered_name, version_number, f"{EVAL_PREFIX}{key}", repr(value))
    client.set_registered_model_tag(registered_name, Tag.KIND, lineage.kind)
    describe_version(client, client.get_model_version(registered_name, version_number))
    return client.get_model_version(registered_name, version_number)
