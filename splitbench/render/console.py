"""Render a summarize() dict: rich tables for the terminal and a small Markdown version.

Rendering only; every number comes from the summary dict.
"""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

LAT_ROWS = (("ttft", "ttft_s"), ("tbt", "tbt_s"), ("mean_tbt", "mean_tbt_s"), ("e2e", "e2e_s"),
            ("norm", "norm_s"))
STATS = ("mean", "p50", "p90", "p99", "max")


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _met(met, markup: bool = True) -> str:
    if met is None:
        return "-"
    if not markup:
        return "met" if met else "MISSED"
    return "[green]met[/green]" if met else "[red]missed[/red]"


def _header_lines(s: dict) -> list[str]:
    run = s.get("run") or {}
    keys = ("run_id", "status", "backend", "model", "workload", "requests_planned")
    parts = [f"{k}={run[k]}" for k in keys if run.get(k) not in (None, "", {})]
    c = s["counts"]
    err = c["error_rate"]
    return [" ".join(parts) or "(no run metadata)",
            f"requests: {c['total']} total, {c['attempted']} attempted, {c['ok']} ok, {c['failed']} failed"
            + (f" (error rate {err:.2%})" if err is not None else "")]


EFF_COLS = (("machines", "machines", ".3g"), ("$/h", "usd_per_hour", ".3g"), ("cost $", "cost_usd", ".3g"),
            ("kJ", "energy_j", None), ("out tok/$", "output_tokens_per_usd", ".3g"),
            ("$/Mtok", "usd_per_million_tokens", ".3g"), ("tok/J", "tokens_per_j", ".3g"))


