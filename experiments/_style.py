"""The one publication style of every experiment figure.

Single-column figures are ``SINGLE`` (3.4 in) wide, multi-panel ones
``DOUBLE`` (7 in); every text is at least 8 pt at that size; colours are the
Okabe–Ito colour-blind-safe palette; math is mathtext (``$\\lambda_i$``), never
raw Unicode. Legends sit outside the data (:func:`legend_right`,
:func:`legend_below`). :func:`save` writes a PNG (``DPI``) and a PDF side by side.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
from cycler import cycler

SINGLE = 3.4  # inches: one journal column
DOUBLE = 7.0  # inches: the full page width
DPI = 300
FONT_PT = 8.0

# Okabe & Ito (2008), "Color Universal Design": blue, vermilion, bluish green,
# orange, reddish purple, sky blue, yellow; black is reserved for theory curves.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#F0E442")
THEORY = "black"
MAX_CURVES = 6  # per panel

RC = {
    "font.size": FONT_PT,
    "axes.titlesize": FONT_PT + 1,
    "axes.labelsize": FONT_PT,
    "xtick.labelsize": FONT_PT,
    "ytick.labelsize": FONT_PT,
    "legend.fontsize": FONT_PT,
    "legend.title_fontsize": FONT_PT,
    "figure.titlesize": FONT_PT + 1,
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "legend.frameon": False,
    "mathtext.fontset": "dejavusans",
    "image.cmap": "viridis",
    "savefig.dpi": DPI,
    "pdf.fonttype": 42,  # TrueType in the PDF: editable text, no Type 3 fonts
    "figure.constrained_layout.use": True,
}


def styled(figure_fn: Callable) -> Callable:
    """Decorate a ``figure(results, path)`` function to draw and save under :data:`RC`."""

    @functools.wraps(figure_fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(RC):
            return figure_fn(*args, **kwargs)

    return wrapper


def subplots(ncols: int = 1, nrows: int = 1, *, height: float | None = None, **kwargs):
    """A figure of ``nrows × ncols`` panels: ``SINGLE`` wide for one panel, else ``DOUBLE``."""
    width = SINGLE if ncols == 1 else DOUBLE
    height = height if height is not None else 2.5 * nrows
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kwargs)


def legend_right(ax, **kwargs):
    """A legend to the right of ``ax``, outside its data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **kwargs)


def legend_below(fig, handles=None, labels=None, ncol: int = 3, **kwargs):
    """A figure legend under all panels (needs constrained layout, which :data:`RC` sets).

    Without ``handles``: every labelled artist of every panel, once per label.
    """
    if handles is None:
        found = {}
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                found.setdefault(label, handle)
        labels, handles = list(found), list(found.values())
    return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, **kwargs)


def save(fig, path: Path) -> tuple[Path, Path]:
    """Write ``fig`` as ``path`` with suffix ``.png`` (``DPI``) and ``.pdf``; close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = path.with_suffix(".png"), path.with_suffix(".pdf")
    fig.savefig(png, dpi=DPI)
    # pdf with a fixed creation date: reruns of the same results give the same bytes
    fig.savefig(pdf, metadata={"CreationDate": None})
    plt.close(fig)
    return png, pdf


def sci(x: float) -> str:
    """``x`` as a mathtext power of ten at one significant digit: ``'$3{\\times}10^{-5}$'``."""
    mantissa, exponent = f"{x:.0e}".split("e")
    power = f"10^{{{int(exponent)}}}"
    return f"${power}$" if mantissa == "1" else rf"${mantissa}{{\times}}{power}$"
