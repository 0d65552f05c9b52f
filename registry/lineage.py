"""Lineage carried by every registered model version, and the query that walks it back.

Tags live on the model version (and its MLflow LoggedModel) under ``vf.*``: the run that made
it, the DVC version and validation result of its data, its parent, the code version and the
config hash. ``python -m registry.lineage models:/demo-head@production`` prints the chain back
to the raw data.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dinomx.errors import UserError, run_command
from registry.mlflow_service import LINEAGE_PREFIX as PREFIX
from registry.mlflow_service import MlflowService, Tag, evaluation_metrics

# No real chain (data -> backbone -> distilled students -> heads) comes near this.
MAX_DEPTH = 64


class RegistryError(UserError, LookupError):
    """A model, version or alias that is not in the registry, or a lineage that cannot be read."""


class LineageError(RegistryError):
    """A lineage that cannot be walked: a cycle, or deeper than ``MAX_DEPTH``."""


class BadModelReference(UserError, ValueError):
    """A model name or URI that is malformed."""


class RegistryUnavailable(UserError, RuntimeError):
    """The registry did not answer (down, locked, timed out), which is not the same as an alias
    that is not set: a caller must not act on a guess."""


# The registry's answers for "there is no such model, version or alias".
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def equals(field: str, value: str) -> str:
    """An MLflow search filter ``field = 'value'`` that ``value`` cannot change the meaning of.
    MLflow's filter grammar has no escape for quotes, so a value holding one is refused."""
    if any(c in "'\"\\" or ord(c) < 32 for c in value):
        raise BadModelReference(f"{value!r}: a model name or URI may not hold quotes, backslashes or control characters")
    return f"{field} = '{value}'"


