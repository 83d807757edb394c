"""AutoAttack evaluation of a checkpoint, and the paper's tables and figures from the results.

Evaluates a checkpoint written by train_fire.py or train_trades.py the way Section 5.1 does:
natural accuracy and the standard AutoAttack (Croce & Hein 2020; Linf, APGD-CE, APGD-T, FAB-T,
Square) at the training eps, in float32 and eval mode, with the robust accuracy after each attack
and Avg. Acc. = (Natural + AutoAttack) / 2. The model is rebuilt from the arguments stored in the
checkpoint; the result goes to a JSON file next to it that holds everything a table row needs.

Commands:
    python eval_autoattack.py runs/fire-digits-s0/best.pt        # -> runs/fire-digits-s0/autoattack.json
    python eval_autoattack.py runs/c10/best.pt --eps 8/255 --pgd20 --cw     # + PGD-20 and CW-20
    python eval_autoattack.py runs/c10/best.pt --n-examples 1000 --batch-size 500   # quicker check
    python eval_autoattack.py runs/madry/last.pt --defense "Madry et al."   # -> autoattack-last.json
    python eval_autoattack.py --summarize runs/ --table-out table.md   # mean +- std over seeds
    python eval_autoattack.py --plot-sweep runs/sweep --plot-kind lambda --plot-out fig7.png
    python eval_autoattack.py --plot-sweep runs/sweep --plot-kind plane --plot-out fig8.png

All visible GPUs are used through DataParallel; on the CPU the full standard AutoAttack takes
about a minute for 40 digits images with SmallCNN (measured on 2 cores).
"""
import argparse
import json
import logging
import math
import os
import statistics
import time
from fractions import Fraction

import torch
from tqdm import tqdm

from harness import (UserError, ArgumentParser, attack_pgd_ce, cli, get_datasets, load_checkpoint,
                     load_model_state, model_from_args, upcast_half)

