"""Metrics on hand-built records: every expected number below is worked out by hand in the comments."""
from __future__ import annotations

import json

import pytest
from rich.console import Console

from splitbench.errors import InputError
from splitbench.metrics.fidelity import fidelity_section
from splitbench.metrics.latency import (
    METRIC_DEFINITIONS,
    e2e_s,
    latency_section,
    mean_tbt_s,
    norm_s,
    percentile_set,
    tbt_gaps_s,
    throughput_section,
    ttft_s,
)
from splitbench.metrics.slo import (
    SLO,
    Reference,
    evaluate_slos,
    fit_reference,
    load_reference,
    parse_slos,
    save_reference,
    splitwise_verdict,
)
from splitbench.metrics.summary import summarize
from splitbench.render.console import render_markdown, render_summary
from splitbench.schema.records import RequestRecord
from splitbench.schema.summary import read_summary, write_summary

_ids = iter(range(10**6))


def rec(send, offsets, tokens, *, prompt=100, planned_out=None, intended=None, status="ok",
        actual_in=None, actual_out="auto", end_extra=0.01, pool=None):
    i = next(_ids)
    n = sum(tokens)
    return RequestRecord(
        request_id=f"r{i}", trace_index=i, intended_send_s=send if intended is None else intended,
        planned_input_tokens=prompt, planned_output_tokens=n if planned_out is None else planned_out,
        actual_send_s=send, first_token_s=send + offsets[0] if offsets else None,
        last_token_s=send + offsets[-1] if offsets else None,
        end_s=send + (offsets[-1] if offsets else 0.0) + end_extra,
        chunk_offsets_s=list(offsets), chunk_tokens=list(tokens), actual_input_tokens=actual_in,
        actual_output_tokens=n if actual_out == "auto" else actual_out, status=status, pool=pool)


def steady(send, prompt, ttft, tbt, n, **kw):
    """n one-token chunks: first at ttft, then every tbt seconds."""
    return rec(send, [ttft + k * tbt for k in range(n)], [1] * n, prompt=prompt, **kw)


def failed(send, status="timeout"):
    i = next(_ids)
    return RequestRecord(request_id=f"f{i}", trace_index=i, intended_send_s=send, planned_input_tokens=50,
                         planned_output_tokens=10, actual_send_s=send, end_s=send + 30.0, status=status)


# ---------------------------------------------------------------- per-request values

def test_brief_example_ttft_gaps_mean_tbt():
    r = rec(1.0, [0.5, 0.7, 1.1], [1, 1, 2])
    assert ttft_s(r) == pytest.approx(0.5)
    # gap 0.2 before a 1-token chunk -> 0.2; gap 0.4 before a 2-token chunk -> 0.2, 0.2
    assert tbt_gaps_s(r) == pytest.approx([0.2, 0.2, 0.2])
    assert mean_tbt_s(r) == pytest.approx((1.1 - 0.5) / 3)  # n = 4 tokens
    assert e2e_s(r) == pytest.approx(1.1)   # last token, not end_s (1.11)
    assert norm_s(r) == pytest.approx(1.1 / 4)


