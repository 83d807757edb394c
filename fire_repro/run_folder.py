"""A run folder's life: claimed under its lock, refused when it holds another run, an old run set
aside by --overwrite until the new one commits, a resumed run's files repaired from last.pt, a
finished run left alone.

    <out-dir>/last.pt        the commit point of every epoch (checkpoints.py)
    <out-dir>/best.pt        the epoch of the best validation PGD accuracy
    <out-dir>/metrics.jsonl  one record per committed epoch
    <out-dir>/log.txt        the console's lines
    <out-dir>/summary.json   the test of best.pt, written when the run ends
    <out-dir>/.replaced/     an old run's files while the run --overwrite starts has no commit
    <out-dir>/.lock          held by the training or evaluation that writes into the folder
"""
import json
import os
import shutil
import time

import torch.distributed as dist

from fire_repro.checkpoints import load_checkpoint, save_checkpoint
from fire_repro.common import UserError, lock_folder, read_json, write_atomic
from fire_repro.config import run_identity
from fire_repro.parallel import is_main

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "log.txt", "summary.json")


def refuse_other_run(args, resuming):
    """Refuse a folder that holds another run unless `resuming` (--resume was given) or --overwrite.
    Deletes nothing: see start_run_dir."""
    existing = [f for f in RUN_FILES[:3] if os.path.exists(os.path.join(args.out_dir, f))]
    # `--resume auto` without last.pt may restart a run killed before its first commit (the
    # metrics and log of an uncommitted epoch 1 go), but not one whose best.pt is there.
    fresh_start_ok = resuming and (args.resume is not None or "best.pt" not in existing)
    if existing and not fresh_start_ok and not args.overwrite:
        raise UserError(f"{args.out_dir!r} already holds a run ({', '.join(existing)}): give this run its own "
                        f"--out-dir (--resume auto continues the run there if it is this one; --overwrite "
                        f"deletes it)")


def check_resume(args, ckpt):
    """Refuse to resume `ckpt` into this run if it belongs to another folder or another experiment
    (its identity, see NOT_IDENTITY; a larger --epochs extends the run, a smaller one is refused)."""
    saved, here = run_identity(ckpt["args"]), run_identity(vars(args))
    first = ("method", "dataset", "model")  # the most telling difference first
    for key, value in sorted(here.items(), key=lambda kv: (kv[0] not in first, kv[0])):
        if key in saved and key != "epochs" and saved[key] != value:
            name = key if key == "method" else "--" + key.replace("_", "-")
            raise UserError(f"--resume {args.resume!r} was trained with {name}={saved[key]!r}, this "
                            f"command gives {value!r}: resuming must not change what the run computes "
                            f"(give another run its own --out-dir)")
    here = os.path.realpath(args.out_dir)
    if os.path.dirname(os.path.realpath(args.resume)) != here:
        raise UserError(f"--resume {args.resume!r} is not in --out-dir {args.out_dir!r}: a run "
                        f"continues in its own folder (copy the folder to continue it elsewhere)")
    if ckpt["epoch"] > args.epochs:
        raise UserError(f"--resume {args.resume!r} holds {ckpt['epoch']} committed epochs, more than "
                        f"--epochs {args.epochs}: a run can be extended, not shortened")


REPLACED = ".replaced"  # an old run's files while the run that --overwrite starts has no commit


def set_old_run_aside(out_dir):
    """Move an old run's files into <out-dir>/.replaced, last.pt first: from then on the folder
    holds no last.pt until the new run commits its first epoch, which is how settle_replaced_run
    tells the two runs apart, even after a kill in the middle of the move."""
    names = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not names:
        return
    os.makedirs(os.path.join(out_dir, REPLACED), exist_ok=True)
    for name in names:  # RUN_FILES lists last.pt first
        os.replace(os.path.join(out_dir, name), os.path.join(out_dir, REPLACED, name))


def replacement_started(out_dir):
    """When the run that --overwrite started in `out_dir` set the old run aside (UTC, to the
    second), while it has not committed its first epoch; None when nothing is being replaced."""
    try:
        started = os.stat(os.path.join(out_dir, REPLACED)).st_mtime
    except OSError:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))


def missing_run_file(path):
    """Why a run's file (a checkpoint, say) is not there: 'is being replaced by a run started at
    <time> ...' when its folder's run is being replaced, else 'does not exist'."""
    started = replacement_started(os.path.dirname(os.path.abspath(path)))
    if started is None:
        return "does not exist"
    return (f"is being replaced by a run started at {started} (the old run's files are in "
            f"{REPLACED}/ until the new run commits its first epoch)")


