"""The plan of run_all.sh (`python -m fire_repro.plan`, which run_all.sh runs): run_all.sh's blocks
name their trainings, evaluations, tables and figures (one line each, on stdin); this module answers
everything else from the code the scripts themselves run, and launches what is not finished
(launchers.py).

    run folder      <OUT_DIR>/runs/<tag>-<identity>: config.identity_hash of the arguments as the
                    training script's own get_args resolves them (train_fire.get_args, train_trades.get_args)
    finished run    run_folder.finished_run: summary.json of --epochs epochs
    evaluation      eval_autoattack.py's own parser and settings_of, with its masking report
                    (--sanity, --transfer-from a planned run without the regulariser: transfer_source);
                    its radius the data set's
                    evaluation radius (data.DataSet.evaluation_radius), its norm and radius as
                    autoattack.threat_model gives them, its file results.default_out, finished when
                    results.finished says so (checkpoint SHA-256 and settings): a damaged result
                    is evaluated again
    cost            images trained x the paper's measured time per image of that network (cost_of)
    launchers       local: JOBS processes at a time, each step after the steps it needs; slurm:
                    sbatch jobs chained by afterok dependencies (docs/cluster.md)

Plan lines end with \0 (a field may hold a newline), their fields separated by \x1f; "@N" in a field stands for the folder of the N-th training:

    common FLAGS...                 flags of every training (run_all.sh's TRAIN_COMMON)
    block NAME                      the steps that follow belong to block NAME
    train @N TAG SCRIPT FLAGS...    a training: the block's FLAGS, then common's, then TRAIN_FLAGS
                                    (which may not set a flag of FLAGS)
    evaluate @N/KIND.pt FLAGS...    AutoAttack on a checkpoint (the data set's radius is added here)
    corrupt @N/KIND.pt FLAGS...     python -m fire_repro.corruptions on a checkpoint of a data set of
                                    RobustBench's corruption boards (CIFAR-10/100; others: no step), after
                                    its AutoAttack; a rehearsal's stand-in files are written first
    table NAME TITLE ARGS...        python -m fire_repro.tables ARGS: @N/KIND.pt is its result
    plot NAME KIND ARGS...          python -m fire_repro.tables ARGS --plot-kind KIND (Figs. 7 and 8)
    curves NAME TITLE @N...         plot_runs.py's training curves of the runs, figures/NAME-curves.png
    step OUTPUT CMD...              a CPU command writing OUTPUT, run here unless OUTPUT exists
    prepare PATH CMD...             stand-in data that trainings read, written before anything else

The settings come from the environment that run_all.sh checked (docs/reproducing.md,
docs/cluster.md); those only this module reads are checked here, before anything is created.
The exit status is 0 when every table and figure was written whole, 1 when a step failed or a
table left results out (the blocks are named), 2 for bad settings.
"""
import getpass
import glob
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field

import eval_autoattack
import train_fire
import train_trades
from fire_repro import corruptions, results
from fire_repro.autoattack import threat_model
from fire_repro.common import UserError, cli, eps_text, lock_folder, sha256_file
from fire_repro.config import identity_hash
from fire_repro.data import DATASETS, REHEARSAL_NOTE, batch_split, epoch_steps, steps_per_epoch, test_size
from fire_repro.launchers import Local, Slurm, Stops, check_slurm, env
from fire_repro.checkpoints import damaged_checkpoint
from fire_repro.run_folder import damaged_metrics, finished_run, repair_metrics

SCRIPTS = {"train_fire.py": train_fire, "train_trades.py": train_trades}
# Flags that run_all.sh sets for every run itself: TRAIN_FLAGS may not override them.
OWNED_FLAGS = ("--dataset", "--seed", "--out-dir", "--resume", "--overwrite", "--print-identity", "--planned",
               "--lam", "--beta", "--loss", "--distance", "--self-adaptive", "--aux-data",
               "--init-from", "--rehearsal")


