"""Export an evaluation to RobustBench: its model_info JSON and the weights in RobustBench's form.

The evaluation must be at RobustBench's protocol: eval_autoattack.py's standard AutoAttack on the
first 10,000 test images of CIFAR-10 at 8/255 (Linf) or 0.5 (--norm l2), or of CIFAR-100 at 8/255,
of a WideResNet checkpoint. What a result cannot know (the paper, its authors, its venue) comes
from the flags. Writes, in RobustBench's layouts (docs/robustbench.md):

    <out-dir>/model_info/<dataset>/<Linf|L2>/<name>.json   the leaderboard entry
    <out-dir>/models/<dataset>/<Linf|L2>/<name>.pt         {"state_dict": ...} for its WideResNet

Command:
    python export_robustbench.py runs/c10-l2/autoattack-l2-eps0.5.json --name Picot2021Adversarial \\
        --link https://arxiv.org/abs/2106.06685 --paper "Adversarial Robustness via Fisher-Rao Regularization" \\
        --authors "Marine Picot, Francisco Messina, Malik Boudiaf, Fabrice Labeau, Ismail Ben Ayed, Pablo Piantanida" \\
        --venue "IEEE TPAMI 2022" --out-dir robustbench-export
"""
import os
import re

from fire_repro.checkpoints import load_checkpoint
from fire_repro.common import ArgumentParser, UserError, check_input_file, check_output, cli, read_json, write_atomic, write_json
from fire_repro.data import DATASETS
from fire_repro.results import RESULT_FORMAT, checkpoint_of, result_problem
from fire_repro import robustbench_io


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=str, help="result JSON of eval_autoattack.py (at RobustBench's protocol)")
    p.add_argument("--name", type=str, required=True,
                   help="the entry's name on RobustBench, e.g. Picot2021Adversarial (letters, digits, _ -)")
    p.add_argument("--link", type=str, required=True, help="the paper's URL")
    p.add_argument("--paper", type=str, required=True, help="the paper's title (model_info's `name`)")
    p.add_argument("--authors", type=str, required=True, help="the paper's authors, comma-separated")
    p.add_argument("--venue", type=str, required=True, help="where it was published, e.g. 'ICML 2021'")
    p.add_argument("--reported", type=float, default=None,
                   help="robust accuracy in %% reported in the paper (default: this AutoAttack accuracy)")
    p.add_argument("--footnote", type=str, default=None, help="the leaderboard's footnote (default: none)")
    p.add_argument("--external", type=float, default=None,
                   help="robust accuracy in %% of a stronger evaluation than AutoAttack (model_info's "
                        "`external`, which the leaderboard ranks by; default: none, not written)")
    p.add_argument("--out-dir", type=str, default="robustbench-export", help="folder the two files go into")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of the same --name in --out-dir (default: refuse)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        p.error(f"--name must be letters, digits, _ and -, got {args.name!r}")
    for flag in ("reported", "external"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 100:
            p.error(f"--{flag} is a percentage in [0, 100], got {value}")
    return args


def main(argv=None):
    args = get_args(argv)
    check_input_file(args.result, "result")
    record = read_json(args.result)
    if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT:
        raise UserError(f"{args.result!r} is not a result of eval_autoattack.py")
    problem = result_problem(record, args.result) or robustbench_io.protocol_problem(record)
    if problem:
        raise UserError(f"{args.result!r} cannot go to RobustBench: {problem}")
    if not isinstance(record.get("checkpoint"), str):
        raise UserError(f"{args.result!r} names no evaluated 'checkpoint' (typed by hand?): the export "
                        f"needs its weights; evaluate the checkpoint with eval_autoattack.py")
    threat = robustbench_io.THREATS[record.get("norm") or "linf"]
    info_path = os.path.join(args.out_dir, "model_info", record["dataset"], threat, f"{args.name}.json")
    weights_path = os.path.join(args.out_dir, "models", record["dataset"], threat, f"{args.name}.pt")
    for path in (info_path, weights_path):
        if os.path.lexists(path) and not args.overwrite:
            raise UserError(f"an export named {args.name!r} exists at {path!r}: pass --overwrite to replace "
                            f"it, or choose another --name or --out-dir")
    ckpt_path = checkpoint_of(record, args.result)
    ckpt = load_checkpoint(ckpt_path)  # its SHA-256 is the evaluated one's
    saved = ckpt["args"]
    if (saved["model"], saved["dataset"]) != (record["model"], record["dataset"]):
        raise UserError(f"{args.result!r} says {record['model']} on {record['dataset']}, its checkpoint "
                        f"{ckpt_path!r} holds {saved['model']} on {saved['dataset']}: evaluate the checkpoint again")
    try:
        weights = robustbench_io.export_weights(ckpt["model"], record["model"], DATASETS[record["dataset"]].classes)
    except (RuntimeError, KeyError, ValueError) as e:  # tensors of another network than its name
        raise UserError(f"checkpoint {ckpt_path!r} does not hold a {record['model']}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}") from None
    for path in (info_path, weights_path):
        check_output(path, "output")
    info = robustbench_io.model_info(record, dict(link=args.link, name=args.paper, authors=args.authors,
                                                  venue=args.venue, reported=args.reported,
                                                  footnote=args.footnote, external=args.external))
    import torch
    write_atomic(weights_path, lambda f: torch.save(weights, f), binary=True)
    write_json(info_path, info)
    print(f"{args.result}: {info['architecture']} {record['dataset']} {threat} eps {info['eps']}, clean "
          f"{info['clean_acc']}%, AutoAttack {info['autoattack_acc']}%"
          + (" (unreliable: AutoAttack warned)" if info["unreliable"] else "") + f" -> {info_path}, {weights_path}")
    return info_path, weights_path


if __name__ == "__main__":
    cli(main)