RESULT_FORMAT = "fire-repro-autoattack/1"
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack's standard order
DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "digits"}
METHOD_NAMES = {"fire": "FIRE", "fire-sa": "FIRE + Self-Adaptive", "hellinger": "Hellinger",
                "trades": "TRADES", "trades-sa": "Self Adaptive", "madry": "Madry et al.",
                "mart": "MART"}


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
                   help="best.pt / last.pt files of train_fire.py or train_trades.py")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eps", type=parse_eps, default=None,
                   help="Linf radius in [0, 1] pixel units, e.g. 0.3 or 8/255 (default: the "
                        "checkpoint's training eps)")
    g.add_argument("--n-examples", type=int, default=None,
                   help="first N images of the split (default: all; AutoAttack's papers use the "
                        "first 10,000 of the test set)")
    g.add_argument("--batch-size", type=int, default=500, help="images per AutoAttack batch")
    g.add_argument("--seed", type=int, default=0, help="seed of AutoAttack and of the PGD starts")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA (all visible GPUs, DataParallel) when available, else CPU")
    g.add_argument("--split", type=str, default="test", choices=["test", "val"],
                   help="test split, or the training script's held-out validation split")
    g.add_argument("--data-dir", type=str, default=None,
                   help="where the data live (default: the checkpoint's --data-dir)")
    g.add_argument("--pgd20", action="store_true",
                   help="also PGD-20 on the cross-entropy (step 2.5 eps / 20, uniform start)")
    g.add_argument("--cw", action="store_true",
                   help="also CW-Linf: PGD-20 on the Carlini-Wagner margin loss (older papers' table)")
    g.add_argument("--smoke-aa", action="store_true",
                   help="for smoke tests only: the standard attacks, order and target classes with "
                        "10 instead of 100 iterations (APGD, FAB) and 100 instead of 5000 Square "
                        "queries; results are marked and NOT comparable with the paper's")
    g.add_argument("--defense", type=str, default=None,
                   help="name of the table row (default: from the method, lam/beta, extra data "
                        "and checkpoint, e.g. 'FIRE (lam=12)')")
    g.add_argument("--out", type=str, default=None,
                   help="result JSON (default: <run>/autoattack.json for best.pt, "
                        "<run>/autoattack-<name>.json for <name>.pt)")
    g = p.add_argument_group("tables and figures from result JSONs")
    g.add_argument("--summarize", type=str, nargs="+", default=None, metavar="DIR",
                   help="collect result JSONs under these folders (recursively) and print the "
                        "paper's table: mean +- std over seeds")
    g.add_argument("--table-out", type=str, default=None, help="also write the Markdown table here")
    g.add_argument("--title", type=str, default=None, help="heading written above the table")
    g.add_argument("--plot-sweep", type=str, nargs="+", default=None, metavar="DIR",
                   help="draw a lambda/beta sweep from the result JSONs under these folders")
    g.add_argument("--plot-kind", type=str, default="lambda", choices=["lambda", "plane"],
                   help="lambda: natural and AutoAttack accuracy against lambda (Fig. 7); "
                        "plane: AutoAttack against natural accuracy, one curve per method (Fig. 8)")
    g.add_argument("--plot-out", type=str, default="sweep.png", help="PNG written by --plot-sweep")
    args = p.parse_args(argv)

    modes = sum([bool(args.checkpoints), args.summarize is not None, args.plot_sweep is not None])
    if modes != 1:
        p.error("give checkpoints to evaluate, or --summarize DIR..., or --plot-sweep DIR...")
    if args.out and len(args.checkpoints) > 1:
        p.error("--out needs exactly one checkpoint")
    if args.n_examples is not None and args.n_examples < 1:
        p.error(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


# ----------------------------------------------------------------------------------------------
# The CW-Linf objective (PGD on it, for comparison with older papers)


def cw_margin(logits, y):
    """Carlini-Wagner margin, max_{j != y} z_j - z_y, per sample: > 0 iff misclassified."""
    logits = upcast_half(logits)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return z_other - z_y


# ----------------------------------------------------------------------------------------------
# Evaluation


def autoattack_batch(adversary, model, x, y):
    """Standard AutoAttack on one batch; returns (clean-correct mask, robust mask after each
    attack, x_adv).

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
        idx = robust.nonzero().squeeze(1)
        if len(idx) > 0:
            adversary.attacks_to_run = [attack]
            adv, _ = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[idx]
            x_adv[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
        after[attack] = robust.clone()
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


def evaluate_autoattack(model, x, y, eps, batch_size=500, seed=0, device="cpu", pgd20=False,
                        cw=False, smoke=False, log_path=None, progress=True):
    """Natural accuracy, the standard AutoAttack (robust accuracy after each attack) and
    optionally PGD-20 and CW-20 on images x in [0, 1] (on the CPU) with labels y.
    smoke=True cuts AutoAttack's iterations and queries (see --smoke-aa): only for smoke tests.

    The model must already be in eval mode (dropout off, BatchNorm running statistics): a model
    in train mode raises UserError rather than silently giving wrong numbers. Returns a dict of
    accuracies in [0, 1].
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
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device,
                               seed=seed)
        if smoke:  # same attacks, order and targets; a tenth of the iterations, 1/50 of the queries
            adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = 10
            adversary.square.n_queries = 100
        counts = dict.fromkeys(["natural", *STANDARD_ATTACKS, "pgd20", "cw"], 0)
        max_pert, n = 0.0, 0
        starts = range(0, len(x), batch_size)
        bar = tqdm(starts, desc="AutoAttack", unit="batch", leave=False,
                   disable=None if progress else True)  # None: off when not a terminal
        for start in bar:
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            correct, after, x_adv = autoattack_batch(adversary, model, xb, yb)
            counts["natural"] += correct.sum().item()
            for attack in STANDARD_ATTACKS:
                counts[attack] += after[attack].sum().item()
            max_pert = max(max_pert, (x_adv - xb).abs().max().item())
            if x_adv.min() < 0 or x_adv.max() > 1 or max_pert > eps + 1e-5:
                raise RuntimeError(f"AutoAttack left the eps-ball or [0, 1] (max |x' - x| = {max_pert})")
            with torch.no_grad():  # sanity check: the final x' really fools the model
                again = (model(x_adv).argmax(1) == yb).sum().item()
            if again != after["square"].sum().item():
                collect.messages.append(f"re-evaluating x' gave {again} robust points in a batch, "
                                        f"AutoAttack {after['square'].sum().item()}")
            if pgd20 or cw:
                torch.manual_seed(seed + start)  # each batch's random start, independent of order
            if pgd20:
                x_pgd = attack_pgd_ce(model, xb, yb, eps, 2.5 * eps / 20, 20)
                with torch.no_grad():
                    counts["pgd20"] += (model(x_pgd).argmax(1) == yb).sum().item()
            if cw:
                x_cw = attack_pgd_ce(model, xb, yb, eps, 2.5 * eps / 20, 20, objective=cw_margin)
                with torch.no_grad():
                    counts["cw"] += (model(x_cw).argmax(1) == yb).sum().item()
            n += len(yb)
            bar.set_postfix(natural=f"{counts['natural'] / n:.3f}", aa=f"{counts['square'] / n:.3f}")
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old[0])
        logger.propagate = old[1]
    result = dict(natural=counts["natural"] / n,
                  robust_after={a: counts[a] / n for a in STANDARD_ATTACKS},
                  autoattack=counts["square"] / n, n_examples=n, max_perturbation=max_pert,
                  aa_version="smoke (10 iterations, 100 queries)" if smoke else "standard",
                  aa_warnings=collect.messages)
    result["avg_acc"] = (result["natural"] + result["autoattack"]) / 2
    if pgd20:
        result["pgd20"] = counts["pgd20"] / n
    if cw:
        result["cw"] = counts["cw"] / n
    return result


