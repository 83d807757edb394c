"""The plan of run_all.sh and its two launchers: run_all.sh's blocks name their trainings,
evaluations, tables and figures (one line each, on stdin); this module answers everything else
from the code the scripts themselves run, and launches what is not finished.

    run folder      <OUT_DIR>/runs/<tag>-<identity>: config.identity_hash of the arguments that the
                    training script's own parser resolves (train_fire.get_args, train_trades.get_args,
                    imported as benchmark.py imports them; --print-identity)
    finished run    summary.json of --epochs epochs (as run_folder.finished_summary reads it)
    evaluation      eval_autoattack.py's own parser and settings_of; its radius the data set's
                    eval_eps or l2_eval_eps (data.DATASETS), its norm and radius as
                    eval_autoattack.threat_model gives them, its file results.default_out, finished when
                    results.finished says so (checkpoint SHA-256 and settings): a damaged result
                    is evaluated again
    cost            images trained x the paper's measured time per image of that network (cost_of)
    launchers       local: JOBS processes at a time, each step after the steps it needs; slurm:
                    sbatch jobs chained by afterok dependencies (docs/cluster.md)

Plan lines end with \0 (a field may hold a newline), their fields separated by \x1f; "@N" in a field stands for the folder of the N-th training:

    block NAME                      the steps that follow belong to block NAME
    train @N TAG SCRIPT FLAGS...    a training (TRAIN_FLAGS are appended here)
    evaluate @N/KIND.pt FLAGS...    AutoAttack on a checkpoint (the data set's radius is added here)
    table NAME TITLE ARGS...        eval_autoattack.py --summarize ARGS: @N/KIND.pt is its result
    plot NAME KIND ARGS...          eval_autoattack.py --plot-sweep ARGS (Figs. 7 and 8)
    curves NAME TITLE @N...         plot_runs.py's training curves of the runs, figures/NAME-curves.png
    step OUTPUT CMD...              a CPU command writing OUTPUT, run here unless OUTPUT exists
    prepare PATH CMD...             stand-in data that trainings read, written before anything else

The settings come from the environment that run_all.sh checked (docs/reproducing.md,
docs/cluster.md); those only this module reads are checked here, before anything is created.
The exit status is 0 when every table and figure was written whole, 1 when a step failed or a
table left results out (the blocks are named), 2 for bad settings.
"""
import contextlib
import getpass
import glob
import hashlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import eval_autoattack
from fire_repro import results
import train_fire
import train_trades
from fire_repro.common import UserError, cli, eps_text, read_json, sha256_file, write_atomic
from fire_repro.config import IdentityPrinted
from fire_repro.data import DATASETS, steps_per_epoch, test_size

SCRIPTS = {"train_fire.py": train_fire, "train_trades.py": train_trades}
# Flags that run_all.sh sets for every run itself: TRAIN_FLAGS may not override them.
OWNED_FLAGS = ("--dataset", "--seed", "--out-dir", "--resume", "--overwrite", "--print-identity",
               "--lam", "--beta", "--loss", "--distance", "--self-adaptive", "--aux-data",
               "--init-from", "--rehearsal")
TABLE_LEFT_OUT = 3  # eval_autoattack.py --summarize: the table was written but left results out


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


def cost_of(args):
    """(low, high) V100 GPU-hours of a training; (0, 0) on the CPU, for a rehearsal, or for a
    network the paper timed no run of."""
    per = hours_per_image(args.model)
    if args.device == "cpu" or args.rehearsal or per is None:
        return 0.0, 0.0
    passes = images_per_epoch(args.dataset, args.batch_size) * args.epochs * (args.attack_steps + 1)
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


def env(name, default=""):
    return os.environ.get(name, default)


def train_flags():
    """TRAIN_FLAGS split into flags; one that run_all.sh sets itself is refused."""
    flags = env("TRAIN_FLAGS").split()
    for flag in flags:
        name = flag.split("=")[0]
        if name.startswith("--") and len(name) > 2 and any(o.startswith(name) for o in OWNED_FLAGS):
            owned = next(o for o in OWNED_FLAGS if o.startswith(name))
            raise UserError(f"TRAIN_FLAGS may not set {owned}: run_all.sh sets it for every run "
                            f"(SEEDS, DATASETS, the blocks; docs/reproducing.md)")
    return flags


