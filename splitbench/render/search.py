"""render_search_html(): one self-contained HTML page for a search.json dict: capacity per configuration with CI bars
(and the simulator's prediction), latency vs load per configuration, Pareto of tokens/s per user vs per machine.
Rendering only: every number comes from the dict (render/html.py's SVG and formatting helpers)."""
from __future__ import annotations

import datetime

import jinja2
import matplotlib.pyplot as plt
from markupsafe import Markup

from splitbench.render.html import _color, _svg, fmt_value


def _capacity_svg(result: dict) -> str | None:
    rows = [(s["label"], s["capacity"]) for s in result["searches"]]
    preds = {p["label"]: p["capacity"] for p in result.get("predictions") or []}
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.8))
    width = 0.38 if preds else 0.6
    for k, (label, c) in enumerate(rows):
        for j, (cap, name) in enumerate(((c, "measured"), (preds.get(label), "predicted"))):
            if cap is None or cap.get("rps") is None:
                continue
            x = k + (j - 0.5) * width if preds else k
            lo, hi = cap.get("ci_lo_rps"), cap.get("ci_hi_rps")
            err = [[cap["rps"] - lo], [hi - cap["rps"]]] if lo is not None and hi is not None else None
            ax.bar(x, cap["rps"], width, color=_color(j), label=name if k == 0 or name not in
                   ax.get_legend_handles_labels()[1] else None, yerr=err, capsize=4)
            ax.text(x, cap["rps"], fmt_value(cap["rps"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows])
    ax.set_ylabel("capacity (req/s meeting the SLOs)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _latency_svg(result: dict) -> str | None:
    series = [(s, False) for s in result["searches"] if s["points"]] + \
        [(s, True) for s in result.get("predictions") or [] if s["points"]]
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("ttft_p99", "tbt_p99", "e2e_p99"), ("TTFT p99", "TBT p99", "E2E p99")):
        for i, (s, pred) in enumerate(series):
            pts = sorted((r["rate_rps"], r["latency"][key] * 1e3, r["passed"]) for r in s["points"]
                         if r["latency"].get(key) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if pred else "-", color=_color(i), lw=1.2,
                    label=f"{s['label']}{' (predicted)' if pred else ''}")
            for x, y, ok in pts:
                ax.plot(x, y, "o" if ok else "x", color=_color(i), ms=5)
        ax.set_title(title)
        ax.set_xlabel("offered load (req/s)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (o pass, x fail)")
    axes[0].legend(fontsize=7)
    return _svg(fig)


def _pareto_svg(result: dict) -> str | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for i, s in enumerate(result["searches"]):
        pts = [(r.get("per_user_tokens_per_s"), r.get("per_machine_tokens_per_s"), r["passed"]) for r in s["points"]]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        drawn = True
        for x, y, ok in pts:
            ax.plot(x, y, "o" if ok else "x", color=_color(i), ms=5, alpha=0.9 if ok else 0.5)
        front = [s["points"][k] for k in s.get("pareto") or []]
        front = sorted((r["per_user_tokens_per_s"], r["per_machine_tokens_per_s"]) for r in front
                       if r.get("per_user_tokens_per_s") is not None and r.get("per_machine_tokens_per_s") is not None)
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=_color(i), lw=1.4, label=s["label"])
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("tokens/s per user (1 / median TBT)")
    ax.set_ylabel("output tokens/s per machine")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f3f3f3}td.m,th.m{text-align:left}
