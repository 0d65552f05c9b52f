"""Per-category results as the paper's Table 3: sensitivity, specificity, PPV, NPV, F1 and accuracy
of each category, then each set's accuracy and Cohen's kappa; as Markdown (a model version's
description, a run's artifact) or as text (the console)."""
from __future__ import annotations

import math

from dinomx.evaluation import CATEGORY_METRICS

HEADERS = ("sensitivity", "specificity", "PPV", "NPV", "F1", "accuracy")


def _cell(metrics: dict[str, float], key: str) -> str:
    mean = metrics.get(key, metrics.get(f"{key}.mean"))
    if mean is None or math.isnan(mean):
        return "—"
    sd = metrics.get(f"{key}.sd")
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None and not math.isnan(sd) else "")


def table3(sets: dict[str, dict[str, float]], classes: list[str], weighted: bool) -> list[list[str]]:
    """Rows of the paper's Table 3: per set and category, sensitivity, specificity, PPV, NPV, F1 and
    accuracy; then each set's overall accuracy and Cohen's kappa."""
    rows = [["set", "category", *HEADERS]]
    for name, metrics in sets.items():
        for category in classes:
            rows.append([name, category, *(_cell(metrics, f"category.{category}.{m}") for m in CATEGORY_METRICS)])
        kappa = f"kappa{' (quadratic)' if weighted else ''} {_cell(metrics, 'category.kappa')}"
        rows.append([name, "all", "", "", "", "", kappa, _cell(metrics, "category.accuracy")])
    return rows


def markdown(rows: list[list[str]], title: str) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
