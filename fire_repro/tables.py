"""The paper's tables (and, through figures.py, its sweep figures) from finished AutoAttack results
(the JSON and per-image .npz that eval_autoattack.py writes beside each checkpoint).

    find_results(dirs)         the usable result JSONs under some folders (one warning line per unusable
                               one, which is left out) or named files (each must be usable)
    summarize(results, ...)    Tables 1-3 as Markdown: one row per defense and setting, mean +- std over
                               seeds, and each row's paired AutoAttack difference to the reference (FIRE)
    row_name, result_row_name  a row's name, from what a run or a result records

Commands (run_all.sh runs them for every block):
    python -m fire_repro.tables runs/ --table-out table.md        # mean +- std over seeds, paired differences
    python -m fire_repro.tables runs/ --quoted table2 --title "Table 2"   # + the rows the paper quotes
    python -m fire_repro.tables runs/sweep --plot-kind lambda --plot-out fig7.png   # Fig. 7 (figures.py)
    python -m fire_repro.tables runs/sweep --plot-kind plane --plot-out fig8.png    # Fig. 8
Both exit with 3 when they wrote their output but left out results found under a folder (damaged,
incomplete, their checkpoint changed); a file named on the command line must be a valid result (exit 2).
"""
import json
import math
import os
import statistics
import sys

import numpy as np
from scipy.stats import bootstrap

from fire_repro.common import ArgumentParser, UserError, check_output, cli, eps_text, fmt_hours, load_json, read_json, write_atomic
from fire_repro.config import DEFAULT_IDENTITY, never_starts, run_identity
from fire_repro.data import DATASETS, REHEARSAL_NOTE, rehearsal_title
from fire_repro.results import (CORRUPTIONS_FORMAT, RESULT_FORMAT, corruption_problem, corruptions_out,
                                other_result_format, read_per_image, result_problem, warnings_of)

N_BOOTSTRAP = 10_000
# Rows quoted without training them: those the paper quotes from other papers (Table 2), as printed
# there, and the published rows the `modern`, `l2` and `generated` blocks compare with (robustbench.github.io).
QUOTED = {"table2": [
    dict(defense="Atzmon et al.", dataset="mnist", model="cnn", eps=0.3, aux_data=False,
         natural=0.9935, autoattack=0.9085, avg_acc=0.9510),
    dict(defense="UAT", dataset="cifar10", model="wrn-106-8", eps=8 / 255, aux_data=True,
         natural=0.8646, autoattack=0.5603, avg_acc=0.7124),
    dict(defense="Overfitting", dataset="cifar100", model="resnet18", eps=8 / 255, aux_data=False,
         natural=0.5383, autoattack=0.1895, avg_acc=0.3639),
], "modern": [  # RobustBench's CIFAR-10 Linf leaderboard, WRN-34-10 without extra data, each at the
    # radius RobustBench evaluated it at (its model_info's eps; robustbench_io.zoo_radius): TRADES at 0.031
    dict(defense="TRADES (beta=6), Zhang et al. 2019", dataset="cifar10", model="wrn-34-10", eps=0.031,
         aux_data=False, natural=0.8492, autoattack=0.5308, avg_acc=0.6900, source="RobustBench"),
    dict(defense="TRADES + AWP, Wu et al. 2020", dataset="cifar10", model="wrn-34-10", eps=8 / 255,
         aux_data=False, natural=0.8536, autoattack=0.5617, avg_acc=0.70765, source="RobustBench"),
], "l2": [  # RobustBench's CIFAR-10 L2 0.5 leaderboard without extra data (robustbench 1.1.1's README):
    # its best entry without extra or generated data, the best WRN-34-10, and two baselines
    dict(defense="Gowal et al. 2020", dataset="cifar10", model="wrn-70-16", norm="l2", eps=0.5,
         aux_data=False, natural=0.9090, autoattack=0.7450, avg_acc=0.827, source="RobustBench"),
    dict(defense="TRADES + AWP, Wu et al. 2020", dataset="cifar10", model="wrn-34-10", norm="l2", eps=0.5,
         aux_data=False, natural=0.8851, autoattack=0.7366, avg_acc=0.81085, source="RobustBench"),
    dict(defense="Engstrom et al. 2019 (robustness library)", dataset="cifar10", model="resnet-50", norm="l2",
         eps=0.5, aux_data=False, natural=0.9083, autoattack=0.6924, avg_acc=0.80035, source="RobustBench"),
    dict(defense="Overfitting, Rice et al. 2020", dataset="cifar10", model="preactresnet-18", norm="l2", eps=0.5,
         aux_data=False, natural=0.8867, autoattack=0.6768, avg_acc=0.78175, source="RobustBench"),
], "generated": [  # TRADES on diffusion-generated images: Wang et al. (2023)'s 1M row (their paper and
    # DM-Improves-AT's README; not on RobustBench), and RobustBench's CIFAR-10 Linf 8/255 entries
    dict(defense="Wang et al. 2023, 1M generated images", dataset="cifar10", model="wrn-28-10", eps=8 / 255,
         aux_data=True, natural=0.9112, autoattack=0.6335, avg_acc=0.77235, source="Wang et al. 2023"),
    dict(defense="Wang et al. 2023, 20M generated images", dataset="cifar10", model="wrn-28-10", eps=8 / 255,
         aux_data=True, natural=0.9244, autoattack=0.6731, avg_acc=0.79875, source="RobustBench"),
    dict(defense="Wang et al. 2023, 50M generated images", dataset="cifar10", model="wrn-70-16", eps=8 / 255,
         aux_data=True, natural=0.9325, autoattack=0.7069, avg_acc=0.8197, source="RobustBench"),
    dict(defense="Bartoldson et al. 2024, 300M generated images", dataset="cifar10", model="wrn-94-16",
         eps=8 / 255, aux_data=True, natural=0.9368, autoattack=0.7371, avg_acc=0.83695, source="RobustBench"),
], "corruptions": [  # RobustBench's CIFAR-10 corruption board (CIFAR-10-C, 15 x 5, 10,000 images):
    # adversarially trained entries without extra data (RobustBench/robustbench, model_info/cifar10/corruptions/<name>.json)
    dict(defense="Addepalli2022Efficient_WRN_34_10 (Linf AT)", dataset="cifar10", model="wrn-34-10",
         aux_data=False, natural=0.8871, corruptions=0.8012, source="RobustBench"),
    dict(defense="Addepalli2021Towards_WRN34 (Linf AT)", dataset="cifar10", model="wrn-34-10",
         aux_data=False, natural=0.8532, corruptions=0.7678, source="RobustBench"),
    dict(defense="Gowal2020Uncovering_Linf_70_16 (Linf 8/255 AT)", dataset="cifar10", model="wrn-70-16",
         aux_data=False, natural=0.8529, corruptions=0.7637, source="RobustBench"),
    dict(defense="Gowal2020Uncovering_L2_70_16 (L2 AT)", dataset="cifar10", model="wrn-70-16",
         aux_data=False, natural=0.9090, corruptions=0.8490, source="RobustBench"),
]}
QUOTED_CORRUPTIONS = ("corruptions",)  # the quoted lists of corruption rows (--corruptions tables)



