"""The compat mode's SplitwiseSim performance model, KV size and transfer time, and the `tbt_splitwisesim_s`
statistic, on hand-computable inputs."""
from __future__ import annotations

import pytest

from splitbench.errors import InputError
from splitbench.metrics.latency import latency_section, mean_tbt_s, tbt_splitwisesim_s
from splitbench.schema.records import OK, RequestRecord
from splitbench.sim.compat_perf import (GIB, MIXED_BATCH_FACTOR, SplitwiseSimPerf, compat_machine, compat_model,
                                        load_splitwisesim_perf, transfer_time_s)
from splitbench.sim.profiles import COLUMNS


def _row(p, b, t, prompt_ms, token_ms):
    return {"prompt_size": p, "batch_size": b, "token_size": t, "prompt_time": prompt_ms, "token_time": token_ms,
            "e2e_time": prompt_ms + t * token_ms}


def _perf() -> SplitwiseSimPerf:
    # batch tokens 100 (two rows: median of 100 and 140 ms -> 120), 200 (prompt 100 x batch 2), 400
    rows = [_row(100, 1, 8, 100, 10), _row(100, 1, 16, 140, 14), _row(100, 2, 8, 200, 20), _row(400, 1, 8, 500, 30)]
    return SplitwiseSimPerf("m", "hw", 8, rows)


def test_prompt_batches_interpolate_over_batch_tokens_with_medians():
    perf = _perf()
    assert perf.iteration_s(100, 1, 0) == pytest.approx(0.120)     # median of the two 100-token rows
    assert perf.iteration_s(150, 2, 0) == pytest.approx(0.160)     # halfway between 100 (0.12) and 200 (0.2)
    assert perf.iteration_s(300, 1, 0) == pytest.approx(0.350)     # between 200 (0.2) and 400 (0.5)


def test_predictors_extrapolate_the_end_segments():
    perf = _perf()
    assert perf.iteration_s(600, 1, 0) == pytest.approx(0.5 + 200 * (0.3 / 200))   # last segment extended
    assert perf.iteration_s(50, 1, 0) == pytest.approx(0.12 - 50 * (0.08 / 100))   # first segment extended down


def test_decode_batches_use_the_token_predictor_at_one_token_per_decode():
    perf = _perf()
    # token predictor: 100 -> median(10, 14) = 12 ms, 200 -> 20 ms; a batch of 150 decodes = 150 batch tokens
    assert perf.iteration_s(150, 0, 150) == pytest.approx(0.016)
    assert perf.iteration_s(1, 0, 1) == pytest.approx(0.012 - 99 * 0.008 / 100)   # extrapolated below 100


def test_a_mixed_batch_is_the_prompt_time_of_all_its_tokens_times_1_1():
    perf = _perf()
    assert MIXED_BATCH_FACTOR == 1.1
    assert perf.iteration_s(150, 1, 50) == pytest.approx(0.160 * 1.1)


def test_a_non_positive_iteration_time_is_a_one_line_input_error():
    steep = SplitwiseSimPerf("m", "hw", 8, [_row(100, 1, 8, 10, 10), _row(200, 1, 8, 200, 10)])
    assert steep.iteration_s(100, 1, 0) == pytest.approx(0.010)
    with pytest.raises(InputError, match="not > 0"):
        steep.iteration_s(1, 1, 0)   # 10 ms - 99 x 1.9 ms extrapolated below the first point


def test_kv_bytes_ignore_gqa_and_transfer_is_bytes_over_gib_per_s():
    bloom, llama = compat_model("bloom-176b"), compat_model("llama2-70b")
    assert bloom.kv_bytes(1000) == 2 * 1000 * 14336 * 70 * 2
    assert llama.kv_bytes(10) == 2 * 10 * 8192 * 80 * 2   # hidden size, not 8 KV heads
    assert transfer_time_s(1000, bloom, 200 * GIB) == pytest.approx(2 * 1000 * 14336 * 70 * 2 / (200 * 1024 ** 3))
    assert compat_machine("dgx-a100") == ("a100-80gb", 8, 1, 8 * 80 * GIB)
    assert compat_machine("dgx-h100", 2) == ("h100-80gb", 2, 4, 2 * 80 * GIB)
    with pytest.raises(InputError, match="dgx-z"):
        compat_machine("dgx-z")
    with pytest.raises(InputError, match="divide"):
        compat_machine("dgx-a100", 3)


def test_profile_group_is_read_from_a_splitwisesim_csv(tmp_path):
    path = tmp_path / "perf_model.csv"
    lines = [",".join(COLUMNS)]
    for p, prompt_ms in ((128, 50.0), (256, 90.0)):
        lines.append(f"bloom-176b,a100-80gb,{p},1,64,0,0,{prompt_ms},20.0,{prompt_ms + 64 * 20},8")
    path.write_text("\n".join(lines) + "\n")
    perf = load_splitwisesim_perf(path, "bloom-176b", "a100-80gb", 8)
    assert perf.iteration_s(192, 1, 0) == pytest.approx(0.070)
    with pytest.raises(InputError, match="no profile rows"):
        load_splitwisesim_perf(path, "bloom-176b", "h100-80gb", 8)


def _rec(n_out, ttft, e2e):
    return RequestRecord(request_id="r", trace_index=0, intended_send_s=1.0, planned_input_tokens=10,
                         planned_output_tokens=n_out, actual_send_s=1.0, first_token_s=1.0 + ttft,
                         last_token_s=1.0 + e2e, end_s=1.0 + e2e, actual_output_tokens=n_out, status=OK)


def test_tbt_splitwisesim_divides_by_all_output_tokens():
    a, b = _rec(11, 0.5, 2.5), _rec(4, 1.0, 1.8)
    assert tbt_splitwisesim_s(a) == pytest.approx(2.0 / 11) and mean_tbt_s(a) == pytest.approx(2.0 / 10)
    assert tbt_splitwisesim_s(_rec(1, 0.5, 0.5)) == 0.0 and mean_tbt_s(_rec(1, 0.5, 0.5)) is None
    lat = latency_section([a, b])
    assert lat["tbt_splitwisesim_s"]["count"] == 2
    assert lat["tbt_splitwisesim_s"]["mean"] == pytest.approx((2.0 / 11 + 0.8 / 4) / 2)
