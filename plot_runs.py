"""Training curves of run folders: the per-epoch records of metrics.jsonl as one figure.

Six panels against the epoch: validation natural and PGD accuracy, training natural accuracy,
the loss and the regulariser (`reg` = loss - CE), the mean batch gradient norm with the largest
step of the epoch (`grad_norm`, `grad_norm_max`, log scale). The collapse alarm (`collapsed`:
validation PGD below half its best for 2 epochs) is a dotted vertical line at the first epoch it
fired and a cross on the validation PGD curve. Runs that differ only in the seed (config.run_identity
of their arguments) are one curve, the mean over seeds with a band of +- one standard deviation,
labelled by the row name the tables give (tables.row_name). The extension of --out picks the format.

Commands:
    python plot_runs.py runs/fire-digits-s0 --out curves.png
    python plot_runs.py runs/fire-mnist5k-s0 runs/fire-mnist5k-s1 runs/trades-mnist5k-s0 --out curves.pdf
    python plot_runs.py runs/ --out curves.png     # every run folder under runs/, seeds averaged

A run is read from its folder as it stands: metrics.jsonl (every committed epoch, also of a run
still going or stopped early) and the arguments log.txt records (the last line of arguments: a
resumed run's); no checkpoint is loaded.
"""
import json
import math
import os

from fire_repro.checkpoints import check_saved_args
from fire_repro.common import ArgumentParser, UserError, check_output, cli, write_atomic
from fire_repro.config import run_identity
from fire_repro.figures import figure_formats
from fire_repro.data import rehearsal_title
from fire_repro.tables import dataset_title, mean_std, row_name, settings_text, varies, warn

# (metrics.jsonl key, panel title, y label, scale): one panel each; grad_norm_max joins grad_norm
PANELS = [("val_nat", "validation natural accuracy", "%", 100),
          ("val_pgd", "validation PGD accuracy", "%", 100),
          ("train_nat", "training natural accuracy", "%", 100),
          ("loss", "training loss", "", 1),
          ("reg", "regulariser (loss - CE)", "", 1),
          ("grad_norm", "batch gradient norm: mean (solid), largest (dashed)", "", 1)]
KEYS = [p[0] for p in PANELS] + ["grad_norm_max"]
ACCURACIES = [p[0] for p in PANELS if p[2] == "%"]


def get_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=str,
                        help="run folders (each with metrics.jsonl), or folders searched for them")
    parser.add_argument("--out", type=str, default="curves.png",
                        help="the figure; its extension picks the format (png, pdf, svg, ...)")
    parser.add_argument("--title", type=str, default=None, help="the figure's title (default: none)")
    return parser.parse_args(argv)


def run_folders(paths):
    """The run folders (holding metrics.jsonl) given, or found under the folders given, each once,
    in order; hidden folders (a run's .replaced/) are skipped. Raises UserError for a path that
    does not exist or holds no run."""
    folders = []
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"{path!r} {'is not a folder' if os.path.exists(path) else 'does not exist'}")
        found = []
        for root, subdirs, files in os.walk(path):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            if "metrics.jsonl" in files:
                found.append(os.path.normpath(root))
        if not found:
            raise UserError(f"{path!r} holds no run folder (no metrics.jsonl in it or below it)")
        folders += [f for f in found if f not in folders]
    real = {}  # a folder reached twice (through a symlink, or given twice) is one run
    return [real.setdefault(os.path.realpath(f), f) for f in folders if os.path.realpath(f) not in real]