def rehearsal(results):
    """Whether any of the results comes from a --rehearsal run (generated data)."""
    return any((r.get("train_identity") or {}).get("rehearsal") for r in results)


def norm_of(r):
    """A result's threat model: its `norm`; linf (the paper's) for a result or quoted row without one."""
    return r.get("norm") or "linf"


def threat_text(r):
    """The ε cell: '8/255' for Linf (the paper's tables), 'L2 0.5' for L2."""
    return eps_text(r["eps"]) if norm_of(r) == "linf" else f"L2 {r['eps']:g}"


def dataset_title(name):
    return DATASETS[name].title if name in DATASETS else name


def row_name(saved, checkpoint="best"):
    """A row's name from a run's training arguments `saved` (or a result's recorded training
    identity and method fields) and its checkpoint ('best', 'last', ...): the method's title (its
    config.Method, args.method_*), its weight, extra data, today's recipe and a checkpoint other
    than best.pt, e.g. 'FIRE (lam=12)' or 'TRADES (beta=6) + AWP + EMA'. A method's own rows for
    some checkpoints (Method.checkpoint_rows: Madry's last epoch 'Madry et al.', its best checkpoint
    'Overfitting') and its title with extra data (Method.aux_title: TRADES' 'RST-adv') come from
    its Method; a run fine-tuned from another (--init-from) is Hendrycks et al.'s 'Pre-training'.
    """
    if saved.get("robustbench"):  # an entry of RobustBench's model zoo (robustbench_io.py)
        return f"{saved['robustbench']} (RobustBench)"
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    # today's recipe (docs/modern-recipe.md): its runs are other rows than the method's
    # (a part that starts after the last epoch was never done: no " + AWP" for it)
    late = {key for key, _ in never_starts(saved)}
    recipe = ((" + AWP" if saved.get("awp_gamma") and "awp_warmup" not in late else "")
              + (" + EMA" if saved.get("ema") and "ema_start" not in late else "")
              + (f" + clip {saved['clip_grad_norm']:g}" if saved.get("clip_grad_norm") else ""))
    if saved.get("init_from"):
        return "Pre-training" + recipe + ("" if stem == "best" else f" [{stem}]")
    rows = {row[0]: row[1] for row in saved.get("method_checkpoint_rows") or ()}
    if stem in rows:
        return rows[stem] + recipe
    name = (saved.get("aux_data") and saved.get("method_aux_title")) or saved["method_title"]
    key = saved.get("method_weight")
    if key and isinstance(saved.get(key), (int, float)):
        name += f" ({key}={saved[key]:g})"
    if saved.get("aux_data"):
        name += " + extra data"
    if saved.get("augment") == "authors":
        name += " + authors' aug."
    name += recipe
    if stem != "best":
        name += f" [{stem}]"
    return name


