"""The paper's tables and figures from finished AutoAttack results (the JSON and per-image .npz
that eval_autoattack.py writes beside each checkpoint).

    find_results(dirs)         the usable result JSONs under some folders (one warning line per unusable
                               one, which is left out) or named files (each must be usable)
    summarize(results, ...)    Tables 1-3 as Markdown: one row per defense and setting, mean +- std over
                               seeds, and each row's paired AutoAttack difference to FIRE
    plot_sweep(results, ...)   Fig. 7 (accuracy against lambda) or Fig. 8 (the accuracy plane)

Used through `eval_autoattack.py --summarize DIR...` and `--plot-sweep DIR...`.
"""
import json
import math
import os
import statistics
import sys

import numpy as np
from scipy.stats import bootstrap

from fire_repro.common import UserError, eps_text, write_atomic
from fire_repro.config import never_starts, run_identity
from fire_repro.data import DATASETS
from fire_repro.results import RESULT_FORMAT, read_per_image, result_problem

FIRE_LAM = 12.0  # the paper's lambda and train_fire.py's default: the reference row of the paired comparison
N_BOOTSTRAP = 10_000
# Rows quoted without training them: those the paper quotes from other papers (Table 2), as printed
# there, and the RobustBench entries the `modern` block compares with (source: robustbench.github.io).
QUOTED = {"table2": [
    dict(defense="Atzmon et al.", dataset="mnist", model="cnn", eps=0.3, aux_data=False,
         natural=0.9935, autoattack=0.9085, avg_acc=0.9510),
    dict(defense="UAT", dataset="cifar10", model="wrn-106-8", eps=8 / 255, aux_data=True,
         natural=0.8646, autoattack=0.5603, avg_acc=0.7124),
    dict(defense="Overfitting", dataset="cifar100", model="resnet18", eps=8 / 255, aux_data=False,
         natural=0.5383, autoattack=0.1895, avg_acc=0.3639),
], "modern": [  # RobustBench's CIFAR-10 Linf 8/255 leaderboard, WRN-34-10 without extra data
    dict(defense="TRADES (beta=6), Zhang et al. 2019", dataset="cifar10", model="wrn-34-10", eps=8 / 255,
         aux_data=False, natural=0.8492, autoattack=0.5308, avg_acc=0.6900, source="RobustBench"),
    dict(defense="TRADES + AWP, Wu et al. 2020", dataset="cifar10", model="wrn-34-10", eps=8 / 255,
         aux_data=False, natural=0.8536, autoattack=0.5617, avg_acc=0.70765, source="RobustBench"),
], "l2": [  # RobustBench's CIFAR-10 L2 0.5 leaderboard without extra data (robustbench 1.1.1's README)
    dict(defense="TRADES + AWP, Wu et al. 2020", dataset="cifar10", model="wrn-34-10", norm="l2", eps=0.5,
         aux_data=False, natural=0.8851, autoattack=0.7366, avg_acc=0.81085, source="RobustBench"),
    dict(defense="Engstrom et al. 2019 (robustness library)", dataset="cifar10", model="resnet-50", norm="l2",
         eps=0.5, aux_data=False, natural=0.9083, autoattack=0.6924, avg_acc=0.80035, source="RobustBench"),
    dict(defense="Overfitting, Rice et al. 2020", dataset="cifar10", model="preactresnet-18", norm="l2", eps=0.5,
         aux_data=False, natural=0.8867, autoattack=0.6768, avg_acc=0.78175, source="RobustBench"),
]}

REHEARSAL_MARK = "REHEARSAL (generated data, not results): "
REHEARSAL_NOTE = ("**REHEARSAL: these runs trained on generated stand-in images (--rehearsal) with a "
                  "tiny network and a few steps; the numbers check the plan, they are not results.**")


def rehearsal(results):
    """Whether any of the results comes from a --rehearsal run (generated data)."""
    return any((r.get("train_identity") or {}).get("rehearsal") for r in results)


