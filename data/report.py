"""The result of validating a dataset, as the DVC stage writes it and training reads it back:
plain JSON, readable without loading Great Expectations."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Failure:
    expectation: str
    column: str | None
    unexpected_count: int
    files: list[str]


@dataclass
class ValidationReport:
    suite: str
    dataset: str
    success: bool
    rows: int
    evaluated_expectations: int
    failures: list[Failure] = field(default_factory=list)
    # Index of the Data Docs site holding this run's page (relative to the repository root when
    # the dataset is in one, so that the report, a DVC output, stays the same on every machine).
    data_docs: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, path: str | Path) -> "ValidationReport":
        data = json.loads(Path(path).read_text())
        data["failures"] = [Failure(**f) for f in data["failures"]]
        return cls(**data)

    def summary(self) -> str:
        head = f"{self.suite} on {self.dataset}: {'PASSED' if self.success else 'FAILED'} ({self.rows} files)"
        lines = [head]
        for f in self.failures:
            shown = ", ".join(f.files[:5]) + (f" (+{len(f.files) - 5} more)" if len(f.files) > 5 else "")
            lines.append(f"  - {f.expectation}({f.column or 'table'}): {f.unexpected_count} unexpected: {shown}")
        return "\n".join(lines)
