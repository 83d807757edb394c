"""The sweep figures of the paper from finished results: Fig. 7 (natural and AutoAttack accuracy
against the regulariser's weight) and Fig. 8 (the natural / AutoAttack accuracy plane). Drawn by
`python -m fire_repro.tables DIR... --plot-kind {lambda,plane} --plot-out FILE`.
"""
import json
import os
import statistics

from fire_repro.common import eps_text, write_atomic
from fire_repro.data import rehearsal_title
from fire_repro.tables import (dataset_title, fmt_model, norm_of, rehearsal, rounded, settings_text, shown_in_row,
                               training_settings, varies, weight_of)


def figure_formats():
    """File formats matplotlib's Agg canvas writes (png, pdf, svg, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    return FigureCanvasAgg.get_supported_filetypes()


def curve_shown(r):
    """The training settings a sweep curve's label (the method), key (data set, architecture,
    training eps) and x-axis (the weight) show: tables.shown_in_row bar augmentation, extra data and
    pre-training, which other curves may differ in."""
    return shown_in_row(r) - {"augment", "aux_data", "init_from"}


def radius_text(norm, eps):
    """A curve's radius: '8/255' in Linf, 'L2 0.5' in L2, '-' when none is recorded."""
    return "-" if eps is None else eps_text(eps) if norm == "linf" else f"{norm.upper()} {eps:g}"


def plot_sweep(results, path, kind="lambda"):
    """Fig. 7 (kind='lambda': natural and AutoAttack accuracy against the weight) or Fig. 8
    (kind='plane': AutoAttack against natural accuracy, one curve per method); mean over seeds.
    Results that differ in anything but the weight and the seed (any other training setting,
    training or evaluation norm and eps, images, split, AutoAttack version) are separate curves, never averaged into
    one point."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg
    curves, settings = {}, {}
    for r in results:
        label = r["method_title"] + (" + extra data" if r.get("aux_data") else "")
        training = training_settings(r)  # bar what the label and the key show, and the weight
        training = None if training is None else {k: v for k, v in training.items() if k not in curve_shown(r)}
        train_norm = (r.get("train_identity") or {}).get("norm") or "linf"
        key = (label, r["dataset"], r["model"], (train_norm, rounded(r.get("train_eps"))), (norm_of(r), rounded(r["eps"])),
               r["n_examples"], r["split"], r.get("aa_version") or "", json.dumps(training, sort_keys=True))
        settings[key[8]] = training
        curves.setdefault(key, {}).setdefault(weight_of(r), []).append(r)
    differ = [i for i in range(1, 9) if len({k[i] for k in curves}) > 1]
    recorded = [s for s in settings.values() if s is not None]
    keys = [k for k in sorted(set().union(*recorded)) if varies(recorded, k)]
    describe = {1: dataset_title, 2: fmt_model,
                3: lambda v: "train ε " + radius_text(*v), 4: lambda v: "ε " + radius_text(*v),
                5: lambda v: f"{v} images", 6: str, 7: str,
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
    title = rehearsal_title if rehearsal(results) else (lambda text: text)
    if kind == "lambda":
        weights = {}
        for r in results:
            weights.setdefault(r.get("method_weight") or "-", set()).add(r["method_title"])
        ax.set_xlabel(" / ".join(f"{w} ({', '.join(sorted(t))})" for w, t in sorted(weights.items())))
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title("Natural and AutoAttack accuracy against the weight"), fontsize=9 if rehearsal(results) else None)
    else:
        ax.set_xlabel("natural accuracy (%)")
        ax.set_ylabel("AutoAttack accuracy (%)")
        ax.set_title(title("Natural / adversarial accuracy plane (labels: the weight)"), fontsize=9 if rehearsal(results) else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    write_atomic(path, lambda f: fig.savefig(f, format=ext, dpi=120), binary=True)
    return sorted(curves)