# ---- cost: the paper's measured throughput per network -----------------------------------------
# GPU-hours = 4 V100s x the paper's hours per training image of the network at its attack steps,
# from the run that measured it (data.DATASETS paper_hours, aux_paper_hours), x the images a run
# trains (its steps x batch size x epochs), scaled by (attack steps + 1) forward-backward passes.
# ResNet-18 by its FLOPs (1.11 GFLOPs an image against WRN-34-10's 13.3).
MEASURED_BY = {"smallcnn": ("mnist", False), "wrn-34-10": ("cifar10", False), "wrn-28-10": ("cifar10", True)}
SCALED = {"resnet18": ("wrn-34-10", 1.11 / 13.3)}
GPUS_PER_RUN = 4


def images_per_epoch(dataset, batch_size):
    """Images one epoch trains on (extra data included): its steps x the batch size."""
    return steps_per_epoch(DATASETS[dataset].train_images, batch_size) * batch_size


def hours_per_image(model):
    """(low, high) hours on 4 V100s per training image and attack pass of `model`; None if the
    paper measured no run of it."""
    if model in SCALED:
        base, ratio = SCALED[model]
        return tuple(h * ratio for h in hours_per_image(base))
    if model not in MEASURED_BY:
        return None
    name, aux = MEASURED_BY[model]
    d = DATASETS[name]
    preset = dict(d.preset, **(d.aux_preset if aux else {}))
    hours = d.aux_paper_hours if aux else d.paper_hours
    passes = images_per_epoch(name, preset["batch_size"]) * preset["epochs"] * (preset["attack_steps"] + 1)
    return tuple(h / passes for h in hours)


def run_epoch_steps(args):
    """Batches in one epoch of the training `args` at full scale (data.epoch_steps of the data set's
    training split)."""
    return epoch_steps(DATASETS[args.dataset].train_size - args.val_size, args)


def cost_of(args):
    """(low, high) V100 GPU-hours of a training; (0, 0) on the CPU, for a rehearsal, or for a
    network the paper timed no run of."""
    per = hours_per_image(args.model)
    if args.device == "cpu" or args.rehearsal or per is None:
        return 0.0, 0.0
    passes = run_epoch_steps(args) * args.batch_size * args.epochs * (args.attack_steps + 1)
    return tuple(GPUS_PER_RUN * p * passes for p in per)


def hours(h):
    return f"{h:.1f}" if h < 10 else f"{round(h):,}"


# ---- the plan ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Step:
    kind: str                    # train, evaluate, table, plot, step, prepare
    block: str
    name: str                    # what it is called in messages (a folder, a checkpoint, a file)
    command: list
    log: str = ""
    needs: list = field(default_factory=list)   # steps that must succeed first
    done: bool = False           # finished and whole before this invocation
    output: str = ""             # the file it writes (evaluations: the result; tables: the table)
    job: str = ""                # SLURM job name
    note: str = ""               # a line for the dry run
    cost: tuple = (0.0, 0.0)
    state: str = "pending"       # pending, running, ok, failed
    damage: str = ""             # a finished run's file that is damaged, and what to do about it


def train_flags():
    """TRAIN_FLAGS split into flags; one that run_all.sh sets itself is refused, and so is a request
    for help (it would print the scripts' help in place of the plan)."""
    flags = env("TRAIN_FLAGS").split()
    for flag in flags:
        if flag in ("-h", "--help") or (flag.startswith("--h") and "--help".startswith(flag.split("=")[0])):
            raise UserError(f"TRAIN_FLAGS may not hold {flag}: it adds flags to every training "
                            f"(train_fire.py -h and train_trades.py -h list them)")
        name = flag.split("=")[0]
        if name.startswith("--") and len(name) > 2 and any(o.startswith(name) for o in OWNED_FLAGS):
            owned = next(o for o in OWNED_FLAGS if o.startswith(name))
            raise UserError(f"TRAIN_FLAGS may not set {owned}: run_all.sh sets it for every run "
                            f"(SEEDS, DATASETS, the blocks; docs/reproducing.md)")
    return flags