def result_row_name(r):
    """A result's row: its `defense` when eval_autoattack.py --defense named it, else row_name of
    what it records (its training identity, method fields and checkpoint)."""
    if r.get("defense"):
        return r["defense"]
    method = {k: v for k, v in r.items() if k.startswith("method")}
    return row_name({**(r.get("train_identity") or {}), **method}, r.get("checkpoint_kind") or "best")


def weight_of(r):
    """The value of a result's (or run's) method weight (lam, beta, ...); None without one."""
    key = r.get("method_weight")
    value = r.get(key) if key else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_reference(r):
    """Whether a result is the reference of the paired comparisons: its method at the weight its
    Method names (method_reference; FIRE at lam 12)."""
    return not r.get("quoted") and r.get("method_reference") is not None and weight_of(r) == r["method_reference"]


def checkpoint_order(r):
    """A result's place among the rows: its method's order, or the order its Method gives its
    checkpoint (Madry's best checkpoint, 'Overfitting', comes just before FIRE)."""
    rows = {row[0]: row[2] for row in r.get("method_checkpoint_rows") or ()}
    return rows.get(r.get("checkpoint_kind"), r["method_order"])


def warn(message):
    print(f"{os.path.basename(sys.argv[0])}: warning: {message}", file=sys.stderr, flush=True)


RUN_MARKS = ("best.pt", "summary.json")  # a folder holding one of these is a run folder


