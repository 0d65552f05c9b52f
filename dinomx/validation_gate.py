"""Training refuses data whose validation failed, also when launched without the platform.

The data side writes its report as ``validation/report.json`` beside the dataset it checked
(``data/<name>/validation`` for ``data/<name>/tiles/...``, ``data/demo/validation`` for
``data/demo/images/...``); the engine reads only its verdict, so it needs nothing of ``data/``.
"""
from __future__ import annotations

import json
from pathlib import Path

from dinomx.errors import DataError

REPORT = Path("validation") / "report.json"
# How far above the training folder a report may sit (tiles/slices/train -> data/<name>/).
LEVELS = 4


class DataNotValidated(DataError):
    """The dataset's own validation report says it failed."""


def report_beside(data: str | Path) -> Path | None:
    """The nearest ``validation/report.json`` in ``data``'s folder or above it."""
    folder = Path(data).resolve()
    for candidate in [folder, *folder.parents][:LEVELS + 1]:
        if (candidate / REPORT).is_file():
            return candidate / REPORT
    return None


def check_validated(data: str | Path, skip: bool = False) -> Path | None:
    """The report found beside ``data``; raises ``DataNotValidated`` when it failed, unless ``skip``."""
    report = report_beside(data)
    if report is None or skip:
        return report
    try:
        verdict = json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        raise DataNotValidated(f"{report}: unreadable validation report ({exc}); rerun `dvc repro` (stage validate)") from None
    if verdict.get("success") is not True:
        failures = verdict.get("failures") or []
        named = ", ".join(f"{f.get('expectation')}({f.get('column') or 'table'})" for f in failures[:3])
        raise DataNotValidated(f"{data}: its validation report {report} failed ({len(failures)} expectation(s)"
                               f"{': ' + named if named else ''}); nothing trains on it. Fix the data and rerun "
                               "`dvc repro`, or pass --skip-validation-gate to train anyway (a model of it cannot "
                               "be promoted)")
    return report
