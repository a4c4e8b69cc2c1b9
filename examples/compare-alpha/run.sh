#!/usr/bin/env bash
# Regenerate this example: orthogonalize the refusal direction out of the embedded
# Qwen2.5-Coder-0.5B-Instruct at three strengths (as rank-1 LoRA adapters, ~1 MB each, in
# runs/compare-alpha/), then compare each edited model with the original side by side.
# Paths are relative to the repository root, so comparison.json records them as a reader
# would type them (e.g. default+runs/compare-alpha/lora-a0.5).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=runs/compare-alpha
mkdir -p "$work"
for alpha in 0.5 1.0 1.5; do
  steerlab orthogonalize default --direction examples/compare-alpha/refusal-direction \
    --source-layer 12 --alpha "$alpha" --format lora --out "$work/lora-a$alpha" --overwrite
done
steerlab compare default "$work/lora-a0.5" "$work/lora-a1.0" "$work/lora-a1.5" \
  --name original --name "alpha=0.5" --name "alpha=1.0" --name "alpha=1.5" \
  --limit 16 --capability-limit 24 --max-new-tokens 32 --kl-tokens 4 \
  --out examples/compare-alpha --overwrite