def norm_of(r):
    """A result's threat model: its `norm`, linf for results and quoted rows from before --norm."""
    return r.get("norm") or "linf"


def threat_text(r):
    """The ε cell: '8/255' for Linf (the paper's tables), 'L2 0.5' for L2."""
    return eps_text(r["eps"]) if norm_of(r) == "linf" else f"L2 {r['eps']:g}"


def dataset_title(name):
    return DATASETS[name].title if name in DATASETS else name


def row_name(saved, checkpoint):
    """A result's row name, from its checkpoint's training arguments: the method's title (its
    config.Method), its weight, extra data, today's recipe and a non-best checkpoint, e.g.
    'FIRE (lam=12)' or 'TRADES (beta=6) + AWP + EMA'.

    Madry's adversarial training gives two rows of Table 2: its last epoch ('Madry et al.') and
    its checkpoint chosen on validation robust accuracy, i.e. early stopping ('Overfitting',
    Rice et al. 2020). TRADES on extra data is Carmon et al.'s 'RST-adv'; a run fine-tuned from
    another (--init-from) is Hendrycks et al.'s 'Pre-training'.
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
    if saved["method"] == "madry" and stem in ("best", "last"):
        return ("Madry et al." if stem == "last" else "Overfitting (Madry, early stopping)") + recipe
    name = saved["method_title"]
    if saved["method"] == "trades" and saved.get("aux_data"):
        name = "RST-adv"  # Carmon et al. 2019: TRADES on the extra pseudo-labelled data
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
        if os.path.isfile(d):
            paths.append(d)
            named.add(os.path.realpath(d))
        elif os.path.isdir(d):
            for root, subdirs, files in os.walk(d):
                subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))  # not .replaced/
                jsons = [os.path.join(root, f) for f in sorted(files) if f.endswith(".json")]
                paths += jsons
                if any(f in files for f in RUN_MARKS):
                    runs.append((root, jsons))
        else:
            raise UserError(f"{d!r} does not exist")
    results, left_out, seen, evaluated = [], [], set(), set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record, problem = None, "not whole JSON (damaged?)"
        else:
            problem = result_problem(record, path)
        if real in named:
            if problem:
                raise UserError(f"{path}: {problem}")
        elif record is not None and not (isinstance(record, dict) and record.get("format") == RESULT_FORMAT):
            continue  # not a result (a run's summary.json, a timing)
        elif problem:
            warn(f"left out {path}: {problem}")
            left_out.append(path)
            continue
        record["_path"] = path
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
    identity = r.get("train_identity")  # again through run_identity: an older result's inert settings
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


# Training settings that a row already shows: in its name (method, weight, loss, regulariser,
# self-adaptive targets, augmentation, extra data, pre-training) or a column (data set,
# architecture, training eps, the threat model in the ε column).
SHOWN_IN_ROW = frozenset({"method", "lam", "beta", "loss", "distance", "self_adaptive", "augment",
                          "aux_data", "init_from", "dataset", "model", "eps", "norm"})


def varies(settings, key):
    """Whether `key` takes more than one value (absent counts as one) in these settings dicts."""
    return len({json.dumps(s.get(key), sort_keys=True) for s in settings}) > 1


def training_columns(groups):
    """Per data set, the training settings its rows must show: those that differ between them,
    bar the ones the row name or a column already shows, unless rows of one name differ in them."""
    named = {}
    for rows in groups:
        if not rows[0].get("quoted") and training_settings(rows[0]) is not None:
            named.setdefault(rows[0]["dataset"], []).append((rows[0]["defense"], training_settings(rows[0])))
    shown = {}
    for dataset, pairs in named.items():
        settings = [s for _, s in pairs]
        same_name = [[s for d, s in pairs if d == name] for name in {d for d, _ in pairs}]
        shown[dataset] = [k for k in sorted(set().union(*settings)) if varies(settings, k) and (
            k not in SHOWN_IN_ROW or any(varies(group, k) for group in same_name))]
    return shown


def fmt_setting(value):
    if isinstance(value, list):
        return " ".join(map(fmt_setting, value))
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def settings_text(settings, keys):
    """'--lr 0.01 --epochs 200': the values of `keys` in a result's training settings."""
    return " ".join(f"--{k.replace('_', '-')} {fmt_setting(settings.get(k))}" for k in keys) or "-"


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


