"""The attacks every method shares: the cross-entropy PGD of Madry et al. (the evaluation of every
epoch, the Madry and MART training attacks) and the natural / PGD accuracy of a model. Each method's
own training attack (PGD on its regulariser) lives in its training script."""
import torch
import torch.nn.functional as F


def upcast_half(logits):
    """float16/bfloat16 logits -> float32; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def attack_pgd_ce(model, x, y, eps, step_size, steps, start="uniform", objective=None):
    """Linf PGD maximising the cross-entropy; returns x'. Caller sets eval mode.

    start: "uniform" in the eps-ball (Madry et al.; our evaluation), "normal" = x + 0.001 N(0, 1)
    (MART's code). objective(logits, y) -> per-sample values replaces the cross-entropy (e.g. the
    CW margin of eval_autoattack.py).
    """
    if objective is None:
        def objective(logits, y):
            return F.cross_entropy(upcast_half(logits), y, reduction="none")
    noise = (torch.empty_like(x).uniform_(-eps, eps) if start == "uniform"
             else 0.001 * torch.randn_like(x))
    x_adv = (x + noise).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(objective(model(x_adv), y).sum(), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def evaluate(model, loader, eps, steps, device):
    """Natural and PGD-`steps` (CE, step 2.5 eps / steps) accuracy in float32 and eval mode."""
    model.eval()
    correct = torch.zeros(2, device=device)
    n = 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            correct[0] += (model(x).argmax(1) == y).sum()
        if steps > 0 and eps > 0:
            x = attack_pgd_ce(model, x, y, eps, 2.5 * eps / steps, steps)
        with torch.no_grad():
            correct[1] += (model(x).argmax(1) == y).sum()
        n += len(y)
    nat, adv = (correct / max(n, 1)).tolist()
    return nat, adv
