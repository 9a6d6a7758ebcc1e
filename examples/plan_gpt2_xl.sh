#!/usr/bin/env bash
# The forecast for GPT-2 XL on eight H100s (FSDP), snapshots every 10 steps, a checkpoint every 1,000.
# The output is shown in the README ("GPT-2 XL on eight H100s").
set -euo pipefail
budget-callback plan --preset gpt2-xl --gpu h100 --devices 8 --strategy fsdp --batch-size 8 \
  --steps 20000 --save-every 10 --checkpoint-every 1000 "$@"
