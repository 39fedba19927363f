"""Render a comparison (metrics.compare.build_comparison): rich tables per section and one Markdown table.

Rendering only: values, ratios and "estimated" marks come from the comparison rows.
"""
from __future__ import annotations

from rich.table import Table

from splitbench.metrics.compare import SECTIONS


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit == "s":
        return f"{v * 1e3:.1f} ms"
    return f"{v:.4g}"


def _cell(row: dict, i: int, with_ratio: bool = True) -> str:
    text = _fmt(row["values"][i], row["unit"])
    if row["estimated"][i] and row["values"][i] is not None:
        text += "*"
    r = row["ratios"][i]
    if with_ratio and i > 0 and r is not None:
        text += f" ({r:.2f}x)"
    return text


def render_compare(comparison: dict, console) -> None:
    """Rich tables, one per section; '*' marks estimated figures; (Nx) is the ratio against the first run."""
    labels = [r["label"] for r in comparison["runs"]]
    for section, _ in SECTIONS:
        rows = [r for r in comparison["rows"] if r["section"] == section]
        if not rows:
            continue
        t = Table(title=f"{section} (ratio vs {labels[0]})" if len(labels) > 1 else section)
        t.add_column("metric", no_wrap=True)
        t.add_column("unit")
        for lab in labels:
            t.add_column(lab, justify="right")
        for r in rows:
            t.add_row(r["label"], "ms" if r["unit"] == "s" else r["unit"], *[_cell(r, i) for i in range(len(labels))])
        console.print(t)
    if any(any(r["estimated"]) for r in comparison["rows"]):
        console.print("* estimated (see notes)", markup=False)
    for n in comparison["notes"]:
        console.print(f"note: {n}", markup=False, highlight=False)


def render_compare_markdown(comparison: dict) -> str:
    labels = [r["label"] for r in comparison["runs"]]
    out = ["# splitbench compare", "", "| metric | unit | " + " | ".join(labels) + " |",
           "|---|---|" + "---:|" * len(labels)]
    for r in comparison["rows"]:
        out.append(f"| {r['label']} | {'ms' if r['unit'] == 's' else r['unit']} | "
                   + " | ".join(_cell(r, i) for i in range(len(labels))) + " |")
    out.append("")
    if any(any(r["estimated"]) for r in comparison["rows"]):
        out.append("\\* estimated (see notes)")
    out += [f"- {n}" for n in comparison["notes"]]
    return "\n".join(out) + "\n"
