"""Today's recipe on top of any method (docs/modern-recipe.md): adversarial weight perturbation
(--awp-gamma), the weight average (--ema) and gradient clipping (--clip-grad-norm). The AWP step is
the SGD update computed at the perturbed point, the perturbation has the size gamma * ||w|| per layer
and is removed up to a bounded rounding, the average is its closed form, and a run with all three
on resumes exactly."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from fire_repro import attacks
from fire_repro import checkpoints
from fire_repro import data
from fire_repro import tables, training
import train_fire
import train_trades

U = 2.0 ** -24  # float32's unit roundoff


def small_net():
    """Conv, BatchNorm, linear: weights (dimension > 1) AWP moves, and BatchNorm statistics it must not."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


def batch(n=16):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(10, (n,), generator=gen), torch.arange(n)


def weights(model):
    return [p for p in model.parameters() if p.dim() > 1]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("script,flags", [
    (train_fire, []), (train_fire, ["--distance", "hellinger"]), (train_trades, []),
    (train_trades, ["--loss", "madry"]), (train_trades, ["--loss", "mart"])])
def test_awp_step_is_the_sgd_update_at_the_perturbed_point(script, flags):
    """One step with --awp-gamma: the weights become w + (the SGD update computed at w + v on the
    x' found at w), v = gamma ||w|| g / ||g|| per layer with g the gradient of the method's own loss
    at w; BatchNorm statistics are those of the training pass alone. The perturbation is removed up
    to float32 rounding: |error| <= 4 u (|w| + |v| + |update|) elementwise, u = 2^-24."""
    args = script.get_args([*flags, "--awp-gamma", "0.02", "--awp-warmup", "1", "--attack-steps", "2",
                            "--lr", "0.5"])
    x, y, idx = batch()
    model = small_net()
    before = state(model)
    # The reference, written out: the ascent pass on one copy, the training step on another.
    ascent = copy.deepcopy(model)
    torch.manual_seed(5)
    loss, _, x_adv = script.train_step(args, ascent, ascent, x, y, idx)
    grads = torch.autograd.grad(loss, weights(ascent))
    v = [args.awp_gamma * w.detach().norm() / (g.norm() + 1e-20) * g for w, g in zip(weights(model), grads)]
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for w, dv in zip(weights(perturbed), v):
            w += dv
    at_perturbed = state(perturbed)
    reference = training.TrainState(args, perturbed, None, torch.device("cpu"))
    training.sgd_update(script.train_step(args, perturbed, perturbed, x, y, idx, None, x_adv)[0],
                       reference.optimizer, reference.scaler)
    update = {k: perturbed.state_dict()[k] - at_perturbed[k] for k in before}
    # The training loop's step
    run = training.TrainState(args, model, None, torch.device("cpu"))
    torch.manual_seed(5)
    run.step(args, script.train_step, (model, model), x, y, idx, epoch=0)
    after = model.state_dict()
    named_v = dict(zip([k for k, p in model.named_parameters() if p.dim() > 1], v))
    for k in before:
        if k in named_v:  # a perturbed weight: w + update, up to the rounding of adding and removing v
            bound = 4 * U * (before[k].abs() + named_v[k].abs() + update[k].abs())
            assert ((after[k] - (before[k] + update[k])).abs() <= bound).all(), k
            assert update[k].abs().max() > 0, k
        else:  # biases, BatchNorm's affine and running statistics: as after the training pass alone
            assert torch.allclose(after[k], perturbed.state_dict()[k], rtol=1e-6, atol=1e-7), k
    assert [float(dv.norm() / w.detach().norm()) for dv, w in zip(v, weights(ascent))] == pytest.approx([0.02] * 2)


