#!/usr/bin/env bash
# Regenerate this example: orthogonalize the refusal direction out of the embedded
# Qwen2.5-Coder-0.5B-Instruct at three strengths (as rank-1 LoRA adapters, ~1 MB each),
# then compare each edited model with the original side by side.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${TMPDIR:-/tmp}/steerlab-compare-alpha"
mkdir -p "$work"
for alpha in 0.5 1.0 1.5; do
  steerlab orthogonalize default --direction "$here/refusal-direction" --source-layer 12 \
    --alpha "$alpha" --format lora --out "$work/lora-a$alpha" --overwrite
done
steerlab compare default "$work/lora-a0.5" "$work/lora-a1.0" "$work/lora-a1.5" \
  --name original --name "alpha=0.5" --name "alpha=1.0" --name "alpha=1.5" \
  --limit 16 --capability-limit 24 --max-new-tokens 32 --kl-tokens 4 \
  --out "$here"
