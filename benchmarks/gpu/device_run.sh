#!/usr/bin/env bash
# splitbench on the lent H200 (issue 13), one script: from the repo root there, `OUT=$OUT bash benchmarks/gpu/device_run.sh`.
# The GPU bundle is carried and unpacked exactly as ../shared/gpu/device-smoke.sh does (its parts named in
# .gpu/parts.sha256, in .gpu/ of one or more calls, kept in /tmp/parts while the machine stays warm; traces in
# .gpu/traces/). Then the steps in $STEPS run in order, none started after $BUDGET_S s, each writing small results
# (tables, summaries; no raw run directories) to $OUT as it goes:
#   check   benchmarks/gpu_check.py: baseline, Splitwiser over NIXL and over the example connector (tiny model)
#   live    an 8B-shaped random model (`splitbench model random --config llama-3.1-8b`, served --load-format dummy):
#           a window of azure-conv-2023 and azure-code-2023 through baseline and Splitwiser-NIXL; compare per trace
#   profile `splitbench profile` of that model (one instance; the split pair with NIXL active), then the simulator
#           on the live windows from those profiles: error per metric (benchmarks/sim_vs_live.py)
#   neighbour benchmarks/neighbour_factor.py on one GPU: two instances of that model sharing it (the Splitwiser
#           layout), A's decode with B idle and with B prefilling; the factor is kept in /tmp/results for `profile`
#   robust  the token instance SIGKILLed mid-run: failures recorded, no GPU process or memory left (nvidia-smi);
#           a start failure (the V2 model runner without flashinfer) reported as its real cause in one line
#   ceiling client ceilings (benchmarks/client_ceiling.py) at --workers 1,2,4,8 against as many stub processes
#   router  benchmarks/router_overhead.py at 200 req/s (both modes) and --ceiling, the router on a core of its own
#   twogpu  (2 GPUs, nvidia-h200-x2) the 8B model on GPUS2 (default 0,1): baseline 2 instances vs prompt on the first
#           GPU + token on the second over NIXL, both live windows, compare, placement check, profiles, simulator
# Knobs: STEPS="check live profile robust ceiling", BUDGET_S=540, GPU=0, LIVE_S=45 (window per live run, s),
# CHECK_S=20, CEIL_S=5 (s per ceiling point), LIVE_KINDS ("base split"), SPLIT_ONLY=1 (profile the pair only), LIVE_TRACES (default "azure-conv-2023 azure-code-2023"), VARGS8 (vLLM args of the 8B model), LIVE_RUNS (live run dirs for
# `profile` when `live` ran in an earlier call: carry its $OUT/live/runs back as .gpu/live-runs), DRY=1 (print the
# commands only; runs anywhere, no bundle needed).
set -u
G="$PWD/.gpu"; P=/tmp/parts; S=/tmp/site; OUT="${OUT:-/tmp/gpu-out}"; PY="${PY:-python3}"; R=/tmp/results
BUNDLE_SHA=a5eade0cfc62031312a488a36fbd2b4233699cfc32b7f98d14bb4f5c6008dbee
BUDGET_S="${BUDGET_S:-540}"; STEPS="${STEPS:-check live profile robust ceiling}"; DRY="${DRY:-}"; GPU="${GPU:-0}"
LIVE_S="${LIVE_S:-45}"; ROUTER_S="${ROUTER_S:-10}"; CHECK_S="${CHECK_S:-20}"; CEIL_S="${CEIL_S:-5}"; M8=/tmp/llama8b
VARGS8="${VARGS8:---load-format dummy --enforce-eager --max-model-len 16384 --kv-cache-memory-bytes 17179869184 --uvicorn-log-level warning}"
VARGS_TINY="--enforce-eager --max-model-len 4096 --kv-cache-memory-bytes 4294967296 --uvicorn-log-level warning"
mkdir -p "$OUT"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
exec 3>&2   # the log goes to the call's stderr even from inside a step whose output goes to its file
log() { echo "[$(el)s] $*" | tee -a "$OUT/steps.txt" >&3; }
left() { local l=$(( BUDGET_S + 50 - $(el) )); [ "$l" -lt 10 ] && l=10; echo "$l"; }
# x CMD...: log it; under DRY=1 only that; else run it with what is left of the call as its timeout
x() { log "+ $(printf '%q ' "$@")"; [ -n "$DRY" ] && return 0; timeout "$(left)" "$@"; }
want() { case " $STEPS " in *" $1 "*) ;; *) return 1;; esac
         [ "$(el)" -lt "$BUDGET_S" ] || { log "skip $1: past the budget ($(el) s of $BUDGET_S)"; return 1; }
         log "== step $1"; mkdir -p "$OUT/$1"; }