def overridden(block_flags, extra):
    """The first flag of TRAIN_FLAGS (`extra`) that sets one of a block's own flags (`block_flags`,
    argparse abbreviations and --flag=value included), or None."""
    own = [f for f in block_flags if f.startswith("--")]
    for flag in extra:
        name = flag.split("=")[0]
        if name.startswith("--") and len(name) > 2:
            hit = next((o for o in own if o == name), None) or next((o for o in own if o.startswith(name)), None)
            if hit:
                return hit
    return None


def resolve(script, argv):
    """The arguments as `script` resolves them (its own get_args: its parser, the data set's preset,
    its checks) and their identity hash; a refused flag is a UserError with the script's own message."""
    try:
        args = SCRIPTS[script].get_args(argv)
    except UserError as e:
        raise UserError(f"{e} (in: {script} {' '.join(argv)})") from None
    return args, identity_hash(vars(args))


def retrain_command(train):
    """The command that trains a planned run again from scratch in its folder: the script and its
    flags, --overwrite in place of --resume auto."""
    i = next(i for i, c in enumerate(train.command) if c in SCRIPTS)
    return shlex.join(["python", *train.command[i:-2], "--overwrite"])


class Plan:
    """Every step of the blocks, de-duplicated (a run or an evaluation shared by several blocks is
    one step), with what is finished already."""

    def __init__(self, lines, out_dir):
        self.out_dir, self.extra, self.common = out_dir, train_flags(), []
        self.steps, self.blocks, self.folders, self.args = [], {}, {}, {}
        self.by_key, self.evals = {}, {}   # de-duplication; checkpoint -> its evaluation
        self.corrupts = {}                 # checkpoint -> its corruption evaluation
        self.shared = {}                   # block -> trainings shared with a block above
        block = ""
        for line in lines:
            kind, *fields = line.split("\x1f")
            if kind == "block":
                block = fields[0]
                self.blocks[block] = []
                continue
            if kind == "common":
                self.common = fields
                continue
            step = getattr(self, "add_" + kind)(block, *fields)
            if step is not None:
                self.blocks[block].append(step)

    def ref(self, text):
        """A field with @N (the N-th training's folder) replaced."""
        return re.sub(r"@(\d+)", lambda m: self.folders[m.group(1)], text)

    def once(self, key, step):
        if key in self.by_key:
            return self.by_key[key], True
        self.by_key[key] = step
        self.steps.append(step)
        return step, False

    def add_train(self, block, handle, tag, script, *flags):
        own = self.overridden_check(block, script, [self.ref(f) for f in flags])
        argv = own + self.common + self.extra
        args, ident = resolve(script, [*argv, "--print-identity", *self.planned_inputs(argv)])
        folder = os.path.join(self.out_dir, "runs", f"{tag}-{ident}")
        self.folders[handle.lstrip("@")] = folder
        self.args[folder] = args
        launcher = [sys.executable]
        nproc = int(env("NPROC", "1"))
        if nproc > 1 and not getattr(args, "self_adaptive", False):  # soft targets live in one process
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        needs = [self.by_key[("train", os.path.dirname(args.init_from))]] if args.init_from and \
            ("train", os.path.dirname(args.init_from)) in self.by_key else []
        step, seen = self.once(("train", folder), Step(
            "train", block, folder, [*launcher, script, *argv, "--out-dir", folder, "--resume", "auto"],
            log=os.path.join(folder, "train.out"), needs=needs, done=finished_run(folder, args.epochs) is not None,
            job=f"train-{os.path.basename(folder)}", cost=cost_of(args),
            note=f"{script} {' '.join(argv)}"))
        if seen:
            self.shared[block] = self.shared.get(block, 0) + 1
        elif step.done:
            why = damaged_metrics(folder, args.epochs)
            step.damage = why and f"{folder}/metrics.jsonl is damaged ({why}): written again from last.pt's history"
        return step

    def overridden_check(self, block, script, flags):
        """The block's own flags of a training; a UserError if TRAIN_FLAGS would override one."""
        hit = overridden(flags, self.extra)
        if hit:
            raise UserError(f"TRAIN_FLAGS may not set {hit}: block {block} sets it for its runs "
                            f"({script} {' '.join(flags)}); run another block, or train the run yourself")
        return flags

    def planned_inputs(self, argv):
        """--planned FILE for each input (--init-from, --aux-data) that a step planned before
        writes: a run's checkpoint, prepared stand-in data. It may not exist yet; every other input
        is checked by the script's parser as a training checks it."""
        outputs = set(self.folders.values())
        prepared = {step.output for step in self.steps if step.kind == "prepare"}
        planned = []
        for flag, value in zip(argv, argv[1:]):
            if flag in ("--init-from", "--aux-data") and (
                    os.path.dirname(value) in outputs or value in prepared):
                planned += ["--planned", value]
        return planned

    def transfer_source(self, folder):
        """best.pt of a run planned before, of the same data set and norm as `folder`'s, trained
        without a regulariser (Madry et al.: no method weight, or the weight at 0), for the
        masking report's transfer check: the same architecture and seed preferred; None if none."""
        saved = self.args[folder]
        found = [(a.model == saved.model, a.seed == saved.seed, f) for f, a in self.args.items()
                 if f != folder and a.dataset == saved.dataset and a.norm == saved.norm
                 and (not a.method_weight or getattr(a, a.method_weight) == 0)]
        return os.path.join(max(found)[2], "best.pt") if found else None

    def add_evaluate(self, block, checkpoint, *flags):
        ckpt = self.ref(checkpoint)
        folder = os.path.dirname(ckpt)
        train, saved = self.by_key[("train", folder)], self.args[folder]
        if ckpt in self.evals:
            return self.evals[ckpt]
        # the paper's evaluation radius, where it is not training's
        eps = DATASETS[saved.dataset].evaluation_radius(saved.norm)
        source = self.transfer_source(folder)
        flags = [*flags, *(["--eps", str(eps)] if eps is not None else []),  # + the masking report
                 "--sanity", *(["--transfer-from", source] if source else [])]
        eargs = eval_autoattack.get_args([ckpt, *flags])   # eval_autoattack.py's own parser
        norm, eps = threat_model(vars(saved), eargs.norm, eargs.eps)
        n = min(eargs.n_examples or math.inf, test_size(saved))
        out = results.default_out(ckpt, eps, saved.eps, eargs.split, norm)
        done, why, damage = False, "", ""
        if train.done:
            damage = damaged_checkpoint(ckpt) if os.path.isfile(ckpt) else "missing"
        if damage:  # evaluating it would fail on every rerun: the run must be trained again
            damage = (f"{ckpt} of a finished run is damaged ({damage}): train the run again with "
                      f"`{retrain_command(train)}` (its old files are set aside), then run this command again")
        elif train.done:
            record, why = results.finished(out, sha256_file(ckpt), eval_autoattack.settings_of(eargs, eps, n, norm))
            done = record is not None and "sanity" in record
            why = why or ("" if done or record is None else "no masking report; only it is added")
        stem = os.path.splitext(os.path.basename(out))[0]
        # one evaluation of a run folder at a time (eval_autoattack.py locks the folder): Table 2
        # evaluates the Madry runs' last.pt and best.pt, the second after the first
        before = [s for s in self.evals.values() if os.path.dirname(s.name) == folder and not s.done][-1:]
        step = Step("evaluate", block, ckpt, [sys.executable, "eval_autoattack.py", ckpt, *flags],
                    log=os.path.splitext(ckpt)[0] + "-eval.out", done=done, output=out,
                    needs=[train, *before, *([self.by_key[("train", os.path.dirname(source))]] if source else [])],
                    job=f"eval-{os.path.basename(folder)}-{stem}",
                    note=f" at eps {eps_text(eps)}" + (f" (again: {why})" if why else ""), damage=damage)
        if damage:
            step.state = "failed"
        self.evals[ckpt] = step
        self.steps.append(step)
        return step

    def add_corrupt(self, block, checkpoint, *flags):
        """The corruption evaluation of a checkpoint (a step of kind evaluate: a GPU job), after its
        training and the AutoAttack evaluation of its folder (both lock the folder); None for a
        data set without RobustBench's corruption files."""
        ckpt = self.ref(checkpoint)
        folder = os.path.dirname(ckpt)
        train, saved = self.by_key[("train", folder)], self.args[folder]
        if saved.dataset not in corruptions.BOARDS:
            return None
        if ckpt in self.corrupts:
            return self.corrupts[ckpt]
        cargs = corruptions.get_args([ckpt, *flags])   # the command's own parser
        needs = [train, *[s for s in self.evals.values() if os.path.dirname(s.name) == folder]]
        _, directory, record, archive = corruptions.board_facts(saved.dataset)
        files = os.path.join(cargs.data_dir or saved.data_dir, directory)
        if not saved.rehearsal and not os.path.isdir(files):  # as the extra-data rows without AUX_DATA
            if files not in self.corrupts:
                print(f"  SKIP the corruption evaluations of {saved.dataset}: {files} not found (download "
                      f"{archive} from https://zenodo.org/record/{record}; docs/corruptions.md)")
                self.corrupts[files] = None
            return None
        if saved.rehearsal:  # stand-in files of RobustBench's layout (corruptions.write_standin)
            needs.append(self.add_prepare(block, files, sys.executable, "-c",
                                          "import sys; from fire_repro import corruptions; "
                                          "corruptions.write_standin(sys.argv[1], sys.argv[2])",
                                          os.path.dirname(files), saved.dataset))
        out, done = results.corruptions_out(ckpt), False
        if train.done and os.path.isfile(ckpt) and os.path.isdir(files):
            try:
                out, record_done, _ = corruptions.finished(ckpt, cargs, vars(saved))
                done = record_done is not None
            except UserError:
                done = False   # damaged files: the step itself says so
        n = cargs.n_examples or DATASETS[saved.dataset].test_size
        passes = len(corruptions.SEVERITIES) * len(corruptions.board_facts(saved.dataset)[0]) * n
        per = hours_per_image(saved.model)   # a forward pass: a third of a training pass, on one GPU
        cost = "" if per is None or saved.rehearsal else \
            f", about {60 * passes * GPUS_PER_RUN * per[1] / 3:.0f} GPU-minutes"
        step = Step("evaluate", block, out, [sys.executable, "-m", "fire_repro.corruptions", ckpt, *flags],
                    log=os.path.splitext(out)[0] + ".out", needs=needs, done=done, output=out,
                    job=f"corrupt-{os.path.basename(folder)}-{os.path.splitext(os.path.basename(out))[0]}",
                    note=f": {passes:,} corrupted images from {files}{cost}")
        self.corrupts[ckpt] = step
        self.steps.append(step)
        return step

    def add_corruptions_table(self, block, name, title, *args):
        """tables/NAME-corruptions.md (python -m fire_repro.tables --corruptions) of the corruption
        results of the checkpoints (@N/KIND.pt) that have one; none when none does."""
        ckpts = [self.ref(a) for a in args if self.corrupts.get(self.ref(a))]
        if not ckpts:
            return None
        output = os.path.join(self.out_dir, "tables", f"{name}-corruptions.md")
        command = [sys.executable, "-m", "fire_repro.tables", *[self.corrupts[c].output for c in dict.fromkeys(ckpts)],
                   "--corruptions", "--quoted", "corruptions", "--title", title, "--table-out", output]
        digest = hashlib.sha256("\x1f".join(command).encode()).hexdigest()[:8]
        step = Step("table", block, output, command, log=os.path.splitext(output)[0] + ".out",
                    needs=[self.corrupts[c] for c in ckpts], output=output, job=f"table-{name}-corruptions-{digest}")
        self.steps.append(step)
        return step

    def from_results(self, block, kind, name, output, args, command):
        needs = [self.evals[self.ref(a)] for a in args if a.startswith("@")]
        needs += [self.corrupts[self.ref(a)] for a in args if self.corrupts.get(self.ref(a))]  # the Corruptions column
        command = [self.ref(a) if a.startswith("@") else a for a in command]
        command = [self.evals[a].output if a in self.evals else a for a in command]
        digest = hashlib.sha256("\x1f".join(command).encode()).hexdigest()[:8]
        step = Step(kind, block, output, command, log=os.path.splitext(output)[0] + ".out",
                    needs=needs, output=output, job=f"{kind}-{name}-{digest}")
        self.steps.append(step)
        return step

    def add_table(self, block, name, title, *args):
        output = os.path.join(self.out_dir, "tables", f"{name}.md")
        return self.from_results(block, "table", name, output, args, [
            sys.executable, "-m", "fire_repro.tables", *args, "--title", title, "--table-out", output])

    def add_plot(self, block, name, kind, *args):
        output = os.path.join(self.out_dir, "figures", f"{name}.png")
        return self.from_results(block, "plot", name, output, args, [
            sys.executable, "-m", "fire_repro.tables", *args, "--plot-kind", kind, "--plot-out", output])

    def add_curves(self, block, name, title, *runs):
        """plot_runs.py's training curves of the runs (@N) to figures/NAME-curves.png, drawn again
        after their trainings, like a table after its evaluations."""
        folders = [self.ref(r) for r in runs]
        output = os.path.join(self.out_dir, "figures", f"{name}-curves.png")
        needs = [self.by_key[("train", f)] for f in dict.fromkeys(folders)]
        command = [sys.executable, "plot_runs.py", *dict.fromkeys(folders), "--title", title, "--out", output]
        digest = hashlib.sha256("\x1f".join(command).encode()).hexdigest()[:8]
        step = Step("plot", block, output, command, log=os.path.splitext(output)[0] + ".out",
                    needs=needs, output=output, job=f"curves-{name}-{digest}")
        self.steps.append(step)
        return step

    def add_step(self, block, output, *command):
        step, _ = self.once(("step", output), Step("step", block, output, list(command),
                                                   done=os.path.exists(output), output=output))
        return step

    def add_prepare(self, block, output, *command):
        step, _ = self.once(("prepare", output), Step("prepare", block, output, list(command),
                                                      done=os.path.exists(output), output=output))
        return step


