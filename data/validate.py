"""Validate an image-folder dataset with a Great Expectations suite before anything trains on it.

A failing suite exits non-zero (so ``dvc repro`` stops) and leaves a JSON report naming each
failing expectation and the files that broke it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from data.metadata import image_folder_metadata

SUITE_NAME = "image_tiles"
logging.getLogger("great_expectations").setLevel(logging.ERROR)


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


def tile_expectations(image_size: int, channels: int) -> list[gxe.Expectation]:
    mode = "RGB" if channels == 3 else "L"
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="path"),
        gxe.ExpectColumnValuesToBeInSet(column="is_image_file", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"]),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=[mode]),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[channels]),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=image_size, max_value=image_size),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=image_size, max_value=image_size),
        gxe.ExpectColumnValuesToBeInSet(column="has_nan", value_set=[False]),
        # A blank (constant) tile carries no signal and usually means a broken export.
        gxe.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=1.0),
    ]


def validate_frame(frame: pd.DataFrame, expectations: list[gxe.Expectation], dataset: str) -> ValidationReport:
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_definition = (
        context.data_sources.add_pandas("tiles")
        .add_dataframe_asset("metadata")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{SUITE_NAME}-check", data=batch_definition, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    )
    failures = []
    for r in result.results:
        if r.success:
            continue
        config = r.expectation_config
        details = r.result or {}
        files = [row["path"] for row in details.get("unexpected_index_list") or [] if isinstance(row, dict)]
        failures.append(
            Failure(
                expectation=config.type,
                column=config.kwargs.get("column"),
                unexpected_count=int(details.get("unexpected_count") or 0),
                files=files,
            )
        )
    return ValidationReport(
        suite=SUITE_NAME,
        dataset=dataset,
        success=bool(result.success),
        rows=len(frame),
        evaluated_expectations=len(result.results),
        failures=failures,
    )


def validate_image_folder(root: str | Path, image_size: int, channels: int = 3) -> tuple[ValidationReport, pd.DataFrame]:
    frame = image_folder_metadata(root)
    return validate_frame(frame, tile_expectations(image_size, channels), str(root)), frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate an image-folder dataset (Great Expectations)")
    parser.add_argument("--images", required=True, help="dataset root: <split>/<class>/<image>")
    parser.add_argument("--report-dir", required=True, help="where report.json and metadata.csv go")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    args = parser.parse_args(argv)
    report, frame = validate_image_folder(args.images, args.image_size, args.channels)
    out = Path(args.report_dir)
    report.write(out / "report.json")
    frame.to_csv(out / "metadata.csv", index=False)
    print(report.summary())
    return 0 if report.success else 1


if __name__ == "__main__":
    sys.exit(main())
