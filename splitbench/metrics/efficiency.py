"""Cost and energy efficiency per pool (prompt, token, mixed, baseline) and in total: pure functions over
records + run.json's "hardware" allocation + (optionally) measured energy per pool. Formulas: README "Efficiency".
"""
from __future__ import annotations

from typing import Sequence

from splitbench.metrics.latency import input_tokens, output_tokens, window_s
from splitbench.metrics.slo import SLO, request_is_good
from splitbench.schema.records import RequestRecord

UNALLOCATED = "unallocated"
TOTAL = "total"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _pool_of(instances: dict[str, str], default: str | None):
    def pool(inst: str | None) -> str | None:
        return instances.get(inst, default) if inst else default
    return pool


def pool_usage(records: Sequence[RequestRecord], pools_by_instance: dict[str, str],
               slos: Sequence[SLO] = ()) -> dict[str, dict]:
    """Work each pool did for ok requests: input tokens on the pool of RequestRecord.prefill_instance, output
    tokens on that of decode_instance (the same instance for a co-located request; `instance` when a record has
    only that); a record without an instance goes to the only pool when there is one."""
    distinct = set(pools_by_instance.values())
    default = next(iter(distinct)) if len(distinct) == 1 else "unknown"
    pool = _pool_of(pools_by_instance, default)
    out: dict[str, dict] = {}

    def slot(p: str) -> dict:
        return out.setdefault(p, {"ok_requests": 0, "good_requests": 0 if slos else None,
                                  "input_tokens": 0, "output_tokens": 0})

    for r in records:
        if not r.ok:
            continue
        pre = r.prefill_instance or r.instance
        p_pre, p_dec = pool(pre), pool(r.decode_instance or pre)
        good = bool(slos) and request_is_good(r, slos)
        for p in {p_pre, p_dec}:
            s = slot(p)
            s["ok_requests"] += 1
            if good:
                s["good_requests"] += 1
        slot(p_pre)["input_tokens"] += input_tokens(r)
        slot(p_dec)["output_tokens"] += output_tokens(r)
    return out


def _ratios(d: dict, window: float | None) -> dict:
    """Derived per-$ and per-J figures of one pool (or the total)."""
    cost, energy = d["cost_usd"], d["energy_j"]
    n_in, n_out = d["input_tokens"], d["output_tokens"]
    avg_w = _div(energy, window)
    d.update(
        avg_power_w=avg_w,
        input_tokens_per_usd=_div(n_in, cost), output_tokens_per_usd=_div(n_out, cost),
        tokens_per_usd=_div(n_in + n_out, cost),
        usd_per_million_input_tokens=_div(cost * 1e6, n_in), usd_per_million_output_tokens=_div(cost * 1e6, n_out),
        usd_per_million_tokens=_div(cost * 1e6, n_in + n_out),
        good_requests_per_usd=_div(d["good_requests"], cost),
        input_tokens_per_j=_div(n_in, energy), output_tokens_per_j=_div(n_out, energy),
        tokens_per_j=_div(n_in + n_out, energy),
        output_tokens_per_s=_div(n_out, window), input_tokens_per_s=_div(n_in, window),
        # throughput per kW of average power (measured or estimated) and per kW provisioned (iso-power view)
        output_tokens_per_s_per_kw=_div(_div(n_out, window), _div(avg_w, 1000.0)),
        output_tokens_per_s_per_provisioned_kw=_div(_div(n_out, window), d["provisioned_power_w"] / 1000.0),
        output_tokens_per_s_per_usd_per_hour=_div(_div(n_out, window), d["usd_per_hour"]),
    )
    return d