# ---- what the plan prints ----------------------------------------------------------------------
def counts_line(name, steps, shared, queued):
    trains = [s for s in steps if s.kind == "train"]
    evals = [s for s in steps if s.kind == "evaluate"]
    outputs = [s for s in steps if s.kind in ("table", "plot", "step")]
    start = [s for s in trains if not s.done and s not in queued]
    lo, hi = sum(s.cost[0] for s in start), sum(s.cost[1] for s in start)
    gpu = "no GPU" if hi == 0 else f"{hours(lo)} GPU-hours" if hours(lo) == hours(hi) else f"{hours(lo)}-{hours(hi)} GPU-hours"
    eq = [s for s in evals if not s.done and s in queued]
    return (f"{name:<8} {len(trains) + shared:3d} trainings: {sum(s.done for s in trains)} done, "
            f"{sum(s in queued for s in trains)} queued, {len(start)} to start ({gpu})"
            + (f", {shared} shared with a block above" if shared else "")
            + f"; {len(evals)} evaluations: {sum(s.done for s in evals)} done, {len(eq)} queued, "
            f"{len(evals) - sum(s.done for s in evals) - len(eq)} to start; tables and figures: {len(outputs)}")


def describe(step, queued, slurm):
    if step.kind == "train":
        if step.damage:
            return f"  would repair {step.damage}"
        if step.done:
            return None
        if step in queued:
            return f"  queued train {step.name}: job {slurm.active(step)}"
        resumes = " (resumes)" if os.path.exists(os.path.join(step.name, "last.pt")) else ""
        steps = steps_per_epoch_of(step)
        return f"  would train  {step.name}{resumes}  ({step.note})" + (f"\n    {steps}" if steps else "")
    if step.kind == "evaluate":
        if step.damage:
            return f"  DAMAGED {step.damage}"
        if step.done:
            return None
        if step in queued:
            return f"  queued evaluate {step.name}: job {slurm.active(step)}"
        return f"  would evaluate {step.name}{step.note}"
    if step.kind in ("table", "plot"):
        return f"  would write  {step.output}"
    if step.kind == "step" and not step.done:
        return f"  would write  {step.output} ({os.path.basename(step.command[1])}, CPU)"
    return None


