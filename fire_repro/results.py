"""What a result is: the JSON (and per-image .npz) that eval_autoattack.py writes for a checkpoint,
where it goes, what it must hold, and whether an evaluation is finished and whole. Read by
eval_autoattack.py, tables.py and the plan of run_all.sh.

    <run>/autoattack[-<checkpoint>][-l2][-eps<eps>][-val].json   default_out()
    <run>/<same stem>.npz     per image: index, label, natural, apgd-ce ... square [, pgd20, cw]

A result's warnings (AutoAttack's checks, the masking report) are read by warnings_of.
"""
import math
import os

from fire_repro.attacks import eps_problem
from fire_repro.common import eps_text, read_arrays, read_json, sha256_file
from fire_repro.run_folder import missing_run_file

RESULT_KIND = "fire-repro-autoattack/"  # a result JSON's `format`: this kind and its version
RESULT_FORMAT = RESULT_KIND + "1"
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack's standard order
RESULT_FIELDS = {"defense": (str, type(None)), "method": str, "method_title": str, "method_order": int, "dataset": str,
                 "model": str, "eps": (int, float), "seed": (int, type(None)), "natural": (int, float),
                 "autoattack": (int, float), "avg_acc": (int, float), "n_examples": int, "split": str,
                 "train_identity": dict}  # seed None: a model without one (a RobustBench entry)
# Values a result's numbers may take: accuracies are shares of images; the radii `eps` (in the
# evaluation's norm) and `train_eps` (in the training's) are those their norm allows (attacks.eps_problem).
UNIT = (0.0, 1.0)
RESULT_RANGES = {"natural": UNIT, "autoattack": UNIT, "avg_acc": UNIT, "pgd20": UNIT, "cw": UNIT,
                 "n_examples": (1, math.inf), "seed": (0, math.inf),
                 "train_time_s": (0.0, math.inf), "pretrain_time_s": (0.0, math.inf)}
# AutoAttack's checks (`aa_checks`: check -> "passed", its warning, or "not run"; autoattack.AA_CHECKS)
# and the masking report (`sanity`, sanity.py) are optional fields of the same format: a result
# written before them lacks them and reads as "not recorded", not as a failure.
PASSED, NOT_RUN, NOT_RECORDED = "passed", "not run", "not recorded"
OPTIONAL = ("pgd20", "cw", "train_eps", "train_time_s", "pretrain_time_s", "seed")  # may be absent or null


