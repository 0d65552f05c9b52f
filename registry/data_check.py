"""The training data a promotion vouches for: validated again by the promotion service itself.

A version's lineage names the DVC version of the data it was trained on and says the data passed
its suite, and the researcher who trained it wrote both. Before an alias moves, the promotion
service fetches that data version from the platform's DVC remote (the default remote of its own
checkout, not the one the lineage names), checks every object against its md5 on the way, and runs
the suite (``data.validate``) on it with the parameters the lineage declares. The verdict goes into
the promotion ledger under the data's md5, the folder, the suite and its parameters, so a data
version is fetched and validated once however many models are trained on it.

    python -m registry.data_check models:/demo-backbone/3    # ahead of a promotion of big data
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from tempfile import TemporaryDirectory

from dvc.exceptions import DvcException
from dvc.repo import Repo
from mlflow.entities.model_registry import ModelVersion

from data.report import SUITE_PARAMETERS, ValidationReport
from dinomx.errors import UserError, run_command
from registry.evidence import last_words, run_module
from registry.ledger import Entry, Ledger
from registry.lineage import Lineage, resolve_version, version_uri
from registry.mlflow_service import MlflowService

VALIDATION = "validation"
MD5 = re.compile(r"[0-9a-f]{32}")  # what DVC names an object by; anything else could name a path
FETCH_THREADS = 8
CHUNK = 1 << 20


class DataUnavailable(UserError, RuntimeError):
    """The data version cannot be fetched from the platform's remote as its md5 says it is, or the
    lineage does not say enough to validate it."""


@dataclass(frozen=True)
class DataCheck:
    """The promotion service's verdict on one data version under one suite."""

    data_md5: str
    dataset: str  # the folder validated, as the lineage names it
    suite: str
    parameters: dict
    success: bool
    rows: int
    failures: list[str]  # the report's lines, for a refusal and the ledger

    def same_question(self, other: "DataCheck") -> bool:
        return (self.data_md5, self.dataset, self.suite, self.parameters) == \
            (other.data_md5, other.dataset, other.suite, other.parameters)


def question(lineage: Lineage, uri: str) -> DataCheck:
    """What the lineage asks to be checked (``success`` not yet known); refuses a lineage that
    does not say which folder and parameters its data was validated with."""
    if not lineage.data_output or not lineage.validation_dataset or not lineage.validation_parameters:
        raise DataUnavailable(f"{uri}: the lineage does not name the data's DVC output, validated folder and suite "
                              "parameters (vf.data_output, vf.validation_dataset, vf.validation_parameters), which "
                              "the promotion service needs to validate the data itself; train it again")
    try:
        parameters = json.loads(lineage.validation_parameters)
    except json.JSONDecodeError:
        parameters = None
    # They become options of a command the promotion service runs: a suite's parameters and numbers
    # only, never another option (``{"dataset": ...}`` would point the check at another folder).
    if not isinstance(parameters, dict) or set(parameters) - set(SUITE_PARAMETERS) or \
            not all(_numbers(value) for value in parameters.values()):
        raise DataUnavailable(f"{uri}: vf.validation_parameters: expected a JSON object of {', '.join(SUITE_PARAMETERS)} "
                              f"(numbers), got {lineage.validation_parameters[:80]!r}")
    for inner, outer, what in ((lineage.data_path, lineage.validation_dataset, "the data it trained on"),
                               (lineage.validation_dataset, lineage.data_output, "the validated folder")):
        if not _inside(inner, outer):
            raise DataUnavailable(f"{uri}: {what} ({inner}) is not inside {outer}, which its lineage says holds it")
    return DataCheck(lineage.data_md5, lineage.validation_dataset, lineage.validation_suite, parameters, False, 0, [])


def _numbers(value) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)


def _inside(inner: str, outer: str) -> bool:
    inner_parts, outer_parts = PurePosixPath(inner).parts, PurePosixPath(outer).parts
    return ".." not in inner_parts and inner_parts[:len(outer_parts)] == outer_parts


def recorded(entries: list[Entry], asked: DataCheck) -> DataCheck | None:
    """The ledger's newest verdict on the same data, folder, suite and parameters."""
    for entry in reversed(entries):
        if entry.kind == VALIDATION:
            body = entry.body
            known = DataCheck(body["data_md5"], body["dataset"], body["suite"], body["parameters"], body["success"],
                              body["rows"], body["failures"])
            if known.same_question(asked):
                return known
    return None


