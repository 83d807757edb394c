"""RobustBench in and out (docs/robustbench.md).

Out: a finished evaluation at RobustBench's protocol (standard AutoAttack on the first 10,000 test
images; CIFAR-10 at 8/255 Linf or 0.5 L2, CIFAR-100 at 8/255 Linf) becomes the leaderboard's
model_info JSON and a weights file in RobustBench's local model-folder layout, for its WideResNet
with the input normalisation as buffers `mu` and `sigma` (the form of its WRN entries that
normalise, e.g. Rice2020OverfittingNet); export_robustbench.py is the command.

In: eval_autoattack.py evaluates a zoo entry named robustbench:<dataset>/<Linf|L2>/<name> at the
radius RobustBench evaluated it at (robustbench_radii.json: 0.031 for four Linf entries, not 8/255),
with its network from RobustBench's zoo and its weights <model dir>/<dataset>/<Linf|L2>/<name>.pt
read here with weights_only=True (downloaded by RobustBench first when missing and there is a
network), with the result JSON, per-image file and paired intervals of our checkpoints.

Cross-check: leaderboard_benchmark() runs RobustBench's own robustbench.eval.benchmark with
pyautoattack, so that a number can be checked the leaderboard's way.
"""
import contextlib
import functools
import importlib
import json
import logging
import os
import pickle
import re
import sys
import warnings
from fractions import Fraction

import torch

from fire_repro.autoattack import reduce_to_smoke
from fire_repro.common import UserError, eps_text
from fire_repro.data import DATASETS
from fire_repro.results import warnings_of

PREFIX = "robustbench:"
THREATS = {"linf": "Linf", "l2": "L2"}  # --norm -> RobustBench's threat model (and folder) name
PROTOCOL_EPS = {("cifar10", "linf"): 8 / 255, ("cifar10", "l2"): 0.5, ("cifar100", "linf"): 8 / 255}
PROTOCOL_IMAGES = 10_000
# The fields of the leaderboard's model_info files (RobustBench's repository), in their order;
# `external` (a stronger evaluation's robust accuracy) only when given: RobustBench sorts its
# leaderboard by it as a number when the key is there.
INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
               "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote",
               "unreliable")
# Each zoo entry's radius, as RobustBench's model_info file of the entry states it.
RADII_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "robustbench_radii.json")


def robustbench():
    """The robustbench package. Its 1.1.1 imports `autoattack` (the upstream AutoAttack's module
    name) but depends on pyautoattack, the same code under the name `pyautoattack`: the first name is
    pointed at the second unless an `autoattack` is installed. Its import warns, several lines each,
    that pkg_resources (setuptools) and torch.jit.interface (timm) are deprecated: nothing a user of
    this repository can change, so those two warnings are silenced here, where it is imported."""
    try:
        importlib.import_module("autoattack")
    except ImportError:
        import pyautoattack
        import pyautoattack.state
        sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
        return importlib.import_module("robustbench")


# ---- In: a zoo entry as eval_autoattack.py sees a checkpoint


def is_zoo(spec):
    return spec.startswith(PREFIX)


def parse_zoo(spec):
    """robustbench:<dataset>/<Linf|L2>/<name> -> (dataset, norm, name); UserError otherwise."""
    m = re.fullmatch(r"robustbench:(cifar10|cifar100)/(Linf|L2)/([A-Za-z0-9_.-]+)", spec)
    if not m:
        raise UserError(f"{spec!r}: a RobustBench entry is robustbench:<cifar10|cifar100>/<Linf|L2>/<name>, "
                        f"e.g. robustbench:cifar10/L2/Wu2020Adversarial")
    dataset, threat, name = m.groups()
    return dataset, {v: k for k, v in THREATS.items()}[threat], name


def zoo_radius(dataset, norm, name):
    """The radius RobustBench evaluated the entry at (its model_info's `eps`, e.g. 0.031 for
    Zhang2019Theoretically), None if robustbench_radii.json does not hold the entry."""
    with open(RADII_FILE) as f:
        text = json.load(f)["eps"].get(f"{dataset}/{THREATS[norm]}/{name}")
    return None if text is None else float(Fraction(text))


