"""AutoAttack evaluation of a checkpoint, as Section 5.1 evaluates.

Evaluates a checkpoint written by train_fire.py or train_trades.py (or a RobustBench zoo entry):
natural accuracy and the standard AutoAttack (Croce & Hein 2020; APGD-CE, APGD-T, FAB-T, Square;
Linf, or L2 with --norm l2) at the training eps, in float32 (TF32 off) and eval mode, with the
robust accuracy after each attack and Avg. Acc. = (Natural + AutoAttack) / 2. The model is rebuilt
from the arguments stored in the checkpoint; the result goes to a JSON file next to it that holds
everything a table row needs, tied to the checkpoint by its SHA-256, and per-image results go to an
.npz beside it. The JSON records each of AutoAttack's checks (aa_checks) and, with --sanity, the
masking report (fire_repro/sanity.py): docs/evaluation.md#checks. Tables and sweep figures are made
from the results by `python -m fire_repro.tables`; AutoAttack's throughput is timed by
`python benchmark.py --autoattack N`.

Commands:
    python eval_autoattack.py runs/fire-digits-s0/best.pt        # -> runs/fire-digits-s0/autoattack.json
    python eval_autoattack.py runs/c10/best.pt --eps 8/255 --pgd20 --cw   # -> autoattack-eps8-255.json
    python eval_autoattack.py runs/c10/best.pt --n-examples 1000 --batch-size 500   # quicker check
    python eval_autoattack.py runs/madry/last.pt --defense "Madry et al."   # -> autoattack-last.json
    python eval_autoattack.py runs/c10/best.pt --split val                  # -> autoattack-val.json
    python eval_autoattack.py runs/c10/best.pt --sanity --transfer-from runs/madry/best.pt   # + masking report
    torchrun --nproc_per_node=4 eval_autoattack.py runs/c10/best.pt --eps 8/255   # one GPU per process
    python -m fire_repro.tables runs/ --table-out table.md               # the table: mean +- std over seeds

The images are evaluated in chunks of --chunk-size, each saved when it finishes (<json
stem>.chunks/): the same command after a kill or preemption continues from the finished chunks,
and a finished evaluation of the same checkpoint (same SHA-256) and settings is skipped. Under
torchrun the chunks are shared among the processes; otherwise all visible GPUs are used through
DataParallel. Each attack of each batch prints a line (robust accuracy after it, its time); CPU
times: docs/performance.md.
"""
import argparse
import datetime
import glob
import json
import math
import os
import shutil
import sys
import time
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist

from fire_repro import results, robustbench_io
from fire_repro.autoattack import AA_CHECKS, accuracies, chunk_seed, evaluate_autoattack, merge_checks, threat_model
from fire_repro.checkpoints import load_checkpoint, load_model, run_training_time
from fire_repro.common import (ArgumentParser, Range, UserError, check_output, check_ranges, cli, lock_folder,
                               read_arrays, read_json, sha256_file, write_atomic, write_json)
from fire_repro.config import run_identity
from fire_repro.data import REHEARSAL_NOTE, first_images, split_of
from fire_repro.parallel import over_all_gpus, rank_and_world, setup_device
from fire_repro.results import RESULT_FORMAT, STANDARD_ATTACKS, default_out, settings_change
from fire_repro.run_folder import missing_run_file
from fire_repro.sanity import masking_report
from fire_repro.attacks import EPS_RANGES, NORMS

# The ranges of the numeric flags, the one place they are written (the help texts quote them).
EVAL_RANGES = {"n_examples": Range(1, 10**7), "batch_size": Range(1, 65_536),
               "chunk_size": Range(1, 10**6), "seed": Range(0, 2**32, high_open=True),
               "sanity_n": Range(1, 10**7)}
# Flags of the commands that make tables, sweep figures and timings, each with its command.
MOVED = {"--summarize": "python -m fire_repro.tables DIR... [--quoted NAME] [--table-out FILE] [--title TEXT]",
         "--plot-sweep": "python -m fire_repro.tables DIR... --plot-kind {lambda,plane} --plot-out FILE",
         "--time-images": "python benchmark.py --autoattack N --checkpoint CHECKPOINT",
         "--time-model": "python benchmark.py --autoattack N --model NAME --dataset NAME"}


