"""The L2 threat model (--norm l2): every method's training attack stays in the L2 ball and the
[0, 1] box and climbs its objective, the step is a normalised-gradient step, the presets and the
run identity (an Linf run's name does not move), a digits run that learns in L2, and AutoAttack's
L2 version on it."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fire_repro import data
import eval_autoattack
from fire_repro import results
import train_fire
import train_trades
from fire_repro.attacks import attack_pgd_ce, perturbation_norm, pgd_step, random_start
from conftest import cli_error, run_script
from fire_repro.checkpoints import load_model
from models import get_model

TOL = 1e-5  # float32 rounding of a projection onto a radius of about 1


def random_smallcnn():
    torch.manual_seed(0)
    model = get_model("smallcnn", 10).eval()
    # A zero-initialised last layer gives identical outputs for every input: use a random one.
    nn.init.normal_(model[1].classifier[-1].weight, std=0.5)
    return model


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


# (attack(model, x, y, steps) -> x', objective(natural logits, adversarial logits, y) per image)
ATTACKS = {
    "fire": (lambda m, x, y, eps, s: train_fire.attack_fire(m, x, eps, eps / 4, s, norm="l2"),
             lambda nat, adv, y: train_fire.fisher_rao_sq(nat, adv)),
    "hellinger": (lambda m, x, y, eps, s: train_fire.attack_fire(m, x, eps, eps / 4, s, train_fire.hellinger_sq, "l2"),
                  lambda nat, adv, y: train_fire.hellinger_sq(nat, adv)),
    "trades": (lambda m, x, y, eps, s: train_trades.attack_trades(m, x, eps, eps / 4, s, "l2"),
               lambda nat, adv, y: train_trades.kl_per_sample(nat, adv)),
    "madry": (lambda m, x, y, eps, s: attack_pgd_ce(m, x, y, eps, eps / 4, s, norm="l2"),
              lambda nat, adv, y: ce(adv, y)),
    "mart": (lambda m, x, y, eps, s: attack_pgd_ce(m, x, y, eps, eps / 4, s, start="normal", norm="l2"),
             lambda nat, adv, y: ce(adv, y)),
}


@pytest.mark.parametrize("method", list(ATTACKS))
def test_l2_attack_stays_in_ball_and_box_and_climbs_its_objective(method):
    attack, objective = ATTACKS[method]
    model, (x, y) = random_smallcnn(), data.load_digits_tensors()
    x, y, eps = x[:32], y[:32], 1.0
    torch.manual_seed(0)
    x_start = attack(model, x, y, eps, 0)  # the random start alone
    torch.manual_seed(0)
    x_adv = attack(model, x, y, eps, 10)
    assert (perturbation_norm(x_adv - x, "l2") <= eps + TOL).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        nat = model(x)
        before, after = objective(nat, model(x_start), y), objective(nat, model(x_adv), y)
    assert after.mean() > before.mean()
    assert (after >= before - 1e-6).float().mean() > 0.9  # almost every image climbs, not only on average
    # the attack uses the L2 ball, not an Linf box of the same radius: some pixel moves by less than
    # eps while the image moves by more than eps / 2 in L2
    assert (perturbation_norm(x_adv - x, "l2") > eps / 2).float().mean() > 0.9


def test_l2_step_has_length_step_size_and_projects_onto_the_ball():
    x = torch.full((4, 1, 28, 28), 0.5)  # far from the box's faces: no clamping
    grad = torch.randn_like(x) * torch.tensor([1e-3, 1.0, 10.0, 1e3]).view(-1, 1, 1, 1)
    step = pgd_step(x, grad, x, eps=1.0, step_size=0.3, norm="l2")
    assert torch.allclose(perturbation_norm(step - x, "l2"), torch.full((4,), 0.3), atol=TOL)
    # the direction is the gradient's
    cos = F.cosine_similarity((step - x).flatten(1), grad.flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones(4), atol=1e-5)
    far = pgd_step(x, grad, x, eps=0.1, step_size=0.3, norm="l2")
    assert torch.allclose(perturbation_norm(far - x, "l2"), torch.full((4,), 0.1), atol=TOL)
    # a zero gradient is a zero step, not NaN
    assert torch.equal(pgd_step(x, torch.zeros_like(x), x, 1.0, 0.3, "l2"), x)


def test_l2_random_start_fills_the_ball():
    torch.manual_seed(0)
    x = torch.full((2000, 1, 2, 2), 0.5)  # 4 pixels: radii of a uniform point are eps * U^(1/4)
    radius = perturbation_norm(random_start(x, 0.2, "l2") - x, "l2") / 0.2
    assert (radius <= 1 + TOL).all()
    # P(radius <= r) = r^4 for a uniform point of the 4-dimensional ball: at r = 0.5, 1/16
    assert abs((radius <= 0.5).float().mean().item() - 1 / 16) < 0.02  # 4.5 binomial std at n=2000


# ---- presets and identity


def identity(capsys, *argv):
    """`train_fire.py --print-identity ARGV`'s output, run in this process."""
    capsys.readouterr()
    assert train_fire.main(["--print-identity", *argv]) is None
    return capsys.readouterr().out.strip()


def test_linf_identity_unchanged_and_l2_its_own(capsys):
    # the hash that names a default FIRE digits run folder (the paper's threat model: no norm in it)
    assert identity(capsys) == identity(capsys, "--norm", "linf") == "5c3a5dac0066"
    assert identity(capsys, "--norm", "l2") != identity(capsys)