def zoo_entry(spec):
    """(dataset, norm, name, its model_dicts entry) of robustbench:<dataset>/<threat>/<name>;
    UserError for a board RobustBench does not have, a name outside its zoo, and the entries read
    otherwise than from one weights file in the model folder (timm's, ensembles)."""
    dataset, norm, name = parse_zoo(spec)
    robustbench()
    import timm
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    boards = model_dicts[BenchmarkDataset(dataset)]
    if ThreatModel(THREATS[norm]) not in boards:
        have = ", ".join(t.value for t in boards if t.value in THREATS.values())
        raise UserError(f"{spec!r}: RobustBench has no {dataset} {THREATS[norm]} leaderboard "
                        f"({dataset} boards: {have})")
    entries = boards[ThreatModel(THREATS[norm])]
    if name not in entries:
        raise UserError(f"{spec!r} is not in robustbench {_version()}'s model zoo for {dataset} {THREATS[norm]}")
    entry = entries[name]
    if timm.is_model(f"{name.lower().replace('-', '_')}_{dataset}_{THREATS[norm].lower()}"):
        raise UserError(f"{spec!r} is a timm model (timm downloads its weights, not from the model "
                        f"folder): not evaluated here; cross-check it with leaderboard_benchmark (docs/robustbench.md)")
    if isinstance(entry["gdrive_id"], list):
        raise UserError(f"{spec!r} is an ensemble of {len(entry['gdrive_id'])} networks ({name}.pt_m0.pt, ...): "
                        f"not evaluated here (a result names one weights file); cross-check it with "
                        f"leaderboard_benchmark (docs/robustbench.md)")
    return dataset, norm, name, entry


def zoo_checkpoint(spec, model_dir):
    """A zoo entry in the shape of a checkpoint for eval_autoattack.py: {"args": what a training
    records (data set, norm, RobustBench's radius for the entry, the row's name), "path": its
    weights file, "model": its network with the weights loaded}. The file is downloaded by
    RobustBench when missing (needs a network); UserError if it cannot be, or cannot be loaded."""
    dataset, norm, name, entry = zoo_entry(spec)
    eps = zoo_radius(dataset, norm, name)
    if eps is None:
        raise UserError(f"{spec!r}: its RobustBench radius is not in {RADII_FILE} (written for robustbench "
                        f"1.1.1, installed {_version()}): add it from the entry's model_info file")
    path = os.path.join(model_dir, dataset, THREATS[norm], f"{name}.pt")
    if not os.path.isfile(path):
        from robustbench.utils import download_gdrive_new
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            download_gdrive_new(entry["gdrive_id"], path)
        except Exception as e:  # noqa: BLE001  (offline: requests/gdown raise many kinds)
            raise UserError(f"{path!r} is missing and RobustBench could not download it "
                            f"({type(e).__name__}); copy the file there or rerun with a network") from None
    saved = dict(method="robustbench", method_title=name, method_weight=None, method_order=-1,
                 robustbench=name, dataset=dataset, model=f"robustbench:{name}", norm=norm,
                 eps=eps, seed=None, val_size=DATASETS[dataset].val_size)
    return dict(args=saved, path=path, model=load_zoo_model(entry, name, dataset, path))


def data_only_globals():
    """What a training script saves beside the tensors and weights_only=True may rebuild, as none
    runs code of the file: numpy scalars and dtypes (a best accuracy), argparse.Namespace (the
    arguments)."""
    import argparse
    import numpy as np
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [core.multiarray.scalar, np.dtype, *dtypes, argparse.Namespace]