sb() { x "$PY" -m splitbench.cli "$@"; }

# ---------------------------------------------------------------- parts and unpack (as device-smoke.sh)
unpack() {
  while read -r sum name; do [ -f "$G/$name" ] && cp -f "$G/$name" "$P/"; done < "$G/parts.sha256"
  need=$(wc -l < "$G/parts.sha256"); have=0
  while read -r sum name; do
    if [ -f "$P/$name" ] && echo "$sum  $P/$name" | sha256sum -c --status; then have=$((have + 1)); else log "part missing or bad: $name"; fi
  done < "$G/parts.sha256"
  log "parts present: $have/$need"
  [ "$have" -lt "$need" ] && { log "not all parts here yet: the next call must carry the missing one(s)"; exit 0; }
  if [ ! -f "$S/.complete" ]; then
    cat $(awk -v d="$P" '{print d "/" $2}' "$G/parts.sha256") > /tmp/gpu-site.tar.xz
    echo "$BUNDLE_SHA  /tmp/gpu-site.tar.xz" | sha256sum -c --status || { log "bundle sha256 mismatch"; exit 3; }
    rm -rf "$S"
    "$PY" -c "
import tarfile
with tarfile.open('/tmp/gpu-site.tar.xz', 'r:xz', ignore_zeros=True) as t:
    t.extractall('$S', filter='fully_trusted')" || { log "unpack failed"; exit 3; }
    rm -f /tmp/gpu-site.tar.xz; touch "$S/.complete"; log "unpacked $S ($(du -sh $S | cut -f1))"
  fi
}
if [ -n "$DRY" ]; then log "DRY=1: bundle unpack skipped (parts from $G/parts.sha256 -> $S)"; else mkdir -p "$P"; unpack; fi

export PYTHONPATH="$S:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HOME=/tmp/hf VLLM_CACHE_ROOT=/tmp/vllm-cache TRITON_CACHE_DIR=/tmp/triton-cache \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# flashinfer is not in the bundle: the V1 model runner and the non-flashinfer sampler work without it (seen 2026-12-01)
EXTRA_ENV="${EXTRA_ENV:-VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0}"; [ -n "$EXTRA_ENV" ] && export $EXTRA_ENV
TRACES="${TRACES:-$G/traces}"; [ -d "$TRACES" ] || TRACES="$PWD/shared/traces"
if [ -z "$DRY" ]; then
  { nvidia-smi -L; nproc; "$PY" -V; } > "$OUT/host.txt" 2>&1
  # the host vLLM's flags and connectors, probed once (cached in ~/.cache/splitbench/vllm for the steps below)
  timeout 240 "$PY" -c "import time; t = time.time(); from splitbench.servers.vllm_features import detect
print(detect().describe(), f'{time.time() - t:.0f} s')" > "$OUT/vllm-features.txt" 2>&1
  log "vLLM features: $(tail -c 300 "$OUT/vllm-features.txt" | tr '\n' ' ')"
fi