def efficiency_section(records: Sequence[RequestRecord], run_meta: dict, *, slos: Sequence[SLO] = (),
                       measured_energy: dict | None = None) -> dict | None:
    """Cost, energy and per-$/per-J efficiency per pool and in total over the throughput window.

    run_meta["hardware"] (hardware.catalog.plan_allocation) says which machine share each instance holds; None
    when the run has none. measured_energy: {"method": "measured-nvml", "pools": {pool: J}, "coverage": f, ...}
    from the power samples; without it energy is ESTIMATED as provisioned server power x machines x window.
    """
    hw = run_meta.get("hardware")
    if not hw:
        return None
    pools_by_instance = {a["instance"]: a["pool"] for a in hw["allocations"]}
    ok = [r for r in records if r.ok]
    total = {"ok_requests": len(ok),
             "good_requests": sum(1 for r in ok if request_is_good(r, slos)) if slos else None,
             "input_tokens": sum(input_tokens(r) for r in ok), "output_tokens": sum(output_tokens(r) for r in ok)}
    return efficiency_from(hw, window_s(records), pool_usage(records, pools_by_instance, slos), total, slos,
                           measured_energy)


def efficiency_from(hw: dict, span: tuple[float | None, float | None], usage: dict[str, dict], done: dict,
                    slos: Sequence[SLO] = (), measured_energy: dict | None = None) -> dict:
    """efficiency_section's dict from the allocation, the throughput window, pool_usage() and the totals of ok
    requests (ok_requests, good_requests, input_tokens, output_tokens)."""
    types = hw["types"]
    start, end = span
    window = (end - start) if start is not None and end is not None else 0.0
    measured = measured_energy is not None and measured_energy.get("pools") is not None
    shares: dict[str, dict] = {}
    for a in hw["allocations"] + ([{"pool": UNALLOCATED, "machine": hw["machine"],
                                    "machines": hw["unallocated_machines"]}] if hw["unallocated_machines"] > 1e-9
                                  else []):
        mt = types[a["machine"]]
        s = shares.setdefault(a["pool"], {"machines": 0.0, "machine_types": {}, "usd_per_hour": 0.0,
                                          "provisioned_power_w": 0.0})
        s["machines"] += a["machines"]
        s["machine_types"][a["machine"]] = s["machine_types"].get(a["machine"], 0.0) + a["machines"]
        s["usd_per_hour"] += mt["usd_per_hour"] * a["machines"]
        s["provisioned_power_w"] += mt["server_power_w"] * a["machines"]
    zero = {"ok_requests": 0, "good_requests": 0 if slos else None, "input_tokens": 0, "output_tokens": 0}
    pools: dict[str, dict] = {}
    for p in sorted(set(shares) | set(usage)):
        s = shares.get(p, {"machines": 0.0, "machine_types": {}, "usd_per_hour": 0.0, "provisioned_power_w": 0.0})
        energy = (measured_energy["pools"].get(p, 0.0) if measured else s["provisioned_power_w"] * window)
        pools[p] = _ratios({**s, **usage.get(p, zero), "cost_usd": s["usd_per_hour"] * window / 3600.0,
                            "energy_j": energy, "energy_estimated": not measured}, window)
    total = {"machines": hw["machines"], "machine_types": {}, "usd_per_hour": 0.0, "provisioned_power_w": 0.0}
    for p in pools.values():
        for k, v in p["machine_types"].items():
            total["machine_types"][k] = total["machine_types"].get(k, 0.0) + v
        total["usd_per_hour"] += p["usd_per_hour"]
        total["provisioned_power_w"] += p["provisioned_power_w"]
    total.update(**done, cost_usd=total["usd_per_hour"] * window / 3600.0,
                 energy_j=(measured_energy.get("total_energy_j", sum(measured_energy["pools"].values()))
                           if measured else total["provisioned_power_w"] * window),
                 energy_estimated=not measured)
    pools[TOTAL] = _ratios(total, window)
    cost_estimated = any(bool(t.get("estimated")) for t in types.values())
    return {"window_s": window, "start_s": start, "end_s": end, "cost_estimated": cost_estimated,
            "machine_types": {n: {k: t.get(k) for k in ("usd_per_hour", "server_power_w", "accelerators",
                                                        "accelerator", "estimated", "source")}
                              for n, t in types.items()},
            "energy_method": measured_energy.get("method", "measured") if measured else "estimated-provisioned",
            "estimated": not measured,
            "energy_note": (measured_energy.get("note") if measured else
                            "ESTIMATED: provisioned server power x machines x window (no power measurement)"),
            "energy_coverage": measured_energy.get("coverage") if measured else None,
            "unit": hw.get("unit"), "pools": pools}
