"""render_html(): one self-contained HTML page (inline SVG plots from matplotlib, no scripts, no external URLs)
for a compare_runs() dict: run headers, comparison tables, latency CDFs, efficiency, timelines, TTFT breakdown.
"""
from __future__ import annotations

import datetime
import io
import math

import jinja2
import matplotlib

matplotlib.use("Agg")   # headless SVG rendering; this module is the plotting backend (import it only for --html)
import matplotlib.pyplot as plt
from markupsafe import Markup
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from splitbench.metrics.compare import SECTIONS
from splitbench.render.plots import draw_ttft_uncached

POOL_ORDER = ("prompt", "token", "baseline", "mixed", "unallocated")
EST_HATCH = "//"
COLORS = plt.get_cmap("tab10").colors


def _color(i: int):
    return COLORS[i % len(COLORS)]


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def fmt_value(v) -> str:
    """Table formatting: '-' for missing, strings as given, numbers to ~4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a >= 1e4:
            return f"{v:,.0f}"
        if a == int(a) and a < 1e4:
            return f"{int(v)}"
        return f"{v:.4g}"
    return str(v)


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline in HTML


# ----------------------------------------------------------------------------- plots

def _latency_cdf_svg(runs: list[dict]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, (("ttft_s", "TTFT"), ("tbt_s", "TBT (per-token gaps)"), ("e2e_s", "E2E"))):
        drawn = False
        for i, run in enumerate(runs):
            c = ((run.get("series") or {}).get("cdf") or {}).get(key) or {}
            xs = [x * 1e3 for x in c.get("x", [])]
            if xs:
                ax.step(xs, c["p"], where="post", color=_color(i), label=run["label"], lw=1.6)
                drawn = drawn or any(x > 0 for x in xs)
        if drawn:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(_compact))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("ms (log scale)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend(loc="lower right", fontsize=8)
    return _svg(fig)


def _pools(runs: list[dict]) -> list[str]:
    seen = {p for r in runs for p in (((r.get("summary") or {}).get("efficiency") or {}).get("pools") or {})}
    return [p for p in POOL_ORDER if p in seen] + sorted(seen - set(POOL_ORDER) - {"total"}) + \
        (["total"] if "total" in seen else [])


def _compact(v, _=None) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _grouped_bars(ax, groups: list[str], runs: list[dict], value, estimated, annotate=None) -> None:
    """Bars: one group per entry of `groups`, one bar per run; value(run, k) -> float|None for group k."""
    n = max(1, len(runs))
    width = 0.8 / n
    for i, run in enumerate(runs):
        for g in range(len(groups)):
            v = value(run, g)
            if v is None:
                continue
            est = estimated(run, g)
            x = g - 0.4 + width * (i + 0.5)
            ax.bar(x, v, width, color=_color(i), hatch=EST_HATCH if est else None, edgecolor="white" if not est
                   else "black", linewidth=0.5)
            label = annotate(run, g) if annotate else None
            if est:
                label = (label + "\n" if label else "") + "est."
            if label:
                ax.text(x, v, label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.yaxis.set_major_formatter(FuncFormatter(_compact))
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.2)


def _efficiency_svg(runs: list[dict], iso_rows: list[dict]) -> tuple[str | None, bool]:
    """(svg or None when no run has efficiency data nor iso rows, whether any plotted figure is estimated)."""
    pools = _pools(runs)
    iso = [r for r in iso_rows if any(_num(v) is not None for v in r.get("values", []))]
    if not pools and not iso:
        return None, False

    def pool(run, p) -> dict:
        return (((run.get("summary") or {}).get("efficiency") or {}).get("pools") or {}).get(p) or {}

    def energy_est(run, p) -> bool:
        eff = (run.get("summary") or {}).get("efficiency") or {}
        return bool(pool(run, p).get("energy_estimated", eff.get("estimated", False)))

    any_est = False
    n_ax = (2 if pools else 0) + (1 if iso else 0)
    fig, axes = plt.subplots(1, n_ax, figsize=(4.6 * n_ax + 1, 3.8), squeeze=False)
    axes = list(axes[0])
    if pools:
        ax = axes.pop(0)
        usd = lambda r, k: _num(pool(r, pools[k]).get("output_tokens_per_usd"))
        cost_est = lambda r, k: usd(r, k) is not None and bool(((r.get("summary") or {}).get("efficiency") or {})
                                                               .get("cost_estimated"))
        _grouped_bars(ax, pools, runs, usd, cost_est)
        ax.set_title("output tokens per $")
        ax = axes.pop(0)
        kj = lambda r, p: None if _num(pool(r, p).get("tokens_per_j")) is None else pool(r, p)["tokens_per_j"] * 1e3
        _grouped_bars(ax, pools, runs, lambda r, k: kj(r, pools[k]),
                      lambda r, k: kj(r, pools[k]) is not None and energy_est(r, pools[k]))
        ax.set_title("tokens per kJ")
        any_est = any(kj(r, p) is not None and energy_est(r, p) for r in runs for p in pools) or \
            any(cost_est(r, k) for r in runs for k in range(len(pools)))
    if iso:
        ax = axes.pop(0)
        idx = {id(r): k for k, r in enumerate(runs)}

        def ratio(run, k):   # the row's own ratio against the first run (metrics.compare), never recomputed here
            return _num((iso[k].get("ratios") or [None] * len(runs))[idx[id(run)]])

        iso_est = lambda run, k: bool((iso[k].get("estimated") or [False] * len(runs))[idx[id(run)]])
        short = [(r.get("label") or r.get("metric", "")).replace(" output tok/s", "").replace(" (", "\n(")
                 for r in iso]
        _grouped_bars(ax, short, runs,
                      ratio, iso_est, annotate=lambda run, k: fmt_value(_num(iso[k]["values"][idx[id(run)]])))
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"iso-cost / iso-power (ratio vs {runs[0]['label']})")
        any_est = any_est or any(iso_est(run, k) for run in runs for k in range(len(iso)))
    handles = [Patch(color=_color(i), label=r["label"]) for i, r in enumerate(runs)]
    if any_est:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=EST_HATCH,
                             label="estimated (provisioned power / catalog estimates)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, -0.08))
    return _svg(fig), any_est


def _timeline_svg(runs: list[dict]) -> str:
    inst = [(i, iid, s) for i, r in enumerate(runs)
            for iid, s in ((r.get("series") or {}).get("instances") or {}).items() if s.get("t_s")]
    fig, axes = plt.subplots(1, 3 if inst else 1, figsize=(13 if inst else 6, 3.6), squeeze=False)
    axes = list(axes[0])
    ax = axes[0]
    for i, r in enumerate(runs):
        s = (r.get("series") or {}).get("inflight") or {}
        if s.get("t_s"):
            ax.step(s["t_s"], s["requests"], where="post", color=_color(i), label=r["label"], lw=1.4)
    ax.set_title("in-flight requests (client)")
    ax.set_xlabel("run time (s)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    if inst:
        has = lambda key: any(v is not None for _, _, s in inst for v in s.get(key) or [])
        queue_key = "waiting" if has("waiting") else "running"   # the stub serves no waiting gauge
        styles = ("-", "--", ":", "-.")
        per_run: dict[int, int] = {}
        for i, iid, s in inst:
            k = per_run[i] = per_run.get(i, -1) + 1
            lab = f"{runs[i]['label']} {iid}" + (f" ({s['pool']})" if s.get("pool") else "")
            for ax, key, scale in ((axes[1], queue_key, 1), (axes[2], "kv_usage", 100)):
                ys = [math.nan if v is None else v * scale for v in s.get(key) or []]
                ax.plot(s["t_s"], ys, styles[k % 4], color=_color(i), label=lab, lw=1.2)
        axes[1].set_title(f"{queue_key} requests per instance")
        axes[2].set_title("KV cache usage per instance (%)")
        if not has("kv_usage"):
            axes[2].text(0.5, 0.5, "no KV usage gauge scraped", ha="center", va="center",
                         transform=axes[2].transAxes)
            axes[2].set_xticks([])
            axes[2].set_yticks([])
        for ax in axes[1:]:
            ax.set_xlabel("run time (s)")
            ax.grid(True, alpha=0.3)
        axes[1].legend(fontsize=7)
    return _svg(fig)


def _ttft_uncached_svg(runs: list[dict]) -> str | None:
    fig, ax = plt.subplots(figsize=(8, 3.8))
    if not draw_ttft_uncached(ax, runs, COLORS):
        plt.close(fig)
        return None
    return _svg(fig)


def _breakdown_svg(runs: list[dict]) -> str | None:
    rows = [(i, r, (r.get("series") or {}).get("ttft_breakdown")) for i, r in enumerate(runs)]
    rows = [(i, r, b) for i, r, b in rows if b]
    if not rows:
        return None
    comps = rows[0][2]["components"]
    cmap = plt.get_cmap("Set2").colors
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(rows)))
    for y, (_, r, b) in enumerate(rows):
        left = 0.0
        for k, c in enumerate(comps):
            w = b["mean_s"][c] * 1e3
            ax.barh(y, w, left=left, color=cmap[k % len(cmap)], label=c if y == 0 else None, edgecolor="white")
            left += w
        ax.text(left, y, f"  mean TTFT {b['ttft_mean_s'] * 1e3:.1f} ms (n={b['requests']})", va="center",
                fontsize=8)
    ax.set_yticks(range(len(rows)), [r["label"] for _, r, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("mean time (ms)")
    ax.margins(x=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) < 3 else -0.2), ncol=3, fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig)


# ----------------------------------------------------------------------------- page

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;
color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td.m,th.m{text-align:left}.ratio{color:#666;font-size:.85em;margin-left:.4em}
.better{color:#137333}.worse{color:#b3261e}
.est{display:inline-block;background:#fff3cd;color:#7a5b00;border:1px solid #e0c060;border-radius:3px;
font-size:.75em;padding:0 .3em;margin-left:.3em}
.meas{display:inline-block;background:#e6f4ea;color:#137333;border:1px solid #9ccfa9;border-radius:3px;
font-size:.75em;padding:0 .3em;margin-left:.3em}
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.4em;vertical-align:middle}
figure{margin:1em 0;padding:.5em;border:1px solid #e5e5e5;border-radius:4px}
figure svg{max-width:100%;height:auto}figcaption{font-size:.9em;color:#444;margin-top:.4em}
.note{color:#555;font-size:.9em}
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">Created {{ created }}. Ratios are against the first run ({{ runs[0].label }}).</p>
<ul class="runs">
{% for r in runs %}<li><span class="swatch" style="background:{{ r.color }}"></span><b>{{ r.label }}</b>
 &middot; backend {{ r.backend }}{% if r.simulated %} &middot; <span class="est">simulated</span>{% endif %}
 &middot; workload {{ r.workload }} &middot; {{ r.run_dir }}
 {% if r.energy == "estimated" %}<span class="est">energy estimated (provisioned power, no measurement)</span>
 {% elif r.energy == "measured" %}<span class="meas">energy measured ({{ r.energy_method }})</span>{% endif %}</li>
{% endfor %}</ul>
{% if any_estimated %}<p class="note"><span class="est">estimated</span> marks figures derived from the
hardware catalog's provisioned power (no power measurement): energy = provisioned power &times; time.</p>{% endif %}
{% for n in notes %}<p class="note">{{ n }}</p>{% endfor %}
{% for sec in sections %}<h2>{{ sec.title }}</h2>
<table id="table-{{ sec.key }}"><thead><tr><th class="m">metric</th><th class="m">unit</th>
{% for r in runs %}<th>{{ r.label }}</th>{% endfor %}</tr></thead><tbody>
{% for row in sec.rows %}<tr><td class="m">{{ row.label }}</td><td class="m">{{ row.unit }}</td>
{% for c in row.cells %}<td>{{ c.value }}{% if c.ratio %}<span class="ratio {{ c.cls }}">&times;{{ c.ratio }}</span>{% endif %}
{% if c.est %}<span class="est">estimated</span>{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endfor %}
<h2>Plots</h2>
{% for f in figures %}<figure id="{{ f.id }}">{% if f.svg %}{{ f.svg }}{% else %}<p class="note">{{ f.text }}</p>{% endif %}
<figcaption>{{ f.caption }}{% if f.est %} <span class="est">estimated</span> hatched bars are estimates:
energy from provisioned power (no measurement), or cost from catalog figures marked as estimates.{% endif %}</figcaption></figure>
{% endfor %}
</body></html>
"""
_ENV = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)