def fmt_hours(seconds):
    """The paper's RunTime format: 11h00 (hours and minutes); seconds below one minute."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}"


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
    quoted rows, then by each method's `method_order` (config.Method: Madry, Self Adaptive (or
    MART), TRADES, Hellinger, FIRE + Self-Adaptive, a new method, FIRE), Overfitting (Madry's
    best-on-validation checkpoint) just before FIRE."""
    method = -1 if r.get("quoted") else r["method_order"]
    if r["method"] == "madry" and r.get("checkpoint_kind") == "best":
        method = 5
    datasets = list(DATASETS)
    order = datasets.index(r["dataset"]) if r["dataset"] in datasets else len(datasets)
    return (extra_data(r), order, norm_of(r), r["eps"], r["model"],
            method, r.get("lam") or 0, r.get("beta") or 0, r["defense"], r.get("n_examples") or 0,
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
    return sum(sa[k] == sb.get(k) for k in sa if k in sb and k not in SHOWN_IN_ROW)


def paired_cells(groups):
    """For each row, its paired AutoAttack difference to FIRE (lam 12) in points with the 95%
    interval: the FIRE row of the same data set, split and evaluation norm and eps, preferring the same
    extra data, architecture and other training settings, with the most matched seeds; '-' when
    nothing can be paired. A FIRE (lam 12) row is its own reference."""
    cells = {}
    fire = [rows for rows in groups.values() if not rows[0].get("quoted")
            and rows[0]["method"] == "fire" and rows[0].get("lam") == FIRE_LAM]
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


def summarize(results, title=None, quoted=(), left_out=()):
    """The paper's table (Tables 1-3) as Markdown: one row per defense and setting, mean +- std
    over seeds, and each row's paired AutoAttack difference to FIRE; it ends with a note naming
    the result files `left_out` (see find_results), if any."""
    groups = {}
    for r in sorted([*results, *quoted], key=row_order):
        groups.setdefault(group_key(r), []).append(r)
    varying = varying_settings([rows for rows in groups.values() if not rows[0].get("quoted")])
    settings = [c for c in SETTING_COLUMNS if c[0] in varying]
    training = training_columns(groups.values())
    training_keys = sorted(set().union(*training.values()))
    paired = paired_cells(groups)
    extra = [k for k in ("pgd20", "cw") if any(k in r for r in results)]
    header = ["Defense", "Dataset", "ε", "Structure", *[label for _, label, _ in settings],
              *["Training"] * bool(training_keys),
              "Natural", "AutoAttack", "Avg. Acc.", *[{"pgd20": "PGD-20", "cw": "CW-20"}[k] for k in extra],
              "RunTime", "Seeds", "ΔAA vs FIRE [95% CI]"]
    lines = [] if title is None else [f"### {REHEARSAL_MARK if rehearsal(results) else ''}{title}", ""]
    if rehearsal(results):
        lines += [REHEARSAL_NOTE, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sections = len({extra_data(r) for r in [*results, *quoted]}) > 1
    current = None
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
                 fmt_pm([x["autoattack"] for x in rows]), fmt_pm([x["avg_acc"] for x in rows])]
        for k in extra:  # an attack run on some seeds only: the cell names them
            values = [x[k] for x in rows if k in x]
            having = [str(x["seed"]) for x in rows if k in x]
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
                  f"ΔAA vs FIRE = AutoAttack accuracy minus that of FIRE (lam={FIRE_LAM:g}) on the same "
                  f"data set, seeds and images, in points, averaged over the matched seeds, with a "
                  f"95% paired bootstrap interval over images ({N_BOOTSTRAP:,} resamples); - = no "
                  f"per-image results to pair."]
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
        lines += ["", "**Smoke run: AutoAttack with reduced iterations (--smoke-aa) on a toy "
                      "training budget; these numbers only show that the pipeline works.**"]
    if left_out:
        lines += ["", left_out_note(left_out)]
    return "\n".join(lines) + "\n"


