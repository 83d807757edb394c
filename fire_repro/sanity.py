"""The masking report: does an evaluation's robust accuracy come from robustness, or from gradients
that do not point the way to an adversarial example (gradient masking)? The checks of Carlini et
al. 2019 ("On evaluating adversarial robustness") and Pintor et al. 2022 ("Indicators of attack
failure"), each with its threshold (THRESHOLDS; docs/evaluation.md#the-masking-report), run by
`eval_autoattack.py --sanity` on the first images of an evaluation:

    radius          robust accuracy under PGD-20 (cross-entropy) at 1x, 2x and 4x eps and at the
                    whole box (Linf 1, L2 the box's diagonal): it must fall, and reach about 0%
    square          Square alone (black-box) must not beat AutoAttack's white-box attacks
    transfer        PGD-20 x' of another model (--transfer-from) must not beat them either
    zero_gradients  the share of images whose input gradient of the cross-entropy is exactly zero
    loss_rose       the share of images whose cross-entropy did not rise under PGD-20 at eps

The report is the `sanity` field of the result JSON: {"settings", "n_examples", "time_s",
"checks": {name: {"value", "threshold", "flagged", "detail"}}}; a flagged check marks the
result's row in the tables (results.warnings_of).
"""
import time

import torch
import torch.nn.functional as F

from fire_repro.attacks import attack_pgd_ce, upcast_half

# name -> (threshold, its statement in the JSON and the docs). `SLACK`: one point of accuracy,
# the noise of other random starts on a few hundred images.
SLACK = 0.01
THRESHOLDS = {
    "radius": (SLACK, "robust accuracy falls with the radius (each at most 1 point above the smaller "
                      "radius's) and is at most 1% at the whole box"),
    "square": (SLACK, "Square alone at most 1 point below AutoAttack's white-box attacks"),
    "transfer": (SLACK, "transferred x' at most 1 point below AutoAttack's white-box attacks"),
    "zero_gradients": (0.01, "at most 1% of the images with an all-zero input gradient"),
    "loss_rose": (0.05, "the cross-entropy rose under PGD-20 on at least 95% of the images"),
}
RADII = (1, 2, 4)  # multiples of eps, then the whole box
STEPS = 20  # PGD-20, step 2.5 radius / 20, uniform start: the evaluation's PGD-20 (attacks.attack_pgd_ce)


def box_radius(x, norm):
    """The radius at which the ball holds the whole [0, 1] box around any image: 1 in Linf, the
    box's diagonal sqrt(d) in L2. Every image can be moved to one of another class there, so the
    robust accuracy of any attack that works is about 0%."""
    return 1.0 if norm == "linf" else float(x[0].numel()) ** 0.5


def batched(fn, x, y, batch_size):
    """fn(xb, yb) on batches of at most batch_size images, concatenated."""
    return torch.cat([fn(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(upcast_half(model(x)), y, reduction="none")


def correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


def pgd(model, x, y, eps, norm):
    return attack_pgd_ce(model, x, y, eps, 2.5 * eps / STEPS, STEPS, norm=norm)


def zero_gradient(model, x, y):
    """Per image: whether the input gradient of the cross-entropy at x is exactly zero."""
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(upcast_half(model(x)), y, reduction="sum"), x)
    return grad.flatten(1).abs().sum(1) == 0


def check(name, value, flagged, detail):
    threshold, text = THRESHOLDS[name]
    return dict(value=value, threshold=text, flagged=bool(flagged), detail=detail)


def masking_report(model, x, y, eps, norm, whitebox, seed=0, device="cpu", smoke=False, source=None,
                   batch_size=500):
    """The masking report of `model` (eval mode, images in [0, 1] in, logits out) on images x,
    labels y (CPU tensors) at radius eps in `norm`. `whitebox`: per image, robust after
    AutoAttack's white-box attacks (APGD-CE, APGD-T, FAB-T: the evaluation's per-image results);
    `source`: another model (eval mode) whose PGD-20 x' are transferred, or None; smoke: Square
    with 100 instead of 5000 queries (as --smoke-aa). Seeded by `seed`. Returns the `sanity`
    field's "checks" and "time_s" (see the module's docstring)."""
    from pyautoattack.square import SquareAttack
    t0 = time.time()
    torch.manual_seed(seed)
    x, y, whitebox = x.to(device), y.to(device), torch.as_tensor(whitebox, device=device).bool()
    wb = whitebox.float().mean().item()
    checks = {}

    radii = {f"{k}x eps": k * eps for k in RADII}
    radii["box"] = box_radius(x, norm)

    def robust_and_loss_rose(xb, yb, r):  # per image: robust after PGD-20 at r; its loss rose
        x_adv = pgd(model, xb, yb, r, norm)
        return torch.stack([correct(model, x_adv, yb), ce(model, x_adv, yb) > ce(model, xb, yb)], 1)
    acc, rose = {}, None
    for name, r in radii.items():
        got = batched(lambda xb, yb: robust_and_loss_rose(xb, yb, r), x, y, batch_size).float().mean(0)
        acc[name], rose = got[0].item(), got[1].item() if rose is None else rose  # rose: at 1x eps
    rising = [f"{a} {acc[a]:.3f} -> {b} {acc[b]:.3f}" for a, b in zip(acc, list(acc)[1:]) if acc[b] > acc[a] + SLACK]
    box_high = acc["box"] > SLACK
    checks["radius"] = check("radius", acc, rising or box_high, "; ".join(
        rising + [f"robust {acc['box']:.3f} at the whole box (radius {radii['box']:g})"] * box_high)
        or "falls with the radius: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))

    square = SquareAttack(model, p_init=.8, n_queries=100 if smoke else 5000, eps=eps,
                          norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, seed=seed, verbose=False,
                          device=device, resc_schedule=False)
    sq = batched(lambda xb, yb: correct(model, square.perturb(xb, yb), yb), x, y, batch_size).float().mean().item()
    checks["square"] = check("square", dict(square=sq, whitebox=wb), sq < wb - SLACK,
                             f"Square alone {sq:.3f}, white-box {wb:.3f}")

    if source is None:
        checks["transfer"] = dict(value=None, threshold=THRESHOLDS["transfer"][1], flagged=False,
                                  detail="not run (no --transfer-from)")
    else:
        tr = batched(lambda xb, yb: correct(model, pgd(source, xb, yb, eps, norm), yb), x, y,
                     batch_size).float().mean().item()
        checks["transfer"] = check("transfer", dict(transfer=tr, whitebox=wb), tr < wb - SLACK,
                                   f"transferred {tr:.3f}, white-box {wb:.3f}")

    zero = batched(lambda xb, yb: zero_gradient(model, xb, yb), x, y, batch_size).float().mean().item()
    checks["zero_gradients"] = check("zero_gradients", zero, zero > THRESHOLDS["zero_gradients"][0],
                                     f"{zero:.1%} of the images have an all-zero input gradient")

    checks["loss_rose"] = check("loss_rose", rose, 1 - rose > THRESHOLDS["loss_rose"][0],
                                f"the cross-entropy rose on {rose:.1%} of the images under PGD-20")
    return dict(checks=checks, time_s=time.time() - t0)