def test_uneven_chunks_and_e2e_fallback():
    r = rec(0.0, [0.1, 0.4, 0.5], [2, 1, 3])
    assert tbt_gaps_s(r) == pytest.approx([0.3, 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert mean_tbt_s(r) == pytest.approx(0.4 / 5)
    one = rec(2.0, [0.3], [1])
    assert mean_tbt_s(one) is None and tbt_gaps_s(one) == []
    one.last_token_s = None  # no last token recorded: E2E falls back to end_s
    assert e2e_s(one) == pytest.approx(0.31)


def test_percentile_set_by_hand():
    p = percentile_set([float(v) for v in range(10, 0, -1)])  # 1..10 shuffled order
    # linear: p50 at index 4.5 -> 5.5; p90 at 8.1 -> 9.1; p99 at 8.91 -> 9.91
    assert p == pytest.approx({"count": 10, "mean": 5.5, "p50": 5.5, "p90": 9.1, "p99": 9.91, "max": 10.0})
    assert percentile_set([])["p99"] is None


def test_failed_records_excluded_from_latency_but_counted():
    records = [rec(0.0, [0.2, 0.3], [1, 1]), rec(1.0, [0.4, 0.5], [1, 1]), failed(0.5),
               failed(0.7, "http_error")]
    lat = latency_section(records)
    assert lat["ttft_s"]["count"] == 2
    assert lat["ttft_s"]["mean"] == pytest.approx(0.3)
    assert lat["ttft_s"]["max"] == pytest.approx(0.4)
    s = summarize(records)
    assert s["counts"]["ok"] == 2 and s["counts"]["failed"] == 2 and s["counts"]["total"] == 4
    assert s["counts"]["by_status"] == {"ok": 2, "http_error": 1, "timeout": 1}
    assert s["counts"]["error_rate"] == pytest.approx(0.5)


def test_throughput_window():
    a = rec(0.0, [1.0, 2.0], [1, 1], prompt=100, end_extra=1.0, actual_in=90)  # ends 3.0
    b = rec(1.0, [1.0, 3.0], [1, 3], prompt=200, end_extra=1.0)                 # ends 5.0
    c = rec(2.0, [1.0, 1.5], [1, 1], prompt=300, end_extra=0.5)                 # ends 4.0
    f = failed(0.5)                                                             # sent, ends 30.5
    th = throughput_section([a, b, c])
    assert (th["start_s"], th["end_s"], th["window_s"]) == (0.0, 5.0, 5.0)
    assert th["requests_per_s"] == pytest.approx(3 / 5)
    assert th["input_tokens_per_s"] == pytest.approx((90 + 200 + 300) / 5)  # actual 90 beats planned 100
    assert th["output_tokens_per_s"] == pytest.approx((2 + 4 + 2) / 5)
    th2 = throughput_section([a, b, c, f])  # the failed request stretches the window, not the counts
    assert th2["window_s"] == pytest.approx(30.5)
    assert th2["requests_per_s"] == pytest.approx(3 / 30.5)


# ---------------------------------------------------------------- SLOs

def test_parse_slos_good():
    slos = parse_slos("ttft_p99=2s, tbt_p99=100ms,e2e_p50=10,norm_p90=0.2s,mean_tbt_mean=500us")
    assert [(s.metric, s.stat) for s in slos] == [("ttft", "p99"), ("tbt", "p99"), ("e2e", "p50"),
                                                  ("norm", "p90"), ("mean_tbt", "mean")]
    assert [s.threshold_s for s in slos] == pytest.approx([2.0, 0.1, 10.0, 0.2, 0.0005])
    assert parse_slos("") == []


@pytest.mark.parametrize("text,bad", [("ttft_p99=2x", "ttft_p99=2x"), ("ttft_p98=1s", "ttft_p98=1s"),
                                      ("foo_p99=1s", "foo_p99=1s"), ("ttft_p99=2s,e2e_p50", "e2e_p50"),
                                      ("ttft_p99=0s", "ttft_p99=0s"), ("tbt_max=1,tbt_max=2", "tbt_max=2"),
                                      ("ttft_p99=-1s", "ttft_p99=-1s")])
def test_parse_slos_bad_is_one_line_naming_item(text, bad):
    with pytest.raises(InputError) as e:
        parse_slos(text)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg


def test_slo_values_goodput_attainment():
    # TTFTs 0.1 / 0.3 / 0.5; mean TBTs 0.01 / 0.05 / 0.01; plus a one-token request and a failure.
    r1 = steady(0.0, 10, 0.1, 0.01, 11)
    r2 = steady(1.0, 10, 0.3, 0.05, 11)
    r3 = steady(2.0, 10, 0.5, 0.01, 11)
    r4 = rec(3.0, [0.2], [1], end_extra=0.8)  # ends 4.0, one token: no gaps
    f = failed(0.5)                           # ends 30.5 -> window [0, 30.5]
    recs = [r1, r2, r3, r4, f]
    out = evaluate_slos(recs, [SLO("ttft", "p50", 0.35)])
    # ok TTFTs sorted 0.1, 0.2, 0.3, 0.5 -> p50 = 0.25
    assert out["items"][0]["value_s"] == pytest.approx(0.25) and out["items"][0]["met"]
    assert out["good_requests"] == 3                      # r1, r2, r4
    assert out["goodput_rps"] == pytest.approx(3 / 30.5)
    assert out["attainment"] == pytest.approx(3 / 5)      # failure counts as attempted, not good
    out = evaluate_slos(recs, parse_slos("ttft_p50=350ms,tbt_p99=20ms"))
    # pooled gaps: 10 x 0.01, 10 x 0.05, 10 x 0.01 -> p99 is 0.05 > 0.02: missed
    assert out["items"][1]["value_s"] == pytest.approx(0.05) and out["items"][1]["met"] is False
    assert out["all_met"] is False
    assert out["good_requests"] == 2                      # r2 fails on its mean TBT 0.05; r4 has no gaps
    assert evaluate_slos(recs, [])["goodput_rps"] is None


# ---------------------------------------------------------------- Splitwise

REF = Reference(ttft_intercept_s=0.1, ttft_per_token_s=0.001, tbt_s=0.02)


def test_splitwise_all_nine_pass():
    # prompt 100 -> ref TTFT 0.2; n = 51 -> ref E2E 0.2 + 50 * 0.02 = 1.2
    # actual TTFT 0.3 (1.5x), TBT 0.022 (1.1x), E2E 0.3 + 1.1 = 1.4 (1.1667x)
    recs = [steady(float(i), 100, 0.3, 0.022, 51) for i in range(20)]
    v = splitwise_verdict(recs, REF)
    assert v["passed"] and v["failed"] == []
    by = {c["name"]: c["slowdown"] for c in v["checks"]}
    assert len(by) == 9
    assert by["ttft_p99"] == pytest.approx(1.5)
    assert by["tbt_p50"] == pytest.approx(1.1)
    assert by["e2e_p90"] == pytest.approx(1.4 / 1.2)


def test_splitwise_fails_on_ttft_p99_only():
    # 98 requests as above, 2 with TTFT 2.0 (10x): E2E 3.1 / 1.2 = 2.58x stays under the 5x P99 limit
    recs = [steady(float(i), 100, 0.3, 0.022, 51) for i in range(98)]
    recs += [steady(100.0 + i, 100, 2.0, 0.022, 51) for i in range(2)]
    v = splitwise_verdict(recs, REF)
    assert not v["passed"] and v["failed"] == ["ttft_p99"]
    by = {c["name"]: c["slowdown"] for c in v["checks"]}
    assert by["ttft_p99"] == pytest.approx(10.0) and by["ttft_p90"] == pytest.approx(1.5)
    assert by["e2e_p99"] == pytest.approx(3.1 / 1.2)


def test_fit_reference_recovers_line_and_roundtrips(tmp_path):
    # TTFT = 0.05 + 0.0002 * prompt, TBT 0.01, one request per prompt size
    recs = [steady(float(i), p, 0.05 + 0.0002 * p, 0.01, 20) for i, p in enumerate([100, 200, 400, 800])]
    ref = fit_reference(recs + [failed(9.0)], meta={"model": "tiny"})
    assert ref.ttft_intercept_s == pytest.approx(0.05)
    assert ref.ttft_per_token_s == pytest.approx(0.0002)
    assert ref.tbt_s == pytest.approx(0.01)
    assert (ref.n_requests, ref.prompt_tokens_min, ref.prompt_tokens_max) == (4, 100, 800)
    path = tmp_path / "ref" / "reference.json"
    save_reference(ref, path)
    assert load_reference(path) == ref
    path.write_text('{"kind": "splitbench.reference", "tbt_s": 0.01}')
    with pytest.raises(InputError, match="ttft_intercept_s"):
        load_reference(path)
    with pytest.raises(InputError, match="not found"):
        load_reference(tmp_path / "missing.json")
    with pytest.raises(InputError):
        fit_reference([failed(0.0)])


# ---------------------------------------------------------------- fidelity

def test_fidelity_ok_and_client_behind():
    on_time = [steady(0.1 * i + 0.001, 10, 0.05, 0.01, 3, intended=0.1 * i) for i in range(50)]
    f = fidelity_section(on_time)
    assert f["verdict"] == "ok" and f["flags"] == []
    assert f["lag_s"]["p50"] == pytest.approx(0.001)
    assert f["trace_rate_rps"] == pytest.approx(10.0) and f["achieved_rate_rps"] == pytest.approx(10.0)
    # lag grows 20 ms per request: the client sends at 1/0.12 = 8.33 rps instead of 10
    behind = [steady(0.12 * i, 10, 0.05, 0.01, 3, intended=0.1 * i) for i in range(50)]
    f = fidelity_section(behind)
    assert f["verdict"] == "client-behind"
    assert f["lag_s"]["max"] == pytest.approx(0.02 * 49)
    assert f["rate_ratio"] == pytest.approx(0.1 / 0.12)
    assert len(f["reasons"]) == 2 and "client" in f["reasons"][0]
    # a looser limit accepts the same run's lag but not its rate
    f = fidelity_section(behind, {"lag_p99_limit_s": 5.0})
    assert f["verdict"] == "client-behind" and len(f["reasons"]) == 1


def test_fidelity_token_mismatch_and_unverified():
    recs = [steady(0.0, 10, 0.05, 0.01, 3),
            rec(1.0, [0.1, 0.2], [1, 1], planned_out=5),            # planned 5, got 2
            rec(2.0, [0.1, 0.2], [1, 1], actual_in=11),             # planned prompt 10, server says 11
            rec(3.0, [0.1, 0.2], [1, 1], actual_out=None)]          # output unknown
    f = fidelity_section(recs)
    assert f["verdict"] == "ok" and f["flags"] == ["token-mismatch"]
    t = f["tokens"]
    assert (t["input_mismatch"], t["output_mismatch"]) == (1, 1)
    assert (t["input_unverified"], t["output_unverified"]) == (3, 1)  # only rec 3 reports input tokens


# ---------------------------------------------------------------- summary and rendering

def _mixed_run():
    recs = [steady(0.1 * i, 100, 0.3, 0.022, 51, pool="prompt" if i % 2 else "token") for i in range(20)]
    recs.append(failed(0.55))
    lagged = steady(3.0, 100, 0.3, 0.022, 51, intended=2.0)
    return recs + [lagged]


def test_summary_is_json_and_roundtrips(tmp_path):
    s = summarize(_mixed_run(), run_meta={"run_id": "abc", "backend": "stub"},
                  slos="ttft_p99=250ms,e2e_p50=10s", reference=REF)
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text) == s
    assert set(s) >= {"counts", "latency", "throughput", "slos", "splitwise", "fidelity", "pools"}
    assert set(s["pools"]) == {"prompt", "token"} and s["pools"]["prompt"]["ok"] == 10
    assert [i["met"] for i in s["slos"]["items"]] == [False, True]   # TTFT 0.3 > 0.25
    assert s["slos"]["good_requests"] == 0
    assert s["fidelity"]["verdict"] == "client-behind"  # one request sent a second late -> max lag 1 s
    assert summarize([])["latency"]["ttft_s"]["count"] == 0
    write_summary(tmp_path, s)
    assert read_summary(tmp_path) == s
    assert "mean TBT" in METRIC_DEFINITIONS


def test_render_summary_and_markdown():
    s = summarize(_mixed_run(), run_meta={"run_id": "abc"}, slos="ttft_p99=250ms,e2e_p50=10s",
                  reference=REF)
    console = Console(record=True, width=160, force_terminal=False)
    render_summary(s, console)
    text = console.export_text()
    for needle in ("run_id=abc", "ttft", "mean_tbt", "e2e", "norm", "requests/s", "timeout",
                   "ttft_p99", "missed", "Splitwise verdict", "e2e_p99", "client-behind", "prompt"):
        assert needle in text, needle
    assert "300.0" in text  # TTFT p50 in ms
    md = render_markdown(s)
    assert "| ttft |" in md and "Splitwise verdict: PASS" in md and "client-behind" in md