def figure_formats():
    """File formats matplotlib's Agg canvas writes (png, pdf, svg, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    return FigureCanvasAgg.get_supported_filetypes()


# Training settings a curve's label (the method) and key (data set, architecture, training eps)
# show, with the weight on the x-axis.
CURVE_SHOWN = SHOWN_IN_ROW - {"augment", "aux_data", "init_from"}


def sweep_weight(r):
    """The weight a sweep varies: the value of the method's weight flag (lam, beta)."""
    return r.get(r.get("method_weight") or "lam")


def plot_sweep(results, path, kind="lambda"):
    """Fig. 7 (kind='lambda': natural and AutoAttack accuracy against the weight) or Fig. 8
    (kind='plane': AutoAttack against natural accuracy, one curve per method); mean over seeds.
    Results that differ in anything but the weight and the seed (any other training setting,
    evaluation eps, images, split, AutoAttack version) are separate curves, never averaged into
    one point."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg
    curves, settings = {}, {}
    for r in results:
        label = r["method_title"] + (" + extra data" if r.get("aux_data") else "")
        training = training_settings(r)  # bar what the label and the key show, and the weight
        training = None if training is None else {k: v for k, v in training.items() if k not in CURVE_SHOWN}
        key = (label, r["dataset"], r["model"], rounded(r.get("train_eps")), rounded(r["eps"]),
               r["n_examples"], r["split"], r.get("aa_version") or "", json.dumps(training, sort_keys=True))
        settings[key[8]] = training
        curves.setdefault(key, {}).setdefault(sweep_weight(r), []).append(r)
    differ = [i for i in range(1, 9) if len({k[i] for k in curves}) > 1]
    recorded = [s for s in settings.values() if s is not None]
    keys = [k for k in sorted(set().union(*recorded)) if varies(recorded, k)]
    describe = {1: dataset_title, 2: fmt_model,
                3: lambda v: "train ε " + ("-" if v is None else eps_text(v)),
                4: lambda v: "ε " + eps_text(v), 5: lambda v: f"{v} images", 6: str, 7: str,
                8: lambda v: settings_text(settings[v], keys)}
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for n_curve, (key, points) in enumerate(sorted(curves.items(), key=lambda kv: str(kv[0]))):
        weights = sorted(points, key=lambda w: (w is None, w or 0))
        nat = [100 * statistics.fmean(x["natural"] for x in points[w]) for w in weights]
        adv = [100 * statistics.fmean(x["autoattack"] for x in points[w]) for w in weights]
        name = key[0] if not differ else f"{key[0]} ({', '.join(describe[i](key[i]) for i in differ)})"
        color = f"C{n_curve}"
        if kind == "lambda":
            ax.plot(weights, nat, "o-", color=color, label=f"{name}: natural")
            ax.plot(weights, adv, "s--", color=color, label=f"{name}: AutoAttack")
        else:
            ax.plot(nat, adv, "o-", color=color, label=name)
            for w, a, b in zip(weights, nat, adv):
                ax.annotate(f"{w:g}", (a, b), textcoords="offset points", xytext=(3, 3), fontsize=7)
    mark = REHEARSAL_MARK if rehearsal(results) else ""
    if kind == "lambda":
        ax.set_xlabel("λ (FIRE, Hellinger) / β (TRADES, MART)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(mark + "Natural and AutoAttack accuracy against λ", fontsize=9 if mark else None)
    else:
        ax.set_xlabel("natural accuracy (%)")
        ax.set_ylabel("AutoAttack accuracy (%)")
        ax.set_title(mark + "Natural / adversarial accuracy plane (labels: λ or β)", fontsize=9 if mark else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    write_atomic(path, lambda f: fig.savefig(f, format=ext, dpi=120), binary=True)
    return sorted(curves)