def find_results(dirs):
    """The usable result JSONs (by their `format`) under the given folders or files, each file
    once, and the paths of those left out. A file named in `dirs` must be a usable result
    (UserError otherwise). In a folder, a JSON that is a result but not a usable one (damaged,
    incomplete, a value out of range, its checkpoint gone or changed) is left out with one
    warning line; other JSONs (a run's summary.json) are not results and are passed over. Run
    folders without any result are named in one warning line. Returns (results, left_out)."""
    paths, named, runs = [], set(), []
    for d in dirs:
        if os.path.exists(d) and not os.path.isdir(d):  # a file, or what only claims to be one
            paths.append(d)
            named.add(os.path.realpath(d))
        elif os.path.isdir(d):
            for root, subdirs, files in os.walk(d):
                subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))  # not .replaced/
                jsons = [os.path.join(root, f) for f in sorted(files) if f.endswith(".json")]  # FIFOs too: named
                paths += jsons
                if any(f in files for f in RUN_MARKS):
                    runs.append((root, jsons))
        else:
            raise UserError(f"{d!r} does not exist")
    results, left_out, seen, evaluated, first = [], [], set(), set(), {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            record = load_json(path)
        except OSError:
            record, problem = None, "not a regular file (a FIFO, a device?)"
        except ValueError:
            record, problem = None, "not whole JSON (damaged?)"
        else:
            problem = result_problem(record, path)
        if real in named:
            if problem:
                raise UserError(f"{path}: {problem}")
        elif record is not None and not (isinstance(record, dict) and record.get("format") == RESULT_FORMAT):
            if not other_result_format(record):
                continue  # not a result (a run's summary.json, a timing)
            warn(f"left out {path}: {problem}")  # a result of another version of this code
            left_out.append(path)
            continue
        elif problem:
            warn(f"left out {path}: {problem}")
            left_out.append(path)
            continue
        same = json.dumps([record.get(k) for k in ("checkpoint_sha256", "checkpoint_kind", "settings")], sort_keys=True)
        if record.get("checkpoint_sha256") and same in first:  # a copy: one evaluation of a checkpoint counts once
            warn(f"{path} holds the result of {first[same]} again (the same checkpoint, evaluated the same way): "
                 f"counted once")
            continue
        first[same] = path
        record["_path"] = path
        record["defense"] = result_row_name(record)
        results.append(record)
        evaluated.add(os.path.dirname(real))
    waiting = [root for root, jsons in runs if os.path.realpath(root) not in evaluated
               and not any(p in left_out for p in jsons)]
    if waiting:
        warn(f"not evaluated yet (a run without a result JSON): {', '.join(waiting)}")
    if not results:
        raise UserError(f"no usable AutoAttack result JSONs under {' '.join(dirs)}")
    return results, left_out


def left_out_note(left_out):
    """The line a table or figure ends with when results were left out: how many and which."""
    return (f"**Note: {len(left_out)} result file{'s' * (len(left_out) > 1)} left out (damaged or "
            f"not valid; see the warnings): {', '.join(left_out)}.**")


def quoted_rows(name):
    """The rows quoted for table `name` (from the paper, or from `source`), as records of the table
    (marked, one 'seed')."""
    rows = []
    for q in QUOTED.get(name, ()):
        rows.append(dict(q, defense=f"{q['defense']} (quoted from {q.get('source', 'the paper')})", method="quoted",
                         quoted=True, seed=None, n_examples=None, split=None, aa_version=None))
    return rows


def rounded(value):
    return None if value is None else round(value, 8)


def training_settings(r):
    """A result's training identity without the seed (config.run_identity of its checkpoint's
    arguments, recorded by eval_autoattack.py); None for a quoted row."""
    identity = r.get("train_identity")  # again through run_identity: inert settings at their defaults
    return None if identity is None else {k: v for k, v in run_identity(identity).items() if k != "seed"}


def group_key(r):
    """Rows of a table: results are averaged over seeds only when they agree in everything else:
    the row name, the training identity bar the seed (every setting that changes what a run
    computes: a new flag too), the checkpoint, and the evaluation norm, eps, images, split and
    AutoAttack version."""
    training = json.dumps(training_settings(r), sort_keys=True)
    return (r["defense"], training, r.get("checkpoint_kind"), r["dataset"], r["model"], norm_of(r),
            rounded(r["eps"]),
            r.get("n_examples"), r.get("split"), r.get("aa_version"), bool(r.get("quoted")))


# Training settings that a row already shows: in its name (the method, augmentation, extra data,
# pre-training) or a column (data set, architecture, training eps, the threat model in the ε column);
# and each result's method flags (shown_in_row).
SHOWN_IN_ROW = frozenset({"method", "augment", "aux_data", "init_from", "dataset", "model", "eps", "norm"})


def shown_in_row(r):
    """The training settings a result's row shows: SHOWN_IN_ROW, the flags that chose its method
    (method_flags: --distance, --loss, --self-adaptive) and its weight flag."""
    return SHOWN_IN_ROW | set(r.get("method_flags") or ()) | {r.get("method_weight")} - {None}


def varies(settings, key):
    """Whether `key` takes more than one value (absent counts as one) in these settings dicts."""
    return len({json.dumps(s.get(key), sort_keys=True) for s in settings}) > 1


def training_columns(groups):
    """Per data set, the training settings its rows must show: those that differ between them,
    bar the ones the row name or a column already shows, unless rows of one name differ in them."""
    named, in_row = {}, {}
    for rows in groups:
        if not rows[0].get("quoted") and training_settings(rows[0]) is not None:
            named.setdefault(rows[0]["dataset"], []).append((rows[0]["defense"], training_settings(rows[0])))
            in_row.setdefault(rows[0]["dataset"], set()).update(shown_in_row(rows[0]))
    shown = {}
    for dataset, pairs in named.items():
        settings = [s for _, s in pairs]
        same_name = [[s for d, s in pairs if d == name] for name in {d for d, _ in pairs}]
        shown[dataset] = [k for k in sorted(set().union(*settings)) if varies(settings, k) and (
            k not in in_row[dataset] or any(varies(group, k) for group in same_name))]
    return shown


def fmt_setting(value):
    if isinstance(value, list):
        return " ".join(map(fmt_setting, value))
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def settings_text(settings, keys):
    """'--lr 0.01 --epochs 200': the values of `keys` in a result's training settings."""
    return " ".join(f"--{k.replace('_', '-')} {fmt_setting(settings.get(k, DEFAULT_IDENTITY.get(k)))}"
                    for k in keys) or "-"  # a setting an identity leaves out at its default has that value


# Settings that may differ between rows of one data set: (field, column, formatter)
SETTING_COLUMNS = [("train_eps", "Train ε", lambda v: "-" if v is None else eps_text(v)),
                   ("split", "Split", str), ("n_examples", "Images", str), ("aa_version", "AA", str)]
SETTING_NAMES = {"eps": "evaluation ε", "train_eps": "training ε", "split": "split",
                 "n_examples": "number of images", "aa_version": "AutoAttack version"}


def varying_settings(rows_list):
    """The settings that differ between rows of the same data set (quoted rows aside)."""
    values = {}
    for rows in rows_list:
        r = rows[0]
        for field in SETTING_NAMES:
            v = rounded(r.get(field)) if field in ("eps", "train_eps") else r.get(field)
            values.setdefault((r["dataset"], field), set()).add(v)
    return [f for f in SETTING_NAMES if any(len(v) > 1 for (_, g), v in values.items() if g == f)]


def mean_std(values):
    """(mean, sample standard deviation with ddof=1, or None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt_pm(values, scale=100):
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_runtime(rows):
    """Mean training time; '<pre-training> + <fine-tuning>' for runs initialised from another."""
    def finite_mean(key):
        values = [x.get(key) for x in rows]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return statistics.fmean(values) if values else None
    train, pretrain = finite_mean("train_time_s"), finite_mean("pretrain_time_s")
    if train is None:
        return "-"
    return fmt_hours(train) if pretrain is None else f"{fmt_hours(pretrain)} + {fmt_hours(train)}"


def fmt_model(name):
    return {"smallcnn": "CNN", "resnet18": "RN-18"}.get(name, name.upper())


def extra_data(r):
    """Whether a row belongs to Table 2's "With additional data" part: extra pseudo-labelled images
    (--aux-data), or pre-training on other data (--init-from; the paper lists Pre-training there)."""
    return bool(r.get("aux_data") or r.get("init_from"))


def row_order(r):
    """The paper's row order: without extra data first; by data set (in data.DATASETS' order);
    quoted rows, then by each method's order (config.Method: Madry, Self Adaptive (or MART),
    TRADES, Hellinger, FIRE + Self-Adaptive, a new method, Overfitting, FIRE; checkpoint_order),
    then by weight."""
    method = -1 if r.get("quoted") else checkpoint_order(r)
    datasets = list(DATASETS)
    order = datasets.index(r["dataset"]) if r["dataset"] in datasets else len(datasets)
    return (extra_data(r), order, norm_of(r), r["eps"], r["model"],
            method, weight_of(r) or 0, r["defense"], r.get("n_examples") or 0,
            r.get("split") or "", r.get("train_eps") or 0)


# ---- the paired comparison with FIRE

def per_sample_aa(record):
    """(image indices, robust after the whole AutoAttack) from the result's .npz, or None."""
    arrays = read_per_image(record, record["_path"])
    return None if arrays is None else (arrays["index"], arrays["square"].astype(bool))


