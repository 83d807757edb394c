"""The checks an evaluation is trusted by: AutoAttack's own checks, each recorded by name
(autoattack.py), and the masking report (sanity.py, eval_autoattack.py --sanity). Deliberately
broken models set them off; a normally trained one passes."""
import json

import pytest
import torch
import torch.nn.functional as F

from fire_repro import tables
from fire_repro.autoattack import AA_CHECKS, accuracies, check_outcomes, evaluate_autoattack, merge_checks
from fire_repro.common import UserError
from fire_repro.results import PASSED, warnings_of
from fire_repro.sanity import masking_report

EPS = 0.1  # the digits' radius (data.DATASETS["digits"])


@pytest.fixture(scope="module")
def digits_net():
    """(a small MLP trained normally on 1,400 of sklearn's 8x8 digits for 200 Adam steps, a few
    seconds; the 100 images after them and their labels). It learns: over 85% test accuracy."""
    from sklearn.datasets import load_digits
    torch.manual_seed(0)
    d = load_digits()
    x, y = torch.tensor(d.data / 16, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(d.target)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        i = torch.randint(0, 1400, (128,))
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x_test, y_test = x[1400:1500], y[1400:1500]
    with torch.no_grad():
        assert (net(x_test).argmax(1) == y_test).float().mean() > 0.85
    return net, x_test, y_test


class Masked(torch.nn.Module):
    """A trained network made to mask its gradients or break AutoAttack's assumptions: `saturate`
    multiplies its logits by 1e4 (softmax saturates: zero cross-entropy gradients), `quantise` rounds
    the input to 5 levels (a gradient of zero almost everywhere), `softmax` returns probabilities,
    `noise` adds fresh noise to every output (a randomised model), `dynamic` takes a gradient in its
    forward pass (a model that changes at inference)."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        if self.kind == "quantise":
            return self.net(torch.round(x * 4) / 4)
        z = self.net(x)
        if self.kind == "dynamic":
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                torch.autograd.grad(self.net(x).sum(), x)
        return {"saturate": 1e4 * z, "softmax": z.softmax(1), "noise": z + torch.randn_like(z)}.get(self.kind, z)


def aa_checks(model, x, y):
    """AutoAttack's checks as the result JSON records them, from the reduced AutoAttack."""
    per_sample, info = evaluate_autoattack(model, x, y, EPS, smoke=True, progress=False)
    acc = accuracies(per_sample, True)
    return per_sample, merge_checks([info["aa_checks"]], acc["natural"], acc["robust_after"])


@pytest.mark.parametrize("kind,check", [("softmax", "range_output"), ("noise", "randomized"),
                                        ("dynamic", "dynamic"), ("quantise", "zero_gradients"),
                                        ("quantise", "square_sr")])
def test_autoattack_checks_warn_by_name_on_a_model_that_breaks_them(kind, check, digits_net):
    """Each of AutoAttack's checks that applies is recorded with its warning under its own name."""
    net, x, y = digits_net
    _, checks = aa_checks(Masked(net, kind).eval(), x[:40], y[:40])
    assert checks[check] != PASSED and checks[check] in "".join(warnings_of({"aa_checks": checks}))
    assert list(checks)[:len(AA_CHECKS)] == list(AA_CHECKS)


def test_a_trained_network_passes_every_autoattack_check(digits_net):
    """All of AutoAttack's checks ran (the network has robust images for every attack) and passed."""
    net, x, y = digits_net
    _, checks = aa_checks(net, x[:40], y[:40])
    assert checks == dict.fromkeys(AA_CHECKS, PASSED)


def test_autoattack_checks_of_chunks_join_and_old_chunks_are_not_recorded():
    """Chunks' checks join (a warning in one chunk is the evaluation's); the Square check is run
    on the whole evaluation's accuracies; a chunk written without checks makes them 'not recorded'."""
    after = {"apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.45, "square": 0.40}
    joined = merge_checks([{"randomized": [], "dynamic": []}, {"randomized": ["random!"]}], 0.9, after)
    assert joined["randomized"] == "random!" and joined["dynamic"] == PASSED
    assert joined["zero_gradients"] == "not run" and joined["square_sr"].startswith("Square Attack has decreased")
    assert merge_checks([{}], 0.9, dict(after, square=0.45))["square_sr"] == PASSED
    assert set(merge_checks([{}, None], 0.9, after).values()) == {"not recorded"}
    assert check_outcomes({"zero_gradients": ["a", "b"]})["zero_gradients"].startswith("a (and 1 more")


@pytest.mark.parametrize("kind,flagged", [
    (None, set()),
    ("saturate", {"radius", "zero_gradients", "loss_rose"}),
    ("quantise", {"radius", "square", "transfer", "zero_gradients", "loss_rose"})])
def test_masking_report_flags_masked_models_and_passes_a_trained_one(kind, flagged, digits_net):
    """The masking report on 100 digits: the normally trained network passes every check; with
    saturated logits the cross-entropy's gradients vanish (PGD stays far from 0% at the whole box,
    the loss does not rise); with a quantised input also Square alone and a transfer from the
    trained network beat AutoAttack's white-box attacks."""
    net, x, y = digits_net
    model = net if kind is None else Masked(net, kind).eval()
    per_sample, _ = aa_checks(model, x, y)
    report = masking_report(model, x, y, EPS, "linf", per_sample["fab-t"], smoke=True, source=net)
    got = {name for name, c in report["checks"].items() if c["flagged"]}
    assert got == flagged, {name: c["detail"] for name, c in report["checks"].items()}
    radius = report["checks"]["radius"]["value"]
    assert list(radius) == ["1x eps", "2x eps", "4x eps", "box"] and all(0 <= v <= 1 for v in radius.values())
    assert all(c["threshold"] for c in report["checks"].values())


def test_eval_sanity_goes_into_the_result_and_is_added_to_a_finished_one(fire_run, tmp_path, capsys):
    """eval_autoattack.py --sanity writes the masking report into the result JSON; asked again it
    is kept, and asked of a finished evaluation without one it is added without attacking again."""
    import eval_autoattack as ea
    best = str(fire_run[0] / "best.pt")
    small = ["--smoke-aa", "--n-examples", "8", "--batch-size", "8", "--device", "cpu", "--out",
             str(tmp_path / "aa.json")]
    plain, = ea.main([best, *small])
    assert "sanity" not in plain
    # a transfer from the run itself (any of its checkpoints) is a white-box attack: refused
    for own in (best, str(fire_run[0] / "last.pt")):
        with pytest.raises(UserError, match="is a checkpoint of the run evaluated"):
            ea.main([best, *small, "--sanity", "--transfer-from", own])
    other = str(tmp_path / "other.pt")  # a checkpoint of another run (another seed) of the same data set
    ckpt = torch.load(best, weights_only=True)
    ckpt["args"]["seed"] += 1
    torch.save(ckpt, other)
    result, = ea.main([best, *small, "--sanity", "--sanity-n", "6", "--transfer-from", other])
    assert "already evaluated" in capsys.readouterr().out  # AutoAttack was not run again
    record = json.loads((tmp_path / "aa.json").read_text())
    assert record == json.loads(json.dumps(result)) and record["autoattack"] == plain["autoattack"]
    sanity = record["sanity"]
    assert sanity["n_examples"] == 6 and sanity["settings"]["transfer_from"]["checkpoint"] == other
    assert set(sanity["checks"]) == {"radius", "square", "transfer", "zero_gradients", "loss_rose"}
    again, = ea.main([best, *small, "--sanity", "--sanity-n", "6", "--transfer-from", other])
    assert again["sanity"] == sanity  # the same report is not computed again
    without, = ea.main([best, *small, "--sanity", "--sanity-n", "6"])
    assert without["sanity"] == sanity and "masking report kept" in capsys.readouterr().out  # its transfer check stays
    assert json.loads((tmp_path / "aa.json").read_text())["sanity"] == sanity
    table = tables.main([str(tmp_path / "aa.json")])
    assert ("⚠1" in table) == bool(warnings_of(record))
