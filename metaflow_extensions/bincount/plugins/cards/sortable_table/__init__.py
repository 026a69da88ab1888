"""A Metaflow card type whose tables can be re-sorted in the page.

Metaflow 2.19's ``Table`` component is static, and its card front end has no
component for raw HTML, so a sortable table needs a card type of its own.
Metaflow finds this one because the bincount distribution installs the
``metaflow_extensions`` namespace package (pyproject.toml); the ``CARDS`` list
below is what it reads.

Use it like Metaflow's blank card, with ordinary ``Table`` components::

    @card(type="bincount_sortable_table", id="grid", options={"title": "Grid points"})
    @step
    def join(self, inputs):
        current.card["grid"].append(Table(rows, headers=headers))

Each table is rendered as plain HTML in its rows' given order; clicking a
column header sorts by that column, clicking it again reverses. A column whose
non-empty cells are all numbers sorts numerically; empty cells go last; ties
keep the given order. Log components (Metaflow's own card warnings) and
Markdown components (e.g. an error report) are shown as plain text.

The page is self-contained (inline CSS and a few lines of inline JavaScript,
nothing fetched), and every title, header and cell is HTML-escaped.
"""

import json
import math
from html import escape

# Imported from where metaflow.plugins.cards imports it: this module is loaded
# while Metaflow itself is still being imported.
from metaflow.plugins.cards.card_modules.card import MetaflowCard

CARD_TYPE = "bincount_sortable_table"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.4rem; margin: 0; }
.subtitle, .hint { color: #666; font-size: 0.85rem; }
.scroll { overflow-x: auto; margin: 1rem 0 2rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35rem 0.8rem; text-align: left; white-space: nowrap; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th[data-type="number"] { text-align: right; }
tbody tr:nth-child(even) { background: #f7f7f9; }
tbody tr:hover { background: #eef3fb; }
th { background: #f0f0f3; }
th button { all: unset; cursor: pointer; font-weight: 600; }
th button:focus-visible { outline: 2px solid #4c72b0; }
th button::after { content: " \\2195"; color: #aaa; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; color: #222; }
th[aria-sort="descending"] button::after { content: " \\25BC"; color: #222; }
pre { white-space: pre-wrap; background: #f7f7f9; padding: 0.8rem; }
"""

# Sorts the <tbody> rows of every table.sortable by the clicked header's column.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = table.querySelectorAll("thead th");
  headers.forEach(function (th, column) {
    th.querySelector("button").addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      var numeric = th.dataset.type === "number";
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var text = function (row) { return row.cells[column] ? row.cells[column].textContent.trim() : ""; };
      rows.sort(function (a, b) {
        var x = text(a), y = text(b);
        if (x === "" || y === "") return (x === "") - (y === "");  // empty cells last, either way
        var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y, undefined, {numeric: true});
        return (ascending ? order : -order) || a.dataset.order - b.dataset.order;  // ties: given order
      });
      headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


NUMBER_TH = ' data-type="number"'
NUMBER_TD = ' class="number"'


def cell_text(value) -> str:
    """A cell as text; a nested component (a dict) as its JSON."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "" if math.isnan(value) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def table_html(headers: list, rows: list) -> str:
    """One ``table.sortable``; ``data-type="number"`` marks the columns that sort numerically."""
    rows = [[cell_text(c) for c in row] for row in rows if row]
    width = max([len(headers)] + [len(row) for row in rows])
    headers = [cell_text(h) for h in headers] + [""] * (width - len(headers))
    rows = [row + [""] * (width - len(row)) for row in rows]
    numeric = []
    for k in range(width):
        filled = [row[k].strip() for row in rows if row[k].strip()]
        numeric.append(bool(filled) and all(is_number(t) for t in filled))
    head = "".join(f'<th{NUMBER_TH if numeric[k] else ""}><button type="button">{escape(h)}</button></th>'
                   for k, h in enumerate(headers))
    body = "\n".join(f'<tr data-order="{i}">'
                     + "".join(f'<td{NUMBER_TD if numeric[k] else ""}>{escape(t)}</td>' for k, t in enumerate(row))
                     + "</tr>" for i, row in enumerate(rows))
    return (f'<div class="scroll"><table class="sortable">\n<thead><tr>{head}</tr></thead>\n'
            f'<tbody>\n{body}\n</tbody>\n</table></div>')


def component_html(component) -> str:
    kind = component.get("type") if isinstance(component, dict) else None
    if kind == "section":  # Metaflow hands over the components appended in a step wrapped in one section
        return "\n".join(component_html(c) for c in component.get("contents") or [])
    if kind == "table":
        return table_html(component.get("columns") or [], component.get("data") or [])
    if kind in ("log", "markdown"):
        return f'<pre>{escape(str(component.get("data") or component.get("source") or ""))}</pre>'
    return f'<p class="hint">(A {escape(str(kind))} component: this card shows tables only.)</p>'


def page_html(title: str, subtitle: str, components: list) -> str:
    parts = "\n".join(component_html(c) for c in components) or '<p class="hint">No table was added.</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<p class="subtitle">{escape(subtitle)}</p>
<p class="hint">Click a column header to sort by it; click again to reverse.</p>
{parts}
<script>{SCRIPT}</script>
</body>
</html>
"""


class SortableTableCard(MetaflowCard):
    type = CARD_TYPE
    ALLOW_USER_COMPONENTS = True  # current.card[ID].append(Table(...)) reaches render() as dicts

    def __init__(self, options=None, components=None, graph=None, flow=None, **kwargs):
        self._title = str((options or {}).get("title") or "Table")
        self._components = components or []

    def render(self, task):
        return page_html(self._title, task.pathspec, self._components)


CARDS = [SortableTableCard]