# keep(RUN_DIR, DEST): what documents a run (summaries, per-request placement and phases), not its raw files
keep() {
  [ -n "$DRY" ] && return 0
  "$PY" - "$1" "$2" <<'EOF' || log "keep $1 failed"
import json, shutil, sys
from pathlib import Path
import splitbench
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
(dst / "metrics").mkdir(parents=True, exist_ok=True)
for f in ("run.json", "summary.json", "records.parquet", "metrics/summary.json", "power/power_summary.json"):
    if (src / f).exists():
        shutil.copy(src / f, dst / f.replace("power/", ""))
df = splitbench.open_run(src).records
cols = ["request_id", "status", "planned_input_tokens", "actual_output_tokens", "ttft_s", "e2e_s",
        "prefill_instance", "decode_instance"]
out = df[cols].copy()
for k in ("prefill_sent", "prefill_done", "decode_sent", "first_token", "done"):
    out[k] = [p.get(k) if isinstance(p, dict) else None for p in df["phases_s"]]
out.to_csv(dst / "requests.csv", index=False, float_format="%.6f")
EOF
}

# ---------------------------------------------------------------- (a) the GPU check
if want check; then
  x "$PY" benchmarks/gpu_check.py --gpu "$GPU" --trace-dir "$TRACES" --duration "$CHECK_S" --results "$R/check" \
    --json "$OUT/check/check.json" > "$OUT/check/check.txt" 2> /tmp/check.err
  log "check exit $? ($(tail -1 "$OUT/check/check.txt" 2>/dev/null))"; tail -40 /tmp/check.err > "$OUT/check/check-stderr-tail.txt" 2>/dev/null
fi

# ---------------------------------------------------------------- (b) live windows of the 8B-shaped model
have_random() { [ -n "$DRY" ] || "$PY" -m splitbench.cli model random --help > /dev/null 2>&1; }
make_8b() { [ -z "$DRY" ] && [ -f "$M8/config.json" ] || sb model random --config llama-3.1-8b --out "$M8" > "$OUT/model-random.txt" 2>&1; }
if want live; then
  if have_random; then
    make_8b
    for tr in ${LIVE_TRACES:-azure-conv-2023 azure-code-2023}; do
      for b in ${LIVE_KINDS:-base split}; do
        [ "$(el)" -lt "$BUDGET_S" ] || { log "skip live $tr $b: past the budget"; continue; }
        if [ $b = base ]; then bargs=(--backend vllm --instances 1 --gpus "$GPU")
        else bargs=(--backend splitwise --connector nixl --layout splitwiser --gpus "$GPU"); fi
        rm -rf "$R/live/$b-$tr"
        sb run "${bargs[@]}" --model-dir "$M8" --vllm-args "$VARGS8" --trace "$tr" --trace-dir "$TRACES" \
          --duration "$LIVE_S" --rate-scale 1 --power auto --results "$R/live" --run-id "$b-$tr" \
          > "$OUT/live/$b-$tr.txt" 2>&1
        log "live $b $tr exit $?"; keep "$R/live/$b-$tr" "$OUT/live/runs/$b-$tr"
      done
      [ -d "$R/live/base-$tr" ] && [ -d "$R/live/split-$tr" ] && sb compare "$R/live/base-$tr" "$R/live/split-$tr" \
        --no-html --json "$OUT/live/compare-$tr.json" --markdown > "$OUT/live/compare-$tr.md" 2>&1
    done
  else log "skip live: no \`splitbench model random\` in this tree"; fi
fi