def resolve(script, argv):
    """The arguments as `script` resolves them (its parser, the data set's preset) and the identity
    hash it prints; a refused flag is a UserError with the script's own message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
            SCRIPTS[script].get_args([*argv, "--print-identity"])
    except IdentityPrinted as e:
        return e.resolved, out.getvalue().split()[-1]
    except SystemExit:
        pass
    lines = err.getvalue().strip().splitlines() or ["refused"]
    raise UserError(f"{lines[-1]} (in: {script} {' '.join(argv)})")


def run_finished(folder, args):
    summary = read_json(os.path.join(folder, "summary.json"))
    return isinstance(summary, dict) and summary.get("epochs") == args.epochs


class Plan:
    """Every step of the blocks, de-duplicated (a run or an evaluation shared by several blocks is
    one step), with what is finished already."""

    def __init__(self, lines, out_dir):
        self.out_dir, self.extra = out_dir, train_flags()
        self.steps, self.blocks, self.folders, self.args = [], {}, {}, {}
        self.by_key, self.evals = {}, {}   # de-duplication; checkpoint -> its evaluation
        self.shared = {}                   # block -> trainings shared with a block above
        block = ""
        for line in lines:
            kind, *fields = line.split("\x1f")
            if kind == "block":
                block = fields[0]
                self.blocks[block] = []
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
        argv = [self.ref(f) for f in flags] + self.extra
        args, ident = resolve(script, argv + self.planned_inputs(argv))
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
            log=os.path.join(folder, "train.out"), needs=needs, done=run_finished(folder, args),
            job=f"train-{os.path.basename(folder)}", cost=cost_of(args),
            note=f"{script} {' '.join(argv)}"))
        if seen:
            self.shared[block] = self.shared.get(block, 0) + 1
        return step

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

    def add_evaluate(self, block, checkpoint, *flags):
        ckpt = self.ref(checkpoint)
        folder = os.path.dirname(ckpt)
        train, saved = self.by_key[("train", folder)], self.args[folder]
        if ckpt in self.evals:
            return self.evals[ckpt]
        entry = DATASETS[saved.dataset]  # the paper's evaluation radius, where it is not training's
        eps = entry.l2_eval_eps if getattr(saved, "norm", "linf") == "l2" else entry.eval_eps
        flags = [*flags, *(["--eps", str(eps)] if eps is not None else [])]
        eargs = eval_autoattack.get_args([ckpt, *flags])   # eval_autoattack.py's own parser
        norm, eps = eval_autoattack.threat_model(vars(saved), eargs)
        n = min(eargs.n_examples or math.inf, test_size(saved))
        out = results.default_out(ckpt, eps, saved.eps, eargs.split, norm)
        done, why = False, ""
        if train.done and os.path.isfile(ckpt):
            record, why = results.finished(out, sha256_file(ckpt), eval_autoattack.settings_of(eargs, eps, n, norm))
            done = record is not None
        stem = os.path.splitext(os.path.basename(out))[0]
        # one evaluation of a run folder at a time (eval_autoattack.py locks the folder): Table 2
        # evaluates the Madry runs' last.pt and best.pt, the second after the first
        before = [s for s in self.evals.values() if os.path.dirname(s.name) == folder and not s.done][-1:]
        step = Step("evaluate", block, ckpt, [sys.executable, "eval_autoattack.py", ckpt, *flags],
                    log=os.path.splitext(ckpt)[0] + "-eval.out", needs=[train, *before], done=done, output=out,
                    job=f"eval-{os.path.basename(folder)}-{stem}",
                    note=f" at eps {eps_text(eps)}" + (f" (again: {why})" if why else ""))
        self.evals[ckpt] = step
        self.steps.append(step)
        return step

    def from_results(self, block, kind, name, output, args, command):
        needs = [self.evals[self.ref(a)] for a in args if a.startswith("@")]
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
            sys.executable, "eval_autoattack.py", "--summarize", *args, "--title", title, "--table-out", output])

    def add_plot(self, block, name, kind, *args):
        output = os.path.join(self.out_dir, "figures", f"{name}.png")
        return self.from_results(block, "plot", name, output, args, [
            sys.executable, "eval_autoattack.py", "--plot-sweep", *args, "--plot-kind", kind,
            "--plot-out", output])

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


# ---- SLURM settings ----------------------------------------------------------------------------
def slurm_seconds(text):
    """Seconds of a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for
    UNLIMITED; a UserError for anything else."""
    if text in ("UNLIMITED", "INFINITE", "infinite"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise UserError(f"TIME_LIMIT must be a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                        f"D-HH:MM:SS), got {text!r}")
    days, a, b, c = m.groups()
    if days is None:  # minutes, minutes:seconds, hours:minutes:seconds
        parts = [int(a)] + [int(x) for x in (b, c) if x is not None]
        seconds = {1: parts[0] * 60, 2: parts[0] * 60 + parts[-1]}.get(len(parts)) \
            or parts[0] * 3600 + parts[1] * 60 + parts[2]
        return seconds
    return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)


def check_slurm():
    """The SLURM settings only this module reads, checked against each other: the stop signal
    must come inside the time limit, else every start of a job is stopped at once and requeued."""
    limit = slurm_seconds(env("TIME_LIMIT"))
    signal = int(env("SIGNAL_SECONDS"))
    if limit is not None and signal >= limit:
        raise UserError(f"SIGNAL_SECONDS={signal} must be shorter than TIME_LIMIT={env('TIME_LIMIT')} "
                        f"({limit} s): the stop signal would come at the start of every job")
    if shutil.which("sbatch") is None:
        raise UserError("LAUNCHER=slurm needs sbatch on PATH (run this on a SLURM login node)")
    # One test submission per kind of job (nothing is queued): SLURM itself checks the partition,
    # account, GPUs, CPUs, time limit and extra arguments.
    for kind, what in (("train", "training"), ("evaluate", "evaluation")):
        command = ["sbatch", "--test-only", *sbatch_common(), *request(kind), "--wrap=true"]
        r = subprocess.run(command, capture_output=True, text=True)
        if r.returncode:
            answer = ([line for line in r.stderr.splitlines() if line.strip()] or ["?"])[-1]
            for prefix in ("sbatch: error: ", "Batch job submission failed: ", "allocation failure: "):
                answer = answer.removeprefix(prefix)
            raise UserError(f"SLURM refuses the {what} jobs ({' '.join(command[2:-1])}): {answer}")


def sbatch_common():
    return [f"--time={env('TIME_LIMIT')}", *(f"--partition={env('PARTITION')}",) * bool(env("PARTITION")),
            *(f"--account={env('ACCOUNT')}",) * bool(env("ACCOUNT")), *env("SBATCH_ARGS").split()]


def request(kind):
    """sbatch's resources for a training, an evaluation or a table."""
    if kind == "train":
        gpus, cpus = env("GPUS_PER_TRAINING"), env("CPUS_PER_TRAINING")
    elif kind == "evaluate":
        gpus, cpus = env("GPUS_PER_EVAL"), env("CPUS_PER_EVAL")
    else:
        gpus, cpus = "0", "1"
    return [f"--cpus-per-task={cpus}", *(f"--gres=gpu:{gpus}",) * (int(gpus) > 0)]


