"""AutoAttack evaluation of a checkpoint, and the paper's tables and figures from the results
(built by tables.py).

Evaluates a checkpoint written by train_fire.py or train_trades.py the way Section 5.1 does:
natural accuracy and the standard AutoAttack (Croce & Hein 2020; APGD-CE, APGD-T, FAB-T, Square;
Linf, or L2 with --norm l2) at the training eps, in float32 (TF32 off) and eval mode, with the
robust accuracy after each attack and Avg. Acc. = (Natural + AutoAttack) / 2. The model is rebuilt from the arguments
stored in the checkpoint; the result goes to a JSON file next to it that holds everything a table
row needs, tied to the checkpoint by its SHA-256, and per-image results go to an .npz beside it.

Commands:
    python eval_autoattack.py runs/fire-digits-s0/best.pt        # -> runs/fire-digits-s0/autoattack.json
    python eval_autoattack.py runs/c10/best.pt --eps 8/255 --pgd20 --cw   # -> autoattack-eps8-255.json
    python eval_autoattack.py runs/c10/best.pt --n-examples 1000 --batch-size 500   # quicker check
    python eval_autoattack.py runs/madry/last.pt --defense "Madry et al."   # -> autoattack-last.json
    python eval_autoattack.py runs/c10/best.pt --split val                  # -> autoattack-val.json
    torchrun --nproc_per_node=4 eval_autoattack.py runs/c10/best.pt --eps 8/255   # one GPU per process
    python eval_autoattack.py runs/c10/best.pt --time-images 500   # images/s, projected 10,000-image time
    python eval_autoattack.py --time-images 200 --time-model wrn-34-10 --time-dataset cifar10
    python eval_autoattack.py --summarize runs/ --table-out table.md   # mean +- std over seeds
    python eval_autoattack.py --summarize runs/ --quoted table2        # + the rows the paper quotes
    (--summarize and --plot-sweep exit with 3 when they wrote their output but left out results
    under a folder; a file named on their command line must be a valid result, else exit 2)
    python eval_autoattack.py --plot-sweep runs/sweep --plot-kind lambda --plot-out fig7.png
    python eval_autoattack.py --plot-sweep runs/sweep --plot-kind plane --plot-out fig8.png

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
import logging
import math
import os
import shutil
import sys
import time
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from fire_repro import results
from fire_repro import robustbench_io
from fire_repro import tables
from fire_repro.attacks import NORMS, attack_pgd_ce, cw_margin, perturbation_norm
from fire_repro.checkpoints import load_checkpoint, load_model, run_training_time
from fire_repro.common import (ArgumentParser, Range, UserError, check_output, check_ranges, cli,
                    lock_folder, read_arrays, read_json, sha256_file, write_atomic, write_json)
from fire_repro.config import run_identity
from fire_repro.data import DATASETS, dataset_shape, get_datasets
from models import check_model_name, get_model
from fire_repro.parallel import over_all_gpus, rank_and_world, setup_device
from fire_repro.results import RESULT_FORMAT, STANDARD_ATTACKS, default_out, settings_change
from fire_repro.run_folder import missing_run_file
from fire_repro.tables import QUOTED, fmt_hours

TIMING_FORMAT = "fire-repro-autoattack-timing/1"
LEFT_OUT = 3  # exit status of --summarize / --plot-sweep: written, but results under a folder were left out
REHEARSAL_NOTE = "REHEARSAL: a run on generated stand-in data (--rehearsal); not a result"
TEST_SET_SIZE = 10_000  # AutoAttack's papers evaluate the first 10,000 test images
# The ranges of the numeric flags, the one place they are written (the help texts quote them).
EVAL_RANGES = {"n_examples": Range(1, 10**7), "batch_size": Range(1, 65_536),
               "chunk_size": Range(1, 10**6), "seed": Range(0, 2**32, high_open=True),
               "time_images": Range(1, 10**6)}


def parse_eps(text):
    """A radius in [0, 1] pixel units: a number (0.031) or a fraction (8/255)."""
    try:
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="best.pt / last.pt files of train_fire.py or train_trades.py, or a RobustBench "
                        "entry robustbench:<cifar10|cifar100>/<Linf|L2>/<name> (docs/robustbench.md)")
    p.add_argument("--robustbench-dir", type=str, default="models",
                   help="RobustBench's model folder: its entries' weights are read from (or downloaded to) "
                        "<dir>/<dataset>/<Linf|L2>/<name>.pt")
    g = p.add_argument_group("evaluation")
    g.add_argument("--norm", type=str, default=None, choices=list(NORMS),
                   help="threat model of AutoAttack and PGD-20/CW-20: linf or l2 (default: the "
                        "checkpoint's training norm; another one needs --eps)")
    g.add_argument("--eps", type=parse_eps, default=None,
                   help="radius in --norm in [0, 1] pixel units, e.g. 0.3, 8/255 or 0.5 (default: the "
                        "checkpoint's training eps)")
    g.add_argument("--n-examples", type=int, default=None,
                   help=f"first N images of the split, {EVAL_RANGES['n_examples']} (default: all; "
                        f"AutoAttack's papers use the first 10,000 of the test set)")
    g.add_argument("--batch-size", type=int, default=500,
                   help=f"images per AutoAttack batch, {EVAL_RANGES['batch_size']} (500: not tuned "
                        f"on a GPU; it changes the random starts, so it is part of the evaluation's "
                        f"settings)")
    g.add_argument("--chunk-size", type=int, default=1000,
                   help=f"images per saved chunk, {EVAL_RANGES['chunk_size']}: a killed evaluation "
                        f"resumes from its last finished chunk; under torchrun the chunks are shared "
                        f"among processes")
    g.add_argument("--seed", type=int, default=0,
                   help=f"seed of AutoAttack and of the PGD starts, {EVAL_RANGES['seed']}; chunk k is "
                        f"seeded with seed * 1000003 + k")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA (all visible GPUs, DataParallel; one per process under "
                        "torchrun) when available, else CPU")
    g.add_argument("--split", type=str, default="test", choices=["test", "val"],
                   help="test split, or the training script's held-out validation split")
    g.add_argument("--data-dir", type=str, default=None,
                   help="where the data live (default: the checkpoint's --data-dir)")
    g.add_argument("--pgd20", action="store_true",
                   help="also PGD-20 on the cross-entropy (step 2.5 eps / 20, uniform start)")
    g.add_argument("--cw", action="store_true",
                   help="also CW-20: PGD-20 on the Carlini-Wagner margin loss in --norm (older papers' table)")
    g.add_argument("--smoke-aa", action="store_true",
                   help="for smoke tests only: the standard attacks, order and target classes with "
                        "10 instead of 100 iterations (APGD, FAB) and 100 instead of 5000 Square "
                        "queries; results are marked and NOT comparable with the paper's")
    g.add_argument("--defense", type=str, default=None,
                   help="name of the table row (default: from the method, lam/beta, extra data "
                        "and checkpoint, e.g. 'FIRE (lam=12)')")
    g.add_argument("--out", type=str, default=None,
                   help="result JSON (default: <run>/autoattack[-<name>][-eps<eps>][-val].json: "
                        "<name> for <name>.pt other than best.pt, the eps when it is not the "
                        "training eps, -val for --split val)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation of the same checkpoint with other settings (finished, "
                        "or interrupted with chunks left) at the result's path; without it the "
                        "command is refused before any attack runs (give --out to keep both)")
    g = p.add_argument_group("AutoAttack throughput")
    g.add_argument("--time-images", type=int, default=None, metavar="N",
                   help=f"time the AutoAttack on the first N images, N {EVAL_RANGES['time_images']}, "
                        "of each checkpoint's split "
                        "(or of --time-model) instead of evaluating: images/s and the projected "
                        "time for 10,000 images, printed and written to <json stem>-timing.json "
                        "(or --out)")
    g.add_argument("--time-model", type=str, default=None,
                   help="time a freshly initialised model of this architecture (e.g. wrn-34-10) "
                        "on random images labelled with its own predictions, no checkpoint")
    g.add_argument("--time-dataset", type=str, default="cifar10", choices=list(DATASETS),
                   help="image shape and classes for --time-model")
    g = p.add_argument_group("tables and figures from result JSONs")
    g.add_argument("--summarize", type=str, nargs="+", default=None, metavar="DIR",
                   help="collect result JSONs under these folders (recursively) and print the "
                        "paper's table: mean +- std over seeds, and each row's paired AutoAttack "
                        "difference to FIRE")
    g.add_argument("--quoted", type=str, default=None, choices=sorted(QUOTED),
                   help="with --summarize: add the rows this table of the paper quotes from other "
                        "papers (marked, no std)")
    g.add_argument("--table-out", type=str, default=None, help="also write the Markdown table here")
    g.add_argument("--title", type=str, default=None, help="heading written above the table")
    g.add_argument("--plot-sweep", type=str, nargs="+", default=None, metavar="DIR",
                   help="draw a lambda/beta sweep from the result JSONs under these folders")
    g.add_argument("--plot-kind", type=str, default="lambda", choices=["lambda", "plane"],
                   help="lambda: natural and AutoAttack accuracy against lambda (Fig. 7); "
                        "plane: AutoAttack against natural accuracy, one curve per method (Fig. 8)")
    g.add_argument("--plot-out", type=str, default="sweep.png",
                   help="figure written by --plot-sweep; its extension picks the format (png, pdf, svg, ...)")
    args = p.parse_args(argv)

    modes = sum([bool(args.checkpoints), args.summarize is not None, args.plot_sweep is not None,
                 args.time_model is not None])
    if modes != 1:
        p.error("give checkpoints to evaluate, or --summarize DIR..., or --plot-sweep DIR..., "
                "or --time-model NAME")
    if args.out and len(args.checkpoints) > 1:
        p.error("--out needs exactly one checkpoint")
    if args.out and not args.out.endswith(".json"):
        p.error(f"--out must name a .json file (its .npz, .log and .chunks/ go beside it), got {args.out!r}")
    check_ranges(p, args, EVAL_RANGES)
    checks = [
        (args.time_model is None or args.time_images is not None, "--time-model needs --time-images N"),
        (args.quoted is None or args.summarize is not None, "--quoted goes with --summarize"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    if args.time_model is not None:
        try:
            check_model_name(args.time_model)  # the name only: no network is built here
        except ValueError as e:
            p.error(f"--time-model: {e}")
    if args.plot_sweep is not None:
        ext = os.path.splitext(args.plot_out)[1].lstrip(".").lower()
        formats = tables.figure_formats()
        if ext not in formats:
            p.error(f"--plot-out {args.plot_out!r}: the extension must name a figure format "
                    f"({', '.join(sorted(formats))})")
    return args


# ----------------------------------------------------------------------------------------------
# Output files: checked before the work starts, written atomically


def write_npz(path, arrays):
    write_atomic(path, lambda f: np.savez(f, **arrays), binary=True)


# ----------------------------------------------------------------------------------------------
# Evaluation


def autoattack_batch(adversary, model, x, y, say=None):
    """Standard AutoAttack on one batch; returns (clean-correct mask, robust mask after each
    attack, x_adv). `say`, when given, is called with a line per attack ("apgd-ce: robust 0.620
    (12s)": the batch's robust accuracy after it, its time).

    run_standard_evaluation runs its attacks in order, each on the points that survived the
    previous ones. We do exactly that, one attack per call on the same `adversary` (built with
    version="standard", so restarts, target classes and queries are the standard ones), to record
    the robust accuracy after each attack.
    """
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    correct = robust.clone()
    x_adv = x.clone()
    after = {}
    for attack in STANDARD_ATTACKS:
        t0 = time.time()
        idx = robust.nonzero().squeeze(1)
        if len(idx) > 0:
            adversary.attacks_to_run = [attack]
            adv, _ = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[idx]
            x_adv[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
        after[attack] = robust.clone()
        if say:
            say(f"{attack}: robust {robust.float().mean().item():.3f} ({time.time() - t0:.0f}s)")
    adversary.attacks_to_run = list(STANDARD_ATTACKS)
    return correct, after, x_adv


class _Collect(logging.Handler):
    """Keeps AutoAttack's warnings (randomised model, zero gradients, ...) for the JSON."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


def chunk_seed(seed, chunk):
    """The seed of chunk `chunk`: a resumed or sharded evaluation draws exactly the random
    numbers of an uninterrupted one."""
    return seed * 1_000_003 + chunk


def evaluate_autoattack(model, x, y, eps, batch_size=500, seed=0, device="cpu", pgd20=False,
                        cw=False, smoke=False, log_path=None, progress=True, norm="linf"):
    """Natural correctness, robustness after each attack of the standard AutoAttack, and
    optionally under PGD-20 and CW-20, per image, in the `norm` eps-ball, for images x in [0, 1]
    (on the CPU) and labels y.
    smoke=True cuts AutoAttack's iterations and queries (see --smoke-aa): only for smoke tests.

    `seed` drives everything random: AutoAttack re-seeds torch from its `seed` before each attack
    (run_standard_evaluation sets attack.seed = adversary.get_seed()), and each batch's PGD
    starts are seeded from (seed, batch). The model must already be in eval mode (dropout off,
    BatchNorm running statistics): a model in train mode raises UserError rather than silently
    giving wrong numbers. Returns ({"natural", attacks..., ["pgd20"], ["cw"]: bool arrays},
    {"max_perturbation", "aa_warnings"}).
    """
    if any(m.training for m in model.modules()):
        raise UserError("the model is in train mode: call model.eval() before evaluating it")
    from pyautoattack import AutoAttack
    logger = logging.getLogger("auto-attack")  # AutoAttack's progress (DEBUG) and warnings
    collect, handlers = _Collect(), []
    old = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep its warnings off the console: they go to the log and JSON
    handlers.append(collect)
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for h in handlers:
        logger.addHandler(h)
    try:
        adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                               version="standard", device=device, seed=seed)
        if smoke:  # same attacks, order and targets; a tenth of the iterations, 1/50 of the queries
            adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = 10
            adversary.square.n_queries = 100
        names = ["natural", *STANDARD_ATTACKS] + ["pgd20"] * pgd20 + ["cw"] * cw
        per_sample = {k: [] for k in names}
        max_pert, n = 0.0, 0
        bar = tqdm(range(0, len(x), batch_size), desc="AutoAttack", unit="batch", leave=False,
                   disable=None if progress else True)  # None: off when not a terminal

        def say(line):  # a line per attack, also when the bar is off (stdout not a terminal)
            tqdm.write(f"  batch {batch + 1}/{math.ceil(len(x) / batch_size)} {line}")
            sys.stdout.flush()
        for batch, start in enumerate(bar):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            correct, after, x_adv = autoattack_batch(adversary, model, xb, yb, say if progress else None)
            per_sample["natural"].append(correct.cpu())
            for attack in STANDARD_ATTACKS:
                per_sample[attack].append(after[attack].cpu())
            max_pert = max(max_pert, perturbation_norm(x_adv - xb, norm).max().item())
            if x_adv.min() < 0 or x_adv.max() > 1 or max_pert > eps + 1e-5:
                raise RuntimeError(f"AutoAttack left the {norm} eps-ball or [0, 1] (max ||x' - x|| = {max_pert})")
            with torch.no_grad():  # sanity check: the final x' really fools the model
                again = (model(x_adv).argmax(1) == yb).sum().item()
            if again != after["square"].sum().item():
                collect.messages.append(f"re-evaluating x' gave {again} robust points in a batch, "
                                        f"AutoAttack {after['square'].sum().item()}")
            if pgd20 or cw:  # each batch's random start, independent of the batches before it
                torch.manual_seed(chunk_seed(seed, batch) % 2 ** 64)
            if pgd20:
                x_pgd = attack_pgd_ce(model, xb, yb, eps, 2.5 * eps / 20, 20, norm=norm)
                with torch.no_grad():
                    per_sample["pgd20"].append((model(x_pgd).argmax(1) == yb).cpu())
            if cw:
                x_cw = attack_pgd_ce(model, xb, yb, eps, 2.5 * eps / 20, 20, objective=cw_margin, norm=norm)
                with torch.no_grad():
                    per_sample["cw"].append((model(x_cw).argmax(1) == yb).cpu())
            n += len(yb)
            bar.set_postfix(natural=f"{sum(c.sum().item() for c in per_sample['natural']) / n:.3f}",
                            aa=f"{sum(c.sum().item() for c in per_sample['square']) / n:.3f}")
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old[0])
        logger.propagate = old[1]
    per_sample = {k: torch.cat(v).numpy() if v else np.zeros(0, bool) for k, v in per_sample.items()}
    return per_sample, dict(max_perturbation=max_pert, aa_warnings=collect.messages)