def test_awp_perturbation_size_and_what_it_leaves_alone():
    """perturb() moves each conv/linear weight by exactly gamma times its norm, nothing else (biases,
    BatchNorm's weights and running statistics, the self-adaptive targets); restore() puts the
    weights back to within 2 u |w| + u |v|."""
    args = train_fire.get_args(["--awp-gamma", "0.005", "--attack-steps", "1", "--self-adaptive",
                                "--sa-start", "1"])
    x, y, idx = batch()
    model = small_net()
    model(x)  # BatchNorm statistics away from their initial values
    targets = training.SelfAdaptiveTargets(y, 10, args.sa_alpha, args.sa_start, "cpu")
    targets.update(idx, torch.randn(len(y), 10))  # soft, not one-hot
    soft = targets.targets.clone()
    before = state(model)
    awp = training.WeightPerturbation(model, args.awp_gamma)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x_adv = awp.perturb(train_fire.train_step, args, model, x, y, idx, targets, scaler)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= args.eps + 1e-6
    moved = {k for k, p in model.named_parameters() if p.dim() > 1}
    assert moved == {"0.weight", "4.weight"}
    for k, value in model.state_dict().items():
        if k in moved:
            size = (value - before[k]).norm() / before[k].norm()
            assert size.item() == pytest.approx(args.awp_gamma, rel=1e-4), k
        else:
            assert torch.equal(value, before[k]), k
    assert torch.equal(targets.targets, soft)
    awp.restore()
    for k in moved:
        w, w0 = model.state_dict()[k], before[k]
        assert ((w - w0).abs() <= 2 * U * w0.abs() + U * args.awp_gamma * w0.norm()).all(), k


def ce_step(args, model, attack_model, x, y, idx, soft_targets=None, x_adv=None):
    """A deterministic train_step (no attack): the cross-entropy on x."""
    logits = model(x)
    return nn.functional.cross_entropy(logits, y), logits, x


def no_batchnorm_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def _awp_on_rank(rank, world, init, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x, y, _ = batch()
    model = no_batchnorm_net()
    awp = training.WeightPerturbation(model, 0.01)
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)  # each rank its half of the batch
    awp.perturb(ce_step, None, model, x[shard], y[shard], None, None, torch.amp.GradScaler("cpu", enabled=False))
    torch.save([v.clone() for v in awp.v], f"{out}/v{rank}.pt")
    dist.destroy_process_group()


