#!/usr/bin/env bash
# MTL-LoRA's Table 2 at our scale (issue 19 item 2): seven methods on the eight commonsense tasks,
# SmolLM2-135M, matched parameter budgets, 80 steps x 8 samples each, 2 seeds, 100 test items per task;
# then R-LoRA and full fine-tuning (issue 18 item 4) and Table 5's ablations (issue 19 item 3):
# without Lambda_t, tau = 1, n = 1.
# Resumable: run it again after an interruption. Results: runs/studies/mtl_table2/compare.{json,md}, plots/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=configs/studies/mtl_table2
metalora compare $D/lora_mt.yaml $D/mtl_lora.yaml $D/hydra_lora.yaml $D/moelora.yaml $D/multilora.yaml \
  $D/dora.yaml $D/lora_st.yaml $D/r_lora.yaml $D/full_ft.yaml $D/mtl_lora_no_lambda.yaml $D/mtl_lora_tau1.yaml $D/mtl_lora_n1.yaml \
  --seeds "${SEEDS:-0,1}" --jobs "${JOBS:-2}" --limit 100 --reference lora_mt --base \
  --out "${OUT:-runs/studies/mtl_table2}" "$@"