def load_split(saved, split, n_examples, data_dir=None):
    """The first n_examples images and labels of a split, as CPU tensors (x in [0, 1])."""
    spec = argparse.Namespace(dataset=saved["dataset"], val_size=saved["val_size"],
                              data_dir=data_dir or saved.get("data_dir", "data"))
    _, val_set, test_set = get_datasets(spec)
    dataset = test_set if split == "test" else val_set
    n = len(dataset) if n_examples is None else min(n_examples, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=500)
    xs, ys = zip(*[(x, y) for x, y, _ in loader])
    return torch.cat(xs), torch.cat(ys)


def default_defense(saved, checkpoint):
    """Row name: method, its weight, extra data and a non-best checkpoint, e.g. 'FIRE (lam=12)'.

    Madry's adversarial training gives two rows of Table 2: its last epoch ('Madry et al.') and
    its checkpoint chosen on validation robust accuracy, i.e. early stopping ('Overfitting',
    Rice et al. 2020).
    """
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    if saved.get("init_from"):  # fine-tuned from another run: Hendrycks et al. (2019)'s row
        return "Pre-training" + ("" if stem == "best" else f" [{stem}]")
    if saved.get("method") == "madry" and stem in ("best", "last"):
        return "Madry et al." if stem == "last" else "Overfitting (Madry, early stopping)"
    name = METHOD_NAMES.get(saved.get("method"), str(saved.get("method")))
    if saved.get("method") == "trades" and saved.get("aux_data"):
        name = "RST-adv"  # Carmon et al. 2019: TRADES on the extra pseudo-labelled data
    weight = {"fire": "lam", "fire-sa": "lam", "hellinger": "lam", "trades": "beta",
              "trades-sa": "beta", "mart": "beta"}
    key = weight.get(saved.get("method"))
    if key and saved.get(key) is not None:
        name += f" ({key}={saved[key]:g})"
    if saved.get("aux_data"):
        name += " + extra data"
    if stem != "best":
        name += f" [{stem}]"
    return name