# ---------------------------------------------------------------- (b2) two GPUs: prompt on one, token on the other
# (issue 18, needs nvidia-h200-x2): the 8B-shaped model, baseline 2 instances vs Splitwise 1P+1T over NIXL on
# separate GPUs, the same windows as `live`; compare, placement check, then both roles profiled and simulated.
placement() {   # placement(RUN_DIR): which instance (and GPU) prefilled and decoded each ok request
  [ -n "$DRY" ] && return 0
  "$PY" - "$1" <<'EOF' || log "placement check of $1 failed"
import json, sys
from pathlib import Path
import splitbench
run = Path(sys.argv[1])
gpus = {i["id"]: i["gpu_ids"] for i in json.loads((run / "run.json").read_text())["backend"]["instances"]}
df = splitbench.open_run(run).records
ok = df[df["status"] == "ok"]
pairs = ok.groupby(["prefill_instance", "decode_instance"], dropna=False).size().to_dict()
print(f"{run.name}: {len(ok)}/{len(df)} ok; gpus {gpus}; (prefill, decode) -> requests {pairs}")
EOF
}
if want twogpu; then
  GPUS2="${GPUS2:-0,1}"; M2=(--model-dir "$M8" --vllm-args "$VARGS8")
  if [ -z "$DRY" ] && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -lt 2 ]; then log "skip twogpu: fewer than 2 GPUs"
  elif have_random; then
    make_8b
    for tr in azure-conv-2023 azure-code-2023; do
      for b in base2 split2; do
        [ "$(el)" -lt "$BUDGET_S" ] || { log "skip twogpu $tr $b: past the budget"; continue; }
        if [ $b = base2 ]; then bargs=(--backend vllm --instances 2 --gpus "$GPUS2")
        else bargs=(--backend splitwise --connector nixl --gpus "$GPUS2"); fi
        rm -rf "$R/twogpu/$b-$tr"
        sb run "${bargs[@]}" "${M2[@]}" --trace "$tr" --trace-dir "$TRACES" --duration "$LIVE_S" --rate-scale 1 \
          --power auto --results "$R/twogpu" --run-id "$b-$tr" > "$OUT/twogpu/$b-$tr.txt" 2>&1
        log "twogpu $b $tr exit $?"; keep "$R/twogpu/$b-$tr" "$OUT/twogpu/runs/$b-$tr"
        placement "$R/twogpu/$b-$tr" >> "$OUT/twogpu/placement.txt"
      done
      sb compare "$R/twogpu/base2-$tr" "$R/twogpu/split2-$tr" --no-html --json "$OUT/twogpu/compare-$tr.json" \
        --markdown > "$OUT/twogpu/compare-$tr.md" 2>&1
    done
    if [ "$(el)" -lt "$BUDGET_S" ]; then
      first="${GPUS2%%,*}"
      sb profile --backend vllm --gpus "$first" "${M2[@]}" --out "$OUT/twogpu/profile-base.csv" \
        --results "$R/twogpu-profile" > "$OUT/twogpu/profile-base.txt" 2>&1
      sb profile --backend splitwise --connector nixl --gpus "$GPUS2" "${M2[@]}" \
        --out "$OUT/twogpu/profile-split.csv" --results "$R/twogpu-profile" > "$OUT/twogpu/profile-split.txt" 2>&1
      x "$PY" benchmarks/sim_vs_live.py --profile "$OUT/twogpu/profile-base.csv" \
        --split-profile "$OUT/twogpu/profile-split.csv" --results "$R/twogpu-sim" --json "$OUT/twogpu/sim-error.json" \
        $(ls -d "$R"/twogpu/*-azure-* 2>/dev/null | tr '\n' ' ') > "$OUT/twogpu/sim-error.md" 2>&1
      log "twogpu simulator prediction exit $?"
    fi
  else log "skip twogpu: no \`splitbench model random\` in this tree"; fi
fi

# ---------------------------------------------------------------- (b3) a busy neighbour on one GPU
if want neighbour; then
  if have_random; then
    make_8b
    x "$PY" benchmarks/neighbour_factor.py --gpu "$GPU" --model-dir "$M8" --vllm-args "$VARGS8" --load prefill \
      --rounds "${NB_ROUNDS:-3}" --requests "${NB_REQUESTS:-3}" --json "$OUT/neighbour/factor.json" \
      > "$OUT/neighbour/factor.txt" 2>&1
    log "neighbour exit $?: $(tail -1 "$OUT/neighbour/factor.txt" 2>/dev/null)"
    [ -n "$DRY" ] || { mkdir -p "$R"; cp -f "$OUT/neighbour/factor.json" "$R/neighbour.json" 2>/dev/null; }
  else log "skip neighbour: no \`splitbench model random\` in this tree"; fi
fi

# ---------------------------------------------------------------- (c) profiles and the simulator's error
if want profile; then
  if have_random; then
    make_8b
    LIVE_RUNS="${LIVE_RUNS:-$R/live}"; [ -n "$DRY" ] || [ -d "$LIVE_RUNS" ] || LIVE_RUNS="$G/live-runs"
    runs=$(ls -d "$LIVE_RUNS"/*-azure-* 2>/dev/null | tr '\n' ' '); first=$(echo "$runs" | awk '{print $1}')
    # the live runs' machine type: profiles and simulated clusters must name the same one
    machine=$([ -f "$first/run.json" ] && "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['hardware']['machine'])" "$first/run.json")
    [ -n "$DRY" ] && { runs="$LIVE_RUNS/base-azure-conv-2023 $LIVE_RUNS/split-azure-conv-2023 ..."; machine="MACHINE_OF_LIVE_RUNS"; }
    margs=(); [ -n "$machine" ] && margs=(--machine "$machine")
    if [ -z "${SPLIT_ONLY:-}" ]; then
      sb profile --backend vllm --gpus "$GPU" --model-dir "$M8" --vllm-args "$VARGS8" "${margs[@]}" \
        --out "$OUT/profile/profile-base.csv" --results "$R/profile" > "$OUT/profile/profile-base.txt" 2>&1
      log "profile base exit $?"
    else : > "$OUT/profile/profile-base.csv"; fi   # split runs only: sim_vs_live reads the pair profile
    sb profile --backend splitwise --connector nixl --layout splitwiser --gpus "$GPU" --model-dir "$M8" \
      --vllm-args "$VARGS8" "${margs[@]}" --out "$OUT/profile/profile-split.csv" --results "$R/profile" \
      > "$OUT/profile/profile-split.txt" 2>&1
    log "profile split exit $?"
    if [ -n "$runs" ]; then
      x "$PY" benchmarks/sim_vs_live.py --profile "$OUT/profile/profile-base.csv" \
        --split-profile "$OUT/profile/profile-split.csv" --machine "$machine" --results "$R/sim" \
        --json "$OUT/profile/sim-error.json" $runs > "$OUT/profile/sim-error.md" 2>&1
      log "simulator error exit $?"
      if [ -f "$R/neighbour.json" ]; then   # the same, with the measured busy-neighbour factor
        x "$PY" benchmarks/sim_vs_live.py --profile "$OUT/profile/profile-base.csv" \
          --split-profile "$OUT/profile/profile-split.csv" --machine "$machine" --results "$R/sim-nb" \
          --neighbour-busy-factor "$R/neighbour.json" --json "$OUT/profile/sim-error-nb.json" $runs \
          > "$OUT/profile/sim-error-nb.md" 2>&1
        log "simulator error with the neighbour factor exit $?"
      fi
    else log "no live runs in $LIVE_RUNS: simulator error skipped"; fi
  else log "skip profile: no \`splitbench model random\` in this tree"; fi
fi

# ---------------------------------------------------------------- (d) robustness
if want robust; then
  x "$PY" -c "from splitbench.servers.tiny_model import write_tiny_model as w; w('/tmp/tiny128', hidden=512, heads=4, kv_heads=2)"
  rm -rf "$R/robust"
  kpid=""
  [ -n "$DRY" ] || { "$PY" - "$R/robust/kill/run.json" "$OUT/robust/killed.txt" <<'EOF' & kpid=$!; }
import json, os, signal, sys, time
meta, out = sys.argv[1], sys.argv[2]
end = time.time() + 300
while time.time() < end:   # once the replay runs, SIGKILL the token instance's process group 8 s into it
    try:
        m = json.load(open(meta))
        tok = next(i for i in m["backend"]["instances"] if i["id"] == "token-0")
        if m["status"] == "running":
            time.sleep(8)
            os.killpg(tok["pid"], signal.SIGKILL)
            open(out, "w").write(f"killed token-0 process group {tok['pid']} at {time.time():.1f}\n")
            break
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        pass
    time.sleep(0.5)
EOF
  sb run --backend splitwise --connector nixl --layout splitwiser --gpus "$GPU" --model-dir /tmp/tiny128 \
    --vllm-args "$VARGS_TINY" --trace azure-conv-2023 --trace-dir "$TRACES" --duration 30 --power auto \
    --results "$R/robust" --run-id kill > "$OUT/robust/kill.txt" 2>&1
  log "robust kill run exit $? ($(cat "$OUT/robust/killed.txt" 2>/dev/null || echo 'token-0 was not killed'))"
  [ -n "$kpid" ] && { kill "$kpid" 2>/dev/null; wait "$kpid" 2>/dev/null; }
  keep "$R/robust/kill" "$OUT/robust/kill"
  [ -n "$DRY" ] || sleep 3
  x nvidia-smi --query-compute-apps=pid,used_memory --format=csv > "$OUT/robust/nvidia-smi-after.csv" 2>&1
  if [ -z "$DRY" ]; then
    n=$(($(grep -c . "$OUT/robust/nvidia-smi-after.csv") - 1))
    left_procs=$(pgrep -af "vllm.entrypoints|splitbench.servers" | grep -v pgrep || true)
    [ "$n" -eq 0 ] && [ -z "$left_procs" ] && log "robust: no GPU process and no server left" \
      || log "robust FAILED: $n GPU process(es) left; $left_procs"
  fi
  # a start failure must name its real cause: the V2 model runner imports flashinfer, which the bundle lacks
  x env VLLM_USE_V2_MODEL_RUNNER=1 "$PY" -m splitbench.cli run --backend vllm --instances 1 --gpus "$GPU" \
    --model-dir /tmp/tiny128 --vllm-args "$VARGS_TINY" --trace azure-conv-2023 --trace-dir "$TRACES" --duration 5 --power off \
    --results "$R/robust" --run-id startfail > /tmp/startfail.txt 2>&1
  log "robust start failure exit $?: $(grep -m1 -iE 'error|exited' /tmp/startfail.txt | cut -c1-300)"
  [ -n "$DRY" ] || head -c 4000 /tmp/startfail.txt > "$OUT/robust/start-failure.txt"
fi

# ---------------------------------------------------------------- (e) client ceilings (no vLLM)
if want ceiling; then
  for w in 1 2 4 8; do
    [ "$(el)" -lt "$BUDGET_S" ] || { log "skip ceiling w$w: past the budget"; continue; }
    stubs=$(( w < 2 ? 2 : w )); from=$(( w * 1000 ))
    x "$PY" benchmarks/client_ceiling.py --skip-vllm --workers "$w" --stubs "$stubs" --ramp-from "$from" \
      --duration "$CEIL_S" --max-points 8 --json "$OUT/ceiling/w$w.json" > "$OUT/ceiling/w$w.txt" 2>&1
    log "ceiling w$w (stubs $stubs) exit $?: $(grep -m1 'ceiling:' "$OUT/ceiling/w$w.txt" 2>/dev/null)"
  done
fi
if want router; then   # issue 16: the P/D router's added TTFT on a host with a core of its own for the router
  loop=$("$PY" -c 'import uvloop' 2>/dev/null && echo uvloop || echo asyncio); log "router loop: $loop"
  x "$PY" benchmarks/router_overhead.py --loop "$loop" --rate 200 --duration "$ROUTER_S" --mode both --router-core own \
    > "$OUT/router/rate200.txt" 2>&1
  log "router 200 req/s exit $?: $(tail -n 3 "$OUT/router/rate200.txt" 2>/dev/null | head -n 2 | tr '\n' ' ')"
  x "$PY" benchmarks/router_overhead.py --loop "$loop" --ceiling --mode colocated --duration 5 --rate 200 --router-core own \
    > "$OUT/router/ceiling.txt" 2>&1
  log "router ceiling exit $?: $(grep -m1 -i 'ceiling' "$OUT/router/ceiling.txt" 2>/dev/null)"
fi
log "done in $(el) s (steps: $STEPS)"
