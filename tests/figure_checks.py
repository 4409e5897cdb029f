"""Checks of a drawn matplotlib figure that a reader would otherwise catch (shared by tests).

- :func:`panel_letters`: a figure of several data panels letters them (a), (b), …
  in reading order, in each panel's title.
- :func:`legend_matches_marks`: every line entry of every legend is drawn somewhere
  (same line style, marker and colour; a grey entry stands for a style in any
  colour), and one (colour, style, marker) key carries one meaning in the figure.
- :func:`no_hidden_series`: no drawn line lies wholly under a later one in the
  same panel (same points, same style, at least as wide), so every series is seen.
"""

from __future__ import annotations

import re

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

LETTER = re.compile(r"^\(([a-z])\)")


def _data_axes(fig) -> list:
    """Panels that hold data: lines, collections, patches or images (twins once, no colorbars)."""
    out = []
    for ax in fig.axes:
        has = ax.get_lines() or ax.collections or ax.patches or ax.images
        colorbar = ax.get_label() == "<colorbar>"
        twin = any(ax.bbox.bounds == o.bbox.bounds for o in out)
        if has and ax.get_visible() and not colorbar and not twin:
            out.append(ax)
    return out


def panel_letters(fig) -> list[str]:
    """Problems with the panel letters (empty when every data panel of ≥ 2 has its letter)."""
    axes = _data_axes(fig)
    if len(axes) < 2:
        return []
    fig.canvas.draw()
    order = sorted(axes, key=lambda ax: (-round(ax.get_position().y1, 2), ax.get_position().x0))
    found = []
    for ax in order:
        title = next((t for t in (ax.get_title(loc=w) for w in ("left", "center")) if t), "")
        m = LETTER.match(title.strip())
        found.append(m.group(1) if m else None)
    if None in found:
        return [f"a data panel without a '(a)'-style letter in its title: {found}"]
    want = [chr(ord("a") + i) for i in range(len(found))]
    return [] if found == want else [f"panel letters {found} are not {want} in reading order"]


def _marker(line: Line2D) -> str:
    m = line.get_marker()
    return "None" if m in (None, "", " ", "None", "none") else str(m)


def _style(line: Line2D) -> tuple:
    ls = line.get_linestyle()
    ls = "None" if ls in (None, "", " ", "None", "none") else ls
    return ls, _marker(line)


def _grey(color) -> bool:
    r, g, b, _ = to_rgba(color)
    return abs(r - g) < 1e-6 and abs(g - b) < 1e-6 and 0.2 < r < 0.9


def _legends(fig) -> list:
    return [leg for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg]


def legend_matches_marks(fig) -> list[str]:
    """Problems: a legend line entry drawn nowhere, or one key with two labels."""
    drawn = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_visible()]
    keys = {(to_rgba(ln.get_color()), *_style(ln)) for ln in drawn}
    problems, meaning = [], {}
    for leg in _legends(fig):
        for handle, text in zip(leg.legend_handles, leg.get_texts(), strict=True):
            if not isinstance(handle, Line2D):
                continue
            label, color, style = text.get_text(), to_rgba(handle.get_color()), _style(handle)
            if style == ("None", "None"):
                continue
            if _grey(handle.get_color()):
                ok = any(k[1:] == style for k in keys)
            else:
                ok = (color, *style) in keys
            if not ok:
                problems.append(f"legend entry {label!r} {style} is drawn nowhere in that colour")
            key = (color, *style)
            if meaning.setdefault(key, label) != label:
                problems.append(f"one mark {style} means both {meaning[key]!r} and {label!r}")
    return problems


def _points(ax, line: Line2D) -> np.ndarray:
    xy = np.column_stack([np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)])
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    return ax.transData.transform(xy) if len(xy) else xy


def _filled(line: Line2D) -> bool:
    face = line.get_markerfacecolor()
    return _marker(line) != "None" and face not in ("none", "None") and to_rgba(face)[3] > 0


def _covers(low: Line2D, high: Line2D) -> float | None:
    """Within how many pixels ``high`` hides a point of ``low``; ``None`` if it cannot."""
    if _style(low) == _style(high) and high.get_linewidth() >= low.get_linewidth():
        return 1.0  # a line of the same style on the same points
    if _marker(low) != "None" and _filled(high) and high.get_markersize() >= low.get_markersize():
        # a filled marker at least as large over each of low's marks (and low's line, if any,
        # has nowhere to show: one point, or its points all under the marks): hidden when
        # the centres are closer than the margin by which the upper mark is larger, + 1 pixel
        margin = (high.get_markersize() - low.get_markersize()) / 2 * high.figure.dpi / 72
        return margin + 1.0
    return None


def no_hidden_series(fig) -> list[str]:
    """Problems: a drawn line whose every point lies under a later line or mark of its panel."""
    fig.canvas.draw()
    problems = []
    for ax in fig.axes:
        # error-bar caps ('|', '_') may sit on each other; the bars' centres are checked
        lines = [ln for ln in ax.get_lines() if ln.get_visible() and _marker(ln) not in "|_"]
        for i, low in enumerate(lines):
            p = _points(ax, low)
            if not len(p) or (len(p) < 2 and _marker(low) == "None"):
                continue
            for high in lines[i + 1 :]:
                q, reach = _points(ax, high), _covers(low, high)
                if reach is None or not len(q):
                    continue
                gaps = np.min(np.linalg.norm(p[:, None] - q[None], axis=2), axis=1)
                if np.all(gaps <= reach) and (len(p) > 1 or _marker(low) != "None"):
                    problems.append(
                        f"{low.get_label()!r} is hidden under {high.get_label()!r} in one panel"
                    )
    return problems


def check(fig, letters: bool = True) -> list[str]:
    """All of the above (panel letters only where ``letters``)."""
    return [
        *(panel_letters(fig) if letters else []),
        *legend_matches_marks(fig),
        *no_hidden_series(fig),
    ]