def settle_replaced_run(out_dir):
    """The old run that --overwrite set aside is deleted once the new run has committed an epoch
    (last.pt is back in the folder), and put back otherwise. Called with the folder locked: when a
    training starts (after a kill), after each commit, and when a training fails. Returns
    'deleted', 'restored' or None (nothing was set aside)."""
    aside = os.path.join(out_dir, REPLACED)
    if not os.path.isdir(aside):
        return None
    if os.path.exists(os.path.join(out_dir, "last.pt")):
        shutil.rmtree(aside)
        return "deleted"
    for name in os.listdir(aside):  # over the new run's uncommitted log.txt and metrics.jsonl
        os.replace(os.path.join(aside, name), os.path.join(out_dir, name))
    os.rmdir(aside)
    return "restored"


def start_run_dir(args, ckpt):
    """Make the run folder agree with the run about to start (main process, after every input was
    checked). Fresh run: set an old run's files aside (--overwrite; see settle_replaced_run).
    Resumed run: last.pt is the commit point of its epoch, so rebuild from it what a kill may have
    left behind: metrics.jsonl from its history, log.txt cut back to its committed length, best.pt
    when its epoch was the best."""
    path = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    if ckpt is None:
        set_old_run_aside(args.out_dir)
        return
    write_atomic(path("metrics.jsonl"), lambda f: f.writelines(json.dumps(r) + "\n" for r in ckpt["history"]))
    if os.path.exists(path("log.txt")) and os.path.getsize(path("log.txt")) > ckpt["log_bytes"]:
        os.truncate(path("log.txt"), ckpt["log_bytes"])
    if ckpt["best_epoch"] == ckpt["epoch"]:
        best = load_checkpoint(path("best.pt")) if os.path.isfile(path("best.pt")) else None
        if best is None or best["epoch"] != ckpt["epoch"]:
            save_checkpoint(ckpt, path("best.pt"))


def claim_run_dir(args):
    """Take the run folder's lock (main process; the others wait for it), settle a run that an
    interrupted --overwrite was replacing, resolve `--resume auto` (last.pt if the folder has one,
    else a fresh start) and refuse another run's folder. Returns the lock (None off the main process)."""
    lock = None
    if is_main():
        lock = lock_folder(args.out_dir, "--out-dir", "it is in use by another training or evaluation: "
                                                      "give this run its own --out-dir")
        if settle_replaced_run(args.out_dir) == "restored":
            print(f"{args.out_dir}: restored the run that --overwrite was replacing (the new run "
                  f"stopped before its first epoch was committed)", flush=True)
    if dist.is_initialized():
        dist.barrier()
    resuming = args.resume is not None
    if args.resume == "auto":  # continue a preempted run if there is one, else start fresh
        last = os.path.join(args.out_dir, "last.pt")
        args.resume = last if os.path.isfile(last) else None
    if is_main():
        try:
            refuse_other_run(args, resuming)
        except UserError:
            lock.close()
            raise
    return lock


def resume_checkpoint(args):
    """The --resume checkpoint, whole and of this run (same folder, same settings); the record of
    where the run started (--init-from) comes from it."""
    ckpt = load_checkpoint(args.resume, "--resume", resuming=True)
    for key in ("init_from", "init_from_sha256", "pretrain_time_s"):  # where the run started
        setattr(args, key, ckpt["args"].get(key))
    check_resume(args, ckpt)
    return ckpt


def finished_run(out_dir, epochs):
    """The summary.json of the run in `out_dir` if it finished `epochs` epochs and its test, else
    None: the one answer to "is this training done", for a resumed training and for the plan of
    run_all.sh."""
    summary = read_json(os.path.join(out_dir, "summary.json"))  # None: killed before it was written
    return summary if isinstance(summary, dict) and summary.get("epochs") == epochs else None


def finished_summary(args, ckpt):
    """The summary of a run that `ckpt` shows finished (--epochs epochs committed, summary.json of
    those epochs written), after one line saying so: resuming it would only repeat its test. None
    when the run has epochs or its test left to do."""
    if ckpt is None or ckpt["epoch"] != args.epochs:
        return None
    summary = finished_run(args.out_dir, args.epochs)
    if summary is None:
        return None
    if is_main():
        print(f"{args.out_dir}: already finished (--epochs {args.epochs} done, summary.json written); "
              f"nothing to do", flush=True)
    return summary


def damaged_metrics(out_dir, epochs):
    """Why a finished run's metrics.jsonl is damaged (a line that is not an epoch's record, or not
    one record for each of its `epochs` epochs), '' when it is whole."""
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return "missing"
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            return f"line {n} is not whole JSON"
        if not (isinstance(record, dict) and record.get("epoch") == n):
            return f"line {n} is not the record of epoch {n}"
    return "" if len(lines) == epochs else f"{len(lines)} records for {epochs} epochs"


def repair_metrics(out_dir):
    """Write metrics.jsonl again from last.pt's history, the committed record of every epoch (as a
    resumed run does, start_run_dir)."""
    ckpt = load_checkpoint(os.path.join(out_dir, "last.pt"), resuming=True)
    write_atomic(os.path.join(out_dir, "metrics.jsonl"),
                 lambda f: f.writelines(json.dumps(r) + "\n" for r in ckpt["history"]))