def efficiency_rows(eff: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-pool cost/energy table; energy cells carry "est." when estimated."""
    rows = []
    for pool, d in eff["pools"].items():
        cells = [pool]
        for _, key, fmt in EFF_COLS:
            v = d.get(key)
            if key == "energy_j":
                cells.append("-" if v is None else f"{v / 1e3:.3g}" + ("*" if d["energy_estimated"] else ""))
            else:
                cells.append(_num(v, fmt))
        rows.append(cells)
    return ["pool"] + [c for c, _, _ in EFF_COLS], rows


def efficiency_note(eff: dict) -> str:
    """The energy method line under the cost/energy table."""
    return (("* " if eff["estimated"] else "") + f"energy: {eff['energy_method']} - {eff['energy_note']}; "
            f"window {_num(eff['window_s'], '.1f')} s"
            + (f"; sample coverage {eff['energy_coverage']:.1%}" if eff.get("energy_coverage") is not None else ""))


def _table(title: str, *cols: tuple[str, str]) -> Table:
    """A table with (name, justify) columns."""
    t = Table(title=title)
    for name, justify in cols:
        t.add_column(name, justify=justify)
    return t


def _latency(s: dict, console: Console) -> None:
    t = _table("Latency (ms, ok requests)", ("metric", "left"), ("n", "right"), *[(st, "right") for st in STATS])
    for label, key in LAT_ROWS:
        d = s["latency"][key]
        t.add_row(label, str(d["count"]), *[_ms(d[st]) for st in STATS])
    console.print(t)


def _throughput(s: dict, console: Console) -> None:
    th = s["throughput"]
    t = _table("Throughput", ("quantity", "left"), ("value", "right"))
    t.add_row("window (s)", _num(th["window_s"]))
    t.add_row("requests/s", _num(th["requests_per_s"]))
    t.add_row("input tokens/s", _num(th["input_tokens_per_s"], ".1f"))
    t.add_row("output tokens/s", _num(th["output_tokens_per_s"], ".1f"))
    console.print(t)


def _statuses(s: dict, console: Console) -> None:
    c = s["counts"]
    t = _table("Requests by status", ("status", "left"), ("count", "right"))
    for status, n in c["by_status"].items():
        t.add_row(status if status == "ok" else f"[red]{status}[/red]", str(n))
    t.add_row("error rate", "-" if c["error_rate"] is None else f"{c['error_rate']:.2%}")
    console.print(t)


def _slos(s: dict, console: Console) -> None:
    slo = s["slos"]
    if not slo["items"]:
        return
    t = _table("SLOs", ("slo", "left"), ("value (ms)", "right"), ("threshold (ms)", "right"), ("result", "left"))
    for i in slo["items"]:
        t.add_row(i["name"], _ms(i["value_s"]), _ms(i["threshold_s"]), _met(i["met"]))
    console.print(t)
    att = slo["attainment"]
    console.print(f"goodput {_num(slo['goodput_rps'])} req/s, attainment "
                  f"{'-' if att is None else f'{att:.2%}'} ({slo['good_requests']} good requests)", highlight=False)


def _splitwise(s: dict, console: Console) -> None:
    sw = s.get("splitwise")
    if not sw:
        return
    t = _table("Splitwise checks (slowdown vs unloaded reference)", ("check", "left"), ("slowdown", "right"),
               ("limit", "right"), ("result", "left"))
    for ch in sw["checks"]:
        t.add_row(ch["name"], _num(ch["slowdown"], ".2f") + ("" if ch["slowdown"] is None else "x"),
                  f"{ch['limit']:g}x", _met(ch["met"]))
    console.print(t)
    console.print("Splitwise verdict: " + ("[green]PASS[/green]" if sw["passed"]
                                            else f"[red]FAIL[/red] ({', '.join(sw['failed'])})"))


def _fidelity(s: dict, console: Console) -> None:
    f = s["fidelity"]
    t = _table("Replay fidelity", ("quantity", "left"), ("value", "right"))
    for label, key in (("p50", "p50"), ("p99", "p99"), ("max", "max")):
        t.add_row(f"send lag {label} (ms)", _ms(f["lag_s"][key]))
    t.add_row("trace rate (req/s)", _num(f["trace_rate_rps"]))
    t.add_row("achieved rate (req/s)", _num(f["achieved_rate_rps"]))
    errors = f.get("errors") or {}
    if errors.get("failed"):
        t.add_row("server failures", f"{errors['failed']} ({errors['error_rate']:.2%}), "
                                     f"mostly {errors['dominant_kind']}")
    tok = f["tokens"]
    t.add_row("token mismatches (in/out)", f"{tok['input_mismatch']}/{tok['output_mismatch']}")
    t.add_row("unverified tokens (in/out)", f"{tok['input_unverified']}/{tok['output_unverified']}")
    console.print(t)
    color = "green" if f["verdict"] == "ok" and not f["flags"] else "red"
    extra = [flag for flag in f["flags"] if flag != f["verdict"]]
    console.print(f"fidelity verdict: [{color}]{f['verdict']}[/{color}]"
                  + (f" flags: {', '.join(extra)}" if extra else ""))
    for reason in f["reasons"]:
        console.print(f"  - {reason}", markup=False, highlight=False)


def _efficiency(s: dict, console: Console) -> None:
    eff = s.get("efficiency")
    if not eff:
        return
    head, rows = efficiency_rows(eff)
    t = Table(title="Cost and energy per pool" + (" (* energy ESTIMATED)" if eff["estimated"] else ""))
    for col in head:
        t.add_column(col, justify="left" if col == "pool" else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    console.print(t)
    console.print(efficiency_note(eff), markup=False, highlight=False)


def _pools(s: dict, console: Console) -> None:
    if not s.get("pools"):
        return
    t = _table("Per pool (p50 / p99 ms)", *[(col, "left") for col in ("pool", "n", "ok", "ttft", "tbt", "e2e")])
    for pool, d in s["pools"].items():
        t.add_row(pool, str(d["count"]), str(d["ok"]),
                  *[f"{_ms(d[k]['p50'])} / {_ms(d[k]['p99'])}" for k in ("ttft_s", "tbt_s", "e2e_s")])
    console.print(t)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def cache_rows(cache: dict) -> list[list[str]]:
    """Rows (scope, requests, hit, prompt tokens, cached tokens, cached %) of the cache section."""
    scopes = [("all", cache)] + [(f"pool {k}", d) for k, d in cache["pools"].items()] +         [(f"instance {k}", d) for k, d in cache["instances"].items()]
    return [[name, str(d["requests"]), str(d["requests_hit"]), str(d["prompt_tokens"]), str(d["cached_tokens"]),
             _pct(d["cached_fraction"])] for name, d in scopes]


def fit_line(cache: dict) -> str:
    """TTFT = a + b x uncached tokens, as one line."""
    fit = cache["ttft_vs_uncached"]["fit"]
    if not fit:
        return "TTFT vs uncached prompt tokens: no fit (fewer than two distinct uncached counts)"
    r2 = "-" if fit["r2"] is None else f"{fit['r2']:.3f}"
    b = fit["per_token_s"] * 1e6
    return (f"TTFT = {fit['intercept_s'] * 1e3:.2f} ms {'-' if b < 0 else '+'} {abs(b):.2f} ms per 1k uncached "
            f"prompt tokens (n {fit['n']}, r2 {r2})")


def _cache(s: dict, console: Console) -> None:
    cache = s.get("cache")
    if not cache:
        return
    t = _table("Prefix cache (ok requests with cached counts)", ("scope", "left"), ("requests", "right"),
               ("hit", "right"), ("prompt tok", "right"), ("cached tok", "right"), ("cached", "right"))
    for row in cache_rows(cache):
        t.add_row(*row)
    console.print(t)
    if cache.get("server"):
        t = _table("Server prefix cache (/metrics, tokens)", ("instance", "left"), ("queries", "right"),
                   ("hits", "right"), ("hit rate", "right"), ("external hits", "right"), ("ext. rate", "right"))
        for iid, d in cache["server"].items():
            t.add_row(iid, str(d["queries_tokens"]), str(d["hits_tokens"]), _pct(d["hit_rate"]),
                      "-" if d["external_hits_tokens"] is None else str(d["external_hits_tokens"]),
                      _pct(d["external_hit_rate"]))
        console.print(t)
    bins = cache["ttft_vs_uncached"]["bins"]
    if bins:
        t = _table("TTFT vs uncached prompt tokens (ms)", ("uncached tokens", "left"), ("n", "right"),
                   ("p50", "right"), ("p90", "right"), ("max", "right"))
        for b in bins:
            d = b["ttft_s"]
            t.add_row(f"[{b['lo_tokens']}, {b['hi_tokens']})", str(d["count"]), _ms(d["p50"]), _ms(d["p90"]),
                      _ms(d["max"]))
        console.print(t)
    console.print(fit_line(cache), markup=False, highlight=False)


SECTIONS = (_latency, _throughput, _statuses, _slos, _splitwise, _fidelity, _efficiency, _pools, _cache)


def render_summary(summary: dict, console: Console) -> None:
    """Print the run header, then latency, throughput, statuses, SLO, Splitwise, fidelity, cost and pool tables."""
    console.rule("[bold]splitbench run summary")
    for line in _header_lines(summary):
        console.print(line, markup=False, highlight=False)
    for section in SECTIONS:
        section(summary, console)


def render_markdown(summary: dict) -> str:
    """A compact Markdown report: header, latency table, throughput, SLOs, Splitwise, fidelity."""
    s = summary
    out = ["# splitbench run summary", ""] + [f"- {x}" for x in _header_lines(s)] + [""]
    out += ["| metric | n | " + " | ".join(f"{st} (ms)" for st in STATS) + " |",
            "|---|" + "---:|" * (len(STATS) + 1)]
    for label, key in LAT_ROWS:
        d = s["latency"][key]
        out.append(f"| {label} | {d['count']} | " + " | ".join(_ms(d[st]) for st in STATS) + " |")
    th = s["throughput"]
    out += ["", f"Throughput: {_num(th['requests_per_s'])} req/s, {_num(th['input_tokens_per_s'], '.1f')} "
            f"input tok/s, {_num(th['output_tokens_per_s'], '.1f')} output tok/s over "
            f"{_num(th['window_s'])} s.", ""]
    slo = s["slos"]
    if slo["items"]:
        out += ["| SLO | value (ms) | threshold (ms) | result |", "|---|---:|---:|---|"]
        out += [f"| {i['name']} | {_ms(i['value_s'])} | {_ms(i['threshold_s'])} | {_met(i['met'], False)} |"
                for i in slo["items"]]
        att = slo["attainment"]
        out += ["", f"Goodput {_num(slo['goodput_rps'])} req/s, attainment "
                f"{'-' if att is None else f'{att:.2%}'}.", ""]
    sw = s.get("splitwise")
    if sw:
        out += ["| Splitwise check | slowdown | limit | result |", "|---|---:|---:|---|"]
        out += [f"| {c['name']} | {_num(c['slowdown'], '.2f')} | {c['limit']:g} | {_met(c['met'], False)} |"
                for c in sw["checks"]]
        out += ["", f"Splitwise verdict: {'PASS' if sw['passed'] else 'FAIL'}", ""]
    eff = s.get("efficiency")
    if eff:
        head, rows = efficiency_rows(eff)
        out += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += ["", efficiency_note(eff) + ".", ""]
    cache = s.get("cache")
    if cache:
        out += ["| cache scope | requests | hit | prompt tok | cached tok | cached |", "|---|---:|---:|---:|---:|---:|"]
        out += ["| " + " | ".join(r) + " |" for r in cache_rows(cache)]
        out += ["", fit_line(cache) + ".", ""]
    f = s["fidelity"]
    out.append(f"Fidelity: {f['verdict']}" + (f" (flags: {', '.join(f['flags'])})" if f["flags"] else "")
               + f"; send lag p99 {_ms(f['lag_s']['p99'])} ms.")
    out += [f"- {r}" for r in f["reasons"]]
    return "\n".join(out) + "\n"