def test_awp_under_ddp_perturbs_by_the_whole_batch(tmp_path):
    """Two gloo processes, each with half of the batch: both ranks compute the same perturbation,
    the one a single process computes from the whole batch (the ranks' gradients are summed; the
    per-layer normalisation removes the factor)."""
    import torch.multiprocessing as mp
    mp.spawn(_awp_on_rank, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    x, y, _ = batch()
    model = no_batchnorm_net()
    awp = training.WeightPerturbation(model, 0.01)
    awp.perturb(ce_step, None, model, x, y, None, None, torch.amp.GradScaler("cpu", enabled=False))
    ranks = [torch.load(tmp_path / f"v{r}.pt") for r in range(2)]
    for v0, v1, v in zip(*ranks, awp.v):
        assert torch.equal(v0, v1) and torch.allclose(v0, v, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_awp_step_under_mixed_precision(dtype):
    """Under autocast the ascent pass keeps the perturbation's size (float16: the loss is scaled,
    not seen by the GradScaler's bookkeeping) and the step stays finite."""
    args = train_fire.get_args(["--awp-gamma", "0.01", "--awp-warmup", "1", "--attack-steps", "1",
                                "--dtype", dtype])
    x, y, idx = batch()
    model = small_net()
    run = training.TrainState(args, model, None, torch.device("cpu"))
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    before = [w.detach().clone() for w in weights(model)]
    with training.autocast(dtype, x.device):
        run.awp.perturb(train_fire.train_step, args, model, x, y, idx, None, run.scaler)
    sizes = [float((w.detach() - b).norm() / b.norm()) for w, b in zip(weights(model), before)]
    assert sizes == pytest.approx([0.01] * 2, rel=1e-3)
    run.awp.restore()
    loss, _, _, grad_norm = run.step(args, train_fire.train_step, (model, model), x, y, idx, epoch=0)
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
    if scale is not None:  # no overflow seen: the scale stays
        assert run.scaler.get_scale() == scale


def test_average_is_its_closed_form():
    """--ema d --ema-start 2: in epoch 1 the average is the model after every step; from epoch 2 on
    a_k = d a_(k-1) + (1 - d) w_k after every step k, from a_0 = the model as epoch 2 begins, so
    after K steps a_K = d^K w_0 + sum_(k=1..K) (1 - d) d^(K-k) w_k, BatchNorm statistics included."""
    args = train_fire.get_args(["--ema", "0.7", "--ema-start", "2", "--attack-steps", "1", "--lr", "0.2"])
    x, y, idx = batch()
    model = small_net()
    run = training.TrainState(args, model, None, torch.device("cpu"))
    for _ in range(2):
        run.step(args, train_fire.train_step, (model, model), x, y, idx, epoch=0)
        assert all(torch.equal(a, b) for a, b in zip(run.ema.module.state_dict().values(),
                                                     model.state_dict().values()) if a.is_floating_point())
    seen = [state(model)]
    for _ in range(4):
        run.step(args, train_fire.train_step, (model, model), x, y, idx, epoch=1)
        seen.append(state(model))
    d, n = args.ema, len(seen) - 1
    for key, value in run.ema.module.state_dict().items():
        if not value.is_floating_point():
            continue
        closed = d ** n * seen[0][key] + sum((1 - d) * d ** (n - k) * seen[k][key] for k in range(1, n + 1))
        assert torch.allclose(value, closed, rtol=1e-5, atol=1e-6), key
        if key.endswith(("weight", "running_mean")):
            assert not torch.allclose(value, seen[-1][key]), key  # an average, not the model
    assert run.evaluated_model() is run.ema.module


def test_clipping_bounds_the_step_and_is_counted():
    """--clip-grad-norm C: the step uses the gradient scaled to norm C when its norm is above C,
    sgd_update returns the norm before clipping, and EpochStats counts the clipped steps."""
    model = small_net()
    x, y, _ = batch()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = nn.functional.cross_entropy(model(x), y) * 100  # a large gradient
    w0 = [p.detach().clone() for p in model.parameters()]
    norm = training.sgd_update(loss, opt, scaler, clip=0.5)
    step = torch.cat([(w - p).flatten() for w, p in zip(w0, model.parameters())])
    assert norm > 0.5 and step.norm().item() == pytest.approx(0.5, rel=1e-4)
    stats = training.EpochStats("cpu", eps=0.3, step_size=0.01, clip=0.5)
    for g in (norm, torch.tensor(0.1), norm):
        stats.add(torch.tensor(1.0), torch.zeros(16, 10), y, g, x, x)
    assert stats.clipped.item() == 2 and stats.batches == 3


@pytest.mark.parametrize("flags,needle", [
    (["--clip-grad-norm", "0"], "--clip-grad-norm"), (["--clip-grad-norm", "inf"], "--clip-grad-norm"),
    (["--awp-gamma", "-0.1"], "--awp-gamma"), (["--awp-gamma", "nan"], "--awp-gamma"),
    (["--awp-warmup", "0"], "--awp-warmup"), (["--ema", "1"], "--ema"), (["--ema", "0"], "--ema"),
    (["--ema-start", "0"], "--ema-start")])
def test_bad_recipe_flags_are_one_line(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        training.cli(train_fire.get_args, flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0]


RECIPE = ["--awp-gamma", "0.01", "--awp-warmup", "1", "--ema", "0.9", "--ema-start", "2",
          "--clip-grad-norm", "0.12", "--attack-steps", "1", "--eval-steps", "1", "--lr", "0.1",
          "--lr-milestones", "1.0"]


def test_recipe_run_resumes_exactly_and_evaluates_the_average(tmp_path):
    """AWP, the average (from epoch 2) and clipping on: 1 epoch + resume to 2 equals 2 epochs
    straight (online weights, average, its count, optimiser); best.pt's `model` is the average, and
    the summary's test numbers and eval_autoattack.py's are that average's and say so (`ema`)."""
    straight = train_fire.main([*RECIPE, "--epochs", "2", "--out-dir", str(tmp_path / "a")])
    train_fire.main([*RECIPE, "--epochs", "1", "--out-dir", str(tmp_path / "b")])
    resumed = train_fire.main([*RECIPE, "--epochs", "2", "--out-dir", str(tmp_path / "b"), "--resume", "auto"])
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key in ("model", "online_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["ema_updates"] == b["ema_updates"] == 21  # the copy of epoch 1, then epoch 2's 20 batches
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                 b["optimizer"]["state"][0].values()))
    assert not all(torch.equal(a["model"][k], a["online_model"][k]) for k in a["model"])
    for key in ("test_nat", "test_pgd", "val_pgd"):
        assert straight[key] == resumed[key], key
    assert straight["ema"] == 0.9
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(0 <= r["clipped"] <= 1 for r in rows) and rows[-1]["clipped"] > 0
    # the test numbers are the average's: evaluate best.pt's `model` on a plain network
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    net = checkpoints.model_from_args(best["args"])
    checkpoints.load_model_state(net, best, "best.pt")
    args = train_fire.get_args(RECIPE)
    _, _, test_set = data.get_datasets(args)
    torch.manual_seed(0)
    nat, _ = attacks.evaluate(net, data.eval_loader(test_set, args, torch.device("cpu")), args.eps, 0, "cpu")
    assert nat == straight["test_nat"]
    # eval_autoattack.py evaluates that average without a flag, and its JSON says so
    import eval_autoattack
    result, = eval_autoattack.main([str(tmp_path / "a" / "best.pt"), "--smoke-aa", "--n-examples", "16",
                                    "--batch-size", "16", "--device", "cpu"])
    assert result["ema"] == 0.9 and tables.result_row_name(result) == "FIRE (lam=12) + AWP + EMA + clip 0.12"
    with torch.no_grad():
        first = net(torch.stack([test_set[i][0] for i in range(16)])).argmax(1)
    assert result["natural"] == (first == torch.tensor([test_set[i][1] for i in range(16)])).float().mean().item()


def test_modern_table_quotes_robustbench():
    """The `modern` table's quoted rows: RobustBench's TRADES and TRADES + AWP (CIFAR-10, WRN-34-10,
    no extra data; TRADES at 0.031, the radius RobustBench evaluated it at, AWP at 8/255), marked as
    quoted from RobustBench, never as measured here."""
    from fire_repro import tables
    rows = {r["defense"]: r for r in tables.quoted_rows("modern")}
    trades = rows["TRADES (beta=6), Zhang et al. 2019 (quoted from RobustBench)"]
    awp = rows["TRADES + AWP, Wu et al. 2020 (quoted from RobustBench)"]
    assert (trades["natural"], trades["autoattack"], awp["natural"], awp["autoattack"]) == (0.8492, 0.5308, 0.8536, 0.5617)
    assert all(r["quoted"] and r["model"] == "wrn-34-10" for r in rows.values())
    assert (trades["eps"], awp["eps"]) == (0.031, 8 / 255)


def test_an_average_longer_than_the_run_is_a_warning(few_digits, tmp_path):
    """--ema whose horizon, 1 / (1 - decay) steps, is more than a fifth of the steps it averages:
    one warning line at the start (console and log.txt) with the steps and a decay whose horizon is
    a tenth of them; that decay, or a long enough run, gives no warning."""
    args = train_fire.get_args(["--ema", "0.99", "--epochs", "2", "--batch-size", "16"])
    train_set = data.get_datasets(args)[0]
    steps = len(data.train_loader(train_set, args, 0, torch.device("cpu")))  # 1,257 images / 16
    line = training.ema_horizon_warning(args, steps)
    assert f"about 100 steps, 63% of the {2 * steps} steps" in line, line
    suggested = 1 - 1 / (0.1 * 2 * steps)
    assert f"--ema {suggested:.3g} averages over 10%" in line
    args.ema = float(f"{suggested:.3g}")
    assert training.ema_horizon_warning(args, steps) is None
    args.ema, args.epochs = 0.99, 20  # 1,580 steps: 6%
    assert training.ema_horizon_warning(args, steps) is None
    args.ema_start = 15  # averages the last 6 epochs only: 474 steps, 21%
    assert "21% of the 474 steps" in training.ema_horizon_warning(args, steps)
    # a real run says it once, at the start (192 images, batch 64: 3 steps)
    out = tmp_path / "run"
    train_fire.main(["--ema", "0.9", "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1",
                     "--out-dir", str(out)])
    warnings = [line for line in (out / "log.txt").read_text().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--ema 0.9 averages over about 10 steps" in warnings[0], warnings
