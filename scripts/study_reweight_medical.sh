#!/usr/bin/env bash
# META-LoRA's Table 2 at our scale on a medical pool (issue 16 item 4), then its Table 4 (modules), Fig. 2
# (low-rank vs dense) and Fig. 3 (ratios 5:1, 10:1, 50:1): SmolLM2-135M, a MedMCQA pool of 800 per seed,
# a MedQA validation set of N/ratio, 120 steps of 4 for every method, 2 seeds, scored on held-out MedQA
# and MedMCQA test items in cloze form. Plain LoRA on the pool, BM25, DSIR, the classifier, MIX 10:1,
# reweighting with the paper's score and with our options. Resumable: run it again after an interruption.
# Results: runs/studies/reweight_medical/compare.{json,md}, plots/. Extra arguments go to metalora compare.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=configs/studies/reweight_medical
metalora compare $D/lora_pool.yaml $D/meta_paper.yaml $D/bm25.yaml $D/dsir.yaml $D/classifier.yaml $D/mix.yaml \
  $D/meta_ours.yaml $D/meta_wo_mlp.yaml $D/meta_wo_attention.yaml $D/meta_dense.yaml $D/meta_ratio5.yaml \
  $D/meta_ratio50.yaml \
  --tasks $D/eval_tasks.yaml --limit "${LIMIT:-200}" --seeds "${SEEDS:-0,1}" --jobs "${JOBS:-2}" --base \
  --reference lora_pool --out "${OUT:-runs/studies/reweight_medical}" "$@"