def training_time(checkpoint, ckpt):
    """Wall-clock training time of the whole run (best.pt only knows the time up to its epoch):
    summary.json of the run folder, else its last.pt, else the checkpoint's own."""
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    summary = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary):
        try:
            with open(summary) as f:
                return float(json.load(f)["train_time_s"]), "summary.json"
        except (ValueError, KeyError, TypeError):
            pass
    last = os.path.join(run_dir, "last.pt")
    if os.path.isfile(last) and os.path.abspath(last) != os.path.abspath(checkpoint):
        try:
            return float(load_checkpoint(last)["train_time_s"]), "last.pt"
        except (UserError, KeyError, TypeError):
            pass
    return float(ckpt.get("train_time_s", float("nan"))), "checkpoint"


def default_out(checkpoint):
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    name = "autoattack.json" if stem == "best" else f"autoattack-{stem}.json"
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)


def evaluate_checkpoint(path, args, device):
    """Evaluate one checkpoint and write its result JSON; returns the result dict."""
    ckpt = load_checkpoint(path)
    saved = ckpt.get("args")
    try:
        model = model_from_args(saved)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path!r} does not describe its model ({type(e).__name__}: {e})") from None
    load_model_state(model, ckpt, path)
    model = model.to(device).float().eval()  # eval mode: no dropout, BatchNorm running statistics
    net = torch.nn.DataParallel(model) if device.type == "cuda" and torch.cuda.device_count() > 1 else model
    eps = saved["eps"] if args.eps is None else args.eps
    x, y = load_split(saved, args.split, args.n_examples, args.data_dir)
    out = args.out or default_out(path)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    print(f"{path}: {saved['method']} {saved['dataset']} {saved['model']} seed {saved['seed']}, "
          f"AutoAttack Linf eps {eps:g} on {len(y)} {args.split} images", flush=True)
    t0 = time.time()
    numbers = evaluate_autoattack(net, x, y, eps, args.batch_size, args.seed, device, args.pgd20,
                                  args.cw, args.smoke_aa, log_path=os.path.splitext(out)[0] + ".log")
    train_time, source = training_time(path, ckpt)
    import pyautoattack
    result = dict(
        format=RESULT_FORMAT, defense=args.defense or default_defense(saved, path),
        method=saved["method"], dataset=saved["dataset"], model=saved["model"], eps=eps,
        train_eps=saved["eps"], lam=saved.get("lam"), beta=saved.get("beta"),
        aux_data=saved.get("aux_data"), seed=saved["seed"], epochs=saved.get("epochs"),
        lr=saved.get("lr"), checkpoint=os.path.abspath(path),
        checkpoint_kind=os.path.splitext(os.path.basename(path))[0], epoch=ckpt.get("epoch"),
        train_time_s=train_time, train_time_source=source, split=args.split, **numbers,
        aa_seed=args.seed, eval_time_s=time.time() - t0,
        device=str(device), torch=torch.__version__, pyautoattack=pyautoattack.__version__)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)  # a finished result or none: run_all.sh skips runs whose JSON exists
    steps = " | ".join(f"{a} {result['robust_after'][a]:.4f}" for a in STANDARD_ATTACKS)
    extra = "".join(f" | {k} {result[k]:.4f}" for k in ("pgd20", "cw") if k in result)
    print(f"natural {result['natural']:.4f} | {steps} | AutoAttack {result['autoattack']:.4f} | "
          f"Avg. Acc. {result['avg_acc']:.4f}{extra} | {result['eval_time_s']:.0f}s -> {out}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# Tables and figures


def find_results(dirs):
    """Result JSONs (by their `format`) under the given folders or files, each file once."""
    paths = []
    for d in dirs:
        if os.path.isfile(d):
            paths.append(d)
        elif os.path.isdir(d):
            for root, subdirs, files in os.walk(d):
                subdirs.sort()
                paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".json")]
        else:
            raise UserError(f"{d!r} does not exist")
    results, seen = [], set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("format") == RESULT_FORMAT:
            record["_path"] = path
            results.append(record)
    if not results:
        raise UserError(f"no AutoAttack result JSONs under {' '.join(dirs)}")
    return results


