"""The result of validating a dataset, as the DVC stage writes it and training reads it back:
plain JSON, readable without loading Great Expectations."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Every suite parameter there is (``data.suites``), as ``data.validate`` takes them on its command
# line (``--tile-size`` ...): numbers, or a list of numbers.
SUITE_PARAMETERS = ("tile_size", "magnifications", "min_tissue")


@dataclass
class Failure:
    expectation: str
    column: str | None
    unexpected_count: int
    files: list[str]
    expected: str = ""  # the expectation's bounds or set, e.g. "min_value=-1024.0"
    observed: list = field(default_factory=list)  # the values of ``files``, in the same order


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
    # Inputs that ingestion left out as not images of the dataset: [{"source", "reason"}].
    skipped: list[dict] = field(default_factory=list)
    # Inputs that could not be read and were set aside (``--on-error quarantine``): [{"source", "reason"}].
    quarantined: list[dict] = field(default_factory=list)
    # Ingestion's counts (ingest.json): inputs, used, skipped, quarantined, images.
    ingest: dict = field(default_factory=dict)
    # A sharded dataset: shards, and how many were checked now or unchanged since (cached).
    shards: dict = field(default_factory=dict)
    # The suite's parameters (tile_size, magnifications, min_tissue): what the promotion service
    # validates the same data version with again before it vouches for a model trained on it.
    parameters: dict = field(default_factory=dict)

    def inputs_line(self) -> str:
        """What the dataset was built from, for a reviewer: "N inputs: U used, S skipped, Q quarantined"."""
        counts = self.ingest
        if not counts:
            return ""
        return (f"{counts.get('inputs')} inputs: {counts.get('used')} used, {counts.get('skipped')} skipped, "
                f"{counts.get('quarantined', 0)} quarantined")

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, path: str | Path) -> "ValidationReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> "ValidationReport":
        return cls(**{**data, "failures": [Failure(**f) for f in data["failures"]]})

    def summary(self) -> str:
        head = f"{self.suite} on {self.dataset}: {'PASSED' if self.success else 'FAILED'} ({self.rows} files)"
        lines = [head]
        for f in self.failures:
            values = [f"{name} = {value}" for name, value in zip(f.files, f.observed)] or f.files
            shown = ", ".join(values[:5]) + (f" (+{f.unexpected_count - 5} more)" if f.unexpected_count > 5 else "")
            expected = f" [expected {f.expected}]" if f.expected else ""
            lines.append(f"  - {f.expectation}({f.column or 'table'}){expected}: {f.unexpected_count} unexpected: {shown}")
        if self.ingest:
            lines.append(f"  built from {self.inputs_line()}")
        if partial := self.ingest.get("partial"):
            lines.append(f"  {len(partial)} series kept with gaps (ingest.json: partial): "
                         + "; ".join(f"{p['unit']} without {len(p['set_aside'])} slice(s)" for p in partial[:5]))
        if self.shards:
            lines.append(f"  {self.shards['shards']} shard(s), each checked by itself: {self.shards['checked']} now, "
                         f"{self.shards['cached']} unchanged since their last check; md5 read for "
                         f"{self.shards.get('hashed', 0)}, the others' remembered by size and time (--verify reads all)")
        for entries, what in ((self.skipped, "skipped at ingestion (skipped.csv)"),
                              (self.quarantined, "quarantined at ingestion (refused.csv)")):
            if entries:
                reasons = Counter(s["reason"] for s in entries)
                lines.append(f"  {len(entries)} input(s) {what}: "
                             + "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(5)))
        return "\n".join(lines)


# Files a merged failure names; its count stays the true number.
FILES_SHOWN = 1000


def merge_reports(reports: list[ValidationReport], suite: str, dataset: str) -> ValidationReport:
    """One report of parts checked separately (the shards of a dataset): the failures of one
    expectation on one column are one failure naming the files of every part."""
    merged: dict[tuple, Failure] = {}
    for report in reports:
        for f in report.failures:
            key = (f.expectation, f.column, f.expected)
            if key not in merged:
                merged[key] = Failure(f.expectation, f.column, 0, [], f.expected, [])
            into = merged[key]
            into.unexpected_count += f.unexpected_count
            room = FILES_SHOWN - len(into.files)
            into.files += f.files[:room]
            into.observed += f.observed[:room]
    return ValidationReport(suite=suite, dataset=dataset, success=all(r.success for r in reports),
                            rows=sum(r.rows for r in reports),
                            evaluated_expectations=max((r.evaluated_expectations for r in reports), default=0),
                            failures=list(merged.values()))