def default_out(checkpoint, eps=None, train_eps=None, split="test", norm="linf"):
    """<run>/autoattack[-<name>][-l2][-eps<eps>][-val].json: different checkpoints, threat models,
    radii and splits never share a file (an Linf result's name has no norm, as before --norm)."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    name = "autoattack" + ("" if stem == "best" else f"-{stem}") + ("" if norm == "linf" else f"-{norm}")
    if eps is not None and train_eps is not None and abs(eps - train_eps) > 1e-9:
        name += f"-eps{eps_text(eps, sep='-')}"
    if split != "test":
        name += f"-{split}"
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name + ".json")


def settings_change(old, new):
    """'n_examples 32 -> 16, ...' for the evaluation settings that differ; '' when none do."""
    old = old if isinstance(old, dict) else {}
    return ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])


def checkpoint_of(record, json_path):
    """The evaluated checkpoint: its recorded path, else the file of that name beside the JSON
    (a run folder moved as a whole); None if neither exists."""
    recorded = record["checkpoint"]
    beside = os.path.join(os.path.dirname(os.path.abspath(json_path)), os.path.basename(str(recorded)))
    return next((p for p in (str(recorded), beside) if os.path.isfile(p)), None)


_PER_SAMPLE = {}


def per_image_path(record, json_path):
    """The result's per-image .npz: its `per_sample` name (else the JSON's stem) beside the JSON."""
    name = record.get("per_sample") or os.path.splitext(os.path.basename(json_path))[0] + ".npz"
    return os.path.join(os.path.dirname(json_path), str(name))


def read_per_image(record, json_path):
    """The result's per-image arrays if its .npz is whole (every array readable, an image index
    and the AutoAttack verdict for each of its n_examples images), else None (missing or damaged)."""
    path = per_image_path(record, json_path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_size, st.st_mtime_ns, record.get("n_examples"))  # a rewritten file is read again
    if key not in _PER_SAMPLE:
        arrays = read_arrays(path)
        whole = arrays is not None and all(
            k in arrays and arrays[k].shape == (record.get("n_examples"),) for k in ("index", "square"))
        _PER_SAMPLE[key] = arrays if whole else None
    return _PER_SAMPLE[key]


def other_result_format(record):
    """Whether `record` is a result JSON of another version of this code (its `format` is of this
    kind, not RESULT_FORMAT): not readable here, and never taken for a file that is not a result."""
    fmt = record.get("format") if isinstance(record, dict) else None
    return isinstance(fmt, str) and fmt.startswith(RESULT_KIND) and fmt != RESULT_FORMAT


# How far a result's totals may lie from what they are computed from: float rounding of a mean
# over at most 10^7 images, and half the last digit the tables show (0.01 %) for a hand-typed avg_acc.
MEAN_TOL = 1e-6
AVG_TOL = 5e-5


def value_problem(record):
    """Why a result's fields are not a result's (None if they are): not a JSON object, a field
    missing or of the wrong type, or a number that is not finite or outside its range (an accuracy
    of 7.5, a NaN, n_examples 0)."""
    if not isinstance(record, dict):
        return f"not a result (a JSON {type(record).__name__}, not an object)"
    if other_result_format(record):
        return f"a result of format {record['format']!r}, this code reads {RESULT_FORMAT!r}: evaluate again"
    if record.get("format") != RESULT_FORMAT:
        return f"not a result of eval_autoattack.py (its 'format' is not {RESULT_FORMAT!r})"
    for key, kind in RESULT_FIELDS.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            return f"not a complete result ({key!r} missing or of the wrong type)"
    checks, sanity = record.get("aa_checks", {}), record.get("sanity", {})
    if not (isinstance(checks, dict) and all(isinstance(v, str) for v in checks.values())):
        return "not a complete result ('aa_checks' is not an object of texts)"
    if not (isinstance(sanity, dict) and isinstance(sanity.get("checks", {}), dict)
            and all(isinstance(c, dict) for c in sanity.get("checks", {}).values())):
        return "not a complete result ('sanity' is not an object with an object of checks)"
    for key, norm in (("eps", record.get("norm")), ("train_eps", record["train_identity"].get("norm"))):
        problem = None if key in OPTIONAL and record.get(key) is None else eps_problem(record.get(key), norm or "linf")
        if problem:  # no norm: Linf, the paper's threat model
            return f"impossible {key}: {problem}"
    for key, (low, high) in RESULT_RANGES.items():
        value = record.get(key)
        if value is None and key in OPTIONAL:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"not a complete result ({key!r} is not a number)"
        if not (math.isfinite(value) and low <= value <= high):
            return f"impossible value {key}={value!r} (allowed: finite, in [{low:g}, {high:g}])"
    # an image robust to AutoAttack is classified correctly first (autoattack.autoattack_batch)
    if record["autoattack"] > record["natural"] + MEAN_TOL:
        return f"AutoAttack accuracy {record['autoattack']!r} above the natural one {record['natural']!r}"
    if abs(record["avg_acc"] - (record["natural"] + record["autoattack"]) / 2) > AVG_TOL:
        return f"avg_acc {record['avg_acc']!r} is not the mean of natural and AutoAttack accuracy"
    return None


def totals_problem(record, arrays):
    """Why a result's totals contradict its per-image arrays (None if they agree): an accuracy that
    is not the share of its images, or an image robust to AutoAttack that was misclassified."""
    for key, array in (("autoattack", "square"), ("natural", "natural"), ("pgd20", "pgd20"), ("cw", "cw")):
        if array in arrays and record.get(key) is not None:
            share = float(arrays[array].mean()) if len(arrays[array]) else math.nan
            if not abs(record[key] - share) <= MEAN_TOL:
                return f"{key} {record[key]!r} is not its per-image file's {share!r}"
    if "natural" in arrays and (arrays["square"].astype(bool) & ~arrays["natural"].astype(bool)).any():
        return "its per-image file has images robust to AutoAttack but misclassified"
    return None


def warnings_of(record):
    """What a result was warned of, one line each: AutoAttack's checks that warned (aa_checks),
    any of its aa_warnings that no check holds, and the masking report's flagged checks (sanity). [] for a clean result. A warned result still counts: the
    tables show it with a mark and these lines."""
    lines = [f"AutoAttack's check {name}: {outcome}" for name, outcome in (record.get("aa_checks") or {}).items()
             if outcome not in (PASSED, NOT_RUN, NOT_RECORDED)]
    told = "\n".join(lines)  # a warning no check holds (an older result, an edited one) is shown too
    lines += [f"AutoAttack: {message}" for message in record.get("aa_warnings") or () if message not in told]
    for name, check in ((record.get("sanity") or {}).get("checks") or {}).items():
        if check.get("flagged"):
            lines.append(f"masking report, {name}: {check.get('detail')}")
    return lines


def result_problem(record, path):
    """Why a result JSON must not go into a table (None if it may): not a result, incomplete, a
    value out of its range, its per-image file damaged or contradicting its totals, or its checkpoint gone or changed since it
    was evaluated (e.g. retrained)."""
    problem = value_problem(record)
    if problem:
        return problem
    per_image = per_image_path(record, path)
    if os.path.exists(per_image):
        arrays = read_per_image(record, path)
        if arrays is None:
            return f"its per-image file {per_image!r} is damaged; evaluate again"
        problem = totals_problem(record, arrays)
        if problem:
            return f"its totals contradict its per-image file {per_image!r}: {problem}; evaluate again"
    if "checkpoint" not in record:
        return None  # typed by hand: no checkpoint to check against
    if not isinstance(record["checkpoint"], str) or not isinstance(record.get("checkpoint_sha256"), str):
        return "not a complete result ('checkpoint' or 'checkpoint_sha256' missing or not text)"
    ckpt = checkpoint_of(record, path)
    if ckpt is None:
        return f"its checkpoint {record['checkpoint']!r} {missing_run_file(record['checkpoint'])}"
    if sha256_file(ckpt) != record["checkpoint_sha256"]:
        return f"its checkpoint {ckpt!r} has changed since it was evaluated (retrained?); evaluate again"
    return None


def finished(path, checkpoint_sha256, settings):
    """(the result JSON at `path` if it is whole and comes from this checkpoint (hash) and these
    evaluation settings, with its per-image file whole, else None; why an existing JSON would be
    replaced, else None). The one answer to "is this evaluation done", for eval_autoattack.py
    and for the plan of run_all.sh."""
    if not os.path.exists(path):
        return None, None
    record = read_json(path)
    if record is None:
        return None, "it is not whole JSON (damaged)"
    if not (isinstance(record, dict) and record.get("format") == RESULT_FORMAT):
        return None, "it is not a result of eval_autoattack.py"
    if record.get("checkpoint_sha256") != checkpoint_sha256:
        return None, "it was evaluated on another checkpoint (other SHA-256)"
    changed = settings_change(record.get("settings"), settings)
    if changed:
        return None, f"it was evaluated with other settings ({changed}; --overwrite)"
    problem = result_problem(record, path)
    if problem:
        return None, problem
    return record, None


# ---- corruption results (python -m fire_repro.corruptions) --------------------------------------
#     <run>/corruptions[-<checkpoint>].json   corruptions_out(): accuracy per corruption and severity,
#     corruption_mean (each corruption over its severities) and mean (over all), with the identity
#     fields of an AutoAttack result (method, dataset, model, seed, train_identity, checkpoint_sha256, settings)
CORRUPTIONS_FORMAT = "fire-repro-corruptions/1"


def corruptions_out(checkpoint):
    """<run>/corruptions[-<name>].json: <name> for <name>.pt other than best.pt."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    name = "corruptions" + ("" if stem == "best" else f"-{stem}")
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name + ".json")