def paired_difference(a, b, n_boot=N_BOOTSTRAP, seed=0):
    """AutoAttack accuracy of a minus b on the same images, with a 95% paired bootstrap interval.

    a, b: bool arrays (images, matched seeds): robust or not, the same image and seed in the same
    cell. The difference per image is averaged over the seeds; the interval is the percentile
    bootstrap of its mean over n_boot resamples of the images (scipy.stats.bootstrap: the same
    images for both methods and every seed; numpy's default_rng(seed)). Returns (mean, low, high).
    """
    d = (np.asarray(a, float) - np.asarray(b, float)).mean(axis=1)
    if np.all(d == d[0]):  # no spread to resample (e.g. identical results)
        return d[0].item(), d[0].item(), d[0].item()
    ci = bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=0.95, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return d.mean().item(), float(ci.low), float(ci.high)


def matched_seeds(rows, ref):
    """Per-image AutoAttack results of the seeds both rows have, on the same images:
    [(row's, reference's)] for each seed whose .npz files exist and whose image indices agree.
    A model without a seed (a RobustBench entry) is paired with every seed of the reference."""
    theirs = {r["seed"]: r for r in reversed(ref)}
    mine = {r["seed"]: r for r in reversed(rows)}  # the first result of a seed
    if None in mine:
        mine = {seed: mine[None] for seed in theirs}
    pairs = []
    for seed in sorted(set(mine) & set(theirs)):
        a, b = per_sample_aa(mine[seed]), per_sample_aa(theirs[seed])
        if a is not None and b is not None and np.array_equal(a[0], b[0]):
            pairs.append((a[1], b[1]))
    return pairs


def shared_settings(a, b):
    """How many training settings, bar those a row's name or columns show, two results share."""
    sa, sb = training_settings(a) or {}, training_settings(b) or {}
    shown = shown_in_row(a) | shown_in_row(b)
    return sum(sa[k] == sb.get(k) for k in sa if k in sb and k not in shown)


def paired_cells(groups):
    """For each row, its paired AutoAttack difference to the reference (FIRE at lam 12: is_reference)
    in points with the 95% interval: the reference row of the same data set, split and evaluation
    norm and eps, preferring the same extra data, architecture and other training settings, with
    the most matched seeds; '-' when nothing can be paired. A reference row is its own reference."""
    cells = {}
    fire = [rows for rows in groups.values() if is_reference(rows[0])]
    for key, rows in groups.items():
        r, best = rows[0], None
        if r.get("quoted"):
            cells[key] = "-"
            continue
        if any(rows is ref for ref in fire):
            cells[key] = "reference"
            continue
        for ref in fire:
            f = ref[0]
            if ((f["dataset"], f["split"], norm_of(f), rounded(f["eps"]))
                    != (r["dataset"], r["split"], norm_of(r), rounded(r["eps"]))):
                continue
            pairs = matched_seeds(rows, ref)
            score = (len(pairs) > 0, extra_data(f) == extra_data(r), f["model"] == r["model"],
                     shared_settings(f, r), len(pairs))
            if pairs and (best is None or score > best[0]):
                best = score, ref, pairs
        if best is None:
            cells[key] = "-"
        else:
            pairs = best[2]
            m, low, high = paired_difference(np.stack([a for a, _ in pairs], 1),
                                             np.stack([b for _, b in pairs], 1))
            seeds = "" if len(pairs) == len({x["seed"] for x in rows}) else f" ({len(pairs)} seeds)"
            cells[key] = f"{100 * m:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]{seeds}"
    return cells


WARNED = "⚠"  # the mark of a row whose results carry warnings, numbered, with a note under the table


def warning_mark(rows, notes):
    """' ⚠<k>' for a row whose results carry warnings (results.warnings_of), appending note k (the
    row, and each warned result's seed, file and warnings) to `notes`; '' for a clean row."""
    warned = [(r, warnings_of(r)) for r in rows if not r.get("quoted") and warnings_of(r)]
    if not warned:
        return ""
    k = len(notes) + 1
    notes.append(f"- {WARNED}{k} {rows[0]['defense']}, {len(warned)} of {len(rows)} result(s): " + "; ".join(
        f"seed {r['seed']} ({r.get('_path', 'not from a file')}): " + " / ".join(lines) for r, lines in warned))
    return f" {WARNED}{k}"


