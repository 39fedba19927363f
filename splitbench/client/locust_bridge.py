"""The shard replayer child of a Locust worker: plain asyncio, no gevent. `python -m splitbench.client.locust_bridge
SHARD.json` replays one shard through the core replayer at the shared start time and prints one JSON line per
finished record, then {"done": stats}."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import orjson

from splitbench.client.locust_rows import HEADERS_ENV, PipeWriter, workload_from_json
from splitbench.client.replay import replay_workload
from splitbench.client.replayer import ReplayConfig
from splitbench.workload.prompts import prompt_source


def _die_with_parent() -> None:
    """SIGTERM (a graceful stop) when the Locust process that started us dies, however it dies (Linux)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def replay_shard(spec: dict, out_fd: int) -> dict:
    """Replay one shard (core Replayer, shared start time) into spec["shard_dir"]; each finished record also goes
    to out_fd as one JSON line. Returns the replay stats."""
    w = workload_from_json(spec["workload"])
    p = spec["prompts"]
    prompts = prompt_source({"root": p.get("model_root")}, api=spec["replay"].get("api", "completions"),
                            tokenizer=p.get("tokenizer"), vocab_size=p.get("vocab_size"), seed=p.get("seed", 0),
                            shared_prefix_tokens=p.get("shared_prefix_tokens", 0))
    headers = json.loads(os.environ.get(HEADERS_ENV) or "{}")
    cfg = ReplayConfig(**spec["replay"], headers=headers, start_at_unix_s=spec["start_at_unix_s"])
    out = PipeWriter(out_fd)
    dumps = orjson.dumps
    shard_dir = Path(spec["shard_dir"])
    replayer, interrupted = replay_workload(w, prompts.payload, cfg, shard_dir, f"{spec['run_id']}-shard{spec['shard']}",
                                            on_record=lambda rec: out.write(dumps(rec) + b"\n"))
    stats = {**asdict(replayer.stats), "interrupted": interrupted}
    out.write(dumps({"done": stats}) + b"\n")
    out.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m splitbench.client.locust_bridge SHARD.json", file=sys.stderr)
        return 2
    _die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    out_fd = os.dup(1)   # the record stream; anything else printed to stdout goes to stderr instead
    os.dup2(2, 1)
    replay_shard(spec, out_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