@dataclass(frozen=True)
class Lineage:
    kind: str  # "backbone" | "head"
    source_run_id: str
    parent: str  # "scratch", "hf:<repo>", a local path, or "models:/<name>/<version>"
    data_path: str
    data_md5: str
    data_source: str  # "dvc.lock:<stage>" or "<file>.dvc"
    data_remote: str
    validation_suite: str
    validation_success: bool
    validation_report: str  # artifact URI of the report
    git_commit: str
    git_dirty: bool
    config_sha256: str
    # Frozen distillation teachers, comma-separated (models:/..., hf:..., or local paths).
    teachers: str = ""
    # What ingestion built the data from (ValidationReport.inputs_line): a reviewer sees inputs
    # that were quarantined.
    data_inputs: str = ""
    # "N shards, M tiles" when the data was a split of shards.
    data_shards: str = ""
    # How the images were cut from slides or series (``data.tiling.Tiling`` as JSON), so that
    # inference cuts a new slide the same way; empty for image folders.
    tiling: str = ""
    # Model versions that proposed the data's annotations (corrected masks brought back from
    # annotators), comma-separated.
    annotations_proposed_by: str = ""
    # What the promotion service validates again before it vouches for the version: the DVC output
    # ``data_md5`` hashes, the folder of it the report covered, and the suite's parameters (JSON).
    data_output: str = ""
    validation_dataset: str = ""
    validation_parameters: str = ""

    def tags(self) -> dict[str, str]:
        return {PREFIX + k: _tag_value(v) for k, v in asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "Lineage":
        missing = [f.name for f in fields(cls) if PREFIX + f.name not in tags and f.default is MISSING]
        if missing:
            raise RegistryError(f"lineage incomplete: missing tag(s) {', '.join(PREFIX + m for m in missing)}")
        values = {f.name: tags[PREFIX + f.name] for f in fields(cls) if PREFIX + f.name in tags}
        for flag in ("validation_success", "git_dirty"):
            values[flag] = values[flag] == "true"
        return cls(**values)


def _tag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def code_version(repo: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the git checkout holding ``repo``; ("unknown", True) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", True
    return commit, bool(status.strip())


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@alias`` -> (name, None, "alias")."""
    if not uri.startswith("models:/"):
        raise BadModelReference(f"{uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias
    name, _, version = body.rpartition("/")
    if not name or not version:
        raise BadModelReference(f"{uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return name, version, None


def resolve_version(client: MlflowClient, uri: str) -> ModelVersion:
    name, version, alias = parse_model_uri(uri)
    if alias:
        holder = alias_holder(client, name, alias)
        if holder is None:
            raise RegistryError(f"{uri}: no version of {name!r} holds @{alias}")
        return holder
    with registry_errors(f"{uri}: "):
        if version == "latest":
            versions = client.search_model_versions(equals("name", name), order_by=["version_number DESC"], max_results=1)
        else:
            return client.get_model_version(name, version)
    if not versions:
        raise RegistryError(f"registered model {name!r} has no versions")
    return versions[0]


def alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version of ``name`` holding ``alias``, None when the alias (or the model) is not set;
    ``RegistryUnavailable`` when the registry did not say."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in _ABSENT and "not found" in exc.message.lower():
            return None
        raise RegistryUnavailable(f"registry: cannot read {name}@{alias}: {exc.message}") from exc


@contextmanager
def registry_errors(context: str):
    """The registry's "no such thing" as a ``RegistryError``, anything else as ``RegistryUnavailable``."""
    try:
        yield
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            raise RegistryError(f"{context}{exc.message}") from None
        raise RegistryUnavailable(f"registry: {context}{exc.message}") from exc


def version_uri(mv: ModelVersion) -> str:
    return f"models:/{mv.name}/{mv.version}"


def lineage_chain(client: MlflowClient, uri: str) -> list[dict]:
    """From a model version back to its data: one entry per model, child first."""
    parse_model_uri(uri)
    chain, seen = [], []
    current: str | None = uri
    while current and current.startswith("models:/"):
        mv = resolve_version(client, current)
        here = version_uri(mv)
        if here in seen:  # parent tags are written by people and tools: never trust them to end
            raise LineageError("lineage cycle: " + " -> ".join([*seen[seen.index(here):], here]))
        if len(seen) == MAX_DEPTH:
            raise LineageError(f"lineage of {uri} is deeper than {MAX_DEPTH} models; stopped at {here}")
        seen.append(here)
        lineage = Lineage.from_tags(mv.tags)
        children = [version_uri(c) for c in client.search_model_versions(equals("tags.`vf.parent`", here))]
        chain.append({"model": here, "aliases": list(mv.aliases), "children": sorted(children), **asdict(lineage)})
        current = lineage.parent
    return chain


def format_chain(chain: list[dict]) -> str:
    lines = []
    for depth, entry in enumerate(chain):
        pad = "    " * depth
        aliases = f" @{', @'.join(entry['aliases'])}" if entry["aliases"] else ""
        lines += [
            f"{pad}{'└─ ' if depth else ''}{entry['model']}{aliases} ({entry['kind']})",
            f"{pad}   run {entry['source_run_id']}  code {entry['git_commit'][:12]}{' (dirty)' if entry['git_dirty'] else ''}"
            f"  config sha256 {entry['config_sha256'][:12]}",
            f"{pad}   data {entry['data_path']} md5 {entry['data_md5']} ({entry['data_source']}, remote {entry['data_remote']})"
            + (f", {entry['data_shards']}" if entry.get("data_shards") else ""),
            f"{pad}   validation {entry['validation_suite']} {'PASSED' if entry['validation_success'] else 'FAILED'}"
            f"  report {entry['validation_report']}",
        ]
        if entry["data_inputs"]:
            lines.append(f"{pad}   built from {entry['data_inputs']}")
        if entry["children"]:
            lines.append(f"{pad}   built on it: {', '.join(entry['children'])}")
        if not entry["parent"].startswith("models:/"):
            lines.append(f"{pad}   parent {entry['parent']}")
        if entry["teachers"]:
            lines.append(f"{pad}   distilled from {entry['teachers']}")
        if entry.get("tiling"):
            lines.append(f"{pad}   tiling {entry['tiling']}")
        if entry.get("annotations_proposed_by"):
            lines.append(f"{pad}   annotations proposed by {entry['annotations_proposed_by']}, corrected by annotators")
    return "\n".join(lines)


def report_link(entry: dict) -> str:
    """The validation report as the MLflow UI serves it (``get-artifact`` of the run that logged it,
    relative to the UI): a browser cannot open the artifact URI of the lineage tag."""
    path = "/".join(entry["validation_report"].rstrip("/").split("/")[-2:])
    return f"get-artifact?path={path}&run_uuid={entry['source_run_id']}"


def markdown_description(chain: list[dict], metrics: dict[str, float] | None = None,
                         history: Sequence[dict] = (), table: str = "",
                         learning: tuple[bool, str] | None = None) -> str:
    """What the MLflow UI shows on a model version: its lineage chain back to the data, whether its
    training learned (``learning``: its run's verdict, learned or not and in words), its evaluation (per category as the paper's
    Table 3, and the ``vf.eval.*`` metrics the promotion gates read) and its promotion history."""
    lines = ["### Lineage", ""]
    for depth, entry in enumerate(chain):
        step = "This version" if depth == 0 else f"Built on `{entry['model']}`"
        dirty = " (uncommitted changes)" if entry["git_dirty"] else ""
        lines += [
            f"**{step}** ({entry['kind']}, run `{entry['source_run_id']}`)",
            "",
            f"- data: `{entry['data_path']}`, DVC md5 `{entry['data_md5']}` ({entry['data_source']}"
            + (f", remote `{entry['data_remote']}`" if entry["data_remote"] else "")
            + (f", {entry['data_shards']}" if entry.get("data_shards") else "") + ")",
            f"- validation: {entry['validation_suite']} **{'passed' if entry['validation_success'] else 'FAILED'}**"
            f" ([report]({report_link(entry)}))" + (f"; built from {entry['data_inputs']}" if entry["data_inputs"] else ""),
            f"- code: `{entry['git_commit'][:12]}`{dirty}; config sha256 `{entry['config_sha256'][:12]}`",
        ]
        if depth == 0 and learning:
            learned, verdict = learning
            lines.append(f"- training: **{'learned' if learned else 'did NOT learn'}**, "
                         f"{verdict.removeprefix('did not learn: ')}")
        if not entry["parent"].startswith("models:/"):
            lines.append(f"- parent: `{entry['parent']}`")
        if entry["teachers"]:
            lines.append(f"- distilled from: {', '.join(f'`{t}`' for t in entry['teachers'].split(','))}")
        if entry.get("tiling"):
            lines.append(f"- tiling (how predict cuts a new slide or series): `{entry['tiling']}`")
        if entry.get("annotations_proposed_by"):
            lines.append(f"- annotations proposed by {', '.join(f'`{m}`' for m in entry['annotations_proposed_by'].split(','))}"
                         ", corrected by annotators")
        lines.append("")
    if table:
        lines += [table, ""]
    if metrics:
        lines += ["### Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    else:
        lines += ["### Evaluation", "", "Not evaluated yet: `mlflow run . -e evaluate -P model=<this version>`."]
    if history:
        lines += ["", "### Promotion history", "", "| when (UTC) | what | who | why | gates passed |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['time'][:19].replace('T', ' ')} | {r['action']} to @{r['alias']}"
                  f"{' (from version ' + r['previous'] + ')' if r.get('previous') else ''} | {r.get('user', '')} | "
                  f"{str(r.get('reason', '')).replace('|', '/')} | {', '.join(r.get('gates', []))} |" for r in history]
    return "\n".join(lines)


def describe_version(client: MlflowClient, mv: ModelVersion, history: Sequence[dict] = ()) -> str:
    """Write the Markdown description of ``mv`` from its lineage, evaluation tags and promotion
    records (``registry.audit``'s, this version's); returns it."""
    run_tags = client.get_run(mv.run_id).data.tags if mv.run_id else {}
    learning = (run_tags.get(Tag.LEARNED) == "true", run_tags[Tag.LEARNING]) if Tag.LEARNING in run_tags else None
    text = markdown_description(lineage_chain(client, version_uri(mv)), evaluation_metrics(mv.tags), history,
                                mv.tags.get(Tag.EVALUATION_TABLE, ""), learning)
    client.update_model_version(mv.name, mv.version, description=text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a registered model's lineage back to its data")
    parser.add_argument("model", help="models:/<name>/<version> or models:/<name>@<alias>")
    parser.add_argument("--json", action="store_true", help="print the chain as JSON")
    args = parser.parse_args(argv)

    def show() -> None:
        chain = lineage_chain(MlflowService().client, args.model)
        print(json.dumps(chain, indent=2) if args.json else format_chain(chain))

    return run_command("lineage", show, also=(MlflowException,))


if __name__ == "__main__":
    sys.exit(main())