def read_run(folder):
    """{'folder', 'args', 'records'}: the run's arguments (the last JSON line of log.txt that holds
    them) and its metrics.jsonl records. Raises UserError naming what is missing or damaged."""
    metrics = os.path.join(folder, "metrics.jsonl")
    records = []
    with open(metrics, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)  # bytes: json reads UTF-8, and refuses other bytes
            except (ValueError, RecursionError):
                raise UserError(f"{metrics!r} line {n} is not whole JSON (damaged?)") from None
            problem = record_problem(record)
            if problem:
                raise UserError(f"{metrics!r} line {n} is not an epoch record: {problem}")
            records.append(record)
    if not records:
        raise UserError(f"{metrics!r} holds no epoch yet")
    args = None
    try:
        with open(os.path.join(folder, "log.txt"), errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and "lr" in record and "method_title" in record:
                        args = record  # the arguments (the summary line has no lr)
    except OSError:
        pass
    if args is None:
        raise UserError(f"{folder!r}: log.txt does not hold the run's arguments (its first line)")
    check_saved_args(args, os.path.join(folder, "log.txt"))
    odd = [k for k in ARGS_NUMBERS if not (args.get(k) is None or is_number(args[k]))]
    if not isinstance(args["method_title"], str) or odd:
        raise UserError(f"{folder!r}: log.txt's arguments are damaged ({(odd or ['method_title'])[0]!r} "
                        f"is not a {'number' if odd else 'text'})")
    return dict(folder=folder, args=args, records=records)


ARGS_NUMBERS = ("epochs", "lam", "beta", "awp_gamma", "awp_warmup", "ema", "ema_start", "clip_grad_norm",
                "sa_start", "eval_steps")  # the arguments a curve's name reads, as numbers


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record):
    """Why a metrics.jsonl line is not an epoch record (None if it is): not a JSON object, no
    integer epoch, a curve's value that is not a number (or null), or an alarm without its
    validation PGD accuracy."""
    if not (isinstance(record, dict) and is_number(record.get("epoch")) and isinstance(record["epoch"], int)):
        return "no integer 'epoch'"
    if record["epoch"] < 1:
        return f"epoch {record['epoch']} (epochs count from 1)"
    odd = [k for k in KEYS if record.get(k) is not None and not is_number(record[k])]
    if odd:
        return f"{odd[0]!r} is {record[odd[0]]!r}, not a number"
    odd = [k for k in ACCURACIES if math.isfinite(record.get(k) or 0) and not 0 <= (record.get(k) or 0) <= 1]
    if odd:
        return f"{odd[0]!r} is {record[odd[0]]!r}, not an accuracy in [0, 1]"
    if record.get("collapsed") and not is_number(record.get("val_pgd")):
        return "'collapsed' without its 'val_pgd'"
    return None