def group_key(r):
    """Rows of a table: the same defense (method, lam/beta, extra data, checkpoint), data set,
    eps and architecture; seeds are averaged within a row."""
    return (r["defense"], r["method"], r.get("lam"), r.get("beta"), bool(r.get("aux_data")),
            r.get("checkpoint_kind"), r["dataset"], round(r["eps"], 8), r["model"],
            r.get("aa_version"))


def mean_std(values):
    """(mean, sample standard deviation with ddof=1, or None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt_pm(values, scale=100):
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_eps(eps):
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0 and eps < 0.1:
        return f"{round(k)}/255"
    return f"{eps:g}"


def fmt_hours(seconds):
    """The paper's RunTime format: 11h00 (hours and minutes); seconds below one minute."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}"


def fmt_model(name):
    return {"smallcnn": "CNN", "resnet18": "RN-18"}.get(name, name.upper())


METHOD_ORDER = {"madry": 0, "mart": 1, "trades-sa": 1, "trades": 2, "hellinger": 3, "fire-sa": 4, "fire": 6}
DATASET_ORDER = {"mnist": 0, "cifar10": 1, "cifar100": 2, "digits": 3}


def row_order(r):
    """The paper's row order: without extra data first; by data set; Madry, Self Adaptive (or
    MART), TRADES, Hellinger, FIRE + Self-Adaptive, Overfitting (Madry's best-on-validation
    checkpoint), FIRE."""
    method = METHOD_ORDER.get(r["method"], 5)
    if r["method"] == "madry" and r.get("checkpoint_kind") == "best":
        method = 5
    return (bool(r.get("aux_data")), DATASET_ORDER.get(r["dataset"], 9), r["eps"], r["model"],
            method, r.get("lam") or 0, r.get("beta") or 0, r["defense"])