# ---- launchers ---------------------------------------------------------------------------------
def failed_need(step):
    return next((n for n in step.needs if n.state == "failed"), None)


class Local:
    """JOBS trainings and evaluations at a time on this machine, each after the steps it needs;
    tables, figures and CPU steps run here when theirs are done."""

    def __init__(self, plan):
        self.plan, self.jobs, self.running = plan, int(env("JOBS", "1")), {}

    def start(self, step):
        os.makedirs(os.path.dirname(step.log) or ".", exist_ok=True)
        if step.kind == "train":
            print(f"  train  {step.name}  ({step.note})", flush=True)
            write_atomic(os.path.join(step.name, "command.txt"), lambda f: f.write(step.note + "\n"))
        else:
            print(f"  evaluate {step.name}", flush=True)
        log = open(step.log, "w")
        self.running[subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT)] = (step, log)
        step.state = "running"

    def finish(self, proc):
        step, log = self.running.pop(proc)
        log.close()
        step.state = "ok" if proc.returncode == 0 else "failed"
        if step.kind == "evaluate" and step.state == "ok":
            with open(step.log) as f:
                print(f.read(), end="", flush=True)
        if step.state == "failed":
            with open(step.log) as f:
                tail = f.read().splitlines()[-5:]
            print(f"FAILED: {' '.join(step.command)} (see {step.log})", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr, flush=True)

    def inline(self, step):
        """A table, figure or CPU step, here and now; its console output printed."""
        os.makedirs(os.path.dirname(step.output) or ".", exist_ok=True)
        r = subprocess.run(step.command, capture_output=True, text=True)
        print(r.stdout, end="")
        print(r.stderr, end="", file=sys.stderr, flush=True)
        step.state = "ok" if r.returncode == 0 else "failed"
        if r.returncode == TABLE_LEFT_OUT:
            print(f"INCOMPLETE: {step.output} was written with results left out", file=sys.stderr)
        elif r.returncode:
            print(f"FAILED: {step.output} (exit {r.returncode})", file=sys.stderr, flush=True)

    def run(self):
        pending = [s for s in self.plan.steps if s.state == "pending"]
        while pending or self.running:
            progressed = False
            for step in list(pending):
                if step.done:
                    print(f"  done   {step.output or step.name}", flush=True)
                    step.state = "ok"
                elif failed_need(step):
                    print(f"  SKIP   {step.name}: {failed_need(step).name} failed", file=sys.stderr)
                    step.state = "failed"
                elif any(n.state != "ok" for n in step.needs):
                    continue
                elif step.kind in ("train", "evaluate"):
                    if len(self.running) >= self.jobs:
                        continue
                    self.start(step)
                else:
                    self.inline(step)
                pending.remove(step)
                progressed = True
            if self.running and not progressed:
                time.sleep(0.2)
                for proc in [p for p in self.running if p.poll() is not None]:
                    self.finish(proc)
            elif not progressed and pending:  # nothing runs and nothing can start: a cycle
                raise UserError(f"the plan cannot order {pending[0].name}")