def finite_mean_std(values):
    """tables.mean_std of the finite values (std 0 for one value); nan, nan if there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean, std = mean_std(values)
    return mean, std or 0.0


def curves(runs):
    """One curve per experiment: runs whose run_identity differs only in the seed are averaged
    epoch by epoch (over the seeds that reached the epoch); two runs of one identity and seed (a
    copied folder) are one. Returns dicts with 'label', 'seeds',
    'epochs', 'mean' and 'std' ({key: list per epoch}) and 'alarms' ([(seed, first alarm epoch)])."""
    groups = {}
    for run in runs:
        identity = {k: v for k, v in run_identity(run["args"]).items() if k != "seed"}
        groups.setdefault(json.dumps(identity, sort_keys=True), []).append(run)
    settings = {key: json.loads(key) for key in groups}
    names = {key: row_name(group[0]["args"], "best.pt") for key, group in groups.items()}
    result = []
    for key, group in groups.items():
        label = names[key]
        same_name = [settings[k] for k in groups if names[k] == label]
        if len(same_name) > 1:  # rows of one name: say what tells them apart
            keys = sorted(set().union(*same_name))  # a setting at its default is left out of an identity
            label += f" ({settings_text(settings[key], [k for k in keys if varies(same_name, k)])})"
        by_seed = {}  # a copied run (same settings, same seed) is one seed, drawn once
        for run in group:
            first = by_seed.setdefault(run["args"]["seed"], run)
            if first is not run:
                warn(f"{run['folder']!r} holds the run of {first['folder']!r} again (same settings, seed "
                     f"{run['args']['seed']}): drawn once")
        group = sorted(by_seed.values(), key=lambda r: r["args"]["seed"])
        epochs = sorted({r["epoch"] for run in group for r in run["records"]})
        by_epoch = [{r["epoch"]: r for r in run["records"]} for run in group]
        mean, std = {}, {}
        for k in KEYS:
            stats = [finite_mean_std([b[e].get(k) for b in by_epoch if e in b]) for e in epochs]
            mean[k], std[k] = [s[0] for s in stats], [s[1] for s in stats]
        alarms = [(run["args"]["seed"], next(r["epoch"] for r in run["records"] if r.get("collapsed")))
                  for run in group if any(r.get("collapsed") for r in run["records"])]
        result.append(dict(label=label, seeds=[run["args"]["seed"] for run in group], epochs=epochs,
                           mean=mean, std=std, alarms=alarms, runs=group))
    return result


def curve_label(c):
    seeds = c["seeds"]
    text = f"{c['label']}, seed {seeds[0]}" if len(seeds) == 1 else \
        f"{c['label']}, mean ± std of {len(seeds)} seeds ({','.join(map(str, seeds))})"
    if c["alarms"]:
        text += "; alarm: " + ", ".join(f"s{s} at {e}" for s, e in c["alarms"])
    return text


def plot_runs(runs, path, title=None):
    """Draw the curves of `runs` (read_run dicts) into `path` (format from its extension), one set
    of panels per data set (curves are compared within a data set only); the title (and each
    panel set's) starts with REHEARSAL when the runs are rehearsal runs. Returns the curves, those
    of each data set after another (curves(runs of that data set))."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    by_dataset = {}
    for run in runs:
        by_dataset.setdefault(run["args"].get("dataset"), []).append(run)
    sets = [(dataset, curves(group)) for dataset, group in by_dataset.items()]
    rehearsed = any(run["args"].get("rehearsal") for run in runs)
    fig = Figure(figsize=(13, 7 * len(sets) + 0.3 * (sum(len(d) for _, d in sets) + 2)), layout="constrained")
    subfigs = fig.subfigures(len(sets), 1, squeeze=False).ravel()
    n_curve = 0
    for subfig, (dataset, drawn) in zip(subfigs, sets):
        axes = subfig.subplots(2, 3, sharex=True).ravel()
        for c in drawn:
            color = f"C{n_curve % 10}"
            n_curve += 1
            for ax, (key, _, _, scale) in zip(axes, PANELS):
                for k, style in [(key, "-")] + [("grad_norm_max", "--")] * (key == "grad_norm"):
                    mean = [scale * v for v in c["mean"][k]]
                    label = (f"{dataset_title(dataset)}: " * (len(sets) > 1) + curve_label(c)) if ax is axes[0] and style == "-" else None
                    ax.plot(c["epochs"], mean, style, color=color, lw=1.4, marker="o", ms=2, label=label)
                    if len(c["seeds"]) > 1:
                        lo = [m - scale * s for m, s in zip(mean, c["std"][k])]
                        hi = [m + scale * s for m, s in zip(mean, c["std"][k])]
                        ax.fill_between(c["epochs"], lo, hi, color=color, alpha=0.2, lw=0)
                for _, epoch in c["alarms"]:
                    ax.axvline(epoch, color=color, ls=":", lw=1.2)
            for run in c["runs"]:  # the alarm's epochs, on each seed's own validation PGD
                marked = [r for r in run["records"] if r.get("collapsed")]
                axes[1].plot([r["epoch"] for r in marked], [100 * r["val_pgd"] for r in marked], "x",
                             color=color, ms=7, mew=2)
        eval_steps = {c["runs"][0]["args"].get("eval_steps") for c in drawn}
        for ax, (key, name, unit, _) in zip(axes, PANELS):
            if key == "val_pgd" and len(eval_steps) == 1:
                name = name.replace("PGD", f"PGD-{eval_steps.pop()}")
            ax.set_title(name + (" (x: collapse alarm)" if key == "val_pgd" else ""), fontsize=9)
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
        axes[5].set_yscale("log")
        axes[5].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axes[5].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[5].yaxis.set_minor_formatter(NullFormatter())
        axes[5].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel of the set
        for ax in axes[3:]:
            ax.set_xlabel("epoch")
        if len(sets) > 1:
            subfig.suptitle((rehearsal_title if rehearsed else str)(dataset_title(dataset)), fontsize=11)
    handles = [h for sub in subfigs for h in sub.axes[0].get_legend_handles_labels()[0]]
    labels = [lab for sub in subfigs for lab in sub.axes[0].get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="outside lower center", ncol=1, fontsize=8, frameon=False)
    if title or rehearsed:
        fig.suptitle((rehearsal_title if rehearsed else str)(title or "training curves"))
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    write_atomic(path, lambda f: fig.savefig(f, format=ext, dpi=110), binary=True, what="figure")
    return [c for _, drawn in sets for c in drawn]


def main(argv=None):
    args = get_args(argv)
    ext = os.path.splitext(args.out)[1].lstrip(".").lower()
    formats = figure_formats()
    if ext not in formats:
        raise UserError(f"--out {args.out!r}: unknown figure format {ext or '(no extension)'!r}; "
                        f"use one of {', '.join(sorted(formats))}")
    check_output(args.out, "--out")
    runs = [read_run(folder) for folder in run_folders(args.runs)]
    drawn = plot_runs(runs, args.out, args.title)
    for c in drawn:
        print(f"{curve_label(c)}: epochs {c['epochs'][0]}-{c['epochs'][-1]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli(main)
