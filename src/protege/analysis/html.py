"""Self-contained HTML pages: inline CSS, figures embedded as base64 PNG, no script, no link out.

What the run report and ``protege compare`` are written with; a page opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b;
       max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 21px; margin: 36px 0 10px;
     border-bottom: 2px solid #e4e8ee; padding-bottom: 4px; } h3 { font-size: 16px; margin: 22px 0 6px; }
.meta { color: #5a6573; font-size: 13.5px; margin: 2px 0; }
nav { margin: 14px 0 8px; font-size: 14px; } nav a { margin-right: 14px; color: #2a5db0; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e4e8ee; text-align: right; white-space: nowrap; }
th { background: #f4f6f9; font-weight: 600; } td:first-child, th:first-child { text-align: left; }
tr.hl td { background: #f3f8ff; font-weight: 600; }
figure { margin: 10px 0 18px; } figure img { max-width: 100%; height: auto; border: 1px solid #eef0f3; }
figcaption { color: #5a6573; font-size: 13px; margin-top: 4px; max-width: 1000px; }
.note { background: #fff8e6; border-left: 4px solid #f0b429; padding: 8px 12px; font-size: 14px; margin: 10px 0; }
.row { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
code { background: #f4f6f9; padding: 1px 4px; border-radius: 3px; font-size: 13px; }
"""


def esc(text: Any) -> str:
    """``text`` as HTML-escaped string."""
    return html.escape(str(text), quote=True)


def missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: Any, digits: int = 2) -> str:
    """A share in [0, 1] as a percentage (``"96.10%"``), ``"—"`` when absent."""
    return "—" if missing(x) else f"{100 * float(x):.{digits}f}%"


def num(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals, ``"—"`` when absent."""
    return "—" if missing(x) else f"{float(x):.{digits}f}"


def count(x: Any) -> str:
    """An integer with thousands separators, ``"—"`` when absent."""
    return "—" if missing(x) else f"{int(x):,}"


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_scale(ax: Any) -> None:
    """A log y axis whose ticks read as plain numbers (0.5, 2, 10), not powers of ten.

    Minor ticks are labelled only as far as they fit: all of them within one decade, the 2s and 5s
    over up to two decades, none beyond (labels 0.06, 0.07, 0.08 would run into each other)."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _pos: int) -> str:
        if value <= 0:
            return ""
        low, high = ax.get_ylim()
        decades = math.log10(max(high, low) / max(min(high, low), 1e-300))
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
        if mantissa != 1 and (decades > 2 or (decades > 1 and mantissa not in (2, 5))):
            return ""
        return f"{value:g}"

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(label))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def figure(fig: Any, alt: str, caption: str | None = None, width: int | None = None) -> str:
    """A matplotlib figure as an embedded PNG ``<figure>`` (the figure is closed)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    size = f' style="width:{width}px"' if width else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}"{size}>{cap}</figure>'


def png_figure(png: bytes, alt: str, caption: str | None = None) -> str:
    """PNG bytes as an embedded ``<figure>``."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], highlight: Sequence[bool] | None = None
) -> str:
    """An HTML table; cells are escaped; ``highlight[i]`` marks row ``i``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="hl"' if highlight and highlight[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def note(text: str) -> str:
    """A highlighted remark (``text`` is HTML)."""
    return f'<p class="note">{text}</p>'


def page(title: str, header_html: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole page: title, header block, a table of contents and ``(id, heading, body_html)`` sections."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(heading)}</a>' for sid, heading, _ in sections)
    body = "".join(
        f'<section id="{esc(sid)}"><h2>{esc(heading)}</h2>{content}</section>'
        for sid, heading, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{header_html}<nav>{nav}</nav>{body}</body></html>\n"
    )
