"""Gate rules (pure): the gates.toml format, its validation (one-line errors naming file, line and key) and the
metric names a rule may gate on. The decisions over runs live in gate.py; rendering in render/gate.py.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from splitbench.errors import InputError
from splitbench.metrics.slo import parse_slos

LAT_METRICS = ("ttft", "tbt", "mean_tbt", "e2e", "norm")
LAT_STATS = ("p50", "p90", "p99", "mean", "max")
RATES = {"requests_per_s": "ok", "input_tokens_per_s": "in", "output_tokens_per_s": "out", "goodput_rps": "good"}
EFF = {"input_tokens_per_usd": ("in", "cost_usd"), "output_tokens_per_usd": ("out", "cost_usd"),
       "tokens_per_usd": ("tok", "cost_usd"), "good_requests_per_usd": ("good", "cost_usd"),
       "input_tokens_per_j": ("in", "energy_j"), "output_tokens_per_j": ("out", "energy_j"),
       "tokens_per_j": ("tok", "energy_j")}
GATE_KEYS = {"confidence", "bootstrap", "seed", "slo"}
PRE_KEYS = {"max_lag_p99_ms", "max_lag_p99_host_multiple", "min_rate_ratio", "max_token_mismatches",
            "max_error_rate", "same_workload"}
RULE_KEYS = {"metric", "tolerance", "better", "name"}
DEFAULT_PRE = {"max_lag_p99_ms": 10.0, "min_rate_ratio": 0.95, "max_token_mismatches": 0, "max_error_rate": 0.01,
               "same_workload": True}


@dataclass
class Rule:
    metric: str
    better: str               # lower | higher
    tolerance: float          # >= 0; relative fraction or absolute in the metric's unit (s, 1/s, ...)
    relative: bool
    name: str = ""
    line: int | None = None


@dataclass
class Rules:
    rules: list[Rule]
    confidence: float = 0.95
    bootstrap: int = 1000
    seed: int = 0
    slos: list = field(default_factory=list)
    pre: dict = field(default_factory=lambda: dict(DEFAULT_PRE))
    source: str = ""


def metric_better(metric: str) -> str | None:
    """Default direction of a known metric name; None for unknown names."""
    m = metric.split(".", 1)
    if len(m) == 2:
        return "higher" if m[1] in EFF else None
    base, _, stat = metric.rpartition("_")
    if base in LAT_METRICS and stat in LAT_STATS:
        return "lower"
    if metric in RATES:
        return "higher"
    return "lower" if metric == "error_rate" else None


_TOL = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>%|s|ms|us)?\s*$")


def parse_tolerance(v, metric: str) -> tuple[float, bool]:
    """"10%" -> (0.10, relative); "5ms" -> (0.005, absolute, latency metrics only); a number -> absolute."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"tolerance must be like \"10%\", \"5ms\" or a number, got {v!r}")
    if not isinstance(v, str):
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"tolerance must be a finite number >= 0, got {v!r}")
        return float(v), False
    m = _TOL.match(v)
    if not m:
        raise ValueError(f"tolerance must be like \"10%\", \"5ms\" or a number, got {v!r}")
    num, unit = float(m["num"]), m["unit"]
    if unit == "%":
        return num / 100.0, True
    if unit in ("s", "ms", "us"):
        if metric_better(metric) != "lower" or metric.split("_")[0] not in LAT_METRICS:
            raise ValueError(f"a time tolerance ({v}) only applies to latency metrics, not {metric}")
        return num * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit], False
    return num, False


def _line_of(text: str, rule_index: int | None, key: str | None, table: str | None = None) -> int | None:
    lines = text.splitlines()
    if rule_index is not None:
        hits = [i for i, ln in enumerate(lines) if re.match(r"^\s*\[\[\s*rule\s*\]\]", ln)]
        if rule_index >= len(hits):
            return None
        start = hits[rule_index]
    elif table is not None:
        start = next((i for i, ln in enumerate(lines) if re.match(rf"^\s*\[\s*{table}\s*\]", ln)), None)
        if start is None:
            return None
    else:
        return None
    for i in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        if key and re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1


Fail = Callable[..., None]   # fail(msg, line=None, column=None): raises InputError naming the rules file