def corruption_problem(record, path):
    """Why a corruption result must not go into a table (None if it may): not one, incomplete, an
    accuracy outside [0, 1], or its checkpoint gone or changed since it was evaluated."""
    if not (isinstance(record, dict) and record.get("format") == CORRUPTIONS_FORMAT):
        return f"not a result of fire_repro.corruptions (its 'format' is not {CORRUPTIONS_FORMAT!r})"
    acc = record.get("accuracy")
    values = [a for v in acc.values() for a in v] if isinstance(acc, dict) and all(
        isinstance(v, list) for v in acc.values()) else None
    if not values or not isinstance(record.get("mean"), (int, float)) or not isinstance(record.get("train_identity"), dict):
        return "not a complete corruption result ('accuracy', 'mean' or 'train_identity' missing)"
    if not all(isinstance(a, (int, float)) and math.isfinite(a) and 0 <= a <= 1 for a in [*values, record["mean"]]):
        return "impossible accuracy (allowed: finite, in [0, 1])"
    ckpt = checkpoint_of(record, path) if isinstance(record.get("checkpoint"), str) else None
    if ckpt is None:
        return f"its checkpoint {record.get('checkpoint')!r} {missing_run_file(str(record.get('checkpoint')))}"
    if sha256_file(ckpt) != record.get("checkpoint_sha256"):
        return f"its checkpoint {ckpt!r} has changed since it was evaluated (retrained?); evaluate again"
    return None


def finished_corruptions(path, checkpoint_sha256, settings):
    """The corruption result at `path` if it is whole and comes from this checkpoint and these
    settings, else None: "is this corruption evaluation done", for the command and the plan."""
    record = read_json(path) if os.path.exists(path) else None
    if (not isinstance(record, dict) or record.get("checkpoint_sha256") != checkpoint_sha256
            or record.get("settings") != settings or corruption_problem(record, path)):
        return None
    return record