def summarize(results, title=None, quoted=(), left_out=()):
    """The paper's table (Tables 1-3) as Markdown: one row per defense and setting, mean +- std
    over seeds, and each row's paired AutoAttack difference to the reference (FIRE at lam 12:
    is_reference); it ends with a note naming
    the result files `left_out` (see find_results), if any."""
    groups = {}
    for r in sorted([*results, *quoted], key=row_order):
        groups.setdefault(group_key(r), []).append(r)
    varying = varying_settings([rows for rows in groups.values() if not rows[0].get("quoted")])
    settings = [c for c in SETTING_COLUMNS if c[0] in varying]
    training = training_columns(groups.values())
    training_keys = sorted(set().union(*training.values()))
    paired = paired_cells(groups)
    refs = [r for r in results if is_reference(r)]
    ref_title = refs[0]["method_title"] if refs else "reference"
    ref_text = (f"that of {ref_title} ({refs[0]['method_weight']}={refs[0]['method_reference']:g})" if refs
                else "that of the reference method (method_reference; none in this table)")
    for r in results:
        r.setdefault("corruptions", corruptions_beside(r))
    extra = [k for k in ("pgd20", "cw", "corruptions") if any(r.get(k) is not None for r in results)]
    header = ["Defense", "Dataset", "ε", "Structure", *[label for _, label, _ in settings],
              *["Training"] * bool(training_keys),
              "Natural", "AutoAttack", "Avg. Acc.",
              *[{"pgd20": "PGD-20", "cw": "CW-20", "corruptions": "Corruptions"}[k] for k in extra],
              "RunTime", "Seeds", f"ΔAA vs {ref_title} [95% CI]"]
    lines = [] if title is None else [f"### {rehearsal_title(title) if rehearsal(results) else title}", ""]
    if rehearsal(results):
        lines += [f"**{REHEARSAL_NOTE}: the runs trained a tiny network for a few steps; they check the plan.**", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sections = len({extra_data(r) for r in [*results, *quoted]}) > 1
    current, warned = None, []  # warned: the notes of the rows whose results carry warnings
    for key, rows in groups.items():
        r = rows[0]
        if sections and extra_data(r) != current:
            current = extra_data(r)
            label = "**With additional data**" if current else "**Without additional data**"
            lines.append("| " + label + " |" + " |" * (len(header) - 1))
        seeds = sorted({x["seed"] for x in rows if x["seed"] is not None})
        if r.get("quoted") or not seeds:  # quoted, or a model without a seed (RobustBench)
            seeds_text = "-"
        elif len(seeds) != len(rows):  # the same seed twice (e.g. copied folders): say so
            seeds_text = f"{len(rows)} results, seeds {','.join(map(str, seeds))}"
        else:
            seeds_text = f"{len(rows)} ({','.join(map(str, seeds))})"
        cells = [r["defense"], dataset_title(r["dataset"]), threat_text(r),
                 fmt_model(r["model"]), *[fmt(r.get(field)) if not r.get("quoted") else "-"
                                          for field, _, fmt in settings],
                 *[settings_text(training_settings(r), training.get(r["dataset"], []))
                   if not r.get("quoted") else "-"] * bool(training_keys),
                 fmt_pm([x["natural"] for x in rows]),
                 fmt_pm([x["autoattack"] for x in rows]) + warning_mark(rows, warned),
                 fmt_pm([x["avg_acc"] for x in rows])]
        for k in extra:  # an attack run on some seeds only: the cell names them
            values = [x[k] for x in rows if x.get(k) is not None]
            having = [str(x["seed"]) for x in rows if x.get(k) is not None]
            partial = f" (only seed{'s' * (len(having) > 1)} {','.join(having)})" if len(values) < len(rows) else ""
            cells.append(fmt_pm(values) + partial if values else "-")
        cells += [fmt_runtime(rows), seeds_text, paired[key]]
        lines.append("| " + " | ".join(cells) + " |")
    n = {r["n_examples"] for r in results}
    smoke = any(r.get("aa_version") != "standard" for r in results)
    lines += ["", f"Accuracies in %, mean ± sample standard deviation (ddof = 1) over seeds (one "
                  f"seed: the value alone); AutoAttack = "
                  f"{'reduced smoke version' if smoke else 'standard version'}, "
                  f"{' and '.join(sorted({'L2' if norm_of(r) == 'l2' else 'Linf' for r in [*results, *quoted]}))}, on "
                  f"{'/'.join(map(str, sorted(n)))} {'/'.join(sorted({r['split'] for r in results}))} "
                  f"images; Avg. Acc. = (Natural + AutoAttack) / 2; RunTime = mean wall-clock "
                  f"training time (pre-training + fine-tuning for runs initialised from another). "
                  f"ΔAA vs {ref_title} = AutoAttack accuracy minus {ref_text} on the same "
                  f"data set, seeds and images, in points, averaged over the matched seeds, with a "
                  f"95% paired bootstrap interval over images ({N_BOOTSTRAP:,} resamples); - = no "
                  f"per-image results to pair."]
    if "corruptions" in extra:
        lines += ["", "Corruptions = mean accuracy over every corruption and severity of the result's "
                      "corruptions.json beside it (python -m fire_repro.corruptions: RobustBench's 15 x 5 "
                      "CIFAR-C files, or the 9 x 5 computed for other data sets; docs/corruptions.md)."]
    if quoted:
        sources = sorted({r.get("source", "the paper") for r in quoted})
        lines += ["", f"Rows marked (quoted from {' / '.join(sources)}) are numbers quoted from "
                      f"{' and '.join(sources)}; they were not trained or evaluated here."]
    if varying or training_keys:
        differ = [SETTING_NAMES[f] for f in varying]
        if training_keys:
            differ.append(f"training settings ({', '.join('--' + k.replace('_', '-') for k in training_keys)}: "
                          f"column Training)")
        lines += ["", f"**Note: rows of the same data set differ in {', '.join(differ)}; compare rows "
                      f"only where these agree.**"]
    if smoke:
        lines += ["", "**AutoAttack with reduced iterations and queries (eval_autoattack.py --smoke-aa): "
                      "these numbers are not comparable with the standard AutoAttack's.**"]
    if warned:
        lines += ["", f"**{WARNED} marks a row with results that carry warnings (AutoAttack's checks, the "
                      f"masking report: docs/evaluation.md#checks); their numbers are in the row as they "
                      f"are:**", "", *warned]
    if left_out:
        lines += ["", left_out_note(left_out)]
    return "\n".join(lines) + "\n"


# ---- common corruptions (python -m fire_repro.corruptions) ----------------------------------------

def corruptions_beside(r):
    """The mean corruption accuracy of the corruption result beside an AutoAttack result (the same
    checkpoint, results.corruptions_out, with the same SHA-256), or None."""
    if "_path" not in r or not r.get("checkpoint_kind"):
        return None
    path = corruptions_out(os.path.join(os.path.dirname(r["_path"]), r["checkpoint_kind"] + ".pt"))
    record = read_json(path) if os.path.isfile(path) else None
    if (not isinstance(record, dict) or record.get("format") != CORRUPTIONS_FORMAT
            or record.get("checkpoint_sha256") != r.get("checkpoint_sha256") or corruption_problem(record, path)):
        return None
    return record["mean"]


def find_corruption_results(dirs):
    """The usable corruption results under folders or named files, and the paths left out (a
    corruption result that is damaged or whose checkpoint changed; one warning line each)."""
    found, left_out = [], []
    for d in dirs:
        if not os.path.exists(d):
            raise UserError(f"{d!r} does not exist")
        paths = [d] if os.path.isfile(d) else sorted(
            os.path.join(root, f) for root, _, files in os.walk(d) for f in files if f.endswith(".json"))
        for path in paths:
            record = read_json(path)
            if not (isinstance(record, dict) and record.get("format") == CORRUPTIONS_FORMAT):
                if path == d:
                    raise UserError(f"{path}: not a result of python -m fire_repro.corruptions")
                continue
            problem = corruption_problem(record, path)
            if problem:
                if path == d:
                    raise UserError(f"{path}: {problem}")
                warn(f"left out {path}: {problem}")
                left_out.append(path)
                continue
            record["_path"], record["defense"] = path, result_row_name(record)
            found.append(record)
    if not found:
        raise UserError(f"no usable corruption results (corruptions.json) under {' '.join(dirs)}")
    return found, left_out


def summarize_corruptions(records, title=None, quoted=(), left_out=()):
    """The corruption table as Markdown: one row per defense and setting, the natural accuracy,
    each corruption's accuracy averaged over its severities, and the mean over every corruption
    and severity, each mean +- std over seeds; quoted rows (RobustBench's board) give the natural
    accuracy and the mean only."""
    groups = {}
    for r in sorted([*records, *quoted], key=lambda r: (r.get("quoted", False), DATASETS.get(r["dataset"]) is None,
                                                        r["dataset"], -1 if r.get("quoted") else r["method_order"],
                                                        weight_of(r) or 0, r["defense"])):
        key = (r["defense"], json.dumps(training_settings(r), sort_keys=True), r["dataset"], r["model"],
               r.get("checkpoint_kind"), json.dumps(r.get("settings"), sort_keys=True), bool(r.get("quoted")))
        groups.setdefault(key, []).append(r)
    names = list(dict.fromkeys(n for r in records for n in r["accuracy"]))
    header = ["Defense", "Dataset", "Structure", "Natural", *names, "Mean", "Seeds"]
    lines = [] if title is None else [f"### {rehearsal_title(title) if rehearsal(records) else title}", ""]
    if rehearsal(records):
        lines += [f"**{REHEARSAL_NOTE}: the runs trained a tiny network for a few steps; they check the plan.**", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rows in groups.values():
        r = rows[0]
        natural = [x["natural"] for x in rows if x.get("natural") is not None]
        per = [fmt_pm([x["corruption_mean"][n] for x in rows]) if n in r.get("corruption_mean", {}) else "-"
               for n in names]
        seeds = sorted({x["seed"] for x in rows if x.get("seed") is not None})
        lines.append("| " + " | ".join([r["defense"], dataset_title(r["dataset"]), fmt_model(r["model"]),
                                         fmt_pm(natural) if natural else "-", *per,
                                         fmt_pm([x.get("mean", x.get("corruptions")) for x in rows]),
                                         f"{len(rows)} ({','.join(map(str, seeds))})" if seeds else "-"]) + " |")
    sources = sorted({r["settings"]["source"] for r in records})
    n = sorted({r["n_examples"] for r in records})
    lines += ["", f"Accuracies in %, mean ± sample standard deviation (ddof = 1) over seeds (one seed: the "
                  f"value alone), on the first {'/'.join(map(str, n))} test images; a corruption's column is "
                  f"its mean over severities 1-5; Mean = over every corruption and severity. Corruptions: "
                  + " and ".join({"robustbench-files": "RobustBench's CIFAR-C files (15 corruptions x 5 severities)",
                                  "computed": "computed on the test images (9 of the 15 corruptions x 5 "
                                              "severities, Hendrycks' CIFAR-10-C definitions; docs/corruptions.md)"}[x]
                                 for x in sources) + "."]
    if quoted:
        lines += ["", "Rows marked (quoted from RobustBench) are RobustBench's corruption board "
                      "(model_info/cifar10/corruptions/<name>.json): 15 x 5 on 10,000 CIFAR-10-C images; not "
                      "trained or evaluated here."]
    if left_out:
        lines += ["", left_out_note(left_out)]
    return "\n".join(lines) + "\n"


# ---- the command line -----------------------------------------------------------------------------
LEFT_OUT = 3  # exit status: the table or figure was written, but results under a folder were left out


def get_args(argv=None):
    from fire_repro.figures import figure_formats
    p = ArgumentParser(prog="python -m fire_repro.tables", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="folders searched (recursively) for result JSONs of eval_autoattack.py, or result files")
    p.add_argument("--quoted", type=str, default=None, choices=sorted(QUOTED),
                   help="add the rows this table quotes from other papers or RobustBench (marked, no std)")
    p.add_argument("--corruptions", action="store_true",
                   help="table the corruption results (corruptions.json of python -m fire_repro.corruptions): "
                        "per corruption, mean +- std over seeds; --quoted corruptions adds RobustBench's board")
    p.add_argument("--table-out", type=str, default=None, help="also write the Markdown table here")
    p.add_argument("--title", type=str, default=None, help="heading written above the table")
    p.add_argument("--plot-kind", type=str, default="lambda", choices=["lambda", "plane"],
                   help="with --plot-out: lambda = natural and AutoAttack accuracy against the weight (Fig. 7); "
                        "plane = AutoAttack against natural accuracy, one curve per method (Fig. 8)")
    p.add_argument("--plot-out", type=str, default=None,
                   help="draw the sweep figure into this file instead of the table; its extension picks the "
                        "format (png, pdf, svg, ...)")
    args = p.parse_args(argv)
    if args.plot_out is not None:
        ext = os.path.splitext(args.plot_out)[1].lstrip(".").lower()
        if ext not in figure_formats():
            p.error(f"--plot-out {args.plot_out!r}: the extension must name a figure format "
                    f"({', '.join(sorted(figure_formats()))})")
        for flag in ("quoted", "table_out", "title", "corruptions"):
            if getattr(args, flag) not in (None, False):
                p.error(f"--{flag.replace('_', '-')} goes with the table, not with --plot-out")
    if args.quoted and (args.quoted in QUOTED_CORRUPTIONS) != args.corruptions:
        p.error(f"--quoted {args.quoted} " + ("quotes corruption rows: add --corruptions" if args.corruptions is False
                                              else "quotes AutoAttack rows, not corruption rows"))
    return args


def main(argv=None):
    """The table (printed, written to --table-out, returned) or the sweep figure (--plot-out; its path
    is returned)."""
    from fire_repro import figures
    args = get_args(argv)
    if args.plot_out or args.table_out:
        check_output(args.plot_out or args.table_out, "--plot-out" if args.plot_out else "--table-out")
    found, left_out = (find_corruption_results if args.corruptions else find_results)(args.paths)
    if args.plot_out:
        figures.plot_sweep(found, args.plot_out, args.plot_kind)
        print(f"{len(found)} results -> {args.plot_out}")
        if left_out:
            print(left_out_note(left_out))
        output = args.plot_out
    else:
        output = (summarize_corruptions if args.corruptions else summarize)(found, args.title, quoted_rows(args.quoted),
                                                                             left_out)
        print(output, end="")
        if args.table_out:
            write_atomic(args.table_out, lambda f: f.write(output))
    if left_out:
        sys.exit(LEFT_OUT)
    return output


if __name__ == "__main__":
    cli(main)
