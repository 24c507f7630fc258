#!/usr/bin/env bash
# The WeCoLoRA paper's runs: distillations on ImageNet and linear probes of each distilled
# student, for both tables of the seed README, skipping runs that already finished.
#
#   TEACHER_SSL=pretrained/mae_pretrain_vit_base.pth TEACHER_SUP=pretrained/vit_base_sup.npz \
#   IMAGENET=/data/imagenet INAT19=/data/inat19 RESISC45=/data/NWPU-RESISC45 CXR=/data/cxr14 \
#     bash scripts/run_wecolora.sh runs/wecolora [extra --config.* flags for every run]
#   python scripts/wecolora_table.py runs/wecolora --out runs/wecolora/table
#
# Data (unset: that data set's probes are skipped, and distillation needs IMAGENET):
#   IMAGENET   ImageNet-layout folder with train/<class>/ and val/<class>/ (distillation reads
#              train/ at alpha = 1% or 10% per class; the probe trains on train/, tests on val/)
#   INAT19     iNaturalist 2019 in the same layout (train/, val/)
#   RESISC45   NWPU-RESISC45: one folder per class (the probe splits it 10% / 90%)
#   CXR        NIH ChestX-ray14 in its official layout (Data_Entry_2017*.csv, lists, images*/)
#   CIFAR-100 comes from TFDS (set TFDS_DATA_DIR or pass --config.data.tfds_data_dir=...).
# Teachers: TEACHER_SSL (MAE ViT-B/16 .pth), TEACHER_SUP (supervised ViT-B/16 .npz/.pth); a
# teacher that is not set is skipped.
# Selection (space-separated): TABLES ("1 2"), DATASETS ("imagenet chestxray inat19 resisc45
# cifar100"), REDUCTIONS ("2 3": the r values run; table 1 has r = 2 only). DRY_RUN=1
# prints the commands without running them.
#
# Layout (read by scripts/wecolora_table.py):
#   OUT/distill/<teacher>/<variant>-r<r>-a<alpha>/            a distillation run
#   OUT/probe/<teacher>/<variant>-r<r>-a<alpha>/<dataset>/    its linear probe
#   OUT/probe/<teacher>/copied-r<r>/<dataset>/                 the copied, undistilled student
# variants: no_copy, weco_kd (WeCo+KD), lora_plain (WeCo + LoRA on q, v), lora (WeCoLoRA:
# enhanced LoRA on q, k, v, out, fc1, fc2). A run is finished when its work dir has results.csv;
# an interrupted run resumes from its last checkpoint when the script is started again.
set -euo pipefail
OUT="${1:?usage: run_wecolora.sh OUT_DIR [extra --config flags]}"
shift || true
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
TABLES="${TABLES:-1 2}"
DATASETS="${DATASETS:-imagenet chestxray inat19 resisc45 cifar100}"
REDUCTIONS="${REDUCTIONS:-2 3}"

teacher_path() {
  case "$1" in
    ssl) echo "${TEACHER_SSL:-}" ;;
    sup) echo "${TEACHER_SUP:-}" ;;
  esac
}

data_root() {
  case "$1" in
    imagenet) echo "${IMAGENET:-}" ;;
    inat19) echo "${INAT19:-}" ;;
    resisc45) echo "${RESISC45:-}" ;;
    chestxray) echo "${CXR:-}" ;;
    cifar100) echo "tfds" ;;
  esac
}

variant_args() {
  case "$1" in
    no_copy) echo "student=no_copy" ;;
    weco_kd) echo "student=weco_kd" ;;
    lora_plain) echo "student=lora,lora=plain" ;;
    lora) echo "student=lora,lora=enhanced" ;;
  esac
}

run() {  # run WORKDIR CONFIG [flags]: skip if finished, else run (or print under DRY_RUN)
  local workdir="$1" config="$2"
  shift 2
  if [[ -f "$workdir/results.csv" ]]; then
    echo "skip $workdir (finished)"
    return 0
  fi
  echo "=== $workdir"
  local cmd=("$PYTHON" -m idat_jax.main --config "$config" --workdir "$workdir"
             --config.progress_bar=False "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}"
  fi
}

probe() {  # probe TEACHER_NAME TEACHER_PATH R STUDENT_RUN PROBE_DIR DATASETS... -- flags
  local tname="$1" tpath="$2" r="$3" student_run="$4" dir="$5"
  shift 5
  local sets=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do sets+=("$1"); shift; done
  shift || true
  for ds in "${sets[@]}"; do
    [[ " $DATASETS " == *" $ds "* ]] || continue
    local root
    root="$(data_root "$ds")"
    if [[ -z "$root" ]]; then
      echo "skip probe $ds (its data root is not set)"; continue
    fi
    local arg="dataset=$ds,r=$r,teacher=$tpath"
    [[ -n "$student_run" ]] && arg="$arg,student_run=$student_run"
    [[ "$root" != tfds ]] && arg="$arg,root=$root"
    run "$dir/$ds" "$REPO/configs/wecolora_linprobe.py:$arg" "$@"
  done
}

# One line per distillation: teacher r alpha variant, then the data sets its probe needs.
plan() {
  if [[ " $TABLES " == *" 1 "* ]]; then  # ablation: SSL teacher, r = 2, alpha 1% and 10%
    for alpha in 0.01 0.1; do
      for v in no_copy weco_kd lora_plain lora; do
        echo "ssl 2 $alpha $v imagenet inat19 cifar100"
      done
    done
  fi
  if [[ " $TABLES " == *" 2 "* ]]; then  # both teachers, r = 2 and 3, WeCo+KD vs WeCoLoRA, 1%
    for t in sup ssl; do
      for r in 2 3; do
        for v in weco_kd lora; do
          echo "$t $r 0.01 $v imagenet chestxray inat19 resisc45 cifar100"
        done
      done
    done
  fi
}

declare -A copied_done=()
while read -r tname r alpha variant sets; do
  [[ " $REDUCTIONS " == *" $r "* ]] || continue
  tpath="$(teacher_path "$tname")"
  if [[ -z "$tpath" ]]; then
    echo "skip teacher $tname (TEACHER_${tname^^} is not set)"; continue
  fi
  name="$variant-r$r-a$alpha"
  ddir="$OUT/distill/$tname/$name"
  if [[ -z "${IMAGENET:-}" ]]; then
    echo "skip distillation $tname/$name (IMAGENET is not set)"; continue
  fi
  run "$ddir" "$REPO/configs/wecolora_distill.py:r=$r,ratio=$alpha,$(variant_args "$variant"),teacher=$tpath,root=$IMAGENET/train" "$@"
  if [[ "${DRY_RUN:-0}" != 1 && ! -f "$ddir/results.csv" ]]; then
    echo "distillation $ddir did not finish; its probes are skipped"; continue
  fi
  # shellcheck disable=SC2086
  probe "$tname" "$tpath" "$r" "$ddir" "$OUT/probe/$tname/$name" $sets -- "$@"
  if [[ -z "${copied_done[$tname-$r]:-}" ]]; then  # the copied student without distillation
    copied_done[$tname-$r]=1
    probe "$tname" "$tpath" "$r" "" "$OUT/probe/$tname/copied-r$r" \
      imagenet chestxray inat19 resisc45 cifar100 -- "$@"
  fi
done < <(plan | awk '!seen[$0]++')
