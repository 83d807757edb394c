"""The checkpoint format, written and read in this one file.

A checkpoint is a plain dict (torch.save; read with weights_only=True, so loading runs no code):

    format        CHECKPOINT_FORMAT
    args          the run's arguments, presets applied (what rebuilds its model, data and evaluation)
    model         the evaluated weights (with --ema the average)
    epoch, train_time_s, history, best_val_pgd, best_epoch, log_bytes (log.txt's committed length)
    optimizer, scheduler, scaler, rng, method_state (self-adaptive targets or None)
    online_model, ema_updates    with --ema: the weights SGD continues from, the average's count

checkpoint_state() writes it from a training's state, load_checkpoint() checks it whole,
load_train_state() puts it back into a training's state; load_model(path) gives the network alone.
"""
import os
import random

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from fire_repro.attacks import eps_problem
from fire_repro.common import UserError, check_input_file, read_json, sha256_file, write_atomic
from fire_repro.data import DATASETS, dataset_shape
from models import Normalize, check_model_name, get_model

CHECKPOINT_FORMAT = "fire-repro/1"


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, keys.tolist(), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state, path):
    """Write atomically (with fsync): a kill at any moment leaves the previous file at `path` readable."""
    write_atomic(path, lambda f: torch.save(state, f), binary=True, what="checkpoint")


def checkpoint_state(train_state, args, log_bytes):
    """The checkpoint of a training's state (training.TrainState) after its committed epoch."""
    s = train_state
    state = dict(format=CHECKPOINT_FORMAT, model=s.model.state_dict(),
                 optimizer=s.optimizer.state_dict(), scheduler=s.scheduler.state_dict(),
                 scaler=s.scaler.state_dict(), epoch=s.epoch, best_val_pgd=s.best,
                 best_epoch=s.best_epoch, rng=rng_state(), args=vars(args),
                 train_time_s=s.train_time, history=s.history, log_bytes=log_bytes,
                 method_state=None if s.soft_targets is None else s.soft_targets.state_dict())
    if s.ema is not None:  # `model`, which evaluation reads, is the average; SGD resumes from `online_model`
        state.update(model=s.ema.module.state_dict(), online_model=s.model.state_dict(),
                     ema_updates=s.ema.n_averaged.item())
    return state