.pass{color:#137333}.fail{color:#b3261e}.note{color:#555;font-size:.9em}
figure{margin:1em 0;padding:.5em;border:1px solid #e5e5e5;border-radius:4px}figure svg{max-width:100%;height:auto}
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">Created {{ created }}; status {{ status }}.{% if best %} Best configuration: <b>{{ best }}</b>.{% endif %}
SLOs: {{ slos }}.</p>
<h2>Capacity</h2>
<table id="table-capacity"><thead><tr>{% for h in cap_head %}<th{% if loop.first %} class="m"{% endif %}>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in cap_rows %}<tr>{% for c in row %}<td{% if loop.first %} class="m"{% endif %}>{{ c }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% if comparison %}<h2>Measured vs predicted</h2>
<table id="table-comparison"><thead><tr><th class="m">config</th><th>measured req/s</th><th>predicted req/s</th><th>error</th></tr></thead>
<tbody>{% for row in comparison %}<tr><td class="m">{{ row[0] }}</td><td>{{ row[1] }}</td><td>{{ row[2] }}</td><td>{{ row[3] }}</td></tr>
{% endfor %}</tbody></table>{% endif %}
<h2>Plots</h2>
{% for f in figures %}<figure id="{{ f.id }}">{% if f.svg %}{{ f.svg }}{% else %}<p class="note">{{ f.text }}</p>{% endif %}
<figcaption class="note">{{ f.caption }}</figcaption></figure>
{% endfor %}
<h2>Probes</h2>
{% for s in probe_sections %}<h3>{{ s.label }}</h3>
<table><thead><tr><th class="m">probe</th><th>rate</th><th>req/s</th><th>requests</th><th class="m">verdict</th>
<th>score</th><th>se</th><th class="m">failed</th></tr></thead><tbody>
{% for r in s.rows %}<tr><td class="m">{{ r.dir }}</td><td>{{ r.rate }}</td><td>{{ r.rps }}</td><td>{{ r.n }}</td>
<td class="m {{ 'pass' if r.passed else 'fail' }}">{{ 'pass' if r.passed else 'fail' }}{{ r.early }}</td>
<td>{{ r.score }}</td><td>{{ r.se }}</td><td class="m">{{ r.failed }}</td></tr>
{% endfor %}</tbody></table>{% endfor %}
</body></html>
"""
_ENV = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
CAP_HEAD = ("config", "capacity req/s", "CI lo", "CI hi", "stop", "probes", "out tok/s", "out tok/$", "tok/J")


def _probe_rows(s: dict) -> list[dict]:
    return [{"dir": r["dir"], "rate": fmt_value(r["rate"]), "rps": fmt_value(r["rate_rps"]), "n": r["requests"],
             "passed": r["passed"], "early": " (stopped early)" if r.get("early_stop") else "",
             "score": f"{r['score']:+.3f}", "se": f"{r['score_se']:.3f}", "failed": ", ".join(r.get("failed") or [])}
            for r in s["points"]]


def render_search_html(result: dict) -> str:
    """The whole page; all text escaped."""
    searches = [(s, False) for s in result["searches"]] + [(s, True) for s in result.get("predictions") or []]
    cap_rows = [[s["label"] + (" (predicted)" if pred else ""),
                 fmt_value(s["capacity"].get("rps")), fmt_value(s["capacity"].get("ci_lo_rps")),
                 fmt_value(s["capacity"].get("ci_hi_rps")), s["capacity"].get("stop") or "-",
                 s["capacity"].get("probes"), fmt_value(s["capacity"].get("output_tokens_per_s")),
                 fmt_value(s["capacity"].get("output_tokens_per_usd")), fmt_value(s["capacity"].get("tokens_per_j"))]
                for s, pred in searches]
    comparison = [[r["label"], fmt_value(r["measured_rps"]), fmt_value(r["predicted_rps"]),
                   "-" if r["error"] is None else f"{r['error']:+.1%}"] for r in result.get("comparison") or []]
    figures = [
        {"id": "plot-capacity", "svg": _capacity_svg(result), "text": "No capacity found.",
         "caption": "Capacity per configuration (the fitted boundary) with its bootstrap confidence interval; "
                    "beside it the simulator's prediction from the profile, when --predict ran."},
        {"id": "plot-latency-load", "svg": _latency_svg(result), "text": "No probes.",
         "caption": "p99 TTFT, TBT and E2E of every probe against its offered load, per configuration (dashed: "
                    "predicted)."},
        {"id": "plot-pareto", "svg": _pareto_svg(result), "text": "No probe has per-user and per-machine rates.",
         "caption": "Tokens/s per user (1 / median TBT) against output tokens/s per machine for every probe; the "
                    "line joins each configuration's Pareto front."},
    ]
    for f in figures:
        f["svg"] = Markup(f["svg"]) if f.get("svg") else None
    created = result.get("created_unix_s")
    created = datetime.datetime.fromtimestamp(created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") \
        if isinstance(created, (int, float)) else "-"
    spec = result.get("spec") or {}
    slos = ", ".join(x for x in (spec.get("slos"), "Splitwise's nine checks" if spec.get("splitwise_slo") else None)
                     if x) or "-"
    return _ENV.from_string(_TEMPLATE).render(
        title=f"splitbench search: {result['search_id']}", created=created, status=result.get("status"),
        best=result.get("best"), slos=slos, cap_head=CAP_HEAD, cap_rows=cap_rows, comparison=comparison,
        figures=figures, probe_sections=[{"label": s["label"] + (" (predicted)" if pred else ""),
                                          "rows": _probe_rows(s)} for s, pred in searches])
