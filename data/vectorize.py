"""Label rasters to polygons and back, exactly, on pixel edges.

A pixel (column c, row r) is the square [c, c+1] x [r, r+1]: the convention of QuPath's GeoJSON
(level-0 pixel coordinates). ``polygons`` traces the boundary of each label's pixels along those
edges, so a polygon never cuts a pixel; ``fill`` paints a polygon back by its pixels' centres with
the even-odd rule, so ``fill(polygons(mask == c)) == (mask == c)`` holds to the pixel. Tiles of
one class next to each other become one polygon; a region enclosing another class gets a hole.
No GIS library is needed for either direction.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Ring = list[tuple[float, float]]


@dataclass(frozen=True)
class Polygon:
    exterior: Ring
    holes: tuple[Ring, ...] = ()

    def mapped(self, transform: Callable[[float, float], tuple[float, float]]) -> Polygon:
        return Polygon([transform(x, y) for x, y in self.exterior],
                       tuple([transform(x, y) for x, y in hole] for hole in self.holes))


def _edges(mask: np.ndarray) -> np.ndarray:
    """Directed boundary edges (x0, y0, x1, y1) of the True pixels, the region on the right of
    each (x to the right, y down): exterior rings run clockwise on screen, holes the other way."""
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    out = []
    for dy, dx, start, end in (
        (-1, 0, (0, 0), (1, 0)),   # top edge, heading right
        (0, 1, (1, 0), (1, 1)),    # right edge, heading down
        (1, 0, (1, 1), (0, 1)),    # bottom edge, heading left
        (0, -1, (0, 1), (0, 0)),   # left edge, heading up
    ):
        neighbour = padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx]
        rows, cols = np.nonzero(inside & ~neighbour)
        out.append(np.stack([cols + start[0], rows + start[1], cols + end[0], rows + end[1]], axis=1))
    return np.concatenate(out)


def _rings(edges: np.ndarray, width: int) -> list[np.ndarray]:
    """Edges linked into closed rings. Where two rings meet at a vertex (pixels touching only at
    a corner) the walk turns right, towards its own region, so regions are 4-connected."""
    stride = width + 2
    starts = edges[:, 1] * stride + edges[:, 0]
    ends = edges[:, 3] * stride + edges[:, 2]
    order = np.argsort(starts, kind="stable")
    first = np.searchsorted(starts[order], ends, "left")
    # A vertex starts one edge, or two where pixels touch at a corner: then the one heading to
    # the right of the arriving edge.
    choice = order[first]
    pinch = np.nonzero(np.searchsorted(starts[order], ends, "right") - first == 2)[0]
    if len(pinch):
        heading = edges[:, 2:] - edges[:, :2]
        right = np.stack([-heading[pinch, 1], heading[pinch, 0]], axis=1)
        other = order[first[pinch] + 1]
        second_is_right = (heading[other] == right).all(1)
        choice[pinch[second_is_right]] = other[second_is_right]
    following = choice.tolist()
    used = bytearray(len(edges))
    rings = []
    for begin in range(len(edges)):
        if used[begin]:
            continue
        members, current = [], begin
        while not used[current]:
            used[current] = 1
            members.append(current)
            current = following[current]
        rings.append(_corners(edges[members, :2]))
    return rings


def _corners(points: np.ndarray) -> np.ndarray:
    """The ring's corners only: a straight run of pixel edges is one side."""
    into, out = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    return points[into[:, 0] * out[:, 1] - into[:, 1] * out[:, 0] != 0]


def _area(ring: np.ndarray) -> int:
    """Twice the signed area (the shoelace sum); positive for exterior rings here (y down)."""
    xs, ys = ring.astype(np.int64).T
    return int(np.dot(xs, np.roll(ys, -1)) - np.dot(np.roll(xs, -1), ys))


def _region_pixel(ring: np.ndarray) -> tuple[int, int]:
    """(row, column) of the pixel on the region's side (the right) of the ring's first edge."""
    (x0, y0), (x1, y1) = ring[:2].tolist()
    dx, dy = int(np.sign(x1 - x0)), int(np.sign(y1 - y0))
    return int(np.floor(y0 + dy * 0.5 + dx * 0.5)), int(np.floor(x0 + dx * 0.5 - dy * 0.5))


def polygons(mask: np.ndarray) -> list[Polygon]:
    """The True pixels of a 2-D mask as polygons with holes, in pixel-edge coordinates: one per
    4-connected region, each hole with the region around it."""
    from scipy.ndimage import label  # the region a ring bounds, found by its pixels

    mask = np.asarray(mask, bool)
    if not mask.any():
        return []
    regions, _ = label(mask)
    exteriors, holes = {}, {}
    for ring in _rings(_edges(mask), mask.shape[1]):
        region, outer = int(regions[_region_pixel(ring)]), _area(ring) > 0
        ring = [(float(x), float(y)) for x, y in ring.tolist()]
        if outer:
            exteriors[region] = ring
        else:
            holes.setdefault(region, []).append(ring)
    return [Polygon(exterior, tuple(holes.get(region, ()))) for region, exterior in sorted(exteriors.items())]


def fill(rings: list[Ring], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside ``rings`` by the even-odd rule (an exterior and its holes),
    each ring in pixel-edge coordinates of a ``shape`` (rows, columns) raster."""
    height, width = shape
    out = np.zeros(shape, bool)
    segments = []
    for ring in rings:
        points = np.asarray(ring, dtype=np.float64)
        if len(points) >= 3:
            segments.append(np.concatenate([points, np.roll(points, -1, axis=0)], axis=1))
    if not segments:
        return out
    x0, y0, x1, y1 = np.concatenate(segments).T
    centres = np.arange(height) + 0.5
    # Half-open in y: a vertex on a row's centre line is counted once.
    crosses = (y0[None] <= centres[:, None]) != (y1[None] <= centres[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0[None] + (centres[:, None] - y0[None]) * (x1 - x0)[None] / (y1 - y0)[None]
    columns = np.arange(width) + 0.5
    for row in np.nonzero(crosses.any(1))[0]:
        xs = np.sort(at[row][crosses[row]])
        for left, right in zip(xs[0::2], xs[1::2]):
            out[row, (columns >= left) & (columns < right)] = True
    return out