def parse_eps(text):
    """A radius in pixel units of [0, 1]: a number (0.031) or a fraction (8/255). Its bound depends
    on the norm (attacks.EPS_RANGES), checked once the norm is known (autoattack.threat_model)."""
    try:
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite radius >= 0, got {text!r}")
    return value


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="best.pt / last.pt files of train_fire.py or train_trades.py, or a RobustBench "
                        "entry robustbench:<cifar10|cifar100>/<Linf|L2>/<name> (docs/robustbench.md)")
    p.add_argument("--robustbench-dir", type=str, default="models",
                   help="RobustBench's model folder: its entries' weights are read from (or downloaded to) "
                        "<dir>/<dataset>/<Linf|L2>/<name>.pt")
    p.add_argument("--norm", type=str, default=None, choices=list(NORMS),
                   help="threat model of AutoAttack and PGD-20/CW-20: linf or l2 (default: the "
                        "checkpoint's training norm; another one needs --eps)")
    p.add_argument("--eps", type=parse_eps, default=None,
                   help=f"radius in --norm in pixel units of [0, 1], e.g. 0.3, 8/255 or 0.5, linf "
                        f"{EPS_RANGES['linf']}, l2 {EPS_RANGES['l2']} (default: the checkpoint's training eps)")
    p.add_argument("--n-examples", type=int, default=None,
                   help=f"first N images of the split, {EVAL_RANGES['n_examples']} (default: all; "
                        f"AutoAttack's papers use the first 10,000 of the test set)")
    p.add_argument("--batch-size", type=int, default=500,
                   help=f"images per AutoAttack batch, {EVAL_RANGES['batch_size']} (500: not tuned "
                        f"on a GPU; it changes the random starts, so it is part of the evaluation's "
                        f"settings)")
    p.add_argument("--chunk-size", type=int, default=1000,
                   help=f"images per saved chunk, {EVAL_RANGES['chunk_size']}: a killed evaluation "
                        f"resumes from its last finished chunk; under torchrun the chunks are shared "
                        f"among processes")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of AutoAttack and of the PGD starts, {EVAL_RANGES['seed']}; chunk k is "
                        f"seeded with seed * 1000003 + k")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA (all visible GPUs, DataParallel; one per process under "
                        "torchrun) when available, else CPU")
    p.add_argument("--split", type=str, default="test", choices=["test", "val"],
                   help="test split, or the training script's held-out validation split")
    p.add_argument("--data-dir", type=str, default=None,
                   help="where the data live (default: the checkpoint's --data-dir)")
    p.add_argument("--pgd20", action="store_true",
                   help="also PGD-20 on the cross-entropy (step 2.5 eps / 20, uniform start)")
    p.add_argument("--cw", action="store_true",
                   help="also CW-20: PGD-20 on the Carlini-Wagner margin loss in --norm (older papers' table)")
    p.add_argument("--smoke-aa", action="store_true",
                   help="for smoke tests only: the standard attacks, order and target classes with "
                        "10 instead of 100 iterations (APGD, FAB) and 100 instead of 5000 Square "
                        "queries; results are marked and NOT comparable with the paper's")
    p.add_argument("--sanity", action="store_true",
                   help="also the masking report (fire_repro/sanity.py, docs/evaluation.md#the-masking-report): "
                        "robust accuracy at 1x, 2x, 4x eps and the whole box, Square alone, a transfer attack, "
                        "zero gradients, whether the loss rose; on the first --sanity-n images, into the "
                        "result's `sanity` field (added to a finished evaluation without attacking it again)")
    p.add_argument("--sanity-n", type=int, default=500,
                   help=f"images of the masking report, the first of the evaluated ones, {EVAL_RANGES['sanity_n']}")
    p.add_argument("--transfer-from", type=str, default=None, metavar="CHECKPOINT",
                   help="with --sanity: a checkpoint of the same data set trained without the regulariser "
                        "(e.g. lam 0 or Madry et al.) whose PGD-20 x' are transferred to the evaluated model")
    p.add_argument("--defense", type=str, default=None,
                   help="name of the table row (default: the tables name it from what the result "
                        "records: method, weight, extra data, checkpoint, e.g. 'FIRE (lam=12)')")
    p.add_argument("--out", type=str, default=None,
                   help="result JSON (default: <run>/autoattack[-<name>][-l2][-eps<eps>][-val].json: "
                        "<name> for <name>.pt other than best.pt, the eps when it is not the "
                        "training eps, -val for --split val)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation of the same checkpoint with other settings (finished, "
                        "or interrupted with chunks left) at the result's path; without it the "
                        "command is refused before any attack runs (give --out to keep both)")
    given = sys.argv[1:] if argv is None else argv
    moved = next((flag for flag in MOVED for a in given if a == flag or a.startswith(flag + "=")), None)
    if moved:
        p.error(f"{moved} belongs to another command (eval_autoattack.py evaluates): use {MOVED[moved]}")
    args = p.parse_args(argv)
    if args.out and len(args.checkpoints) > 1:
        p.error("--out needs exactly one checkpoint")
    if args.out and not args.out.endswith(".json"):
        p.error(f"--out must name a .json file (its .npz, .log and .chunks/ go beside it), got {args.out!r}")
    if args.transfer_from and not args.sanity:
        p.error("--transfer-from goes with --sanity (it is a check of the masking report)")
    check_ranges(p, args, EVAL_RANGES)
    return args


