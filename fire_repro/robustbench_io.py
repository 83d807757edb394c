"""RobustBench in and out (docs/robustbench.md).

Out: a finished evaluation at RobustBench's protocol (standard AutoAttack on the first 10,000 test
images; CIFAR-10 at 8/255 Linf or 0.5 L2, CIFAR-100 at 8/255 Linf) becomes the leaderboard's
model_info JSON and a weights file in RobustBench's local model-folder layout, for its WideResNet
with the input normalisation as buffers `mu` and `sigma` (the form of its WRN entries that
normalise, e.g. Rice2020OverfittingNet); export_robustbench.py is the command.

In: eval_autoattack.py evaluates a zoo entry named robustbench:<dataset>/<Linf|L2>/<name> through
robustbench.utils.load_model, which reads <model dir>/<dataset>/<Linf|L2>/<name>.pt (downloading
it first when it is missing and there is a network), with the result JSON, per-image file and
paired intervals of our checkpoints.
"""
import importlib
import os
import re
import sys

import torch

from fire_repro.common import UserError, eps_text
from fire_repro.data import DATASETS

PREFIX = "robustbench:"
THREATS = {"linf": "Linf", "l2": "L2"}  # --norm -> RobustBench's threat model (and folder) name
PROTOCOL_EPS = {("cifar10", "linf"): 8 / 255, ("cifar10", "l2"): 0.5, ("cifar100", "linf"): 8 / 255}
PROTOCOL_IMAGES = 10_000
INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
               "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote")


def robustbench():
    """The robustbench package. Its 1.1.1 imports `autoattack` (the upstream AutoAttack's module
    name) but depends on pyautoattack, the same code under the name `pyautoattack`: the first name is
    pointed at the second unless an `autoattack` is installed."""
    try:
        importlib.import_module("autoattack")
    except ImportError:
        import pyautoattack
        import pyautoattack.state
        sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
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


def zoo_checkpoint(spec, model_dir):
    """A zoo entry in the shape of a checkpoint for eval_autoattack.py: {"args": what a training
    records (data set, norm, the protocol's radius, the row's name), "path": its weights file}. The
    file is downloaded by RobustBench when missing (needs a network); UserError if it cannot be."""
    dataset, norm, name = parse_zoo(spec)
    robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    entries = model_dicts[BenchmarkDataset(dataset)][ThreatModel(THREATS[norm])]
    if name not in entries:
        raise UserError(f"{spec!r} is not in robustbench {_version()}'s model zoo for {dataset} {THREATS[norm]}")
    path = os.path.join(model_dir, dataset, THREATS[norm], f"{name}.pt")
    if not os.path.isfile(path):
        try:
            load_zoo_model(dataset, norm, name, model_dir)  # RobustBench downloads it there
        except Exception as e:  # noqa: BLE001  (offline: requests/gdown raise many kinds)
            raise UserError(f"{path!r} is missing and RobustBench could not download it "
                            f"({type(e).__name__}); copy the file there or rerun with a network") from None
    saved = dict(method="robustbench", method_title=name, method_weight=None, method_order=-1,
                 robustbench=name, dataset=dataset, model=f"robustbench:{name}", norm=norm,
                 eps=PROTOCOL_EPS.get((dataset, norm)), seed=None, val_size=DATASETS[dataset].val_size)
    return dict(args=saved, path=path)


def load_zoo_model(dataset, norm, name, model_dir):
    """The zoo entry's network (images in [0, 1] in, logits out) in eval mode, on the CPU."""
    robustbench()
    from robustbench.utils import load_model
    return load_model(name, model_dir=model_dir, dataset=dataset, threat_model=THREATS[norm]).eval()


def _version():
    from importlib.metadata import version
    return version("robustbench")


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
    name, authors, venue, reported, footnote). Accuracies in % as strings with two decimals."""
    depth, widen = re.fullmatch(r"wrn-(\d+)-(\d+)", record["model"]).groups()
    autoattack = f"{100 * record['autoattack']:.2f}"
    return dict(link=person["link"], name=person["name"], authors=person["authors"],
                additional_data=bool(record.get("aux_data") or record.get("init_from")),
                number_forward_passes=1, dataset=record["dataset"], venue=person["venue"],
                architecture=f"WideResNet-{depth}-{widen}", eps=eps_text(record["eps"]),
                clean_acc=f"{100 * record['natural']:.2f}",
                reported=autoattack if person.get("reported") is None else f"{person['reported']:.2f}",
                autoattack_acc=autoattack, footnote=person.get("footnote"))


def export_weights(ckpt_model, model, classes):
    """RobustBench-named state dict of a checkpoint's `model` tensors, checked by loading it
    (strict) into RobustBench's class, as load_model reads it ({"state_dict": ...})."""
    state = robustbench_state_dict(ckpt_model)
    robustbench_network(model, classes).load_state_dict(state, strict=True)
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in state.items()}}