def load_zoo_model(entry, name, dataset, path):
    """The zoo entry's network (images in [0, 1] in, logits out) in eval mode, on the CPU, its
    weights read from `path` with weights_only=True (no code of the file runs, whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says; numpy scalars and argparse arguments beside the tensors
    are read as data) and unpacked as robustbench.utils.load_model does for
    CIFAR entries; UserError naming the file when it cannot be read or does not fit the network."""
    from robustbench.model_zoo.enums import BenchmarkDataset
    from robustbench.utils import _safe_load_state_dict, rm_substr_from_state_dict
    try:
        with torch.serialization.safe_globals(data_only_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects besides tensors: code would run to rebuild them
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(f"cannot load RobustBench weights {path!r} safely: it holds "
                        f"{unsafe.group(1) if unsafe else 'objects other than tensors'}; only if you trust "
                        f"the file, keep its tensors: python -c \"import torch; c = torch.load('{path}', "
                        f"weights_only=False); torch.save(c.get('state_dict', c), '{path}')\"") from None
    except Exception as e:  # noqa: BLE001  (truncated, empty, random bytes)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load RobustBench weights {path!r}: {first[:200]}") from None
    if isinstance(checkpoint, dict) and ("Kireev2021Effectiveness" in name or name == "Andriushchenko2020Understanding"):
        checkpoint = checkpoint.get("last")  # RobustBench takes the last of 'last' and 'best'
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not (isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values())):
        raise UserError(f"RobustBench weights {path!r} are not a state dict (a dict of tensors)")
    state = rm_substr_from_state_dict(rm_substr_from_state_dict(checkpoint, "module."), "model.")
    model = entry["model"]()
    try:
        _safe_load_state_dict(model, name, state, BenchmarkDataset(dataset))  # strict, as RobustBench
    except RuntimeError as e:
        raise UserError(f"RobustBench weights {path!r} do not fit {name}'s network: "
                        f"{str(e).strip().splitlines()[0][:200]}") from None
    return model.eval()


def _version():
    from importlib.metadata import version
    return version("robustbench")


# ---- Cross-check: RobustBench's own benchmark() with pyautoattack


class UpstreamAutoAttack:
    """pyautoattack's AutoAttack with the upstream AutoAttack's signature, the one
    robustbench.eval.benchmark calls: AutoAttack(model, norm, eps, version, device, log_path) and
    run_standard_evaluation(x, y, bs=..., state_path=...) returning x_adv alone (pyautoattack names
    the batch argument `batch_size`, has no `log_path` and returns (x_adv, y_adv)). `seed` is the
    attacks' seed (upstream's default, None, seeds from the clock: no two runs agree); seed 0 is
    eval_autoattack.py's for its first chunk (autoattack.chunk_seed(0, 0))."""

    def __init__(self, model, norm="Linf", eps=0.3, seed=0, verbose=True, attacks_to_run=(),
                 version="standard", is_tf_model=False, device="cuda", log_path=None, smoke=False):
        from pyautoattack import AutoAttack
        self.log_path = log_path
        self.adversary = AutoAttack(model, norm=norm, eps=eps, version=version, device=device, seed=seed,
                                    attacks=list(attacks_to_run) if version == "custom" else None)
        if smoke:
            reduce_to_smoke(self.adversary)

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
        logger = logging.getLogger("auto-attack")
        handler = logging.FileHandler(self.log_path) if self.log_path else None
        old_level = logger.level
        if handler:
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
        try:
            x_adv, y_adv = self.adversary.run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
        finally:
            if handler:
                logger.removeHandler(handler)
                handler.close()
                logger.setLevel(old_level)
        return (x_adv, y_adv) if return_labels else x_adv


@contextlib.contextmanager
def leaderboard_benchmark(seed=0, smoke=False):
    """robustbench.eval.benchmark, runnable with pyautoattack: inside the `with`, the AutoAttack it
    builds is UpstreamAutoAttack seeded with `seed` (with `smoke`, reduced as --smoke-aa reduces it:
    only to cross-check a smoke evaluation). RobustBench's own evaluation of a model (its data
    loading, clean accuracy, standard AutoAttack, accuracy of x_adv), to cross-check ours:

        with leaderboard_benchmark() as benchmark:
            clean, robust = benchmark(model, n_examples=10_000, dataset="cifar10", threat_model="Linf",
                                      eps=8 / 255, data_dir="data", batch_size=500, device=device)
    """
    robustbench()
    rb_eval = importlib.import_module("robustbench.eval")
    real = rb_eval.AutoAttack
    rb_eval.AutoAttack = functools.partial(UpstreamAutoAttack, seed=seed, smoke=smoke)
    try:
        yield rb_eval.benchmark
    finally:
        rb_eval.AutoAttack = real


# ---- Out: our WideResNet in RobustBench's, and the model_info JSON


def robustbench_network(model, classes=10):
    """RobustBench's class for our `wrn-D-W`: Rice2020OverfittingNet, its WideResNet with the input
    normalisation as buffers mu, sigma (a classifier for `classes` classes), random until a state
    dict is loaded."""
    robustbench()
    from robustbench.model_zoo.cifar10 import Rice2020OverfittingNet
    depth, widen = map(int, re.fullmatch(r"wrn-(\d+)-(\d+)", model).groups())
    net = Rice2020OverfittingNet(depth=depth, widen_factor=widen)
    if classes != net.fc.out_features:
        net.fc = torch.nn.Linear(net.fc.in_features, classes)
    return net


