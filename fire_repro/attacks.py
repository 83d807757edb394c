"""The attacks every method shares: one projected PGD step in the Linf or L2 norm (every training
attack and the evaluation take it), the cross-entropy PGD of Madry et al. (the evaluation of every
epoch, the Madry and MART training attacks) and the natural / PGD accuracy of a model. Each method's
own training attack (PGD on its regulariser) lives in its training script.

Threat models (--norm): linf = ||x' - x||_inf <= eps, sign-gradient steps; l2 = ||x' - x||_2 <= eps
per image (over all its pixels and channels), steps along the gradient scaled to L2 length 1.
Both keep x' in the [0, 1] box.
"""
import torch
import torch.nn.functional as F

from fire_repro.common import Range

NORMS = ("linf", "l2")
# The radii each threat model allows, in pixel units of [0, 1], the one statement of them (training
# flags, saved arguments, evaluation and results ask it): an Linf radius of 1 already covers the
# whole box; an L2 radius may exceed 1 (MNIST's preset is 2.0) up to about the box's diagonal,
# sqrt(pixels) (55 for CIFAR).
EPS_RANGES = {"linf": Range(0, 1), "l2": Range(0, 100)}


def eps_problem(eps, norm):
    """Why `eps` is not a radius of the threat model `norm` (None if it is): an unknown norm, or a
    radius that is not a finite number in the norm's range."""
    if norm not in NORMS:
        return f"norm must be one of {', '.join(NORMS)}, got {norm!r}"
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps not in EPS_RANGES[norm]:
        return f"{norm} eps must be a number {EPS_RANGES[norm]}, got {eps!r}"
    return None


def upcast_half(logits):
    """float16/bfloat16 logits -> float32; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def perturbation_norm(delta, norm):
    """Per-image size of a perturbation in `norm` (shape (B,))."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else torch.linalg.vector_norm(flat, dim=1)


def _per_image(v, like):
    return v.view(-1, *([1] * (like.dim() - 1)))


def pgd_step(x_adv, grad, x, eps, step_size, norm):
    """One step of projected gradient ascent in `norm`: move x' by step_size along the gradient's
    steepest direction (sign for linf, grad / ||grad||_2 for l2), project onto the eps-ball around x,
    then clamp to [0, 1] (clamping only shrinks each pixel's |x' - x|, so x' stays in the ball)."""
    if norm == "linf":
        x_adv = x_adv + step_size * grad.sign()
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    g_norm = perturbation_norm(grad, "l2").clamp_min(1e-12)  # a zero gradient stays a zero step
    delta = x_adv + step_size * grad / _per_image(g_norm, grad) - x
    scale = (eps / perturbation_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1)
    return (x + delta * _per_image(scale, delta)).clamp(0, 1)


def random_start(x, eps, norm):
    """A uniform random point of the eps-ball around x (Madry et al.), clamped to [0, 1]. In L2 the
    direction is a normalised Gaussian and the radius eps * U^(1/d), d pixels: uniform in the ball."""
    if norm == "linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    noise = torch.randn_like(x)
    d = noise[0].numel()
    radius = eps * torch.rand(len(x), device=x.device, dtype=x.dtype).pow(1 / d)
    noise = noise * _per_image(radius / perturbation_norm(noise, "l2").clamp_min(1e-12), noise)
    return (x + noise).clamp(0, 1)


def cw_margin(logits, y):
    """Carlini-Wagner margin, max_{j != y} z_j - z_y, per sample: > 0 iff misclassified (PGD on
    it is the CW-20 of older papers' tables)."""
    logits = upcast_half(logits)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return z_other - z_y


def attack_pgd_ce(model, x, y, eps, step_size, steps, start="uniform", objective=None, norm="linf"):
    """PGD maximising the cross-entropy in the `norm` eps-ball; returns x'. Caller sets eval mode.

    start: "uniform" in the eps-ball (Madry et al.; our evaluation), "normal" = x + 0.001 N(0, 1)
    (MART's code). objective(logits, y) -> per-sample values replaces the cross-entropy (e.g. the
    CW margin of eval_autoattack.py).
    """
    if objective is None:
        def objective(logits, y):
            return F.cross_entropy(upcast_half(logits), y, reduction="none")
    x_adv = random_start(x, eps, norm) if start == "uniform" else (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(objective(model(x_adv), y).sum(), x_adv)
        x_adv = pgd_step(x_adv.detach(), grad, x, eps, step_size, norm)
    return x_adv.detach()


def evaluate(model, loader, eps, steps, device, norm="linf"):
    """Natural and PGD-`steps` (CE in `norm`, step 2.5 eps / steps) accuracy in float32 and eval mode."""
    model.eval()
    correct = torch.zeros(2, device=device)
    n = 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            correct[0] += (model(x).argmax(1) == y).sum()
        if steps > 0 and eps > 0:
            x = attack_pgd_ce(model, x, y, eps, 2.5 * eps / steps, steps, norm=norm)
        with torch.no_grad():
            correct[1] += (model(x).argmax(1) == y).sum()
        n += len(y)
    nat, adv = (correct / max(n, 1)).tolist()
    return nat, adv
