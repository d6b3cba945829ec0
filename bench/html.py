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
table.leaderboard { border-collapse: separate; border-spacing: 0; font-size: 12px; }
/* The table scrolls inside this box both ways, so the header sticks to the box's top and the
   first columns to its left (a box that scrolls only sideways would stop the header sticking). */
.scroll { overflow: auto; max-height: 80vh; border: 1px solid #ddd; }
table.leaderboard th, table.leaderboard td { border-right: 1px solid #ddd; border-bottom: 1px solid #ddd; padding: 3px 6px;
                                             white-space: nowrap; background: #fff; }
table.leaderboard th { background: #f0f2f5; cursor: pointer; position: sticky; top: 0; z-index: 2; user-select: none; }
table.leaderboard .pin { position: sticky; z-index: 1; box-shadow: inset -1px 0 #bbb; }
table.leaderboard th.pin { z-index: 3; }
.constants { font-size: 13px; } .constants code { background: #f0f2f5; padding: 0 3px; }
table.leaderboard th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.leaderboard th[aria-sort="descending"]::after { content: " \\25BC"; }
table.leaderboard td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.leaderboard tr:nth-child(even) td { background: #fafbfc; }
table.leaderboard tr.dense td { font-weight: 600; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #444; max-width: 1000px; }
.runs li { font-size: 13px; margin: 2px 0; } code { font-size: 12px; }
"""

# Click a header to sort by it; click again to reverse. Numbers sort as numbers (data-v holds the raw value;
# a budget's is its GMACs, so budgets sort by compute). Pinned columns sit where the ones before them end.
SCRIPT = """
document.querySelectorAll("table.leaderboard").forEach(function (table) {
  var left = 0;
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
    if (!th.classList.contains("pin")) { return; }
    Array.prototype.forEach.call(table.rows, function (r) { r.cells[col].style.left = left + "px"; });
    left += th.getBoundingClientRect().width;
  });
});
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


PINNED = ("run", "method", "budget")  # what names a row stays in view when the table is scrolled sideways


def split_constants(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """(the columns that vary, pinned ones first; {column: value} of those with one value in every
    row): constants are said once above the table instead of repeated in every row."""
    constant = {c: df[c].iloc[0] for c in df.columns
                if c not in PINNED and len(df) > 1 and df[c].map(repr).nunique() == 1}
    varying = df.drop(columns=list(constant))
    first = [c for c in PINNED if c in varying.columns]  # pinned columns lead, so they can stick at the left
    return varying[first + [c for c in varying.columns if c not in first]], constant


def _row(rec: dict, columns: list, pinned: list) -> str:
    cells = []
    for c in columns:
        text, sort_value, numeric = _cell(rec[c])
        if c == "budget" and "gmacs" in rec:  # budgets sort by the compute they give, not as text
            sort_value = _cell(rec["gmacs"])[1]
        classes = " ".join(k for k, on in (("num", numeric), ("pin", c in pinned)) if on)
        attrs = (f" class='{classes}'" if classes else "") + (f" data-v='{sort_value}'" if sort_value is not None else "")
        cells.append(f"<td{attrs}>{html.escape(text)}</td>")
    cls = " class='dense'" if rec.get("method") == DENSE else ""
    return f"<tr{cls}>{''.join(cells)}</tr>"


def table(df: pd.DataFrame, gmacs: pd.Series | None = None, table_id: str = "leaderboard") -> str:
    """The leaderboard; ``gmacs`` (per row) gives the budget column its sort value when the table
    itself has no gmacs column (it was constant)."""
    columns = list(df.columns)
    pinned = [c for c in columns if c in PINNED]
    head = "".join(f"<th scope='col'{' class=pin' if c in pinned else ''}>{html.escape(str(c))}</th>" for c in columns)
    records = df.to_dict(orient="records")
    if gmacs is not None:
        records = [{**r, "gmacs": g} for r, g in zip(records, gmacs)]
    rows = "".join(_row(rec, columns, pinned) for rec in records)
    return (f"<div class='scroll'><table class='leaderboard' id='{html.escape(table_id)}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")


def constants_list(constant: dict) -> str:
    items = ", ".join(f"{html.escape(str(k))} <code>{html.escape(_cell(v)[0])}</code>" for k, v in constant.items())
    return f"<p class='constants'>The same in every row: {items}.</p>" if constant else ""


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
    varying, constant = split_constants(board)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul class='runs'>{runs}</ul>"
        f"<h2>Leaderboard</h2><p>{html.escape(notes)} Click a column header to sort.</p>"
        f"{constants_list(constant)}{table(varying, board.get('gmacs'))}{extra}"
        f"<h2>Plots</h2>{figures}"
        f"<script>{SCRIPT}</script></body></html>\n"
    )
