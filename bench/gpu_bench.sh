#!/usr/bin/env bash
# The whole GPU measurement in one call: run this first on any machine with a GPU.
#
#   bash bench/gpu_bench.sh                 # one GPU, at most about 8 minutes; JSON in bench/results/gpu_bench.json
#   bash bench/gpu_bench.sh --smoke         # CPU, tiny models, well under a minute (tests/test_bench.py runs it)
#
# Sections (bench/gpu_bench.py): the environment (GPU, driver, CUDA, torch, diffusers, ...);
# SD inpainting at 512x512, 50 steps, fp16, on the `fullsize` preset's random weights: both
# variants per batch size, the pipeline once per variant against the fused loop, then the
# fused loop with the UNet compiled (`inpaint.compile=default`), its compile timed apart;
# the generate job on CUDA over a few dozen images, with each stage's busy seconds and the
# GPU's utilisation sampled from nvidia-smi; a few BLIP fine-tune steps in bf16 and fp16.
# PYTHON picks the interpreter (default .venv/bin/python); other arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/gpu_bench.py "$@"