def load_train_state(train_state, ckpt, path, device, lr_factor):
    """Put a checked --resume checkpoint (load_checkpoint(resuming=True)) back into a training's
    state, so that training continues exactly where the checkpoint was committed. `lr_factor(epoch)`
    is this run's schedule: resuming with a larger --epochs extends a run."""
    s = train_state
    load_model_state(s.evaluated_model(), ckpt, path)
    if s.ema is not None:  # the average is `model`; SGD continues from `online_model`
        s.model.load_state_dict(ckpt["online_model"])
        s.ema.n_averaged.fill_(ckpt["ema_updates"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    for group in s.optimizer.param_groups:  # this machine's SGD kernel, not the saving machine's
        group["fused"] = device.type == "cuda"
    s.scheduler.load_state_dict(ckpt["scheduler"])
    for group, base_lr in zip(s.optimizer.param_groups, s.scheduler.base_lrs):
        group["lr"] = base_lr * lr_factor(s.scheduler.last_epoch)
    s.scaler.load_state_dict(ckpt["scaler"])
    if s.soft_targets is not None:
        s.soft_targets.load_state_dict(ckpt["method_state"])
    set_rng_state(ckpt["rng"])
    s.epoch, s.best, s.best_epoch = ckpt["epoch"], ckpt["best_val_pgd"], ckpt["best_epoch"]
    s.train_time, s.history = ckpt["train_time_s"], ckpt["history"]


def load_checkpoint(path, what="checkpoint", resuming=False):
    """Load a checkpoint of this repository safely (no code runs) and check that it is whole: the
    model's tensors, the stored arguments that rebuild it, and with `resuming` everything --resume
    restores. The one reader of checkpoints (--resume, --init-from, evaluation). Raises UserError
    naming the first missing or malformed piece."""
    check_input_file(path, what)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, corrupt or unsafe pickles all end here)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load checkpoint {path!r}: {first[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path!r} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT})")
    model = ckpt.get("model")
    if not (isinstance(model, dict) and model and all(torch.is_tensor(v) for v in model.values())):
        raise UserError(f"checkpoint {path!r} is incomplete: 'model' is missing or not a dict of tensors")
    # training stops when a quantity becomes NaN, so a checkpoint of this repository never holds one
    odd = next((k for k, v in model.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if odd is not None:
        raise UserError(f"checkpoint {path!r} is damaged: its weights are not finite (NaN or inf in {odd!r})")
    check_saved_args(ckpt.get("args"), path)
    check_model_shapes(ckpt, path)
    for key, kind in {**CHECKPOINT_PARTS, **(RESUME_PARTS if resuming else {})}.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise UserError(f"checkpoint {path!r} is incomplete: {key!r} is missing or not a "
                            f"{kind.__name__ if isinstance(kind, type) else 'number'}")
    if resuming and ckpt["args"].get("self_adaptive") and not (
            isinstance(ckpt.get("method_state"), dict) and torch.is_tensor(ckpt["method_state"].get("targets"))):
        raise UserError(f"checkpoint {path!r} is incomplete: the self-adaptive targets are missing")
    if resuming and ckpt["args"].get("ema") is not None and not (
            isinstance(ckpt.get("online_model"), dict) and isinstance(ckpt.get("ema_updates"), int)):
        raise UserError(f"checkpoint {path!r} is incomplete: the --ema run's online model is missing")
    return ckpt


def damaged_checkpoint(path):
    """Why the checkpoint file at `path` cannot be whole ('truncated or not a checkpoint file'),
    '' when its container is: torch.save writes a zip archive whose directory is at its end, so a
    cut file has none. Cheap (reads the directory only) for the plan of run_all.sh to ask of every
    finished run; load_checkpoint is the full check."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"truncated or not a checkpoint file ({type(e).__name__}: {str(e)[:80]})"
    return ""


CHECKPOINT_PARTS = {"epoch": int, "train_time_s": (int, float)}  # besides the model and its args
RESUME_PARTS = {"optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "history": list,
                "best_val_pgd": (int, float), "best_epoch": int, "log_bytes": int}


def check_saved_args(saved, path):
    """Raise UserError unless a checkpoint's stored arguments describe its run: the fields that
    rebuild the model, its data and its evaluation (method, data set, model name, eps, seed,
    validation size)."""
    if not isinstance(saved, dict):
        raise UserError(f"{path!r} holds no training arguments ('args')")
    model = saved.get("model")
    radius = eps_problem(saved.get("eps"), saved.get("norm", "linf"))  # no norm: trained in Linf
    problems = [
        (isinstance(model, str), f"no model name (got {model!r})"),
        (saved.get("dataset") in DATASETS, f"unknown dataset {saved.get('dataset')!r}"),
        (radius is None, radius),
        (isinstance(saved.get("method"), str), f"no method name (got {saved.get('method')!r})"),
        (isinstance(saved.get("seed"), int), f"no integer seed (got {saved.get('seed')!r})"),
        (isinstance(saved.get("val_size"), int) and saved["val_size"] >= 1,
         f"val_size must be an integer >= 1, got {saved.get('val_size')!r}"),
    ]
    for ok, problem in problems:
        if not ok:
            raise UserError(f"{path!r} does not describe its training run: {problem}")
    try:
        check_model_name(model)
    except ValueError as e:
        raise UserError(f"{path!r} does not describe its model: {e}") from None


class _ShapesOnly(TorchFunctionMode):
    """With torch.device("meta"): in-place operations on meta tensors (a model's weight
    initialisation) are skipped. They change no shape, a meta tensor holding no values, and their
    meta kernels would first import torch's compiler (seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and args and torch.is_tensor(args[0]) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def check_model_shapes(ckpt, path):
    """Raise UserError unless the checkpoint's tensors are those of the model its arguments name,
    tensor by tensor and shape by shape. The model is built on the meta device (shapes only, no
    memory), so that a name edited to a huge network (wrn-256-32) is refused before it is built."""
    with torch.device("meta"), _ShapesOnly():
        shapes = {k: tuple(v.shape) for k, v in model_from_args(ckpt["args"]).state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    odd = sorted(set(shapes) ^ set(saved)) or sorted(k for k in shapes if shapes[k] != saved[k])
    if odd:
        where = "in one of the two only" if odd[0] not in shapes or odd[0] not in saved else \
            f"{saved[odd[0]]} there, {shapes[odd[0]]} in a {ckpt['args']['model']}"
        raise UserError(f"{path!r} does not match model {ckpt['args']['model']!r}: tensor {odd[0]!r} is {where}")


def model_from_args(saved):
    """Rebuild the model described by a checkpoint's stored arguments."""
    return get_model(saved["model"], *dataset_shape(saved["dataset"]))


def load_model_state(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{path!r} does not match model {ckpt['args'].get('model')!r}: "
                        f"{str(e).splitlines()[0][:200]}") from None


def init_from(model, args):
    """--init-from: start `model` from another run's weights (Hendrycks et al. 2019's fine-tuning).

    Every tensor is copied except the input normalisation (this data set's mean and std stay) and,
    when the class counts differ, the classifier (the last nn.Linear, left freshly initialised).
    The source must be the same --model with equal shapes, else UserError. Records in `args` (so in
    this run's checkpoints and summary) the source's SHA-256 and its training time, pre-training
    included. A resumed run ignores --init-from and keeps the record of its checkpoint (train()).
    """
    path = args.init_from
    try:
        ckpt = load_checkpoint(path)
    except UserError as e:
        raise UserError(f"--init-from: {e}") from None
    saved = ckpt["args"]
    if saved.get("model") != args.model:
        raise UserError(f"--init-from {path!r} is a {saved.get('model')}, this run is a {args.model}")
    target = model.state_dict()
    if set(ckpt["model"]) != set(target):
        odd = sorted(set(ckpt["model"]) ^ set(target))
        raise UserError(f"--init-from {path!r} does not hold a {args.model}: {odd[0]!r} is in one "
                        f"of the two networks only ({len(odd)} tensors differ)")
    keep = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Normalize)
            for b in ("mean", "std")}
    head = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    if ckpt["model"][f"{head}.weight"].shape[0] != target[f"{head}.weight"].shape[0]:
        keep |= {k for k in target if k.startswith(f"{head}.")}  # a new classifier
    for key, value in ckpt["model"].items():
        if key in keep:
            continue
        if value.shape != target[key].shape:
            raise UserError(f"--init-from {path!r} ({saved.get('dataset')}) does not fit this "
                            f"{args.dataset} run: {key} is {tuple(value.shape)} there, "
                            f"{tuple(target[key].shape)} here")
        target[key] = value
    model.load_state_dict(target, strict=True)
    args.init_from_sha256 = sha256_file(path)
    source_time = run_training_time(path, ckpt)[0]
    args.pretrain_time_s = source_time + (saved.get("pretrain_time_s") or 0.0)


def load_model(path, device="cpu"):
    """The network of a checkpoint of this repository, in eval mode on `device`: images in [0, 1]
    in, logits out (normalisation is inside the model; with --ema, the average). Raises UserError
    when the file is not a whole checkpoint of this repository.

        from fire_repro.checkpoints import load_model
        model = load_model("runs/fire-digits-s0/best.pt")
        logits = model(images)
    """
    ckpt = load_checkpoint(path)
    model = model_from_args(ckpt["args"])
    load_model_state(model, ckpt, path)
    return model.to(device).eval()


def run_training_time(path, ckpt):
    """Wall-clock training time of the whole run of checkpoint `path` (best.pt only knows the time
    up to its epoch): summary.json of its folder, else its last.pt, else the checkpoint's own.
    Returns (seconds, source, pretrain seconds or None): a run fine-tuned from another
    (--init-from) records that run's time as `pretrain_time_s` in its summary.json."""
    run_dir = os.path.dirname(os.path.abspath(path))
    record = read_json(os.path.join(run_dir, "summary.json"))
    try:
        pretrain = record.get("pretrain_time_s")
        return (float(record["train_time_s"]), "summary.json", None if pretrain is None else float(pretrain))
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    last = os.path.join(run_dir, "last.pt")
    if os.path.isfile(last) and os.path.abspath(last) != os.path.abspath(path):
        try:
            return float(load_checkpoint(last)["train_time_s"]), "last.pt", None
        except (UserError, KeyError, TypeError):
            pass
    return float(ckpt.get("train_time_s", float("nan"))), "checkpoint", None