def summarize(results, title=None):
    """The paper's table (Tables 1-3) as Markdown: one row per defense, mean +- std over seeds."""
    groups = {}
    for r in sorted(results, key=row_order):
        groups.setdefault(group_key(r), []).append(r)
    extra = [k for k in ("pgd20", "cw") if any(k in r for r in results)]
    header = ["Defense", "Dataset", "ε", "Structure", "Natural", "AutoAttack", "Avg. Acc.",
              *[{"pgd20": "PGD-20", "cw": "CW-20"}[k] for k in extra], "RunTime", "Seeds"]
    lines = [] if title is None else [f"### {title}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sections = len({bool(r.get("aux_data")) for r in results}) > 1
    current = None
    for rows in groups.values():
        r = rows[0]
        if sections and bool(r.get("aux_data")) != current:
            current = bool(r.get("aux_data"))
            label = "**With additional data**" if current else "**Without additional data**"
            lines.append("| " + label + " |" + " |" * (len(header) - 1))
        seeds = sorted({x["seed"] for x in rows})
        if len(seeds) != len(rows):  # the same seed twice (e.g. copied folders): say so
            seeds_text = f"{len(rows)} results, seeds {','.join(map(str, seeds))}"
        else:
            seeds_text = f"{len(rows)} ({','.join(map(str, seeds))})"
        cells = [r["defense"], DATASET_NAMES.get(r["dataset"], r["dataset"]), fmt_eps(r["eps"]),
                 fmt_model(r["model"]), fmt_pm([x["natural"] for x in rows]),
                 fmt_pm([x["autoattack"] for x in rows]), fmt_pm([x["avg_acc"] for x in rows])]
        for k in extra:
            values = [x[k] for x in rows if k in x]
            cells.append(fmt_pm(values) if values else "-")
        times = [x.get("train_time_s") for x in rows]
        times = [t for t in times if t is not None and math.isfinite(t)]
        cells += [fmt_hours(statistics.fmean(times)) if times else "-", seeds_text]
        lines.append("| " + " | ".join(cells) + " |")
    n = {r["n_examples"] for r in results}
    smoke = any(r.get("aa_version") != "standard" for r in results)
    lines += ["", f"Accuracies in %, mean ± sample standard deviation (ddof = 1) over seeds (one "
                  f"seed: the value alone); AutoAttack = "
                  f"{'reduced smoke version' if smoke else 'standard version'}, Linf, on "
                  f"{'/'.join(map(str, sorted(n)))} {'/'.join(sorted({r['split'] for r in results}))} "
                  f"images; Avg. Acc. = (Natural + AutoAttack) / 2; RunTime = mean wall-clock "
                  f"training time."]
    if smoke:
        lines += ["", "**Smoke run: AutoAttack with reduced iterations (--smoke-aa) on a toy "
                      "training budget; these numbers only show that the pipeline works.**"]
    return "\n".join(lines) + "\n"


def sweep_weight(r):
    return r.get("lam") if r["method"] in ("fire", "fire-sa", "hellinger") else r.get("beta")


def plot_sweep(results, path, kind="lambda"):
    """Fig. 7 (kind='lambda': natural and AutoAttack accuracy against the weight) or Fig. 8
    (kind='plane': AutoAttack against natural accuracy, one curve per method); mean over seeds."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg
    curves = {}
    for r in results:
        label = f"{METHOD_NAMES.get(r['method'], r['method'])}" + (" + extra data" if r.get("aux_data") else "")
        points = curves.setdefault((label, r["dataset"], r["model"]), {})
        points.setdefault(sweep_weight(r), []).append(r)
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for n_curve, ((label, dataset, model), points) in enumerate(sorted(curves.items())):
        weights = sorted(points)
        nat = [100 * statistics.fmean(x["natural"] for x in points[w]) for w in weights]
        adv = [100 * statistics.fmean(x["autoattack"] for x in points[w]) for w in weights]
        name = label if len(curves) == 1 else f"{label} ({DATASET_NAMES.get(dataset, dataset)}, {fmt_model(model)})"
        color = f"C{n_curve}"
        if kind == "lambda":
            ax.plot(weights, nat, "o-", color=color, label=f"{name}: natural")
            ax.plot(weights, adv, "s--", color=color, label=f"{name}: AutoAttack")
        else:
            ax.plot(nat, adv, "o-", color=color, label=name)
            for w, a, b in zip(weights, nat, adv):
                ax.annotate(f"{w:g}", (a, b), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if kind == "lambda":
        ax.set_xlabel("λ (FIRE, Hellinger) / β (TRADES, MART)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Natural and AutoAttack accuracy against λ")
    else:
        ax.set_xlabel("natural accuracy (%)")
        ax.set_ylabel("AutoAttack accuracy (%)")
        ax.set_title("Natural / adversarial accuracy plane (labels: λ or β)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    if args.summarize is not None:
        table = summarize(find_results(args.summarize), args.title)
        print(table, end="")
        if args.table_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.table_out)), exist_ok=True)
            with open(args.table_out, "w") as f:
                f.write(table)
        return table
    if args.plot_sweep is not None:
        results = find_results(args.plot_sweep)
        plot_sweep(results, args.plot_out, args.plot_kind)
        print(f"{len(results)} results -> {args.plot_out}")
        return args.plot_out

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    # Evaluation is float32: no TF32 in matmuls or convolutions on Ampere and later GPUs.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return [evaluate_checkpoint(path, args, device) for path in args.checkpoints]


if __name__ == "__main__":
    cli(main)