# ----------------------------------------------------------------------------------------------
# Output files: checked before the work starts, written atomically


def write_npz(path, arrays):
    write_atomic(path, lambda f: np.savez(f, **arrays), binary=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints, their data and where their results go


def settings_of(args, eps, n, norm="linf"):
    """Everything besides the checkpoint that changes an evaluation's numbers. Batch and chunk
    size change the random starts; the number of processes does not (chunks are seeded alone).
    The norm is there when it is not Linf, the paper's threat model."""
    attacks = [*STANDARD_ATTACKS] + ["pgd20"] * args.pgd20 + ["cw"] * args.cw
    return dict(**({"norm": norm} if norm != "linf" else {}), eps=eps, split=args.split, n_examples=n,
                seed=args.seed, smoke_aa=args.smoke_aa, attacks=attacks, batch_size=args.batch_size, chunk_size=args.chunk_size)


class Evaluation:
    """One checkpoint to evaluate, with everything checked before the work starts: its path, its
    training arguments (`saved`), its threat model, images, result file (`out`) and `key`, what
    makes two evaluations the same (the checkpoint's SHA-256 and the settings)."""

    def __init__(self, path, args, out_flag):
        zoo = robustbench_io.is_zoo(path)  # a RobustBench entry: its weights file is the checkpoint
        if not zoo and not os.path.lexists(path):
            raise UserError(f"checkpoint {path!r} {missing_run_file(path)}")
        ckpt = robustbench_io.zoo_checkpoint(path, args.robustbench_dir) if zoo else load_checkpoint(path)
        self.path, self.saved, self.zoo = ckpt["path"] if zoo else path, ckpt["args"], zoo
        self.zoo_model = ckpt.get("model")  # a zoo entry's network, its weights checked on loading
        self.train_identity = run_identity(self.saved)  # the run's settings, for table rows
        try:
            self.norm, self.eps = threat_model(self.saved, args.norm, args.eps)
        except UserError as err:
            raise UserError(f"{self.path}: {err}") from None
        n_split = len(split_of(self.saved, args.split, args.data_dir))  # data present offline?
        self.n = n_split if args.n_examples is None else min(args.n_examples, n_split)
        self.out = out_flag or default_out(self.path, self.eps, self.saved["eps"], args.split, self.norm)
        self.what = "--out" if out_flag else "result file"
        self.key = dict(checkpoint_sha256=sha256_file(self.path), settings=settings_of(args, self.eps, self.n, self.norm))
        self.stem = os.path.splitext(self.out)[0]
        self.sanity = sanity_settings(args, self) if args.sanity else None


def sanity_settings(args, job):
    """What makes two masking reports of one evaluation the same: its images, seed, Square's
    queries and the transfer source (its SHA-256, checked to be a checkpoint of the same data set)."""
    source = None
    if args.transfer_from:
        if not os.path.lexists(args.transfer_from):
            raise UserError(f"--transfer-from {args.transfer_from!r} {missing_run_file(args.transfer_from)}")
        their_args = load_checkpoint(args.transfer_from)["args"]
        theirs = their_args["dataset"]
        if theirs != job.saved["dataset"]:
            raise UserError(f"--transfer-from {args.transfer_from!r} was trained on {theirs}, "
                            f"{job.path} on {job.saved['dataset']}: a transfer needs the same data set")
        if run_identity(their_args) == job.train_identity:  # a white-box attack under another name
            raise UserError(f"--transfer-from {args.transfer_from!r} is a checkpoint of the run evaluated: a transfer "
                            f"needs a model trained independently (the data set's run without the regulariser)")
        source = dict(checkpoint=os.path.abspath(args.transfer_from), sha256=sha256_file(args.transfer_from))
    return dict(n_examples=min(args.sanity_n, job.n), seed=args.seed, smoke_aa=args.smoke_aa, transfer_from=source)


def finished_result(job):
    """results.finished for this evaluation's result file, checkpoint and settings."""
    return results.finished(job.out, job.key["checkpoint_sha256"], job.key["settings"])


def earlier_settings(job):
    """The settings of an earlier evaluation of this same checkpoint at this one's output: finished
    (its result JSON) or interrupted (its chunk files); None if there is none."""
    record = read_json(job.out)
    if (isinstance(record, dict) and record.get("format") == RESULT_FORMAT
            and record.get("checkpoint_sha256") == job.key["checkpoint_sha256"]):
        return record.get("settings")
    for path in sorted(glob.glob(os.path.join(glob.escape(job.stem + ".chunks"), "chunk-*.npz"))):
        chunk = read_chunk_file(path)
        key = chunk[1].get("evaluation") if chunk else None
        if isinstance(key, dict) and key.get("checkpoint_sha256") == job.key["checkpoint_sha256"]:
            return key.get("settings")
    return None


def refuse_other_settings(job, args):
    """Stop before any work, unless --overwrite, where this evaluation would replace one of the same
    checkpoint with other settings (a quick check must not delete a full evaluation)."""
    old = earlier_settings(job)
    changed = "" if old is None else settings_change(old, job.key["settings"])
    if changed and not args.overwrite:
        raise UserError(f"{job.out} holds an evaluation of {job.path} with other settings ({changed}): "
                        f"give --out to write this one elsewhere, or --overwrite to replace it")


def read_chunk_file(path):
    """(arrays, meta) of a chunk file, or None when it is missing or damaged."""
    arrays = read_arrays(path)
    if arrays is None or "meta" not in arrays:
        return None
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError:
        return None
    return (arrays, meta) if isinstance(meta, dict) else None


def read_chunk(path, key, chunk, n):
    """A finished chunk file of this evaluation (same checkpoint hash, settings, chunk, size), as
    (arrays, meta); None if missing, damaged or from another evaluation (it is computed again)."""
    got = read_chunk_file(path)
    if got is None:
        return None
    arrays, meta = got
    ok = (meta.get("evaluation") == key and meta.get("chunk") == chunk
          and len(arrays.get("index", ())) == n)
    return (arrays, meta) if ok else None


def lock_folders(jobs, outs):
    """The run-folder lock (common.lock_folder, the one trainings take) of every folder this
    process writes into or reads a checkpoint from, each taken once: a training or another
    evaluation there meanwhile stops with one line. A checkpoint's folder that cannot be written
    (no training can write there either) is not locked. Process 0 only under torchrun."""
    if rank_and_world()[0] != 0:
        return []
    folders = [os.path.dirname(os.path.abspath(out)) for out in outs]
    folders += [d for d in (os.path.dirname(os.path.abspath(p.path)) for p in jobs) if os.access(d, os.W_OK)]
    locks = []
    try:
        for folder in dict.fromkeys(os.path.realpath(f) for f in folders):
            locks.append(lock_folder(folder, "run folder"))
    except UserError:
        for lock in locks:
            lock.close()
        raise
    return locks


def load_network(job, device):
    """The checkpoint's model (checkpoints.load_model: eval mode, so no dropout and BatchNorm's
    running statistics; a RobustBench entry through robustbench_io) in float32, wrapped in
    DataParallel when several GPUs are visible to one process (not under torchrun: there each
    process has its own GPU)."""
    if job.zoo:
        return over_all_gpus(job.zoo_model.to(device).float().eval(), device)
    return over_all_gpus(load_model(job.path, device).float(), device)


def evaluate_checkpoint(job, args, device):
    """Evaluate one checkpoint chunk by chunk (this process's share of the chunks under torchrun),
    then merge the chunks into the result JSON and the per-image .npz; returns the result dict
    (None on the other processes). A finished evaluation with the same key is skipped."""
    rank, world = rank_and_world()
    done, stale = finished_result(job)
    if stale and rank == 0:
        print(f"{job.path}: replacing {job.out}: {stale}", flush=True)
    if done is not None:
        if args.defense and done.get("defense") != args.defense and rank == 0:
            done["defense"] = args.defense  # a new row name needs no new attack
            write_json(job.out, done)
        if rank == 0:
            print(f"{job.path}: already evaluated (same checkpoint SHA-256 and settings) -> {job.out}",
                  flush=True)
        return add_sanity(job, args, device, done) if rank == 0 else None
    saved, eps = job.saved, job.eps
    net = load_network(job, device)
    x, y = first_images(split_of(saved, args.split, args.data_dir), job.n)
    chunk_dir = job.stem + ".chunks"
    os.makedirs(chunk_dir, exist_ok=True)
    n_chunks = math.ceil(job.n / args.chunk_size)
    if rank == 0:
        print(f"{job.path}: {saved['method']} {saved['dataset']} {saved['model']} seed {saved['seed']}, "
              f"AutoAttack {job.norm} eps {eps:g} on {job.n} {args.split} images in {n_chunks} chunk(s)"
              + (f" over {world} processes" if world > 1 else ""), flush=True)
    for k in range(rank, n_chunks, world):
        path = os.path.join(chunk_dir, f"chunk-{k:05d}.npz")
        lo, hi = k * args.chunk_size, min((k + 1) * args.chunk_size, job.n)
        if read_chunk(path, job.key, k, hi - lo) is not None:
            continue  # finished before a kill or preemption
        t0 = time.time()
        per_sample, info = evaluate_autoattack(
            net, x[lo:hi], y[lo:hi], eps, args.batch_size, chunk_seed(args.seed, k), device,
            args.pgd20, args.cw, args.smoke_aa, log_path=os.path.join(chunk_dir, f"chunk-{k:05d}.log"),
            norm=job.norm)
        meta = dict(evaluation=job.key, chunk=k, time_s=time.time() - t0, **info)
        write_npz(path, dict(index=np.arange(lo, hi), label=y[lo:hi].numpy(), **per_sample,
                             meta=np.array(json.dumps(meta))))
        print(f"  chunk {k + 1}/{n_chunks}: natural {per_sample['natural'].mean():.4f} | AutoAttack "
              f"{per_sample['square'].mean():.4f} | {meta['time_s']:.0f}s", flush=True)
    if dist.is_initialized():
        dist.barrier()  # every chunk is on disk
    result = merge_chunks(job, args, chunk_dir, n_chunks, device) if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()  # the JSON is written before any process moves on
    return add_sanity(job, args, device, result) if rank == 0 else None


def add_sanity(job, args, device, result):
    """The result with its masking report (sanity.masking_report) when --sanity asks for it, written
    into its JSON; a report of the same settings already there is kept, and so is one that adds a
    transfer check to the settings asked for (asked without --transfer-from, it is not lost)."""
    done = (result.get("sanity") or {}).get("settings")
    if job.sanity is None or done == job.sanity:
        return result
    if done and job.sanity["transfer_from"] is None and dict(done, transfer_from=None) == job.sanity:
        print(f"masking report kept: the one in {job.out} has the same settings and a transfer check", flush=True)
        return result
    s = job.sanity
    m = s["n_examples"]
    x, y = first_images(split_of(job.saved, args.split, args.data_dir), m)
    whitebox = results.read_per_image(result, job.out)["fab-t"][:m]  # robust after the white-box attacks
    source = load_model(s["transfer_from"]["checkpoint"], device).float() if s["transfer_from"] else None
    report = masking_report(load_network(job, device), x, y, job.eps, job.norm, whitebox, seed=args.seed,
                            device=device, smoke=args.smoke_aa, source=source, batch_size=args.batch_size)
    result["sanity"] = dict(settings=s, n_examples=m, **report)
    write_json(job.out, result)
    flagged = [name for name, c in report["checks"].items() if c["flagged"]]
    print(f"masking report on {m} images: " + (f"FLAGGED {', '.join(flagged)}" if flagged else "no check flagged")
          + f" ({report['time_s']:.0f}s) -> {job.out}", flush=True)
    return result


def merge_chunks(job, args, chunk_dir, n_chunks, device):
    """Per-image arrays of all chunks -> <stem>.npz, <stem>.log and the result JSON."""
    chunks = []
    for k in range(n_chunks):
        lo, hi = k * args.chunk_size, min((k + 1) * args.chunk_size, job.n)
        chunk = read_chunk(os.path.join(chunk_dir, f"chunk-{k:05d}.npz"), job.key, k, hi - lo)
        if chunk is None:
            raise RuntimeError(f"chunk {k} of {job.out} is missing after every process finished")
        chunks.append(chunk)
    arrays = {key: np.concatenate([a[key] for a, _ in chunks]) for key in chunks[0][0]}
    warnings = []
    for _, meta in chunks:
        warnings += [m for m in meta["aa_warnings"] if m not in warnings]
    saved = job.saved
    ckpt = {} if job.zoo else load_checkpoint(job.path)  # its epoch and training time (a zoo entry: none)
    train_time, source, pretrain_time = run_training_time(job.path, ckpt)
    import pyautoattack
    per_sample = {k: v for k, v in arrays.items() if k not in ("index", "label")}
    acc = accuracies(per_sample, args.smoke_aa)
    weight = saved.get("method_weight")
    result = dict(
        format=RESULT_FORMAT, defense=args.defense,  # None: the tables name the row (tables.row_name)
        **{k: v for k, v in saved.items() if k.startswith("method")}, **({weight: saved.get(weight)} if weight else {}),
        dataset=saved["dataset"], model=saved["model"], norm=job.norm, eps=job.eps, train_eps=saved["eps"],
        aux_data=saved.get("aux_data"), init_from=saved.get("init_from"), seed=saved["seed"],
        epochs=saved.get("epochs"), ema=saved.get("ema"),  # with --ema the weights are the average
        lr=saved.get("lr"), checkpoint=os.path.abspath(job.path),
        checkpoint_kind=os.path.splitext(os.path.basename(job.path))[0], epoch=ckpt.get("epoch"),
        train_time_s=train_time if math.isfinite(train_time) else None, train_time_source=source, pretrain_time_s=pretrain_time,
        split=args.split, **acc,
        max_perturbation=max(meta["max_perturbation"] for _, meta in chunks),
        aa_warnings=warnings,  # all of them; aa_checks: each check's outcome (docs/evaluation.md)
        aa_checks=merge_checks([meta.get("aa_checks") for _, meta in chunks], acc["natural"], acc["robust_after"]),
        aa_seed=args.seed, **job.key, train_identity=job.train_identity,
        per_sample=os.path.basename(job.stem + ".npz"),
        eval_time_s=sum(meta["time_s"] for _, meta in chunks),  # compute time, all processes
        device=device.type, torch=torch.__version__,
        pyautoattack=pyautoattack.__version__,
        **({"rehearsal": REHEARSAL_NOTE} if saved.get("rehearsal") else {}))
    write_npz(job.stem + ".npz", arrays)
    logs = []
    for k in range(n_chunks):
        log = os.path.join(chunk_dir, f"chunk-{k:05d}.log")
        if os.path.isfile(log):
            with open(log) as f:
                logs.append(f"# chunk {k}\n" + f.read())
    write_atomic(job.stem + ".log", lambda f: f.write("".join(logs)))
    write_json(job.out, result)  # last: a JSON exists only with its .npz beside it
    shutil.rmtree(chunk_dir, ignore_errors=True)
    steps = " | ".join(f"{a} {result['robust_after'][a]:.4f}" for a in STANDARD_ATTACKS)
    extra = "".join(f" | {k} {result[k]:.4f}" for k in ("pgd20", "cw") if k in result)
    print((f"{REHEARSAL_NOTE}: " if saved.get("rehearsal") else "")
          + f"natural {result['natural']:.4f} | {steps} | AutoAttack {result['autoattack']:.4f} | "
          f"Avg. Acc. {result['avg_acc']:.4f}{extra} | {result['eval_time_s']:.0f}s -> {job.out}",
          flush=True)
    return result


def main(argv=None):
    args = get_args(argv)
    # Everything the user gave is checked before any attack runs.
    if args.out:
        check_output(args.out, "--out")
    jobs = [Evaluation(path, args, args.out) for path in args.checkpoints]
    outs = [job.out for job in jobs]
    for job in jobs:
        check_output(job.out, job.what)
    if len(set(outs)) != len(outs):
        raise UserError("two checkpoints would write the same result file: evaluate them separately with --out")
    locks = lock_folders(jobs, outs)
    try:
        for job in jobs:
            refuse_other_settings(job, args)
        # a process waits at the merge barrier for the slowest: allow AutoAttack chunks of hours
        device = setup_device(args, timeout=datetime.timedelta(hours=24))
        # Evaluation is float32: no TF32 in matmuls or convolutions on Ampere and later GPUs (whether
        # TF32 would change AutoAttack's verdicts has not been measured).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            return [evaluate_checkpoint(job, args, device) for job in jobs]
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        for lock in locks:
            lock.close()


if __name__ == "__main__":
    cli(main)
