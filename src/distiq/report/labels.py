"""Where to put the labels of a scatter plot so that none overlaps another label or a marker.

Pure geometry in display pixels (x right, y up), no matplotlib: the plot measures each label's
text, passes the sizes here and draws the labels where this module says, with a leader line when
a label had to move away from its point.

- :func:`cluster` groups points whose markers touch: their labels become one label listing all
  of them, since a reader cannot tell such markers apart anyway.
- :func:`place` puts each label, in order, at the free position nearest its point: beside it
  (right, then left), above or below, then further away — never over a placed label, never over
  a marker, never nearer another point than its own (or close to one when it had to move away
  on a leader line), always inside the bounds. A label with no free position gets ``None``; the
  plot then grows and tries again.
"""

from __future__ import annotations

import math

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in pixels, ``x0 <= x1`` and ``y0 <= y1``."""


def overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share any area (touching edges do not count)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(box: Box, bounds: Box) -> bool:
    return (
        box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2] and box[3] <= bounds[3]
    )


def cluster(points: list[tuple[float, float]], radius: float) -> list[list[int]]:
    """Indices of ``points`` grouped by single linkage: two points closer than ``radius`` pixels
    are in one group. Groups keep the input order (of their first member, and within)."""
    parent = list(range(len(points)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (xi, yi) in enumerate(points):
        for j in range(i):
            xj, yj = points[j]
            if math.hypot(xi - xj, yi - yj) < radius:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(points)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda group: group[0])


def _candidates(
    anchor: tuple[float, float], size: tuple[float, float], gap: float, bounds: Box
) -> list[Box]:
    """Positions for a label of ``size`` around ``anchor``, nearest first: columns beside the
    point (right, left, centred) at growing distances, each at rows half a label high apart."""
    x, y = anchor
    width, height = size
    row = max(height / 2, 4.0)
    column = max(gap * 2, 8.0)
    columns = int((bounds[2] - bounds[0]) / column) + 1
    boxes: list[tuple[float, int, Box]] = []
    lefts = [x - width / 2]
    for step in range(columns):
        lefts += [x + gap + step * column, x - gap - width - step * column]
    middle = y - height / 2  # the bottom of a label centred on the point
    k_low = math.ceil((bounds[1] - middle) / row)
    k_high = math.floor((bounds[3] - height - middle) / row)
    for left in lefts:
        if left < bounds[0] or left + width > bounds[2]:
            continue
        for k in range(k_low, k_high + 1):
            bottom = middle + k * row
            box = (left, bottom, left + width, bottom + height)
            dx = max(box[0] - x, 0.0, x - box[2])
            dy = max(box[1] - y, 0.0, y - box[3])
            # prefer beside (right first) over above/below at the same distance
            tie = 0 if left > x else 1 if box[2] < x else 2
            boxes.append((math.hypot(dx, dy) * 10 + tie, abs(k), box))
    boxes.sort(key=lambda item: item[:2])
    return [box for _, _, box in boxes]


def place(
    anchors: list[tuple[float, float]],
    sizes: list[tuple[float, float]],
    points: list[tuple[float, float]],
    owners: list[int],
    bounds: Box,
    marker: float = 6.0,
    clearance: float = 14.0,
) -> list[Box | None]:
    """A box for each label (``sizes[i]`` = (width, height) of the label of ``anchors[i]``), in
    order, such that no two boxes overlap, every box lies inside ``bounds``, no box comes within
    ``marker`` pixels of a point (``points``; ``owners[j]`` is the label of point ``j``), and a
    box stays clear of every other label's points: at least ``clearance`` pixels away, or
    farther than from its own anchor, so that the nearest marker to a label is its own. ``None``
    for a label that found no such place."""
    placed: list[Box] = []
    out: list[Box | None] = []
    for index, (anchor, size) in enumerate(zip(anchors, sizes, strict=True)):
        chosen = None
        for box in _candidates(anchor, size, marker, bounds):
            if any(overlap(box, other) for other in placed):
                continue
            keep_off = max(marker, min(distance(anchor, box) + 3, clearance))
            if all(
                distance(point, box) >= (marker if owner == index else keep_off)
                for point, owner in zip(points, owners, strict=True)
            ):
                chosen = box
                break
        out.append(chosen)
        if chosen is not None:
            placed.append(chosen)
    return out


def distance(anchor: tuple[float, float], box: Box) -> float:
    """Pixels from ``anchor`` to the nearest point of ``box`` (0 inside it)."""
    dx = max(box[0] - anchor[0], 0.0, anchor[0] - box[2])
    dy = max(box[1] - anchor[1], 0.0, anchor[1] - box[3])
    return math.hypot(dx, dy)
