"""AutoAttack (Croce & Hein 2020) as every evaluation here runs it: the standard version (APGD-CE,
APGD-T, FAB-T, Square) through the `pyautoattack` package, one attack at a time so that the robust
accuracy after each attack is kept, with the checks that x' is in the eps-ball and really fools the
model, and optionally PGD-20 and CW-20. eval_autoattack.py evaluates checkpoints with it; benchmark.py
times it (time_autoattack).
"""
import logging
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from fire_repro.attacks import attack_pgd_ce, cw_margin, eps_problem, perturbation_norm
from fire_repro.common import UserError
from fire_repro.results import NOT_RECORDED, NOT_RUN, PASSED, STANDARD_ATTACKS

# AutoAttack's checks (pyautoattack's checks.py), named by their function without "check_": what
# each looks for (docs/evaluation.md#autoattacks-checks). Each warns through the logger AutoAttack
# gives it; CollectWarnings attributes a warning to its check by the logging record's funcName.
AA_CHECKS = {
    "randomized": "the outputs for the same images change between calls (a randomised defence)",
    "range_output": "the outputs are a probability distribution, not logits",
    "dynamic": "the forward pass takes gradients (a defence that changes at inference)",
    "n_classes": "too few classes for the target classes of APGD-T and FAB-T",
    "zero_gradients": "images whose input gradient is exactly zero (in APGD-T)",
    "square_sr": "Square (black-box) broke images that the white-box attacks did not (> 0.2% of them)",
    # and this wrapper's own: the final x' of each batch, evaluated again, is misclassified as
    # AutoAttack reported; "other" holds any other warning AutoAttack logs
    "reevaluated": "the final x' evaluated again does not give AutoAttack's robust count",
}
BEFORE_ATTACKS = ("randomized", "range_output", "dynamic", "n_classes")  # run by every attack's call

TIMING_FORMAT = "fire-repro-autoattack-timing/1"
TEST_SET_SIZE = 10_000  # AutoAttack's papers evaluate the first 10,000 test images


def threat_model(saved, norm=None, eps=None):
    """(norm, eps) of an evaluation of a checkpoint trained with `saved` arguments: `norm` (default
    the training norm) and `eps` (default the training radius). Raises UserError for another norm
    than training's without a radius, or a radius outside the norm's range (attacks.EPS_RANGES)."""
    train_norm = saved.get("norm", "linf")  # a checkpoint without a norm was trained in Linf
    norm = norm or train_norm
    if norm != train_norm and eps is None:
        raise UserError(f"trained in {train_norm}, evaluated in {norm}: give its radius with --eps")
    eps = saved["eps"] if eps is None else eps
    problem = eps_problem(eps, norm)
    if problem:
        raise UserError(f"--eps: {problem}")
    return norm, eps


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