def steps_per_epoch_of(step):
    """'192 steps/epoch x 200 epochs of 256 images (half labelled, half extra data), 74-89 GPU-hours'
    (or '(154 labelled + 358 extra images each)') for a priced training; '' for one on the CPU."""
    if step.cost[1] == 0:
        return ""
    folder = step.name
    a = PLAN_ARGS[folder]
    n = run_epoch_steps(a)
    mixed = ""
    if a.aux_data:
        n_lab, n_unl = batch_split(a.batch_size, a.unsup_fraction)
        mixed = (" (half labelled, half extra data)" if n_lab == n_unl else
                 f" ({n_lab} labelled + {n_unl} extra images each)")
    lo, hi = step.cost
    return (f"{n} steps/epoch x {a.epochs} epochs of {a.batch_size} images{mixed}, "
            f"{hours(lo)}-{hours(hi)} GPU-hours")


PLAN_ARGS = {}
COST_NOTE = ("GPU-hours: 4 V100s x the images a run trains x the paper's time per image of its network "
             "(WRN-34-10: CIFAR's 11h-14h for 100 epochs; WRN-28-10: FIRE + 500K's 18h30-22h12 for 200 "
             "epochs of 192 steps; SmallCNN: MNIST's 2h06-2h22), x (attack steps + 1) / the measured run's; "
             "ResNet-18 by its FLOPs (1/12 of WRN-34-10's).\n  AutoAttack is not included (time one with "
             "benchmark.py --autoattack N --checkpoint CKPT). docs/cluster.md#the-dry-run")


