"""``report.html``: one self-contained page (inline CSS, a small inline sort script, plots embedded as
base64 PNG), so it opens from disk, by mail or as a CI artifact with no server and no network."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

from methods import DENSE

from .plots import Plot

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table.leaderboard { border-collapse: collapse; font-size: 12px; width: 100%; }
.scroll { overflow-x: auto; }
table.leaderboard th, table.leaderboard td { border: 1px solid #ddd; padding: 3px 6px; white-space: nowrap; }
table.leaderboard th { background: #f0f2f5; cursor: pointer; position: sticky; top: 0; user-select: none; }
table.leaderboard th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.leaderboard th[aria-sort="descending"]::after { content: " \\25BC"; }
table.leaderboard td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.leaderboard tr:nth-child(even) td { background: #fafbfc; }
table.leaderboard tr.dense td { font-weight: 600; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #444; max-width: 1000px; }
.runs li { font-size: 13px; margin: 2px 0; } code { font-size: 12px; }
"""

# Click a header to sort by it; click again to reverse. Numbers sort as numbers (data-v holds the raw value).
SCRIPT = """
document.querySelectorAll("table.leaderboard").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(r) {
        var c = r.cells[col], v = c.getAttribute("data-v");
        return v === null ? {s: c.textContent} : {n: parseFloat(v), s: v};
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var cmp = (x.n !== undefined && y.n !== undefined) ? x.n - y.n : x.s.localeCompare(y.s, undefined, {numeric: true});
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _cell(value) -> tuple[str, str | None, bool]:
    """(text shown, sort value, is numeric)."""
    if isinstance(value, bool) or value is None:
        return ("" if value is None else str(value)), None, False
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        text = f"{value:,.4g}" if isinstance(value, float) else str(value)
        return text, repr(float(value)), True
    if isinstance(value, float):
        return "", None, False
    return str(value), None, False


def table(df: pd.DataFrame, table_id: str = "leaderboard") -> str:
    head = "".join(f"<th scope='col'>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for rec in df.to_dict(orient="records"):
        cells = []
        for c in df.columns:
            text, sort_value, numeric = _cell(rec[c])
            attrs = (f" class='num' data-v='{sort_value}'" if numeric else "")
            cells.append(f"<td{attrs}>{html.escape(text)}</td>")
        cls = " class='dense'" if rec.get("method") == DENSE else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f"<div class='scroll'><table class='leaderboard' id='{html.escape(table_id)}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def figure(plot: Plot, page_dir: Path) -> str:
    data = base64.b64encode(plot.png.read_bytes()).decode()
    rel_png = plot.png.relative_to(page_dir).as_posix()
    rel_svg = plot.svg.relative_to(page_dir).as_posix()
    return (f"<figure id='{plot.name}'><h3>{html.escape(plot.title)}</h3>"
            f"<img alt='{html.escape(plot.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(plot.caption)} Files: <a href='{rel_png}'>PNG</a>, "
            f"<a href='{rel_svg}'>SVG</a>.</figcaption></figure>")


def page(title: str, run_lines: list[str], notes: str, board: pd.DataFrame, plots: list[Plot], page_dir: Path, extra: str = "") -> str:
    """The report page; ``extra`` is HTML placed after the leaderboard (the counting sections)."""
    runs = "".join(f"<li>{line}</li>" for line in run_lines)
    figures = "".join(figure(p, page_dir) for p in plots)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul class='runs'>{runs}</ul>"
        f"<h2>Leaderboard</h2><p>{html.escape(notes)} Click a column header to sort.</p>{table(board)}{extra}"
        f"<h2>Plots</h2>{figures}"
        f"<script>{SCRIPT}</script></body></html>\n"
    )
