"""Render a gate result (metrics.gate.evaluate): console table, Markdown for a CI job summary, JUnit XML, JSON."""
from __future__ import annotations

import json
import math
from xml.sax.saxutils import quoteattr

from rich.table import Table

_ICON = {"pass": "PASS", "regression": "REGRESSION", "improvement": "improved", "no-data": "NO DATA",
         "invalid": "INVALID"}


def _num(v, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    base = metric.rpartition("_")[0]
    if base in ("ttft", "tbt", "mean_tbt", "e2e", "norm"):
        return f"{v * 1e3:.2f} ms"
    return f"{v:.4g}"


def _diff(r: dict, v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v * 100:+.1f}%" if r["relative"] else _num(v, r["metric"]).replace(" ms", "ms")


def _tol(r: dict) -> str:
    return f"{r['tolerance'] * 100:g}%" if r["relative"] else _diff(r, r["tolerance"])


def rows(result: dict) -> list[list[str]]:
    return [[r["name"], r["better"], _num(r["baseline"], r["metric"]), _num(r["candidate"], r["metric"]),
             _diff(r, r["diff"]), f"[{_diff(r, r['ci_low'])}, {_diff(r, r['ci_high'])}]", _tol(r),
             _ICON[r["decision"]]] for r in result["rules"]]


HEAD = ["rule", "better", "baseline", "candidate", "change", "CI", "tolerance", "decision"]


def render_console(result: dict, console) -> None:
    failed = [p for p in result["preconditions"] if not p["ok"]]
    t = Table(title=f"gate: {result['verdict'].upper()} (CI {result['confidence']:.0%}, "
                    f"{result['bootstrap']} bootstrap resamples)")
    for h in HEAD:
        t.add_column(h, justify="left" if h in ("rule", "decision", "better") else "right")
    for row in rows(result):
        color = {"REGRESSION": "red", "PASS": "green", "NO DATA": "yellow"}.get(row[-1])
        t.add_row(*row[:-1], f"[{color}]{row[-1]}[/{color}]" if color else row[-1])
    console.print(t)
    for p in failed:
        console.print(f"[red]invalid[/red]: {p['run']}: {p['check']} = {_pv(p['value'])} (limit {p['limit']})"
                      + (f" - {p['why']}" if p.get("why") else ""), highlight=False)


def _pv(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def render_markdown(result: dict) -> str:
    """A CI job summary: verdict, the rule table, failed preconditions."""
    icon = {"pass": "✅", "regression": "❌", "invalid": "⚠️"}[result["verdict"]]
    out = [f"## {icon} splitbench gate: {result['verdict'].upper()}", "",
           f"Baseline: {', '.join(result['baseline'])} · candidate: {', '.join(result['candidate'])} · "
           f"{result['confidence']:.0%} bootstrap CI of the change ({result['bootstrap']} resamples); a regression "
           "needs the whole interval beyond the tolerance on the worse side.", "",
           "| " + " | ".join(HEAD) + " |", "|---|---|---:|---:|---:|---:|---:|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows(result)]
    bad = [p for p in result["preconditions"] if not p["ok"]]
    if bad:
        out += ["", "**Invalid comparison** (preconditions failed):", ""]
        out += [f"- {p['run']}: {p['check']} = {_pv(p['value'])} (limit {p['limit']})"
                + (f" — {p['why']}" if p.get("why") else "") for p in bad]
    return "\n".join(out) + "\n"


def render_junit(result: dict) -> str:
    """One <testcase> per rule and per failed precondition; regression = <failure>, invalid = <error>."""
    cases = []
    for r in result["rules"]:
        body = ""
        msg = (f"{r['metric']}: change {_diff(r, r['diff'])}, CI [{_diff(r, r['ci_low'])}, {_diff(r, r['ci_high'])}]"
               f", tolerance {_tol(r)}")
        if r["decision"] == "regression":
            body = f"<failure message={quoteattr(msg)} type=\"regression\"/>"
        elif r["decision"] == "no-data":
            body = f"<error message={quoteattr(msg)} type=\"no-data\"/>"
        cases.append(f'  <testcase classname="splitbench.gate" name={quoteattr(r["name"])}>{body}'
                     f"<system-out>{_esc(msg)}</system-out></testcase>")
    for p in result["preconditions"]:
        if not p["ok"]:
            msg = f"{p['run']}: {p['check']} = {_pv(p['value'])} (limit {p['limit']})"
            cases.append(f'  <testcase classname="splitbench.gate.preconditions" name={quoteattr(p["check"])}>'
                         f'<error message={quoteattr(msg)} type="invalid"/></testcase>')
    fails = sum(1 for r in result["rules"] if r["decision"] == "regression")
    errors = len(cases) - len(result["rules"]) + sum(1 for r in result["rules"] if r["decision"] == "no-data")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<testsuite name="splitbench-gate" tests="{len(cases)}" failures="{fails}" errors="{errors}">\n'
            + "\n".join(cases) + "\n</testsuite>\n")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=str)