def fetch(md5: str, subfolder: str, into: Path, repo: str | Path = ".") -> int:
    """Write the files under ``subfolder`` of the DVC directory ``md5`` into ``into`` (keeping their
    paths in it), from the default remote of the DVC repository at ``repo``, each checked against
    its md5 as it is read; returns how many files."""
    if not MD5.fullmatch(md5.removesuffix(".dir")):
        raise DataUnavailable(f"data version {md5[:80]!r}: not a DVC md5")
    if not md5.endswith(".dir"):
        raise DataUnavailable(f"data version {md5}: a single file, where a dataset is a folder")
    try:
        odb = Repo(str(repo)).cloud.get_remote_odb()
        where = odb.fs.unstrip_protocol(odb.path)
    except DvcException as exc:
        raise DataUnavailable(f"the promotion service's DVC repository ({Path(repo).resolve()}) has no remote to "
                              f"fetch data from: {exc}") from None
    try:
        manifest = odb.fs.cat_file(odb.oid_to_path(md5))
    except FileNotFoundError:
        raise DataUnavailable(f"data version {md5} is not in the platform's DVC remote {where}: `dvc push` it from "
                              "the checkout that trained on it") from None
    except OSError as exc:
        raise DataUnavailable(f"data version {md5}: the platform's DVC remote {where} did not answer "
                              f"({type(exc).__name__}: {exc})") from None
    if hashlib.md5(manifest).hexdigest() != md5.removesuffix(".dir"):
        raise DataUnavailable(f"data version {md5} in {where}: its file list does not hash to its md5 (the remote "
                              "was altered)")
    try:
        listed = [(str(entry["relpath"]), str(entry["md5"])) for entry in json.loads(manifest)]
    except (ValueError, TypeError, KeyError):
        listed = None
    if listed is None or not all(MD5.fullmatch(file_md5) for _, file_md5 in listed):
        raise DataUnavailable(f"data version {md5} in {where}: its file list is not DVC's")
    wanted = []
    for relpath, file_md5 in listed:
        path = PurePosixPath(relpath)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise DataUnavailable(f"data version {md5} in {where}: lists the path {relpath!r}, which leaves the dataset")
        if _inside(relpath, subfolder):
            wanted.append((path, file_md5))

    def copy(item: tuple[PurePosixPath, str]) -> None:
        path, file_md5 = item
        target = into.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5()
        try:
            with odb.fs.open(odb.oid_to_path(file_md5), "rb") as source, target.open("wb") as out:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as exc:
            raise DataUnavailable(f"data version {md5}: {path} ({file_md5}) cannot be read from {where}: "
                                  f"{type(exc).__name__}") from None
        if digest.hexdigest() != file_md5:
            raise DataUnavailable(f"data version {md5}: {path} in {where} does not hash to its md5 {file_md5} "
                                  "(the remote was altered)")

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        list(pool.map(copy, wanted))
    return len(wanted)


def run_validation(asked: DataCheck, output: str) -> DataCheck:
    """``asked``'s data fetched from the platform's remote into a temporary folder and validated
    there by ``data.validate``, in a process of its own."""
    subfolder = PurePosixPath(asked.dataset).relative_to(output).as_posix() if asked.dataset != output else ""
    with TemporaryDirectory(prefix="vf-data-check-") as tmp:
        data = Path(tmp, "data")
        fetch(asked.data_md5, subfolder, data)
        report_dir = Path(tmp, "report")
        done = run_module("data.validate", ["--dataset", str(data / subfolder), "--report-dir", str(report_dir),
                                            "--suite", asked.suite, "--context-root", str(Path(tmp, "context")),
                                            *_flags(asked.parameters)])
        if done.returncode not in (0, 1) or not (report_dir / "report.json").is_file():
            raise DataUnavailable(f"{asked.dataset} (md5 {asked.data_md5}) could not be validated by the promotion "
                                  f"service: {last_words(done)}")
        report = ValidationReport.read(report_dir / "report.json")
    return DataCheck(asked.data_md5, asked.dataset, asked.suite, asked.parameters, report.success, report.rows,
                     report.summary().splitlines()[1:])


def _flags(parameters: dict) -> list[str]:
    """``data.validate``'s options of the suite's parameters: ``{"min_tissue": 0.5}`` -> ``--min-tissue 0.5``."""
    flags = []
    for name, value in sorted(parameters.items()):
        flags += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return flags


def record(ledger: Ledger, check: DataCheck, uri: str) -> Entry:
    with ledger.exclusive() as appender:
        return appender.append({"kind": VALIDATION, "model": check.data_md5, "version": "", "alias": "",
                                **asdict(check), "asked_by": uri, "time": datetime.now(timezone.utc).isoformat()})


def vouch(ledger: Ledger, mv: ModelVersion) -> DataCheck:
    """The promotion service's verdict on the data ``mv`` was trained on: the ledger's, else
    fetched, validated and recorded now."""
    uri = version_uri(mv)
    lineage = Lineage.from_tags(mv.tags)
    asked = question(lineage, uri)
    if (known := recorded(ledger.entries(), asked)) is not None:
        return known
    check = run_validation(asked, lineage.data_output)
    record(ledger, check, uri)
    return check


def main(argv: list[str] | None = None) -> int:
    from registry.promote import ledger_of

    parser = argparse.ArgumentParser(description="Validate the data a version was trained on, as the promotion "
                                                 "service does, and record the verdict")
    parser.add_argument("model", help="models:/<name>/<version>")
    args = parser.parse_args(argv)

    def go() -> None:
        client = MlflowService().client
        mv = resolve_version(client, args.model)
        check = vouch(ledger_of(client), mv)
        print(f"{check.dataset} (md5 {check.data_md5}), {check.suite} {json.dumps(check.parameters)}: "
              f"{'PASSED' if check.success else 'FAILED'} ({check.rows} files)")
        for line in check.failures:
            print(line)

    return run_command("data_check", go)


if __name__ == "__main__":
    sys.exit(main())
