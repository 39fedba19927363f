"""Console tables of a search.json dict: capacity per configuration (CI, stop reason, efficiency at the best passing
probe), every probe of a single search, and measured vs predicted capacity. Rendering only."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _g(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _cap(c: dict) -> str:
    if c.get("censored") == "above":
        return f"> {_g(c['bracket_rps'][0])}"
    if c.get("censored") == "below":
        return f"< {_g(c['bracket_rps'][1])}"
    return _g(c.get("rps"))


def capacity_table(result: dict) -> Table:
    t = Table(title=f"capacity: highest rate meeting the SLOs ({result['search_id']}"
                    f"{', simulated' if result.get('simulated') else ''})")
    for name in ("config", "req/s", "CI (req/s)", "rate scale", "stop", "probes", "out tok/s", "out tok/$",
                 "tok/J", "req/s per $/h", "req/s per kW"):
        t.add_column(name, justify="left" if name in ("config", "stop") else "right")
    for s in result["searches"]:
        c = s["capacity"]
        best = " *" if result.get("best") == s["label"] and len(result["searches"]) > 1 else ""
        t.add_row(s["label"] + best, _cap(c), f"{_g(c.get('ci_lo_rps'))} - {_g(c.get('ci_hi_rps'))}",
                  _g(c.get("rate_scale")), str(c.get("stop") or "-"), str(c.get("probes")),
                  _g(c.get("output_tokens_per_s")), _g(c.get("output_tokens_per_usd")),
                  _g(c.get("tokens_per_j")) + ("*" if c.get("energy_estimated") else ""),
                  _g(c.get("rps_per_usd_per_hour")), _g(c.get("rps_per_kw")))
    return t


def probes_table(s: dict) -> Table:
    t = Table(title=f"{s['label']}: probes")
    for name in ("probe", "rate", "req/s", "requests", "verdict", "score +- se", "ttft p99 ms", "tbt p99 ms",
                 "e2e p99 ms", "failed checks"):
        t.add_column(name, justify="left" if name in ("probe", "verdict", "failed checks") else "right")
    for r in s["points"]:
        verdict = ("[green]pass[/green]" if r["passed"] else "[red]fail[/red]") + \
            (" (stopped early)" if r.get("early_stop") else "")
        lat = r.get("latency") or {}
        t.add_row(r["dir"], _g(r["rate"], ".4g"), _g(r["rate_rps"]), str(r["requests"]), verdict,
                  f"{r['score']:+.3f} +- {r['score_se']:.3f}", _ms(lat.get("ttft_p99")), _ms(lat.get("tbt_p99")),
                  _ms(lat.get("e2e_p99")), ", ".join(r.get("failed") or []) or "-")
    return t


def comparison_table(result: dict) -> Table:
    t = Table(title="measured vs predicted (simulator from the profile)")
    for name in ("config", "measured req/s", "measured CI", "predicted req/s", "predicted CI", "error"):
        t.add_column(name, justify="left" if name == "config" else "right")
    for row in result["comparison"]:
        m, p = row["measured_ci_rps"], row["predicted_ci_rps"]
        t.add_row(row["label"], _g(row["measured_rps"]), f"{_g(m[0])} - {_g(m[1])}", _g(row["predicted_rps"]),
                  f"{_g(p[0])} - {_g(p[1])}", "-" if row["error"] is None else f"{row['error']:+.1%}")
    return t


def render_search(result: dict, console: Console) -> None:
    """Every table of a search result."""
    console.print(capacity_table(result))
    if len(result["searches"]) == 1:
        console.print(probes_table(result["searches"][0]))
    if result.get("comparison"):
        console.print(comparison_table(result))
    if len(result["searches"]) > 1 and result.get("best"):
        console.print(f"best configuration: {result['best']} (highest capacity)", markup=False, highlight=False)
