"""What each served version of a backbone was sent, over time: the drift watch's windows
(``serving.watch``: one MLflow run per served version) drawn with the promotion history beside."""
from __future__ import annotations

from datetime import datetime

from flask import Blueprint
from flask_login import login_required
from markupsafe import Markup, escape

from portal.views.registry import _known_shape, _registered, _versions
from portal.web import answer, mlflow
from registry.audit import trail as audit_trail
from registry.lineage import equals
from registry.mlflow_service import MONITORING_EXPERIMENT, Tag
from registry.promote import ledger_of

bp = Blueprint("monitoring", __name__)
# A name no registry could hold is a 404 before any store is asked, as on the registry's pages.
bp.url_value_preprocessor(_known_shape)
SERIES = ("drift.p_value", "drift.detected", "ood.fraction", "ood.mean_percentile", "window.size")
WIDTH, HEIGHT, PAD = 900, 240, 40
COLOURS = ("#1f4e79", "#2e8b57", "#8b4513", "#6a5acd", "#b8860b")


def _windows(client, run_id: str) -> list[dict]:
    """One row per window: its time and every series the watch logged for it."""
    rows: dict[int, dict] = {}
    for key in SERIES:
        for point in client.get_metric_history(run_id, key):
            rows.setdefault(point.step, {"step": point.step, "time": point.timestamp})[key] = point.value
    return [rows[step] for step in sorted(rows)]


@bp.get("/registry/<name>/monitoring")
@bp.get("/api/models/<name>/monitoring", endpoint="api_monitoring")
@login_required
def monitoring(name: str):
    client = mlflow().client
    _registered(name)
    entries = ledger_of(client).entries()
    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    watched = []
    for row in _versions(name, entries) if experiment else []:
        uri = f"models:/{name}/{row['version']}"
        for run in client.search_runs([experiment.experiment_id], equals(f"tags.`{Tag.MONITORED_MODEL}`", uri)):
            windows = _windows(client, run.info.run_id)
            watched.append({"version": row["version"], "run_id": run.info.run_id,
                            "reference_run": run.data.tags.get(Tag.REFERENCE_RUN, ""), "windows": windows,
                            "flagged": sum(w.get("drift.detected") == 1.0 for w in windows)})
    promotions = audit_trail(entries, name)
    body = {"name": name, "watched": watched, "promotions": promotions}
    return answer(body, "monitoring.html", **body, chart=_chart(watched, promotions))


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def _chart(watched: list[dict], promotions: list[dict]) -> Markup:
    """An SVG over time: each version's share of images out of distribution per window, flagged
    windows in red, promotions as labelled vertical lines."""
    moved = [(_ms(p["time"]), p) for p in promotions if p.get("time")]
    times = [w["time"] for v in watched for w in v["windows"]] + [at for at, _ in moved]
    if not times:
        return Markup("")
    start, end = min(times), max(times)
    span = max(end - start, 1)

    def x(ms: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * (ms - start) / span

    def y(fraction: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * fraction

    parts = [f'<svg id="watch" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="share of images out of distribution per window">',
             f'<line x1="{PAD}" y1="{y(0)}" x2="{WIDTH - PAD}" y2="{y(0)}" stroke="#888"/>',
             f'<line x1="{PAD}" y1="{y(0)}" x2="{PAD}" y2="{y(1)}" stroke="#888"/>',
             f'<text x="4" y="{y(1) + 4}" font-size="11">100%</text><text x="12" y="{y(0) + 4}" font-size="11">0%</text>']
    for ms, promotion in moved:
        at, label = x(ms), escape(f"v{promotion['version']} @{promotion['alias']}")
        parts.append(f'<line class="promotion" x1="{at:.1f}" y1="{y(1)}" x2="{at:.1f}" y2="{y(0)}" stroke="#999" '
                     f'stroke-dasharray="4 3"/><text x="{at + 3:.1f}" y="{PAD - 8}" font-size="11">{label}</text>')
    for index, version in enumerate(watched):
        colour = COLOURS[index % len(COLOURS)]
        points = [(x(w["time"]), y(w.get("ood.fraction", 0.0)), w.get("drift.detected") == 1.0) for w in version["windows"]]
        if points:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                         + " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points) + '"/>')
        parts += [f'<circle class="{"flagged" if flagged else "window"}" cx="{px:.1f}" cy="{py:.1f}" r="{4 if flagged else 2}" '
                  f'fill="{"#b00020" if flagged else colour}"/>' for px, py, flagged in points]
        parts.append(f'<text x="{WIDTH - PAD + 4}" y="{PAD + 14 * index}" font-size="11" fill="{colour}">'
                     f'{escape("v" + version["version"])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
