"""The engine stays usable without the platform: importing every dinomx module loads no MLflow,
S3, DVC, Great Expectations, BentoML or Flask beyond what the engine's allowed dependencies load
themselves (accelerate imports boto3 for SageMaker) (DESIGN.md, "Parts and what each may know")."""
import json
import subprocess
import sys

from tests.conftest import REPO

ALLOWED = ("torch", "transformers", "peft", "accelerate", "numpy", "PIL", "yaml", "tqdm", "safetensors", "sklearn")
PLATFORM = ("mlflow", "boto3", "botocore", "dvc", "bentoml", "great_expectations", "flask")


def _loaded_in_turn(*imports: list[str], packages) -> list[set[str]]:
    """Which of ``packages`` a fresh interpreter holds after importing each list of modules in
    turn, on top of the lists before it."""
    code = (f"import importlib, json, sys\nfor modules in {list(imports)!r}:\n"
            f"    for m in modules: importlib.import_module(m)\n"
            f"    print(json.dumps(sorted({{n.split('.')[0] for n in sys.modules}} & set({list(packages)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return [set(json.loads(line)) for line in out.strip().splitlines()[-len(imports):]]


def _loaded(modules: list[str], packages) -> set[str]:
    """Which of ``packages`` a fresh interpreter holds after importing ``modules``."""
    return _loaded_in_turn(modules, packages=packages)[0]


def test_the_engine_imports_no_platform_package():
    modules = sorted(f"dinomx.{p.stem}" for p in (REPO / "dinomx").glob("*.py") if p.stem != "__init__")
    modules += sorted(f"dinomx.loss.{p.stem}" for p in (REPO / "dinomx" / "loss").glob("*.py") if p.stem != "__init__")
    # One interpreter (torch's import is most of this test): the allowed dependencies first, then
    # the engine, which must bring no platform package they did not bring themselves.
    allowed, engine = _loaded_in_turn(list(ALLOWED), modules, packages=PLATFORM)
    assert len(modules) > 20 and "mlflow" not in engine
    assert engine == allowed


def test_the_data_side_loads_neither_torch_nor_the_platform_for_checking_data():
    """Validation, versioning, ingestion and DICOM/slide reading run in every `dvc repro` and on
    every training start: importing them loads no torch (tiling slides loads it for the engine's
    HED transform, when stain statistics are computed)."""
    modules = sorted(f"data.{p.stem}" for p in (REPO / "data").glob("*.py") if p.stem != "__init__")
    modules += sorted(f"data.readers.{p.stem}" for p in (REPO / "data" / "readers").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 10 and _loaded(modules, ("torch", "mlflow", "bentoml", "flask")) == set()


def test_the_portal_loads_no_engine():
    """Every gunicorn worker and every `python -m portal` command imports the portal: checking a
    config or a teacher's name must not cost it torch, transformers and peft (6 s of imports)."""
    modules = ["portal.app", "portal.__main__", *sorted(f"portal.views.{p.stem}" for p in (REPO / "portal/views").glob("*.py"))]
    assert _loaded(modules, ("torch", "transformers", "peft", "accelerate", "bentoml")) == set()


def test_clinical_answers_need_no_mlflow_or_server():
    """Whole-slide and whole-series inference and the score modules run from a script or a notebook,
    with the engine and the data side only; the entry point and the service add MLflow and BentoML."""
    modules = sorted(f"clinical.{p.stem}" for p in (REPO / "clinical").glob("*.py") if p.stem != "__init__")
    modules += sorted(f"clinical.scores.{p.stem}" for p in (REPO / "clinical" / "scores").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 3 and _loaded(modules, ("mlflow", "bentoml", "flask", "dvc")) == set()


def _data_imports() -> dict[str, set[str]]:
    """Each module of the data side and the data modules it imports, at its top or inside a function."""
    import ast

    graph = {}
    for path in sorted((REPO / "data").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "data":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "data"}
        graph[module] = found
    return graph


def test_the_data_side_imports_in_one_direction():
    """No import circle among the data modules (ingestion, parameters and shards once imported each
    other): each reader, staging and the listings can be read, and replaced, by themselves."""
    graph = _data_imports()
    assert {"data.ingest", "data.listing", "data.staging", "data.readers.slides", "data.readers.ct_series"} <= set(graph)
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done or module not in graph:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)
    # The command sits on top: no other module imports it.
    assert not [m for m, imported in graph.items() if "data.ingest" in imported]
