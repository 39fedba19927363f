"""A run whose prompts the server already holds in its prefix cache (an earlier run with the same --seed) is
warned, on a real stub server with vLLM's prefix-cache accounting; another seed is not."""
from __future__ import annotations

from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.servers.stub_main import run_stub_in_thread

TRACE = "synth:arrivals=poisson,rate=50,count=20,lengths=fixed,input=64,output=4,seed=1"


def warnings_of(tmp_path, run_id: str, url: str, **kw) -> list[str]:
    notes: list[str] = []
    res = run(RunOptions(trace=TRACE, backend="openai", backend_options={"url": url}, results_dir=str(tmp_path),
                         run_id=run_id, **kw), on_status=notes.append)
    assert res.summary["counts"]["ok"] == 20
    return [n for n in notes if "prefix cache" in n]


def test_a_second_run_with_the_same_seed_is_warned_and_another_seed_is_not(tmp_path):
    url, stop = run_stub_in_thread(ttft_s=0.001, tpot_s=0.001)
    try:
        assert warnings_of(tmp_path, "first", url) == []
        again = warnings_of(tmp_path, "again", url)
        # 3 of each prompt's 4 blocks of 16: vLLM recomputes the last prompt token
        assert len(again) == 1 and "--seed 0" in again[0] and "served 75.0%" in again[0], again
        assert warnings_of(tmp_path, "other-seed", url, seed=9) == []
    finally:
        stop()