def robustbench_state_dict(ours):
    """Our WRN's state dict (nn.Sequential(Normalize, WideResNet) of models.py) with RobustBench's
    key names: 0.mean/std -> mu/sigma, 1.blocks.<i> -> block<stage>.layer.<j> (n blocks a stage),
    a block's shortcut -> convShortcut, 1.bn -> bn1; the tensors are the same."""
    blocks = sorted({int(k.split(".")[2]) for k in ours if k.startswith("1.blocks.")})
    per_stage = len(blocks) // 3
    out = {}
    for key, value in ours.items():
        parts = key.split(".")
        if parts[0] == "0":
            new = {"mean": "mu", "std": "sigma"}[parts[1]]
        elif parts[1] == "blocks":
            i = int(parts[2])
            rest = ".".join("convShortcut" if p == "shortcut" else p for p in parts[3:])
            new = f"block{i // per_stage + 1}.layer.{i % per_stage}.{rest}"
        elif parts[1] == "bn":
            new = "bn1." + ".".join(parts[2:])
        else:  # conv1, fc
            new = ".".join(parts[1:])
        out[new] = value
    return out


def protocol_problem(record):
    """Why an evaluation is not at RobustBench's protocol (None if it is)."""
    norm = record.get("norm") or "linf"
    eps = PROTOCOL_EPS.get((record.get("dataset"), norm))
    if eps is None:
        return f"RobustBench has no {record.get('dataset')} {THREATS.get(norm, norm)} leaderboard"
    if abs(record["eps"] - eps) > 1e-9:
        return f"evaluated at eps {eps_text(record['eps'])}, RobustBench's {THREATS[norm]} radius is {eps_text(eps)}"
    if record.get("aa_version") != "standard":
        return f"not the standard AutoAttack ({record.get('aa_version')})"
    if record.get("split") != "test" or record.get("n_examples") != PROTOCOL_IMAGES:
        return (f"evaluated on {record.get('n_examples')} {record.get('split')} images, RobustBench's "
                f"protocol is the first {PROTOCOL_IMAGES:,} test images")
    if not re.fullmatch(r"wrn-\d+-\d+", str(record.get("model"))):
        return f"the model is {record.get('model')}: only WideResNets are exported (RobustBench's WideResNet)"
    return None


def model_info(record, person):
    """RobustBench's model_info JSON from a result and what only a person knows (`person`: link,
    name, authors, venue, reported, footnote, external). Accuracies in % as strings with two
    decimals. `unreliable` (the leaderboard's "potentially unreliable" flag; "Unknown" there when
    absent) is true when the result carries a warning (results.warnings_of): one of AutoAttack's
    checks (a randomised model, zero gradients, Square beating the white-box attacks, ...) or a
    flagged check of the masking report."""
    depth, widen = re.fullmatch(r"wrn-(\d+)-(\d+)", record["model"]).groups()
    autoattack = f"{100 * record['autoattack']:.2f}"
    info = dict(link=person["link"], name=person["name"], authors=person["authors"],
                additional_data=bool(record.get("aux_data") or record.get("init_from")),
                number_forward_passes=1, dataset=record["dataset"], venue=person["venue"],
                architecture=f"WideResNet-{depth}-{widen}", eps=eps_text(record["eps"]),
                clean_acc=f"{100 * record['natural']:.2f}",
                reported=autoattack if person.get("reported") is None else f"{person['reported']:.2f}",
                autoattack_acc=autoattack, footnote=person.get("footnote"),
                unreliable=bool(warnings_of(record)))
    if person.get("external") is not None:
        info["external"] = f"{person['external']:.2f}"
    return info


def export_weights(ckpt_model, model, classes):
    """RobustBench-named state dict of a checkpoint's `model` tensors, checked by loading it
    (strict) into RobustBench's class, as load_model reads it ({"state_dict": ...})."""
    state = robustbench_state_dict(ckpt_model)
    robustbench_network(model, classes).load_state_dict(state, strict=True)
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in state.items()}}


