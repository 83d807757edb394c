"""The two launchers of the plan of run_all.sh (plan.py): Local runs JOBS trainings and evaluations at
a time on this machine, each after the steps it needs; Slurm submits each as a job chained by
afterok dependencies (docs/cluster.md), with the SLURM settings checked first (check_slurm).
"""
import ctypes
import getpass
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from fire_repro.common import OnSignals, UserError, write_atomic
from fire_repro.tables import LEFT_OUT


def env(name, default=""):
    return os.environ.get(name, default)


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


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def own_child(parent):
    """preexec_fn of every job the plan starts: its own process group (so that Ctrl-C in the
    terminal reaches the planner, which stops its jobs as SLURM does, with SIGTERM), and SIGTERM
    when the planner dies, SIGKILL included (Linux's PR_SET_PDEATHSIG), so that no training outlives
    the run_all.sh that started it."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the process group is still signalled on a stop
        pass
    if os.getppid() != parent:  # the planner died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def spawn(command, **kwargs):
    """subprocess.Popen of a job of the plan, owned by this process (own_child)."""
    return subprocess.Popen(command, preexec_fn=lambda parent=os.getpid(): own_child(parent), **kwargs)


class Stops(OnSignals):
    """While the plan is launched, SIGTERM, SIGINT and SIGHUP (to run_all.sh's PID, which is the
    planner's, or to its process group) stop it: no step starts any more, and every running job's
    process group gets SIGTERM (a training commits its epoch, an evaluation its chunks) and is
    waited for. `signum` is the signal that came, None while none did."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signum, self.children = None, set()

    def stop(self, signum, frame):
        self.signum = self.signum or signum
        for proc in list(self.children):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def message(self, out_dir, stopped):
        name = signal.Signals(self.signum).name
        return (f"run_all.sh: stopped by {name}" + (f" ({stopped} running job(s) stopped)" if stopped else "")
                + f"; what finished is kept in {out_dir}: run the same command again to continue "
                  f"(trainings resume from their last epoch, evaluations from their last chunk)")


class Local:
    """JOBS trainings and evaluations at a time on this machine, each after the steps it needs;
    tables, figures and CPU steps run here when theirs are done."""

    def __init__(self, plan, stops=None):
        self.plan, self.jobs, self.running = plan, int(env("JOBS", "1")), {}
        self.stops = stops or Stops()

    def start(self, step):
        os.makedirs(os.path.dirname(step.log) or ".", exist_ok=True)
        if step.kind == "train":
            print(f"  train  {step.name}  ({step.note})", flush=True)
            write_atomic(os.path.join(step.name, "command.txt"), lambda f: f.write(step.note + "\n"))
        else:
            print(f"  evaluate {step.name}", flush=True)
        log = open(step.log, "a")  # every attempt's lines, each after its own header
        log.write(f"== attempt at {time.strftime('%F %T')} (run_all.sh, process {os.getpid()}): "
                  f"{' '.join(step.command)}\n")
        log.flush()
        start = log.tell()
        proc = spawn(step.command, stdout=log, stderr=subprocess.STDOUT)
        self.stops.children.add(proc)
        self.running[proc] = (step, log, start)
        step.state = "running"

    def finish(self, proc):
        step, log, start = self.running.pop(proc)
        self.stops.children.discard(proc)
        log.close()
        step.state = "ok" if proc.returncode == 0 else "failed"
        with open(step.log, errors="replace") as f:
            f.seek(start)
            attempt = f.read()  # this attempt's lines only
        if self.stops.signum is not None:
            step.state = "stopped"
            return
        if step.kind == "evaluate" and step.state == "ok":
            print(attempt, end="", flush=True)
        if step.state == "failed":
            print(f"FAILED: {' '.join(step.command)} (see {step.log})", file=sys.stderr)
            print("\n".join(attempt.splitlines()[-5:]), file=sys.stderr, flush=True)

    def inline(self, step):
        """A table, figure or CPU step, here and now; its console output printed."""
        os.makedirs(os.path.dirname(step.output) or ".", exist_ok=True)
        proc = spawn(step.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stops.children.add(proc)
        out, err = proc.communicate()
        self.stops.children.discard(proc)
        r = subprocess.CompletedProcess(step.command, proc.returncode, out, err)
        print(r.stdout, end="")
        print(r.stderr, end="", file=sys.stderr, flush=True)
        step.state = "ok" if r.returncode == 0 else "failed"
        if r.returncode == LEFT_OUT:
            print(f"INCOMPLETE: {step.output} was written with results left out", file=sys.stderr)
        elif r.returncode:
            print(f"FAILED: {step.output} (exit {r.returncode})", file=sys.stderr, flush=True)

    def run(self):
        """Launch the plan; returns the number of jobs a stop signal stopped (Stops)."""
        pending = [s for s in self.plan.steps if s.state == "pending"]
        stopped = 0
        while pending or self.running:
            progressed = False
            if self.stops.signum is not None:  # stopping: wait for the running jobs, start nothing
                pending = []
                if not self.running:
                    break
                time.sleep(0.2)
                for proc in [p for p in self.running if p.poll() is not None]:
                    self.finish(proc)
                    stopped += 1
                continue
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
        return stopped


class Slurm:
    """One job per training and evaluation, chained by afterok dependencies (a failed training
    cancels its evaluations and tables); a table whose evaluations are all finished is built here.
    Each job's id is in <OUT_DIR>/slurm/<job name>.jobid (written atomically); a job that squeue
    still lists under that id and name is not submitted again."""

    ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING",
              "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}

    def __init__(self, plan, stops=None):
        self.plan, self.dir = plan, os.path.join(plan.out_dir, "slurm")
        self.stops = stops or Stops()
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
        full disk while a run_all.sh wrote it) is reported and its job looked up in the
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
        local = Local(self.plan, self.stops)
        for step in self.plan.steps:
            if self.stops.signum is not None:  # a stop signal: submit no more (submitted jobs run on)
                break
            step.jobid = ""
            after = [n.jobid for n in step.needs if n.jobid]
            if step.state == "failed":  # refused by the plan (a damaged checkpoint), said above
                continue
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