class CollectWarnings(logging.Handler):
    """Keeps AutoAttack's warnings for the JSON: all of them (`messages`) and, per check of
    AA_CHECKS, those its function logged (`checks`: name -> distinct messages), told apart by the
    logging record's funcName (check_<name> in pyautoattack's checks module), not by their text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages, self.checks = [], {}

    def emit(self, record):
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)
        theirs = record.module == "checks" and record.funcName.startswith("check_")
        name = record.funcName[len("check_"):] if theirs else getattr(record, "check", "other")
        found = self.checks.setdefault(name, [])
        if message not in found:
            found.append(message)


def square_check(natural, robust_after):
    """AutoAttack's Square check (pyautoattack's check_square_sr, its threshold) on the accuracies
    of a whole evaluation: [] if it passed, else its warning. AutoAttack runs it only when one call
    runs several attacks; evaluate_autoattack runs them one call each, so it is run here."""
    from pyautoattack import checks
    logger, collect = logging.Logger("square_sr"), CollectWarnings()
    logger.addHandler(collect)
    checks.check_square_sr({"clean": natural, **robust_after}, logger=logger)
    return collect.checks.get("square_sr", [])


def check_outcomes(raw):
    """The JSON's `aa_checks` from {check: [its distinct warnings]} of the checks that ran:
    "passed", the warning (the first, and how many more aa_warnings holds), or "not run"."""
    def text(messages):
        more = f" (and {len(messages) - 1} more warnings of this check in aa_warnings)" if len(messages) > 1 else ""
        return messages[0] + more if messages else PASSED
    return {name: text(raw[name]) if name in raw else NOT_RUN for name in [*AA_CHECKS, *sorted(set(raw) - set(AA_CHECKS))]}


def merge_checks(raws, natural, robust_after):
    """The JSON's `aa_checks` of an evaluation in parts (chunks): each part's {check: [warnings]}
    (None: a part written without them) joined, the Square check on the whole evaluation's
    accuracies; every check "not recorded" when a part lacks them."""
    if any(raw is None for raw in raws):
        return dict.fromkeys(AA_CHECKS, NOT_RECORDED)
    joined = {}
    for raw in raws:
        for name, messages in raw.items():
            found = joined.setdefault(name, [])
            found += [m for m in messages if m not in found]
    joined["square_sr"] = square_check(natural, robust_after)
    return check_outcomes(joined)


def reduce_to_smoke(adversary):
    """--smoke-aa: the same attacks, order and targets; a tenth of the iterations (APGD, FAB), 1/50
    of Square's queries."""
    adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = 10
    adversary.square.n_queries = 100


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
    {"max_perturbation", "aa_warnings", "aa_checks"}): aa_checks maps each check of AA_CHECKS that
    ran to its distinct warnings ([] = passed); check_outcomes makes the JSON's field of it.
    """
    if any(m.training for m in model.modules()):
        raise UserError("the model is in train mode: call model.eval() before evaluating it")
    from pyautoattack import AutoAttack, checks
    # check_dynamic counts calls of grad/backward into a module-level dict that it never resets:
    # zeroed here, so that one evaluation's dynamic model does not flag every later one.
    checks.funcs.update(dict.fromkeys(checks.funcs, 0))
    ran = set()  # the checks that ran: those before each attack's call, zero gradients in APGD-T
    logger = logging.getLogger("auto-attack")  # AutoAttack's progress (DEBUG) and warnings
    collect, handlers = CollectWarnings(), []
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
        if smoke:
            reduce_to_smoke(adversary)
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
            ran.update((*BEFORE_ATTACKS, "reevaluated") if correct.any() else ())
            ran.update(("zero_gradients",) if after["apgd-ce"].any() else ())
            per_sample["natural"].append(correct.cpu())
            for attack in STANDARD_ATTACKS:
                per_sample[attack].append(after[attack].cpu())
            max_pert = max(max_pert, perturbation_norm(x_adv - xb, norm).max().item())
            if x_adv.min() < 0 or x_adv.max() > 1 or max_pert > eps + 1e-5:
                raise RuntimeError(f"AutoAttack left the {norm} eps-ball or [0, 1] (max ||x' - x|| = {max_pert})")
            with torch.no_grad():  # sanity check: the final x' really fools the model
                again = (model(x_adv).argmax(1) == yb).sum().item()
            if again != after["square"].sum().item():
                logger.warning(f"re-evaluating x' gave {again} robust points in a batch, "
                               f"AutoAttack {after['square'].sum().item()}", extra={"check": "reevaluated"})
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
    raw = {name: collect.checks.get(name, []) for name in sorted(ran | set(collect.checks))}
    if len(y):
        acc = accuracies(per_sample, smoke)
        raw["square_sr"] = square_check(acc["natural"], acc["robust_after"])
    return per_sample, dict(max_perturbation=max_pert, aa_warnings=collect.messages, aa_checks=raw)


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


def time_autoattack(model, x, y, eps, device, norm="linf", batch_size=500, seed=0, smoke=False):
    """Images per second of the standard AutoAttack (smoke: the reduced one) on x, and the projected
    time for the 10,000 test images, as a timing record. The time grows with the share of images
    still robust after each attack, so a model's own first images are the honest sample."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    per_sample, _ = evaluate_autoattack(model, x, y, eps, batch_size, chunk_seed(seed, 0), device, smoke=smoke,
                                        norm=norm)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rate = len(y) / seconds
    return dict(format=TIMING_FORMAT, images=len(y), seconds=seconds, images_per_s=rate,
                projected_test_set_s=TEST_SET_SIZE / rate, norm=norm, eps=eps, batch_size=batch_size,
                natural=per_sample["natural"].mean().item(), autoattack=per_sample["square"].mean().item(),
                aa_version="smoke" if smoke else "standard", device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                torch=torch.__version__)