def accuracies(per_sample, smoke):
    """The JSON's accuracies in [0, 1] from the per-image results of evaluate_autoattack."""
    n = len(per_sample["natural"])
    result = dict(natural=per_sample["natural"].mean().item(),
                  robust_after={a: per_sample[a].mean().item() for a in STANDARD_ATTACKS},
                  autoattack=per_sample["square"].mean().item(), n_examples=n,
                  aa_version="smoke (10 iterations, 100 queries)" if smoke else "standard")
    result["avg_acc"] = (result["natural"] + result["autoattack"]) / 2
    for k in ("pgd20", "cw"):
        if k in per_sample:
            result[k] = per_sample[k].mean().item()
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoints, their data and where their results go


def split_dataset(saved, split, data_dir=None):
    """The test or validation split of the checkpoint's data set (images in [0, 1])."""
    spec = argparse.Namespace(dataset=saved["dataset"], val_size=saved["val_size"],
                              data_dir=data_dir or saved.get("data_dir") or "data",
                              rehearsal=saved.get("rehearsal", False))
    _, val_set, test_set = get_datasets(spec)
    return test_set if split == "test" else val_set


def first_images(dataset, n):
    """The first n images and labels of a split, as CPU tensors."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=500)
    xs, ys = zip(*[(x, y) for x, y, _ in loader])
    return torch.cat(xs), torch.cat(ys)


def settings_of(args, eps, n, norm="linf"):
    """Everything besides the checkpoint that changes an evaluation's numbers. Batch and chunk
    size change the random starts; the number of processes does not (chunks are seeded alone).
    The norm is there when it is l2 (an Linf evaluation's settings are as before --norm)."""
    attacks = [*STANDARD_ATTACKS] + ["pgd20"] * args.pgd20 + ["cw"] * args.cw
    return dict(**({"norm": norm} if norm != "linf" else {}), eps=eps, split=args.split, n_examples=n,
                seed=args.seed, smoke_aa=args.smoke_aa, attacks=attacks, batch_size=args.batch_size, chunk_size=args.chunk_size)


def threat_model(saved, args):
    """(norm, eps) of an evaluation of a checkpoint trained with `saved` arguments: --norm (default
    the training norm) and --eps (default the training radius). Raises UserError for another norm
    than training's without --eps."""
    train_norm = saved.get("norm", "linf")  # checkpoints from before --norm are Linf
    norm = args.norm or train_norm
    if norm != train_norm and args.eps is None:
        raise UserError(f"trained in {train_norm}, evaluated in {norm}: give its radius with --eps")
    return norm, saved["eps"] if args.eps is None else args.eps


class Plan:
    """One checkpoint to evaluate, with everything checked before the work starts."""

    def __init__(self, path, args, out_flag):
        zoo = robustbench_io.is_zoo(path)  # a RobustBench entry: its weights file is the checkpoint
        if not zoo and not os.path.lexists(path):
            raise UserError(f"checkpoint {path!r} {missing_run_file(path)}")
        ckpt = robustbench_io.zoo_checkpoint(path, args.robustbench_dir) if zoo else load_checkpoint(path)
        self.path, self.saved, self.zoo = ckpt["path"] if zoo else path, ckpt["args"], zoo and args.robustbench_dir
        self.train_identity = run_identity(self.saved)  # the run's settings, for table rows
        try:
            self.norm, self.eps = threat_model(self.saved, args)
        except UserError as err:
            raise UserError(f"{self.path}: {err}") from None
        n_split = len(split_dataset(self.saved, args.split, args.data_dir))  # data present offline?
        self.n = n_split if args.n_examples is None else min(args.n_examples, n_split)
        self.out = out_flag or default_out(self.path, self.eps, self.saved["eps"], args.split, self.norm)
        self.what = "--out" if out_flag else "result file"
        self.identity = dict(checkpoint_sha256=sha256_file(self.path),
                             settings=settings_of(args, self.eps, self.n, self.norm))
        self.stem = os.path.splitext(self.out)[0]


def finished_result(plan):
    """results.finished for this plan's result file, checkpoint and settings."""
    return results.finished(plan.out, plan.identity["checkpoint_sha256"], plan.identity["settings"])


def earlier_settings(plan):
    """The settings of an earlier evaluation of this same checkpoint at the plan's output: finished
    (its result JSON) or interrupted (its chunk files); None if there is none."""
    record = read_json(plan.out)
    if (isinstance(record, dict) and record.get("format") == RESULT_FORMAT
            and record.get("checkpoint_sha256") == plan.identity["checkpoint_sha256"]):
        return record.get("settings")
    for path in sorted(glob.glob(os.path.join(glob.escape(plan.stem + ".chunks"), "chunk-*.npz"))):
        chunk = read_chunk_file(path)
        identity = chunk[1].get("identity") if chunk else None
        if isinstance(identity, dict) and identity.get("checkpoint_sha256") == plan.identity["checkpoint_sha256"]:
            return identity.get("settings")
    return None


def refuse_other_settings(plan, args):
    """Stop before any work, unless --overwrite, where this evaluation would replace one of the same
    checkpoint with other settings (a quick check must not delete a full evaluation)."""
    old = earlier_settings(plan)
    changed = "" if old is None else settings_change(old, plan.identity["settings"])
    if changed and not args.overwrite:
        raise UserError(f"{plan.out} holds an evaluation of {plan.path} with other settings ({changed}): "
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


def read_chunk(path, identity, chunk, n):
    """A finished chunk file of this evaluation (same checkpoint hash, settings, chunk, size), as
    (arrays, meta); None if missing, damaged or from another evaluation (it is computed again)."""
    got = read_chunk_file(path)
    if got is None:
        return None
    arrays, meta = got
    ok = (meta.get("identity") == identity and meta.get("chunk") == chunk
          and len(arrays.get("index", ())) == n)
    return (arrays, meta) if ok else None


def lock_folders(plans, outs):
    """The run-folder lock (common.lock_folder, the one trainings take) of every folder this
    process writes into or reads a checkpoint from, each taken once: a training or another
    evaluation there meanwhile stops with one line. A checkpoint's folder that cannot be written
    (no training can write there either) is not locked. Process 0 only under torchrun."""
    if int(os.environ.get("RANK", "0")) != 0:
        return []
    folders = [os.path.dirname(os.path.abspath(out)) for out in outs]
    folders += [d for d in (os.path.dirname(os.path.abspath(p.path)) for p in plans) if os.access(d, os.W_OK)]
    locks = []
    try:
        for folder in dict.fromkeys(os.path.realpath(f) for f in folders):
            locks.append(lock_folder(folder, "run folder"))
    except UserError:
        for lock in locks:
            lock.close()
        raise
    return locks


def load_network(plan, device):
    """The checkpoint's model (checkpoints.load_model: eval mode, so no dropout and BatchNorm's
    running statistics; a RobustBench entry through robustbench_io) in float32, wrapped in
    DataParallel when several GPUs are visible to one process (not under torchrun: there each
    process has its own GPU)."""
    if plan.zoo:
        s = plan.saved
        model = robustbench_io.load_zoo_model(s["dataset"], s["norm"], s["robustbench"], plan.zoo)
        return over_all_gpus(model.to(device).float().eval(), device)
    return over_all_gpus(load_model(plan.path, device).float(), device)


def evaluate_checkpoint(plan, args, device):
    """Evaluate one checkpoint chunk by chunk (this process's share of the chunks under torchrun),
    then merge the chunks into the result JSON and the per-image .npz; returns the result dict
    (None on the other processes). A finished evaluation with the same identity is skipped."""
    rank, world = rank_and_world()
    done, stale = finished_result(plan)
    if stale and rank == 0:
        print(f"{plan.path}: replacing {plan.out}: {stale}", flush=True)
    if done is not None:
        if args.defense and done.get("defense") != args.defense and rank == 0:
            done["defense"] = args.defense  # a new row name needs no new attack
            write_json(plan.out, done)
        if rank == 0:
            print(f"{plan.path}: already evaluated (same checkpoint SHA-256 and settings) -> {plan.out}",
                  flush=True)
        return done if rank == 0 else None
    saved, eps = plan.saved, plan.eps
    net = load_network(plan, device)
    x, y = first_images(split_dataset(saved, args.split, args.data_dir), plan.n)
    chunk_dir = plan.stem + ".chunks"
    os.makedirs(chunk_dir, exist_ok=True)
    n_chunks = math.ceil(plan.n / args.chunk_size)
    if rank == 0:
        print(f"{plan.path}: {saved['method']} {saved['dataset']} {saved['model']} seed {saved['seed']}, "
              f"AutoAttack {plan.norm} eps {eps:g} on {plan.n} {args.split} images in {n_chunks} chunk(s)"
              + (f" over {world} processes" if world > 1 else ""), flush=True)
    for k in range(rank, n_chunks, world):
        path = os.path.join(chunk_dir, f"chunk-{k:05d}.npz")
        lo, hi = k * args.chunk_size, min((k + 1) * args.chunk_size, plan.n)
        if read_chunk(path, plan.identity, k, hi - lo) is not None:
            continue  # finished before a kill or preemption
        t0 = time.time()
        per_sample, info = evaluate_autoattack(
            net, x[lo:hi], y[lo:hi], eps, args.batch_size, chunk_seed(args.seed, k), device,
            args.pgd20, args.cw, args.smoke_aa, log_path=os.path.join(chunk_dir, f"chunk-{k:05d}.log"),
            norm=plan.norm)
        meta = dict(identity=plan.identity, chunk=k, time_s=time.time() - t0, **info)
        write_npz(path, dict(index=np.arange(lo, hi), label=y[lo:hi].numpy(), **per_sample,
                             meta=np.array(json.dumps(meta))))
        print(f"  chunk {k + 1}/{n_chunks}: natural {per_sample['natural'].mean():.4f} | AutoAttack "
              f"{per_sample['square'].mean():.4f} | {meta['time_s']:.0f}s", flush=True)
    if dist.is_initialized():
        dist.barrier()  # every chunk is on disk
    result = merge_chunks(plan, args, chunk_dir, n_chunks, device) if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()  # the JSON is written before any process moves on
    return result


def merge_chunks(plan, args, chunk_dir, n_chunks, device):
    """Per-image arrays of all chunks -> <stem>.npz, <stem>.log and the result JSON."""
    chunks = []
    for k in range(n_chunks):
        lo, hi = k * args.chunk_size, min((k + 1) * args.chunk_size, plan.n)
        chunk = read_chunk(os.path.join(chunk_dir, f"chunk-{k:05d}.npz"), plan.identity, k, hi - lo)
        if chunk is None:
            raise RuntimeError(f"chunk {k} of {plan.out} is missing after every process finished")
        chunks.append(chunk)
    arrays = {key: np.concatenate([a[key] for a, _ in chunks]) for key in chunks[0][0]}
    warnings = []
    for _, meta in chunks:
        warnings += [m for m in meta["aa_warnings"] if m not in warnings]
    saved = plan.saved
    ckpt = {} if plan.zoo else load_checkpoint(plan.path)  # its epoch and training time (a zoo entry: none)
    train_time, source, pretrain_time = run_training_time(plan.path, ckpt)
    import pyautoattack
    per_sample = {k: v for k, v in arrays.items() if k not in ("index", "label")}
    result = dict(
        format=RESULT_FORMAT, defense=args.defense or tables.row_name(saved, plan.path),
        method=saved["method"], method_title=saved["method_title"], method_weight=saved["method_weight"],
        method_order=saved["method_order"], distance=saved.get("distance"), dataset=saved["dataset"], model=saved["model"], norm=plan.norm, eps=plan.eps,
        train_eps=saved["eps"], lam=saved.get("lam"), beta=saved.get("beta"),
        aux_data=saved.get("aux_data"), init_from=saved.get("init_from"), seed=saved["seed"],
        epochs=saved.get("epochs"), ema=saved.get("ema"),  # with --ema the weights are the average
        lr=saved.get("lr"), checkpoint=os.path.abspath(plan.path),
        checkpoint_kind=os.path.splitext(os.path.basename(plan.path))[0], epoch=ckpt.get("epoch"),
        train_time_s=train_time if math.isfinite(train_time) else None, train_time_source=source, pretrain_time_s=pretrain_time,
        split=args.split, **accuracies(per_sample, args.smoke_aa),
        max_perturbation=max(meta["max_perturbation"] for _, meta in chunks),
        aa_warnings=warnings, aa_seed=args.seed, **plan.identity, train_identity=plan.train_identity,
        per_sample=os.path.basename(plan.stem + ".npz"),
        eval_time_s=sum(meta["time_s"] for _, meta in chunks),  # compute time, all processes
        device=device.type, torch=torch.__version__,
        pyautoattack=pyautoattack.__version__,
        **({"rehearsal": REHEARSAL_NOTE} if saved.get("rehearsal") else {}))
    write_npz(plan.stem + ".npz", arrays)
    logs = []
    for k in range(n_chunks):
        log = os.path.join(chunk_dir, f"chunk-{k:05d}.log")
        if os.path.isfile(log):
            with open(log) as f:
                logs.append(f"# chunk {k}\n" + f.read())
    write_atomic(plan.stem + ".log", lambda f: f.write("".join(logs)))
    write_json(plan.out, result)  # last: a JSON exists only with its .npz beside it
    shutil.rmtree(chunk_dir, ignore_errors=True)
    steps = " | ".join(f"{a} {result['robust_after'][a]:.4f}" for a in STANDARD_ATTACKS)
    extra = "".join(f" | {k} {result[k]:.4f}" for k in ("pgd20", "cw") if k in result)
    print(("REHEARSAL (generated data, not a result): " if saved.get("rehearsal") else "")
          + f"natural {result['natural']:.4f} | {steps} | AutoAttack {result['autoattack']:.4f} | "
          f"Avg. Acc. {result['avg_acc']:.4f}{extra} | {result['eval_time_s']:.0f}s -> {plan.out}",
          flush=True)
    return result


def time_autoattack(net, x, y, eps, args, device, norm="linf"):
    """Images per second of the standard AutoAttack (or --smoke-aa) on x, and the projected time
    for the 10,000 test images. The time grows with the share of images still robust after each
    attack, so a model's own first images are the honest sample."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    per_sample, _ = evaluate_autoattack(net, x, y, eps, args.batch_size, chunk_seed(args.seed, 0),
                                        device, smoke=args.smoke_aa, norm=norm)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rate = len(y) / seconds
    return dict(format=TIMING_FORMAT, images=len(y), seconds=seconds, images_per_s=rate,
                projected_test_set_s=TEST_SET_SIZE / rate, norm=norm, eps=eps, batch_size=args.batch_size,
                natural=per_sample["natural"].mean().item(), autoattack=per_sample["square"].mean().item(),
                aa_version="smoke" if args.smoke_aa else "standard", device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                torch=torch.__version__)


def report_timing(timing, out, what):
    print(f"{what}: AutoAttack ({timing['aa_version']}) on {timing['images']} images in "
          f"{timing['seconds']:.1f}s = {timing['images_per_s']:.2f} images/s on {timing['device']}; "
          f"{TEST_SET_SIZE:,} test images ~ {fmt_hours(timing['projected_test_set_s'])} "
          f"(natural {timing['natural']:.3f}, AutoAttack {timing['autoattack']:.3f})"
          + (f" -> {out}" if out else ""), flush=True)
    if out:
        write_json(out, timing)


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    if args.summarize is not None:
        if args.table_out:
            check_output(args.table_out, "--table-out")
        found, left_out = tables.find_results(args.summarize)
        table = tables.summarize(found, args.title, tables.quoted_rows(args.quoted), left_out)
        print(table, end="")
        if args.table_out:
            write_atomic(args.table_out, lambda f: f.write(table))
        if left_out:
            sys.exit(LEFT_OUT)
        return table
    if args.plot_sweep is not None:
        check_output(args.plot_out, "--plot-out")
        found, left_out = tables.find_results(args.plot_sweep)
        tables.plot_sweep(found, args.plot_out, args.plot_kind)
        print(f"{len(found)} results -> {args.plot_out}")
        if left_out:
            print(tables.left_out_note(left_out))
            sys.exit(LEFT_OUT)
        return args.plot_out

    # Everything the user gave is checked before any attack runs.
    if args.out:
        check_output(args.out, "--out")
    plans = [Plan(path, args, args.out) for path in args.checkpoints]
    outs = [p.out if args.time_images is None or args.out else p.stem + "-timing.json" for p in plans]
    for plan, out in zip(plans, outs):
        check_output(out, plan.what)
    if len(set(outs)) != len(outs):
        raise UserError("two checkpoints would write the same result file: evaluate them separately with --out")
    if args.time_images is not None and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError("--time-images runs in one process, not under torchrun")
    locks = lock_folders(plans, outs)
    try:
        if args.time_images is None:
            for plan in plans:
                refuse_other_settings(plan, args)
        return run_plans(plans, outs, args)
    finally:
        for lock in locks:
            lock.close()


def run_plans(plans, outs, args):
    """Evaluate (or time) the checked plans, or time --time-model; returns the results."""
    # a process waits at the merge barrier for the slowest: allow AutoAttack chunks of hours
    device = setup_device(args, timeout=datetime.timedelta(hours=24))
    # Evaluation is float32: no TF32 in matmuls or convolutions on Ampere and later GPUs (whether
    # TF32 would change AutoAttack's verdicts has not been measured).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        if args.time_model is not None:
            torch.manual_seed(args.seed)
            model = get_model(args.time_model, *dataset_shape(args.time_dataset)).to(device).eval()
            x = torch.rand(args.time_images, *DATASETS[args.time_dataset].shape)
            with torch.no_grad():  # labels = the model's own predictions: every image is attacked
                y = torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(args.batch_size)])
            d, norm = DATASETS[args.time_dataset], args.norm or "linf"
            eps = args.eps if args.eps is not None else (
                d.eval_eps or d.preset["eps"] if norm == "linf" else d.l2_eval_eps or d.l2_preset.get("eps"))
            if eps is None:
                raise UserError(f"--norm l2 has no radius for {args.time_dataset}: give --eps")
            timing = time_autoattack(model, x, y, eps, args, device, norm)
            report_timing(timing, args.out, f"random {args.time_model} on {args.time_dataset}-shaped images")
            return [timing]
        if args.time_images is not None:
            timings = []
            for plan, out in zip(plans, outs):
                net = load_network(plan, device)
                x, y = first_images(split_dataset(plan.saved, args.split, args.data_dir),
                                    min(args.time_images, plan.n))
                timings.append(time_autoattack(net, x, y, plan.eps, args, device, plan.norm))
                report_timing(timings[-1], out, plan.path)
            return timings
        return [evaluate_checkpoint(plan, args, device) for plan in plans]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