def _cells(row: dict, n: int) -> list[dict]:
    vals = list(row.get("values") or []) + [None] * n
    if row.get("unit") == "s":  # latencies read better in ms
        vals = [v * 1e3 if _num(v) is not None else v for v in vals]
    ratios = list(row.get("ratios") or []) + [None] * n
    est = list(row.get("estimated") or []) + [False] * n
    out = []
    for i in range(n):
        r = _num(ratios[i])
        cls = ""
        if i > 0 and r is not None and r != 1.0 and row.get("better") in ("lower", "higher"):
            cls = "better" if (r > 1.0) == (row["better"] == "higher") else "worse"
        out.append({"value": fmt_value(vals[i]), "ratio": f"{r:.3g}" if i > 0 and r is not None else "",
                    "cls": cls, "est": bool(est[i]) and vals[i] is not None})
    return out


def _run_header(i: int, run: dict) -> dict:
    s = run.get("summary") or {}
    eff = s.get("efficiency") or {}
    energy = "" if not eff else ("estimated" if eff.get("estimated") else "measured")
    rgb = "#" + "".join(f"{round(c * 255):02x}" for c in _color(i)[:3])
    return {"label": run.get("label", f"run {i}"), "backend": run.get("backend") or (s.get("run") or {}).get("backend"),
            "simulated": run.get("simulated"), "workload": (s.get("run") or {}).get("workload") or "-",
            "run_dir": run.get("run_dir", ""), "energy": energy, "energy_method": eff.get("energy_method", ""),
            "color": rgb}


