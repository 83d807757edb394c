"""The losses, distances and attacks: the paper's theorems checked numerically (Eq. 15, Theorems
1-4, Proposition 1), the FIRE, TRADES, MART, Madry and Hellinger losses (and label smoothing on each
method's cross-entropy), and the PGD attacks' invariants."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fire_repro import data
from fire_repro import training
import train_fire
import train_trades
from models import get_model
from train_fire import attack_fire, fire_loss, fisher_rao_distance, hellinger_sq
from train_trades import attack_trades, kl_per_sample, mart_loss, trades_loss


def random_logits(n=64, m=10, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, m, generator=g)).to(dtype)


def naive_frd(a, b):
    """Eq. 15 literally, in float64."""
    bc = (F.softmax(a, 1) * F.softmax(b, 1)).sqrt().sum(1)
    return 2 * torch.arccos(bc.clamp(max=1.0))


# ----------------------------------------------------------------------------------------------
# Theorems and properties of the Fisher-Rao distance


def test_frd_matches_eq15():
    a, b = random_logits(seed=1), random_logits(seed=2)
    assert torch.allclose(fisher_rao_distance(a, b), naive_frd(a, b), atol=1e-10)


def test_theorem1_equals_theorem2_for_two_classes():
    h, h2 = random_logits(200, 1, 4.0, 3).squeeze(1), random_logits(200, 1, 4.0, 4).squeeze(1)
    binary = 2 * (torch.arctan(torch.exp(h2 / 2)) - torch.arctan(torch.exp(h / 2))).abs()  # Eq. 9
    logits = torch.stack([torch.zeros_like(h), h], 1)  # h = h_2 - h_1
    logits2 = torch.stack([torch.zeros_like(h2), h2], 1)
    assert torch.allclose(fisher_rao_distance(logits, logits2), binary, atol=1e-10)


def test_proposition1_bound():
    h, h2 = random_logits(500, 1, 6.0, 5).squeeze(1), random_logits(500, 1, 6.0, 6).squeeze(1)
    d = fisher_rao_distance(torch.stack([0 * h, h], 1), torch.stack([0 * h2, h2], 1))
    assert (d <= 0.5 * (h2 - h).abs() + 1e-12).all()
    # and it is tight near h = h' = 0, where the slope of 2 arctan(e^{h/2}) is exactly 1/2
    small = torch.tensor([[0.0, -1e-4]], dtype=torch.float64), torch.tensor([[0.0, 1e-4]], dtype=torch.float64)
    assert fisher_rao_distance(*small).item() == pytest.approx(1e-4, rel=1e-6)


def test_theorem3_inequality_and_second_order():
    a, b = random_logits(seed=7), random_logits(seed=8)
    d, kl = fisher_rao_distance(a, b), kl_per_sample(a, b)
    assert (1 - torch.cos(d / 2) <= kl / 2 + 1e-12).all()
    # KL = d^2 / 2 + O(d^3): the ratio tends to 1 and the remainder over d^3 stays bounded.
    direction = random_logits(seed=9)
    for t in [1e-1, 1e-2, 1e-3]:
        d, kl = fisher_rao_distance(a, a + t * direction), kl_per_sample(a, a + t * direction)
        assert ((kl - d ** 2 / 2).abs() / d ** 3).max() < 5.0
    assert torch.allclose(kl / (d ** 2 / 2), torch.ones_like(d), atol=1e-2)


def test_theorem4_hellinger():
    a, b = random_logits(seed=10), random_logits(seed=11)
    d = fisher_rao_distance(a, b)
    h2 = hellinger_sq(a, b)
    bc = (F.softmax(a, 1) * F.softmax(b, 1)).sqrt().sum(1)
    assert torch.allclose(h2, 2 * (1 - bc), atol=1e-12)  # Eq. 46 squared
    assert torch.allclose(h2, 2 * (1 - torch.cos(d / 2)), atol=1e-12)  # Eq. 47


def test_symmetry_range_and_identity():
    a, b = random_logits(seed=12), random_logits(seed=13)
    d = fisher_rao_distance(a, b)
    assert torch.allclose(d, fisher_rao_distance(b, a), atol=1e-12)
    assert (d >= 0).all() and (d <= math.pi).all() and (d > 0).all()
    assert (fisher_rao_distance(a, a) == 0).all()
    assert (fisher_rao_distance(a, a + 5.0) == 0).all()  # same softmax, shifted logits
    one_hot_0 = torch.tensor([[1e4, -1e4, 0.0]]).float()
    one_hot_1 = torch.tensor([[-1e4, 1e4, 0.0]]).float()
    assert fisher_rao_distance(one_hot_0, one_hot_1).item() == pytest.approx(math.pi, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(train_fire.REGULARISERS))
def test_every_regulariser_is_zero_at_x_and_finite_with_finite_gradients(name, dtype):
    """Every entry of train_fire.REGULARISERS (a user's new one too, with no new test): zero where
    x' = x (same softmax), finite and non-negative with finite gradients at identical, extreme and
    opposite logits, and a finite FIRE risk."""
    regulariser = train_fire.REGULARISERS[name].fn
    same = random_logits(8, 10, 3.0, 14, torch.float32)
    assert (regulariser(same, same.clone()) == 0).all() and (regulariser(same, same + 5.0).abs() < 1e-6).all()
    big = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-1e4, 1e4, 1e4, -1e4]])
    for a, b in [(same, same.clone()), (big, big.clone()), (big, big.flip(1)), (big, -big)]:
        a = a.to(dtype).requires_grad_(True)
        b = b.to(dtype).requires_grad_(True)
        value = regulariser(a, b)
        assert value.shape == (len(a),) and torch.isfinite(value).all() and (value >= 0).all()
        ga, gb = torch.autograd.grad(value.sum(), (a, b))
        assert torch.isfinite(ga.float()).all() and torch.isfinite(gb.float()).all()
        loss = fire_loss(a, b, torch.zeros(len(a), dtype=torch.long), lam=12.0, regulariser=regulariser)
        assert torch.isfinite(loss)


def test_gradient_is_correct():
    a, b = random_logits(4, 5, 2.0, 15).requires_grad_(True), random_logits(4, 5, 2.0, 16)
    assert torch.autograd.gradcheck(lambda x: fisher_rao_distance(x, b).pow(2), (a,))


def test_bfloat16_distance_is_close():
    a, b = random_logits(256, 10, 3.0, 17, torch.float32), random_logits(256, 10, 3.0, 18, torch.float32)
    ref = fisher_rao_distance(a, b)
    low = fisher_rao_distance(a.bfloat16(), b.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max() < 2e-2  # bf16 rounds the logits (8 bits), not the distance


def test_fisher_rao_distance_of_bfloat16_logits():
    """bfloat16 logits give a finite float32 distance, as close to the float32 one as rounding
    allows: d(q(z), q(z + delta)) <= max|delta| (the Fisher metric on logits is Var_q(delta)), and
    bfloat16 moves a logit z by at most |z| 2^-8."""
    gen = torch.Generator().manual_seed(0)
    a, b = 4 * torch.randn(512, 10, generator=gen), 4 * torch.randn(512, 10, generator=gen)
    b[:64] = a[:64] + 1e-3 * torch.randn(64, 10, generator=gen)  # near-identical outputs
    d32 = fisher_rao_distance(a, b)
    d16 = fisher_rao_distance(a.bfloat16(), b.bfloat16())
    assert d16.dtype == torch.float32 and torch.isfinite(d16).all()
    bound = 2.0 ** -8 * (a.abs().amax(1) + b.abs().amax(1))
    assert ((d16 - d32).abs() <= bound + 1e-5).all()
    assert (d16 - d32).abs().max() < 0.1

    # Under autocast, from a bfloat16 layer: finite values and gradients, also at identical inputs
    # (d = 0) and at huge logits.
    layer = torch.nn.Linear(20, 10)
    x = torch.randn(8, 20, generator=gen)
    for scale in (1.0, 1e4):
        x_adv = (x.clone() + torch.cat([torch.zeros(4, 20), 0.01 * torch.randn(4, 20, generator=gen)])
                 ).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_nat, logits_adv = scale * layer(x), scale * layer(x_adv)
            assert logits_adv.dtype == torch.bfloat16
            d = fisher_rao_distance(logits_nat, logits_adv)
        grad, = torch.autograd.grad(d.pow(2).sum(), x_adv)
        assert d.dtype == torch.float32 and torch.isfinite(d).all() and torch.isfinite(grad).all()
        assert (d[:4] == 0).all()


def test_fisher_rao_sq_is_twice_the_kl_for_nearby_distributions():
    """For q' near q, d^2 = 2 KL(q || q') + O(|q - q'|^3) (both are the Fisher metric's quadratic
    form, d^2 with the paper's factor 2 in d = 2 arccos BC): FIRE's lam acts locally like TRADES'
    beta = 2 lam, which docs/mnist5k-stability.md uses to compare their weights."""
    torch.manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float64) * 2
    direction = torch.randn(64, 10, dtype=torch.float64)
    for t, tol in [(1e-2, 2e-2), (1e-3, 2e-3)]:
        ratio = fisher_rao_distance(logits, logits + t * direction).pow(2) / kl_per_sample(logits, logits + t * direction)
        assert torch.allclose(ratio, torch.full_like(ratio, 2.0), atol=tol), ratio


# ----------------------------------------------------------------------------------------------
# The losses of Tables 2 and 3 (FIRE, TRADES, MART, Hellinger, self-adaptive CE, Madry)


def test_fire_loss_lam0_is_ce_and_is_eq7():
    a, b = random_logits(seed=19), random_logits(seed=20)
    y = torch.arange(64) % 10
    assert torch.allclose(fire_loss(a, b, y, 0.0), F.cross_entropy(a, y))
    expected = F.cross_entropy(a, y) + 12.0 * (naive_frd(a, b) ** 2).mean()
    assert torch.allclose(fire_loss(a, b, y, 12.0), expected, atol=1e-9)


def test_trades_loss_matches_hand_computation():
    a, b = random_logits(6, 3, 2.0, 21), random_logits(6, 3, 2.0, 22)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    kl = (p * (p / q).log()).sum() / 6  # batchmean
    assert torch.allclose(trades_loss(a, b, y, 6.0), F.cross_entropy(a, y) + 6.0 * kl)
    assert torch.allclose(trades_loss(a, b, y, 6.0),
                          F.cross_entropy(a, y) + 6.0 * F.kl_div(F.log_softmax(b, 1), p, reduction="batchmean"))


def test_mart_loss_matches_hand_computation():
    a, b = random_logits(6, 4, 2.0, 23), random_logits(6, 4, 2.0, 24)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    top_wrong = q.clone()
    top_wrong[torch.arange(6), y] = 0
    bce = -torch.log(q[torch.arange(6), y]) - torch.log(1 - top_wrong.max(1).values)
    kl = (p * (p / q).log()).sum(1)
    expected = bce.mean() + 5.0 * (kl * (1 - p[torch.arange(6), y])).mean()
    assert torch.allclose(mart_loss(a, b, y, 5.0), expected, atol=1e-10)
    assert torch.allclose(mart_loss(a, b, y, 0.0), bce.mean(), atol=1e-10)  # beta 0: boosted CE


def test_hellinger_regulariser_and_loss():
    a, b = random_logits(8, 5, 2.0, 30), random_logits(8, 5, 2.0, 31)
    y = torch.arange(8) % 5
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    h2 = ((p.sqrt() - q.sqrt()) ** 2).sum(1)  # hand computation of Eq. 46 squared
    expected = F.cross_entropy(a, y) + 3.0 * h2.mean()  # Eq. 48
    assert torch.allclose(fire_loss(a, b, y, 3.0, hellinger_sq), expected, atol=1e-12)
    # FIRE and Hellinger agree to second order for nearby outputs: H^2 = d^2/4 + O(d^4)
    direction = random_logits(8, 5, 1.0, 32)
    for t in [1e-1, 1e-2]:
        d2 = train_fire.fisher_rao_sq(a, a + t * direction)
        assert ((hellinger_sq(a, a + t * direction) - d2 / 4).abs() / d2 ** 2).max() < 0.1


def test_self_adaptive_targets_and_ce():
    labels = torch.tensor([0, 1, 2, 1])
    sa = training.SelfAdaptiveTargets(labels, 3, alpha=0.9, start=3, device="cpu")
    logits = random_logits(2, 3, 2.0, 33).float()
    idx = torch.tensor([1, 3])
    sa.set_epoch(1)  # epoch index 1 = the 2nd epoch < start 3: one-hot
    before = sa.update(idx, logits)
    assert torch.equal(before, F.one_hot(labels[idx], 3).float())
    assert torch.allclose(training.natural_ce(logits, before), F.cross_entropy(logits, labels[idx]))
    sa.set_epoch(2)  # 3rd epoch: t <- 0.9 t + 0.1 softmax
    after = sa.update(idx, logits)
    expected = 0.9 * F.one_hot(labels[idx], 3).float() + 0.1 * F.softmax(logits, 1)
    assert torch.allclose(after, expected) and torch.allclose(sa.targets[idx], expected)
    assert torch.equal(sa.targets[0], torch.tensor([1.0, 0, 0]))  # other rows untouched
    w = expected.max(1).values
    hand = (w * -(expected * F.log_softmax(logits, 1)).sum(1)).sum() / w.sum()
    assert torch.allclose(training.natural_ce(logits, after), hand)
    state = sa.state_dict()
    other = training.SelfAdaptiveTargets(labels, 3, 0.9, 3, "cpu")
    other.load_state_dict(state)
    assert torch.equal(other.targets, sa.targets)


def test_madry_loss_is_adversarial_ce():
    b, y = random_logits(6, 4, 2.0, 34), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(train_trades.madry_loss(b, y), F.cross_entropy(b, y))


def smoothed_ce(logits, y, ls):
    """Wang et al. (2023)'s SmoothCrossEntropyLoss written out: (1 - ls)(-log p_y) + ls mean_k(-log p_k)."""
    log_p = F.log_softmax(logits, 1)
    return ((1 - ls) * -log_p[torch.arange(len(y)), y] - ls * log_p.mean(1)).mean()


def every_loss(a, b, y, soft):
    """{name: loss(label_smoothing)} for every method's loss, on natural logits a and adversarial b."""
    return {"fire": lambda ls: fire_loss(a, b, y, 12.0, label_smoothing=ls),
            "hellinger": lambda ls: fire_loss(a, b, y, 3.0, hellinger_sq, ls),
            "trades": lambda ls: trades_loss(a, b, y, 6.0, ls),
            "self-adaptive": lambda ls: trades_loss(a, b, soft, 6.0, ls),
            "madry": lambda ls: train_trades.madry_loss(b, y, ls),
            "mart": lambda ls: mart_loss(a, b, y, 5.0, ls)}


def test_label_smoothing_zero_changes_no_loss():
    """--label-smoothing 0 (the default) gives every method's loss bit for bit as without the flag."""
    a, b, y = random_logits(seed=40).float(), random_logits(seed=41).float(), torch.arange(64) % 10
    soft = 0.8 * F.one_hot(y, 10).float() + 0.2 * F.softmax(random_logits(seed=42).float(), 1)
    plain = {"fire": fire_loss(a, b, y, 12.0), "hellinger": fire_loss(a, b, y, 3.0, hellinger_sq),
             "trades": trades_loss(a, b, y, 6.0), "self-adaptive": trades_loss(a, b, soft, 6.0),
             "madry": train_trades.madry_loss(b, y), "mart": mart_loss(a, b, y, 5.0)}
    for name, loss in every_loss(a, b, y, soft).items():
        assert torch.equal(loss(0.0), plain[name]), name


@pytest.mark.parametrize("ls", [0.1, 0.4])
def test_label_smoothing_changes_each_methods_ce_as_the_formula_says(ls):
    """--label-smoothing ls replaces each method's cross-entropy by the CE against (1 - ls) one-hot + ls / M
    and leaves the rest of its loss alone: FIRE, Hellinger and TRADES smooth the CE of the natural
    logits (not their regulariser), Madry its CE of x', MART the -log q'(y) of its boosted CE (not the
    margin term or the KL's weight 1 - q(y|x)); self-adaptive soft targets t are smoothed to
    (1 - ls) t + ls / M, weighted by max_j t_j as before."""
    a, b, y = random_logits(seed=43), random_logits(seed=44), torch.arange(64) % 10
    soft = 0.8 * F.one_hot(y, 10).double() + 0.2 * F.softmax(random_logits(seed=45), 1)
    natural = smoothed_ce(a, y, ls) - F.cross_entropy(a, y)       # what smoothing adds to a natural CE
    adversarial = smoothed_ce(b, y, ls) - F.cross_entropy(b, y)   # ... to a CE of x'
    w = soft.max(1).values
    soft_ce = lambda t: (w * -(t * F.log_softmax(a, 1)).sum(1)).sum() / w.sum()  # noqa: E731
    added = {"fire": natural, "hellinger": natural, "trades": natural, "madry": adversarial,
             "mart": adversarial, "self-adaptive": soft_ce((1 - ls) * soft + ls / 10) - soft_ce(soft)}
    for name, loss in every_loss(a, b, y, soft).items():
        assert torch.allclose(loss(ls) - loss(0.0), added[name], rtol=0, atol=1e-12), name
        assert added[name].abs() > 1e-3, name  # and the change is not nothing
    assert torch.allclose(train_trades.madry_loss(b, y, ls), smoothed_ce(b, y, ls), rtol=0, atol=1e-12)
    # one-hot soft targets are the labels: the smoothed soft CE is the smoothed label CE
    assert torch.allclose(training.natural_ce(a, F.one_hot(y, 10).double(), ls), smoothed_ce(a, y, ls),
                          rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Attacks


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return get_model("smallcnn", 10).eval()


def digits_batch(n=32):
    x, y = data.load_digits_tensors()
    return x[:n], y[:n]


@pytest.mark.parametrize("attack", ["fire", "trades"])
def test_pgd_stays_in_ball_and_increases_objective(attack):
    model = tiny_model()
    # A zero-initialised last layer gives identical outputs for every input: use a random one.
    nn.init.normal_(model[1].classifier[-1].weight, std=0.5)
    x, y = digits_batch()
    eps, objective = 0.1, (lambda a, b: fisher_rao_distance(a, b) ** 2) if attack == "fire" else kl_per_sample
    run = (lambda s: attack_fire(model, x, eps, 0.02, s)) if attack == "fire" else \
          (lambda s: attack_trades(model, x, eps, 0.02, s))
    torch.manual_seed(0)
    x_start = run(0)
    torch.manual_seed(0)
    x_adv = run(10)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        nat = model(x)
        start_obj = objective(nat, model(x_start)).mean()
        adv_obj = objective(nat, model(x_adv)).mean()
    assert adv_obj > 100 * start_obj
    # Every sample moved well beyond the 0.001 random start (a zero gradient would freeze it).
    moved = (x_adv - x).flatten(1).abs().max(1).values
    assert (moved > 0.05).all()


def test_pgd_moves_from_tiny_start_in_bfloat16():
    model = tiny_model()
    nn.init.normal_(model[1].classifier[-1].weight, std=0.5)
    x, _ = digits_batch()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack_fire(model, x, 0.1, 0.02, 5)
    moved = (x_adv - x).flatten(1).abs().max(1).values
    assert (moved > 0.05).float().mean() > 0.9


def test_attack_uses_input_gradients_only():
    model = tiny_model()
    x, _ = digits_batch(8)
    attack_fire(model, x, 0.1, 0.02, 3)
    assert all(p.grad is None for p in model.parameters())


def test_bfloat16_and_float32_losses_close():
    model = tiny_model()
    nn.init.normal_(model[1].classifier[-1].weight, std=0.1)
    x, y = digits_batch(64)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    ref = fire_loss(model(x), model(x_adv), y, 12.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fire_loss(model(x), model(x_adv), y, 12.0)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.02 * abs(ref.item())