class Slurm:
    """One job per training and evaluation, chained by afterok dependencies (a failed training
    cancels its evaluations and tables); a table whose evaluations are all finished is built here.
    Each job's id is in <OUT_DIR>/slurm/<job name>.jobid (written atomically); a job that squeue
    still lists under that id and name is not submitted again."""

    ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING",
              "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}

    def __init__(self, plan):
        self.plan, self.dir = plan, os.path.join(plan.out_dir, "slurm")
        self.common = sbatch_common()
        self.queue, self.submitted = {}, 0
        r = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%j|%T"],
                           capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"squeue failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        for line in r.stdout.splitlines():
            job, name, state = line.split("|")
            if state in self.ACTIVE:
                self.queue[job] = name
        self.ids = self.read_ids()

    def read_ids(self):
        """{job name: id} from the .jobid files. A damaged one (empty, not a number: a kill or a
        full disk while an older run_all.sh wrote it) is reported and its job looked up in the
        queue by its name; repaired (or, not in the queue, removed) when the plan is launched."""
        ids, self.repairs = {}, {}
        for path in sorted(glob.glob(os.path.join(glob.escape(self.dir), "*.jobid"))):
            name = os.path.basename(path)[:-len(".jobid")]
            with open(path, errors="replace") as f:
                job = f.read().strip()
            if not job.isdigit():
                found = [j for j, n in self.queue.items() if n == name]
                print(f"warning: {path} is damaged ({job[:20]!r}): " + (
                    f"job {found[0]} found in the queue by its name" if found else
                    "its job is not in the queue (finished, or to be submitted again)"), file=sys.stderr)
                job = found[0] if found else ""
                self.repairs[path] = job
            if job:
                ids[name] = job
        return ids

    def active(self, step):
        """The job id of this step's job if SLURM still runs or queues it, else ''."""
        job = self.ids.get(step.job, "")
        return job if self.queue.get(job) == step.job else ""

    def submit(self, step, after):
        log = os.path.abspath(step.log)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        opts = ["--parsable", f"--job-name={step.job}", f"--chdir={os.getcwd()}", f"--output={log}",
                "--open-mode=append", *self.common, *request(step.kind)]
        if step.kind in ("train", "evaluate"):
            opts += ["--requeue", f"--signal=B:USR1@{env('SIGNAL_SECONDS')}"]
        if after:
            opts += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        r = subprocess.run(["sbatch", *opts, os.path.join(self.dir, "job.sh"), *step.command],
                           capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"sbatch refused job {step.job}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        step.jobid = r.stdout.strip().split(";")[0]
        write_atomic(os.path.join(self.dir, step.job + ".jobid"), lambda f: f.write(step.jobid + "\n"))
        self.queue[step.jobid] = step.job
        self.ids[step.job] = step.jobid
        self.submitted += 1

    def run(self):
        os.makedirs(self.dir, exist_ok=True)
        for path, job in self.repairs.items():
            if job:
                write_atomic(path, lambda f, job=job: f.write(job + "\n"))
            else:
                os.remove(path)
        write_atomic(os.path.join(self.dir, "job.sh"), lambda f: f.write(JOB_SCRIPT))
        os.chmod(os.path.join(self.dir, "job.sh"), 0o755)
        local = Local(self.plan)
        for step in self.plan.steps:
            step.jobid = ""
            after = [n.jobid for n in step.needs if n.jobid]
            if step.done:
                print(f"  done   {step.output or step.name}")
                step.state = "ok"
            elif step.kind in ("prepare", "step") or (step.kind in ("table", "plot") and not after):
                if failed_need(step) or any(n.state != "ok" for n in step.needs if not n.jobid):
                    print(f"  SKIP   {step.name}: a step it needs did not finish", file=sys.stderr)
                    step.state = "failed"
                else:
                    local.inline(step)
            elif self.active(step):
                step.jobid = self.active(step)
                what = "train" if step.kind == "train" else "evaluate" if step.kind == "evaluate" else ""
                print(f"  queued {what + ' ' if what else ''}{step.name}: job {step.jobid}")
            else:
                self.submit(step, after)
                what = {"train": "train ", "evaluate": "evaluate "}.get(step.kind, "")
                print(f"  submit {what}{step.name}: job {step.jobid}"
                      + (f" (after job {','.join(after)})" if after else ""), flush=True)
        return self.submitted


JOB_SCRIPT = """#!/usr/bin/env bash
# A job of run_all.sh (LAUNCHER=slurm): runs its arguments, a training, an evaluation or a table, in
# the repository (sbatch --chdir). SLURM stops it with SIGTERM when it is preempted or requeued
# (scontrol requeue) and requeues it (--requeue); before the time limit it sends SIGUSR1
# (--signal=B:USR1@SIGNAL_SECONDS): the command is stopped and the job requeues itself. Either way
# the same command starts again and continues from what was committed: a training from last.pt
# (--resume auto), an evaluation from its finished chunks. The job's exit status is the command's.
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
"""


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
        if step.done:
            return None
        if step in queued:
            return f"  queued train {step.name}: job {slurm.active(step)}"
        resumes = " (resumes)" if os.path.exists(os.path.join(step.name, "last.pt")) else ""
        steps = steps_per_epoch_of(step)
        return f"  would train  {step.name}{resumes}  ({step.note})" + (f"\n    {steps}" if steps else "")
    if step.kind == "evaluate":
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
    """'196 steps/epoch x 200 epochs of 256 (49,000 labelled + extra ...), 18.5-22.2 GPU-hours' for
    a priced training; '' for one on the CPU."""
    if step.cost[1] == 0:
        return ""
    folder = step.name
    a = PLAN_ARGS[folder]
    n = steps_per_epoch(DATASETS[a.dataset].train_images, a.batch_size)
    half = " (half labelled, half extra data)" if a.aux_data else ""
    lo, hi = step.cost
    return (f"{n} steps/epoch x {a.epochs} epochs of {a.batch_size} images{half}, "
            f"{hours(lo)}-{hours(hi)} GPU-hours")


PLAN_ARGS = {}
COST_NOTE = ("GPU-hours: 4 V100s x the images a run trains x the paper's time per image of its network "
             "(WRN-34-10: CIFAR's 11h-14h for 100 epochs; WRN-28-10: FIRE + 500K's 18h30-22h12 for 200 "
             "epochs of 192 steps; SmallCNN: MNIST's 2h06-2h22), x (attack steps + 1) / the measured run's; "
             "ResNet-18 by its FLOPs (1/12 of WRN-34-10's).\n  AutoAttack is not included (time one with "
             "eval_autoattack.py --time-images). docs/cluster.md#the-dry-run")


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
        print("REHEARSAL: generated stand-in data, tiny networks, a few steps: this checks the plan, "
              "its numbers are not results")
    if dry:
        return 0
    for folder in ("runs", "tables", "figures"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    start = time.time()
    if slurm is not None:
        with lock(os.path.join(out_dir, "slurm", ".lock")):
            n = slurm.run()
        print(f"== submitted {n} job(s) in {time.time() - start:.0f}s: squeue -u {getpass.getuser()} shows them; "
              f"tables appear in {out_dir}/tables, figures in {out_dir}/figures")
    else:
        Local(plan).run()
        print(f"== done in {time.time() - start:.0f}s: tables in {out_dir}/tables, figures in {out_dir}/figures")
    bad = [b for b, steps in plan.blocks.items() if any(s.state == "failed" for s in steps)]
    if bad:
        print(f"run_all.sh: incomplete: {', '.join(bad)} (a step failed or a table left results out; "
              f"see the lines above)", file=sys.stderr)
        return 1
    return 0


def refuse_real_runs(out_dir):
    """A rehearsal never writes into a folder of real runs (one whose command.txt lacks --rehearsal)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "runs", "*", "command.txt"))):
        with open(path, errors="replace") as f:
            if "--rehearsal" not in f.read().split():
                raise UserError(f"REHEARSAL=1 would write into {out_dir!r}, which holds real runs "
                                f"({os.path.dirname(path)}): choose another OUT_DIR")


@contextlib.contextmanager
def lock(path):
    """One submitting run_all.sh per OUT_DIR at a time."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run_all.sh is submitting jobs into {os.path.dirname(os.path.dirname(path))}: "
                            f"wait for it") from None
        yield


if __name__ == "__main__":
    sys.exit(cli(main))