def main():
    out_dir, launcher, dry = env("OUT_DIR"), env("LAUNCHER", "local"), env("DRY_RUN", "0") == "1"
    if launcher == "slurm":
        check_slurm()
    if env("REHEARSAL") == "1":
        refuse_real_runs(out_dir)
    plan = Plan([line for line in sys.stdin.read().split("\0") if line], out_dir)
    PLAN_ARGS.update(plan.args)
    slurm = Slurm(plan) if launcher == "slurm" else None
    queued = {s for s in plan.steps if slurm is not None and s.kind in ("train", "evaluate")
              and not s.done and slurm.active(s)}
    if dry:
        print(f"== plan (DRY_RUN=1: nothing is created or started; LAUNCHER={launcher})")
    lines, seen = [], set()
    for block, steps in plan.blocks.items():
        if dry:
            print(f"== {block}")
        mine = []
        for step in steps:
            if id(step) in seen and step.kind in ("train", "evaluate"):
                continue
            seen.add(id(step))
            mine.append(step)
            text = describe(step, queued, slurm) if dry else None
            if text:
                print(text)
        lines.append(counts_line(block, mine, plan.shared.get(block, 0), queued))
    print(f"== plan ({launcher} launcher, OUT_DIR={out_dir})")
    print("\n".join(lines))
    if len(plan.blocks) > 1:
        print(counts_line("total", [s for s in plan.steps], 0, queued))
    if any(s.cost[1] for s in plan.steps):
        print(COST_NOTE)
    if env("REHEARSAL") == "1":
        print(f"{REHEARSAL_NOTE}: tiny networks, a few steps; this checks the plan")
    if dry:
        return 0
    for folder in ("runs", "tables", "figures"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    start = time.time()
    # one plan per OUT_DIR at a time, whichever the launcher (held until the local jobs end)
    lock = lock_folder(out_dir, "OUT_DIR", "another run_all.sh holds OUT_DIR (wait for it to end, or stop "
                                           "it: kill its PID; then run this command again)")
    try:
        for step in plan.steps:
            if step.damage and step.kind == "train":
                repair_metrics(step.name)
                print(f"  repaired {step.damage}", flush=True)
            elif step.damage:
                print(f"DAMAGED: {step.damage}", file=sys.stderr, flush=True)
        with Stops() as stops:
            if slurm is not None:
                slurm.stops = stops
                n = slurm.run()
                stopped = 0
            else:
                stopped = Local(plan, stops).run()
        if stops.signum is not None:
            print(stops.message(out_dir, stopped), file=sys.stderr, flush=True)
            return 128 + stops.signum
        if slurm is not None:
            print(f"== submitted {n} job(s) in {time.time() - start:.0f}s: squeue -u {getpass.getuser()} shows "
                  f"them; tables appear in {out_dir}/tables, figures in {out_dir}/figures")
        else:
            print(f"== done in {time.time() - start:.0f}s: tables in {out_dir}/tables, figures in {out_dir}/figures")
    finally:
        lock.close()
    bad = [b for b, steps in plan.blocks.items() if any(s.state == "failed" for s in steps)]
    if bad:
        print(f"run_all.sh: incomplete: {', '.join(bad)} (a step failed or a table left results out; "
              f"see the lines above)", file=sys.stderr)
        return 1
    return 0


def refuse_real_runs(out_dir):
    """A rehearsal never writes into a folder of real runs or outputs: one with a run whose
    arguments (the first line of its log.txt, which every training writes whatever launched it, or
    the command.txt of the local launcher) are not a rehearsal's, or a table without the rehearsal's
    note."""
    for folder in sorted(glob.glob(os.path.join(glob.escape(out_dir), "runs", "*", ""))):
        if real_run(folder):
            raise UserError(f"REHEARSAL=1 would write into {out_dir!r}, which holds real runs "
                            f"({os.path.normpath(folder)}): choose another OUT_DIR")
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "tables", "*.md"))):
        with open(path, errors="replace") as f:
            if REHEARSAL_NOTE not in f.read():
                raise UserError(f"REHEARSAL=1 would write into {out_dir!r}, which holds real tables "
                                f"({path}): choose another OUT_DIR")


def real_run(folder):
    """Whether the run folder holds a run that is not a rehearsal, by its log.txt's arguments line
    (JSON; "rehearsal" false or absent), else its command.txt (without --rehearsal); a log.txt that
    says neither counts as a real run's."""
    log = os.path.join(folder, "log.txt")
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            try:
                args = json.loads(f.readline())
            except ValueError:
                args = None
        if isinstance(args, dict):
            return args.get("rehearsal") is not True
    command = os.path.join(folder, "command.txt")
    if os.path.exists(command):
        with open(command, errors="replace") as f:
            return "--rehearsal" not in f.read().split()
    return os.path.exists(log)


if __name__ == "__main__":
    sys.exit(cli(main))