def test_l2_preset_from_the_data_set_and_flags_override_it():
    args = train_fire.get_args(["--norm", "l2"])
    assert (args.eps, args.step_size) == (data.DATASETS["digits"].l2_preset["eps"],
                                          data.DATASETS["digits"].l2_preset["step_size"])
    assert train_fire.get_args(["--norm", "l2", "--eps", "0.7"]).eps == 0.7
    assert train_trades.get_args(["--norm", "l2", "--dataset", "mnist5k"]).eps == 2.0
    assert train_trades.get_args(["--norm", "l2", "--dataset", "cifar10"]).eps == 128 / 255


@pytest.mark.parametrize("argv, message", [
    (["--norm", "l2", "--dataset", "imagenet32"], "no preset for imagenet32"),
    (["--eps", "2"], "--eps must be in [0, 1]"),  # an Linf radius above 1 covers the whole box
    (["--norm", "l2", "--eps", "200"], "--eps must be in [0, 100]"),
])
def test_bad_norm_settings_are_one_line(argv, message, capsys):
    code, lines = cli_error(train_fire.main, [*argv, "--print-identity"], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_result_files_of_two_norms_never_collide():
    a = results.default_out("runs/x/best.pt", 0.5, 0.5, "test", "l2")
    assert a.endswith("autoattack-l2.json") and a != results.default_out("runs/x/best.pt", 0.5, 0.5)


# ---- a digits run in L2 learns; AutoAttack L2 on it

L2_RUN = ["--norm", "l2", "--epochs", "4", "--lr", "0.1", "--attack-steps", "5", "--eval-steps", "10",
          "--step-size", "0.4", "--device", "cpu"]


@pytest.fixture(scope="module")
def l2_runs(tmp_path_factory):
    """Summaries of a 4-epoch FIRE run in L2 on digits and of the same run undefended (lam 0)."""
    out = tmp_path_factory.mktemp("l2")
    summaries = {}
    for name, extra in (("fire", []), ("plain", ["--lam", "0"])):
        r = run_script("train_fire.py", *L2_RUN, *extra, "--out-dir", str(out / name))
        assert r.returncode == 0, r.stderr
        summaries[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return out, summaries


def test_l2_digits_run_learns_robustness(l2_runs):
    _, s = l2_runs
    assert s["fire"]["norm"] == "l2" and s["fire"]["eps"] == data.DATASETS["digits"].l2_preset["eps"]
    assert s["fire"]["test_nat"] > 0.5  # chance is 0.1
    # L2 PGD-10 accuracy at the preset's radius, FIRE against the undefended run
    assert s["fire"]["test_pgd"] > s["plain"]["test_pgd"] + 0.2, s


def test_autoattack_l2_on_the_l2_run(l2_runs):
    out, _ = l2_runs
    result = eval_autoattack.main([str(out / "fire" / "best.pt"), "--smoke-aa", "--n-examples", "16",
                                   "--pgd20", "--device", "cpu"])[0]
    path = out / "fire" / "autoattack-l2.json"
    saved = json.loads(path.read_text())
    assert saved["norm"] == "l2" and saved["settings"]["norm"] == "l2" and saved == json.loads(json.dumps(result))
    assert saved["max_perturbation"] <= saved["eps"] + TOL
    assert saved["autoattack"] <= saved["pgd20"] + 1e-9 or saved["autoattack"] <= saved["natural"]
    # an Linf evaluation of the L2 run needs its radius, and goes to another file
    with pytest.raises(Exception, match="--eps"):
        eval_autoattack.main([str(out / "fire" / "best.pt"), "--norm", "linf", "--device", "cpu"])


# ---- a radius is checked against its norm, in one place (attacks.EPS_RANGES)

TINY_L2 = ["--norm", "l2", "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1", "--device", "cpu"]


def test_l2_radius_above_1_trains_resumes_and_evaluates(tmp_path, few_digits, capsys):
    """An L2 radius above 1 (MNIST's preset is 2.0) is a radius of its norm everywhere: the run's
    final test reads best.pt, --resume and load_model read it, evaluation takes it and an Linf
    evaluation of it at 0.3 makes a valid result; an Linf radius above 1 stays refused."""
    out = tmp_path / "run"
    summary = train_fire.main([*TINY_L2, "--eps", "1.5", "--out-dir", str(out)])
    assert summary["eps"] == 1.5 and summary["norm"] == "l2"
    train_fire.main([*TINY_L2, "--eps", "1.5", "--epochs", "2", "--out-dir", str(out), "--resume", "auto"])
    load_model(str(out / "best.pt"))
    for flags in ([], ["--norm", "linf", "--eps", "0.3"]):
        result = eval_autoattack.main([str(out / "best.pt"), "--smoke-aa", "--n-examples", "8", "--device", "cpu", *flags])[0]
        assert results.value_problem(json.loads(json.dumps(result))) is None
    code, lines = cli_error(eval_autoattack.main, [str(out / "best.pt"), "--norm", "linf", "--eps", "1.5"], capsys)
    assert code == 2 and len(lines) == 1 and "linf eps must be a number in [0, 1]" in lines[0], lines


def test_result_of_an_unknown_norm_or_radius_is_refused(tmp_path):
    from conftest import write_result
    assert results.value_problem(write_result(tmp_path, "ok", [1, 0], norm="l2", eps=2.0)) is None
    for bad, message in ((dict(norm="l3"), "norm must be one of linf, l2, got 'l3'"),
                         (dict(eps=2.0), "linf eps must be"), (dict(norm="l2", eps=200.0), "l2 eps must be")):
        assert message in results.value_problem(write_result(tmp_path, "bad", [1, 0], **bad))