def render_html(comparison: dict) -> str:
    """The whole page for a compare_runs() dict (first run = reference for ratios); all text escaped."""
    runs = list(comparison.get("runs") or [])
    if not runs:
        raise ValueError("comparison has no runs")
    n = len(runs)
    rows = list(comparison.get("rows") or [])
    known = [k for k, _ in SECTIONS]
    sections = [{"key": k, "title": t, "rows": [r for r in rows if r.get("section") == k]} for k, t in SECTIONS]
    other = [r for r in rows if r.get("section") not in known]
    if other:
        sections.append({"key": "other", "title": "Other", "rows": other})
    for sec in sections:
        sec["rows"] = [{"label": r.get("label") or r.get("metric", ""),
                        "unit": "ms" if r.get("unit") == "s" else (r.get("unit") or ""),
                        "cells": _cells(r, n)} for r in sec["rows"]]
    sections = [s for s in sections if s["rows"]]
    headers = [_run_header(i, r) for i, r in enumerate(runs)]

    eff_svg, eff_est = _efficiency_svg(runs, [r for r in rows if r.get("section") == "iso"])
    bd_svg = _breakdown_svg(runs)
    labels = ", ".join(r["label"] for r in headers)
    figures = [
        {"id": "plot-latency-cdf", "svg": _latency_cdf_svg(runs),
         "caption": f"CDFs of TTFT, per-token TBT gaps and E2E latency (ok requests, log x) for {labels}."},
        {"id": "plot-efficiency", "svg": eff_svg, "est": eff_est,
         "text": "No run has hardware or cost information: no efficiency plot.",
         "caption": "Output tokens per dollar and tokens per kJ per pool and in total; iso-cost / iso-power "
                    "throughput relative to the first run (values on the bars)."},
        {"id": "plot-timeline", "svg": _timeline_svg(runs),
         "caption": "Requests in flight at the client over run time; waiting requests and KV cache usage per "
                    "instance from the scraped vLLM /metrics (when the run scraped them)."},
        {"id": "plot-ttft-breakdown", "svg": bd_svg,
         "text": "No run has router phase timestamps of split (prefill/decode) requests: no TTFT breakdown.",
         "caption": "Mean TTFT of split requests cut at the router's phase timestamps: client to router, router "
                    "queue, prefill (queue and compute on the prompt instance), handoff, KV transfer and decode "
                    "start, relay to client."},
        {"id": "plot-ttft-uncached", "svg": _ttft_uncached_svg(runs),
         "text": "No run has cached prompt token counts: no TTFT vs uncached tokens plot.",
         "caption": "TTFT against uncached prompt tokens (prompt minus the server's cached tokens): median per "
                    "log2 bin and the least-squares line TTFT = a + b x uncached tokens."},
    ]
    any_est = eff_est or any(h["energy"] == "estimated" for h in headers) or \
        any(any(r.get("estimated") or []) for r in rows)
    created = comparison.get("created_unix_s")
    if isinstance(created, (int, float)):
        created = datetime.datetime.fromtimestamp(created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    for f in figures:
        f["svg"] = Markup(f["svg"]) if f.get("svg") else None
    return _ENV.from_string(_TEMPLATE).render(
        title=f"splitbench compare: {labels}", created=created or "-", runs=headers, sections=sections,
        figures=figures, notes=comparison.get("notes") or [], any_estimated=any_est)