def _read(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text(encoding="utf-8")
        return text, tomllib.loads(text)
    except FileNotFoundError:
        raise InputError("rules file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read rules: {e}", file=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise InputError(f"invalid TOML: {e}", file=str(path), line=int(m.group(1)) if m else None) from None


def _gate_table(g: dict, text: str, fail: Fail, out: Rules) -> None:
    """[gate]: confidence, bootstrap, seed, slo."""
    for k in sorted(set(g) - GATE_KEYS):
        fail(f"gate.{k}: unknown key (allowed: {', '.join(sorted(GATE_KEYS))})", _line_of(text, None, k, "gate"), k)
    conf = g.get("confidence", 0.95)
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.5 <= conf < 1:
        fail(f"gate.confidence must be in [0.5, 1), got {conf!r}", _line_of(text, None, "confidence", "gate"),
             "confidence")
    boot = g.get("bootstrap", 1000)
    if isinstance(boot, bool) or not isinstance(boot, int) or not 100 <= boot <= 100000:
        fail(f"gate.bootstrap must be a whole number in [100, 100000], got {boot!r}",
             _line_of(text, None, "bootstrap", "gate"), "bootstrap")
    out.confidence, out.bootstrap, out.seed = float(conf), boot, int(g.get("seed", 0))
    if g.get("slo"):
        try:
            out.slos = parse_slos(str(g["slo"]), source=f"{out.source}: gate.slo")
        except InputError as e:
            fail(str(e), _line_of(text, None, "slo", "gate"), "slo")


def _preconditions_table(pre: dict, text: str, fail: Fail, out: Rules) -> None:
    for k, v in pre.items():
        line = _line_of(text, None, k, "preconditions")
        if k not in PRE_KEYS:
            fail(f"preconditions.{k}: unknown key (allowed: {', '.join(sorted(PRE_KEYS))})", line, k)
        if k == "same_workload":
            if not isinstance(v, bool):
                fail(f"preconditions.same_workload must be true or false, got {v!r}", line, k)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            fail(f"preconditions.{k} must be a number >= 0, got {v!r}", line, k)
        out.pre[k] = v


def _rule(i: int, r: dict, text: str, fail: Fail, slos: list) -> Rule:
    """The i-th [[rule]] (0-based), validated."""
    for k in sorted(set(r) - RULE_KEYS):
        fail(f"rule {i + 1}: unknown key {k!r} (allowed: {', '.join(sorted(RULE_KEYS))})", _line_of(text, i, k), k)
    metric = r.get("metric")
    line = _line_of(text, i, "metric")
    if not isinstance(metric, str) or metric_better(metric) is None:
        fail(f"rule {i + 1}: unknown metric {metric!r} (e.g. ttft_p99, tbt_p50, e2e_p90, output_tokens_per_s, "
             "goodput_rps, error_rate, total.output_tokens_per_usd, prompt.tokens_per_j)", line, "metric")
    better = r.get("better", metric_better(metric))
    if better not in ("lower", "higher"):
        fail(f"rule {i + 1}: better must be lower or higher, got {better!r}", _line_of(text, i, "better"), "better")
    if "tolerance" not in r:
        fail(f"rule {i + 1}: tolerance is required (e.g. \"10%\" or \"5ms\")", line, "tolerance")
    try:
        tol, rel = parse_tolerance(r["tolerance"], metric)
    except ValueError as e:
        fail(f"rule {i + 1}: {e}", _line_of(text, i, "tolerance"), "tolerance")
    if (metric == "goodput_rps" or metric.endswith(".good_requests_per_usd")) and not slos:
        fail(f"rule {i + 1}: {metric} needs SLOs: set gate.slo = \"ttft_p99=2s,...\"", line, "metric")
    return Rule(metric, better, tol, rel, str(r.get("name") or metric), line)


def load_rules(path: str | Path) -> Rules:
    """Parse and validate a gates.toml; every problem is a one-line InputError naming file, line and key."""
    path = Path(path)
    text, data = _read(path)

    def fail(msg, line=None, column=None):
        raise InputError(msg, file=str(path), line=line, column=column)

    unknown = sorted(set(data) - {"gate", "preconditions", "rule"})
    if unknown:
        fail(f"unknown table {unknown[0]!r} (allowed: [gate], [preconditions], [[rule]])", column=unknown[0])
    out = Rules(rules=[], source=str(path))
    _gate_table(data.get("gate", {}), text, fail, out)
    _preconditions_table(data.get("preconditions", {}), text, fail, out)
    rules = data.get("rule", [])
    if not isinstance(rules, list) or not rules:
        fail("no [[rule]] given: a gate needs at least one rule")
    out.rules = [_rule(i, r, text, fail, out.slos) for i, r in enumerate(rules)]
    return out
