"""The logistic-regression / Gaussian model of Section 4 (Figs. 3, 6 and 9) of Picot et al.,
"Adversarial Robustness via Fisher-Rao Regularization".

Model: y in {-1, +1} equally likely, x | y ~ N(y mu, Sigma) in R^2, q(y|x) = sigmoid(y theta^T x)
(Eq. 18), l2 adversary x* = x - eps y theta / ||theta|| (Eq. 19). The script

1. computes the exact natural / adversarial accuracy curve (Eqs. 20-21) over theta = [cos a, sin a],
   its Pareto-optimal set, the MAA (Eq. 24), the natural and adversarial optima (footnote 3) and
   checks the bounds of Proposition 2 (Eqs. 22-23) along the curve;
2. minimises the empirical ACE (Eq. 4), TRADES (Eq. 5), FIRE (Eq. 7) and Hellinger (Eq. 48) risks
   with BFGS from theta = 0 on 10^4 samples per class, for a grid of lambda (footnote 4), and maps
   every solution to its exact accuracies;
3. prints how much of the Pareto set each method reaches, writes results.json and Figs. 3, 6, 9.

Commands (CPU only, numpy / scipy / matplotlib):
    python gaussian_demo.py                          # the protocol as the paper states it
    python gaussian_demo.py --quick                  # small sample and lambda grid, a few seconds
    python gaussian_demo.py --trades-ce nat          # TRADES as in Zhang et al. (CE on natural x)
    python gaussian_demo.py --theta-norm 30          # fix ||theta||_2 = 30, optimise the angle only
    python gaussian_demo.py --adversary worst        # x' maximises each per-sample loss exactly
Outputs go to --out-dir (default runs/gaussian): results.json, fig3.png, fig6.png, fig9.png. Every flag and
--out-dir (created, probe-written) are checked before any work; each output is written to a temporary file
in that folder and renamed onto its name, so an interrupted run never leaves a half-written file. A user
mistake ends with one line `gaussian_demo.py: error: ...` on stderr and exit code 2.
"""
import argparse
import json
import math
import os
import time

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg
from scipy.optimize import minimize, minimize_scalar
from scipy.stats import norm

from fire_repro.common import ArgumentParser, Range, UserError, check_output, check_ranges, cli, write_atomic

METHODS = ("ace", "trades", "fire", "hellinger")
OUTPUTS = ("results.json", "fig3.png", "fig6.png", "fig9.png")
PROG = os.path.basename(__file__)
MIN_ANGLES = 100  # the Pareto set is an arc of the curve: with fewer angles it is a handful of points
# The ranges of the numeric flags, the one place they are written (check_args and the help texts
# use them): far beyond the paper's model (||mu|| = 0.05, eps = 0.1, 10^4 samples, 61 lambdas in
# [1e-2, 1e4]), they keep a run within minutes and its numbers finite.
RANGES = dict(eps=Range(0, 10.0), mu=Range(-1e3, 1e3), sigma=Range(-1e3, 1e3), n_per_class=Range(1, 10**6),
              seed=Range(0, 2**32, high_open=True), lam_min=Range(0, 1e8, low_open=True), lam_max=Range(0, 1e8),
              n_lam=Range(0, 1000), lam_grid=Range(0, 1e8), refine=Range(0, 10), theta_norm=Range(0, 1e4),
              gtol=Range(0, 1.0, low_open=True), zero_tol=Range(0, 1.0), n_angles=Range(MIN_ANGLES, 10**7),
              cover_tol=Range(0, 1.0, low_open=True), fig3_norm=Range(0, 1e4, low_open=True))


def check_args(args, p):
    """Every numeric flag finite and in its range (RANGES), and the rules between flags, before any
    work (p.error: one line, exit code 2)."""
    check_ranges(p, args, RANGES)
    if not any(args.mu):
        p.error("--mu must be non-zero (mu = 0 gives both classes one distribution: every theta has accuracy 1/2)")
    s = args.sigma
    if not math.isclose(s[1], s[2], rel_tol=1e-9) or np.linalg.eigvalsh(np.array(s).reshape(2, 2)).min() <= 0:
        p.error("--sigma must be symmetric positive definite")
    if args.lam_max < args.lam_min:
        p.error(f"--lam-max must be at least --lam-min {args.lam_min:g}, got {args.lam_max:g}")
    if len(args.lam_grid or []) > RANGES["n_lam"].high:
        p.error(f"--lam-grid must have at most {RANGES['n_lam'].high} values, got {len(args.lam_grid)}")
    if 0 < args.theta_norm <= args.zero_tol:
        p.error(f"--zero-tol {args.zero_tol:g} must be below --theta-norm {args.theta_norm:g}, "
                "else every solution would count as theta = 0")


def get_args(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (defaults: Fig. 6 caption of the paper)")
    g.add_argument("--eps", type=float, default=0.1, help=f"l2 radius of the adversary, {RANGES['eps']}, input units")
    g.add_argument("--mu", type=float, nargs=2, default=[-0.0218, 0.0425],
                   help=f"class mean: x|y ~ N(y mu, Sigma), non-zero, each {RANGES['mu']}")
    g.add_argument("--sigma", type=float, nargs=4, default=[0.0212, 0.0036, 0.0036, 0.0042],
                   help=f"Sigma, row-major 2x2, symmetric positive definite, each {RANGES['sigma']}")
    g = p.add_argument_group("empirical risk minimisation (footnote 4)")
    g.add_argument("--n-per-class", type=int, default=None,
                   help=f"training samples per class, {RANGES['n_per_class']} (10^4; 1000 with --quick)")
    g.add_argument("--seed", type=int, default=0, help=f"seed of the sampled training set, {RANGES['seed']}")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="risks to minimise")
    g.add_argument("--lam-min", type=float, default=1e-2,
                   help=f"smallest non-zero lambda of the log-spaced grid, {RANGES['lam_min']}")
    g.add_argument("--lam-max", type=float, default=1e4, help=f"largest lambda of the grid, {RANGES['lam_max']} and at least --lam-min")
    g.add_argument("--n-lam", type=int, default=None,
                   help="log-spaced lambdas in [lam-min, lam-max], lambda = 0 is added "
                        f"({RANGES['n_lam']}, 0: lambda = 0 only; 61; 9 with --quick)")
    g.add_argument("--lam-grid", type=float, nargs="+", default=None,
                   help=f"explicit lambda values, each {RANGES['lam_grid']}, at most {RANGES['n_lam'].high} (override "
                        f"--lam-min/--lam-max/--n-lam)")
    g.add_argument("--refine", type=int, default=6,
                   help=f"rounds ({RANGES['refine']}) of lambda bisection where consecutive solutions "
                        f"are more than --cover-tol apart")
    g.add_argument("--trades-ce", choices=("adv", "nat"), default="adv",
                   help="TRADES cross-entropy on x* (Eq. 5 as printed) or on x (original TRADES)")
    g.add_argument("--adversary", choices=("label", "worst"), default="label",
                   help="label: x* of Eq. 19 for every loss; worst: per sample, the endpoint "
                        "x -+ eps theta/||theta|| that maximises that sample's loss "
                        "(the exact inner max of Eqs. 4, 5, 7, 48 for a linear model)")
    g.add_argument("--theta-norm", type=float, default=0.0,
                   help=f"{RANGES['theta_norm']}. 0: theta free, BFGS from theta = 0 (paper). R > 0: theta = "
                        f"R [cos a, sin a], BFGS over a from the angle of mean(y x), the direction of the "
                        f"free problem's first step")
    g.add_argument("--gtol", type=float, default=1e-6, help=f"BFGS gradient-norm tolerance, {RANGES['gtol']}")
    g.add_argument("--zero-tol", type=float, default=1e-8,
                   help=f"solutions with ||theta||_2 below this ({RANGES['zero_tol']}; < --theta-norm) "
                        "are the constant classifier "
                        "theta = 0 (no angle)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--n-angles", type=int, default=20000,
                   help=f"points of the exact curve, uniform on [0, 2 pi), {RANGES['n_angles']}")
    g.add_argument("--cover-metric", choices=("acc", "angle"), default="acc",
                   help="a Pareto point is reached if a solution is within --cover-tol of it in (nat, adv) "
                        "Euclidean distance (acc) or in angle, radians (angle)")
    g.add_argument("--cover-tol", type=float, default=0.005,
                   help=f"coverage tolerance (accuracy units or radians), {RANGES['cover_tol']}")
    g.add_argument("--fig3-norm", type=float, default=1.0,
                   help=f"||theta||_2, {RANGES['fig3_norm']}, of both thetas in Fig. 3 (the FRD depends on "
                        f"it, the accuracies do not)")
    g.add_argument("--out-dir", type=str, default="runs/gaussian",
                   help="folder for results.json and the PNGs (created; must be writable)")
    g.add_argument("--quick", action="store_true", help="preset: 1000 samples per class, 9 lambdas (for tests)")
    args = p.parse_args(argv)
    # presets fill only what was not given explicitly
    if args.n_per_class is None:
        args.n_per_class = 1000 if args.quick else 10000
    if args.n_lam is None:
        args.n_lam = 9 if args.quick else 61
    args.methods = list(dict.fromkeys(args.methods))  # a method named twice is fitted once
    check_args(args, p)
    return args


def prepare_out_dir(out_dir):
    """Refuse, before the work, an --out-dir that is a file or cannot be written, or an output
    name that is a folder in it (common.check_output for each output). Raises UserError."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir!r} is a file, not a folder")
    for name in OUTPUTS:
        check_output(os.path.join(out_dir, name), "--out-dir output")


# ---------------------------------------------------------------- exact quantities (Sec. 4.1)

def unit(alpha):
    """theta = [cos a, sin a], shape (..., 2)."""
    alpha = np.asarray(alpha, dtype=float)
    return np.stack([np.cos(alpha), np.sin(alpha)], axis=-1)


def angle(theta):
    """The angle a in [0, 2 pi) of theta (..., 2)."""
    theta = np.asarray(theta, dtype=float)
    return np.mod(np.arctan2(theta[..., 1], theta[..., 0]), 2 * np.pi)


def error_probs(theta, mu, sigma, eps):
    """P_e and P'_e of Eqs. 20-21 for theta (..., 2), theta != 0. Both ignore ||theta||."""
    theta = np.asarray(theta, dtype=float)
    m = theta @ mu
    s = np.sqrt(np.einsum("...i,ij,...j->...", theta, sigma, theta))
    return norm.cdf(-m / s), norm.cdf((eps * np.linalg.norm(theta, axis=-1) - m) / s)


def accuracies(alpha, mu, sigma, eps):
    """(1 - P_e, 1 - P'_e) at the angle(s) alpha."""
    pe, pe_adv = error_probs(unit(alpha), mu, sigma, eps)
    return 1 - pe, 1 - pe_adv


def prop2_bounds(pe, sigma, eps):
    """Lower (Eq. 22) and upper (Eq. 23) bounds on P'_e given P_e (Proposition 2)."""
    lam_min, lam_max = np.linalg.eigvalsh(sigma)
    z = norm.ppf(pe)
    return norm.cdf(eps / np.sqrt(lam_max) + z), norm.cdf(eps / np.sqrt(lam_min) + z)


def pareto_mask(nat, adv):
    """True where no other point is at least as good in both coordinates and better in one."""
    order = np.lexsort((-adv, -nat))  # nat descending, ties by adv descending
    mask = np.zeros(len(nat), dtype=bool)
    best_adv = -np.inf
    for i in order:
        if adv[i] > best_adv:
            mask[i] = True
            best_adv = adv[i]
    return mask


def refine_max(f, alphas, values):
    """Maximise f(alpha) by a bounded 1-D search around the best grid point."""
    i = int(np.argmax(values))
    step = alphas[1] - alphas[0]
    r = minimize_scalar(lambda a: -f(a), bounds=(alphas[i] - step, alphas[i] + step),
                        method="bounded", options={"xatol": 1e-12})
    return float(np.mod(r.x, 2 * np.pi)), float(-r.fun)


def exact_curve(mu, sigma, eps, n_angles):
    """The curve of Fig. 6a, its Pareto set, the natural / adversarial optima and the MAA."""
    alphas = np.arange(n_angles) * (2 * np.pi / n_angles)
    nat, adv = accuracies(alphas, mu, sigma, eps)
    w = np.linalg.solve(sigma, mu)  # footnote 3: theta*_nat = Sigma^-1 mu / ||Sigma^-1 mu||
    a_nat = float(angle(w))
    a_adv, _ = refine_max(lambda a: accuracies(a, mu, sigma, eps)[1], alphas, adv)
    a_maa, maa = refine_max(lambda a: np.mean(accuracies(a, mu, sigma, eps)), alphas, (nat + adv) / 2)
    maa_nat, maa_adv = accuracies(a_maa, mu, sigma, eps)
    pe = 1 - nat
    lower, upper = prop2_bounds(pe, sigma, eps)
    return {"alphas": alphas, "nat": nat, "adv": adv, "pareto": pareto_mask(nat, adv),
            "a_nat": a_nat, "a_adv": a_adv, "a_maa": a_maa, "maa": maa,
            "maa_nat": float(maa_nat), "maa_adv": float(maa_adv),
            "prop2_lower_slack": float(np.min((1 - adv) - lower)),  # >= 0 if Eq. 22 holds
            "prop2_upper_slack": float(np.min(upper - (1 - adv)))}  # >= 0 if Eq. 23 holds


# ---------------------------------------------------------------- losses of the logit h = theta^T x
# Each returns (value, d/dh, d/dh') per sample; h is the logit of x, hp of the perturbed x'.

def softplus(t):
    return np.logaddexp(0.0, t)


def sigmoid(t):
    return np.exp(-softplus(-t))


def sech(t):
    e = np.exp(-np.abs(t))
    return 2 * e / (1 + e * e)


def gd_half(h):
    """2 arctan(exp(h/2)) - pi/2 (Gudermannian of h/2), written without overflow."""
    return 2 * np.arctan(np.tanh(h / 4))


def cross_entropy(h, y):
    """-log q(y|x) = softplus(-y h), Eq. 18."""
    return softplus(-y * h), -y * sigmoid(-y * h)


def kl(h, hp):
    """KL(q(.|x) || q(.|x')) of Eq. 6 for the binary model: p (h - h') + softplus(h') - softplus(h)."""
    p = sigmoid(h)
    return p * (h - hp) + softplus(hp) - softplus(h), p * (1 - p) * (h - hp), sigmoid(hp) - p


def fisher_rao_sq(h, hp):
    """d^2 with d = 2 |arctan(e^{h'/2}) - arctan(e^{h/2})| (Eq. 9/11) = |gd(h'/2) - gd(h/2)|."""
    delta = gd_half(hp) - gd_half(h)
    return delta ** 2, -delta * sech(h / 2), delta * sech(hp / 2)


def hellinger_sq(h, hp):
    """H^2 = 2 (1 - sum_y sqrt(q q')) (Eq. 46) = 2 (1 - cos(d/2)) = 4 sin^2(d/4) (Theorem 4)."""
    delta = gd_half(hp) - gd_half(h)
    s = np.sin(delta / 2)
    return 4 * np.sin(delta / 4) ** 2, -s * sech(h / 2) / 2, s * sech(hp / 2) / 2


def sample_loss(method, h, hp, y, lam, trades_ce):
    """Per-sample risk and its derivatives in h and h' for ACE (Eq. 4), TRADES (Eq. 5), FIRE (Eq. 7),
    Hellinger (Eq. 48)."""
    ce_on_adv = method == "ace" or (method == "trades" and trades_ce == "adv")
    value, d_h, d_hp = np.zeros_like(h), np.zeros_like(h), np.zeros_like(h)
    if ce_on_adv:
        value, d_hp = cross_entropy(hp, y)
    else:
        value, d_h = cross_entropy(h, y)
    if method != "ace" and lam != 0:
        reg = {"trades": kl, "fire": fisher_rao_sq, "hellinger": hellinger_sq}[method]
        r, r_h, r_hp = reg(h, hp)
        value, d_h, d_hp = value + lam * r, d_h + lam * r_h, d_hp + lam * r_hp
    return value, d_h, d_hp


def risk(theta, x, y, method, lam, eps, trades_ce="adv", adversary="label"):
    """Empirical risk and its gradient at theta. x' = x - s eps theta/||theta||, so h' = h - s eps ||theta||
    with s = y (Eq. 19) or, for adversary="worst", the sign that maximises each sample's loss.

    theta = 0 is singular: theta/||theta|| is undefined and ||theta|| has a kink. There h' = h (x' = x),
    and the gradient returned is the minimum-norm element of the subdifferential g + k B, where B is
    the unit ball and k = -eps mean(s dl/dh') the weight of eps||theta||. For FIRE, Hellinger and
    TRADES with CE on x, k = 0 (each regulariser is minimal at h' = h), so this is the plain gradient;
    for ACE and TRADES with CE on x*, k = eps/2 and the minimum-norm subgradient is 0 whenever
    ||mean(y x)|| <= eps: theta = 0 is then a global (sharp) minimum and BFGS stops there.
    """
    r = np.hypot(theta[0], theta[1])
    h = x @ theta
    if adversary == "label":
        s = y
        value, d_h, d_hp = sample_loss(method, h, h - s * eps * r, y, lam, trades_ce)
    else:
        up = sample_loss(method, h, h - eps * r, y, lam, trades_ce)
        down = sample_loss(method, h, h + eps * r, y, lam, trades_ce)
        pick = up[0] >= down[0]
        s = np.where(pick, 1.0, -1.0)
        value, d_h, d_hp = (np.where(pick, a, b) for a, b in zip(up, down))
    grad = ((d_h + d_hp)[:, None] * x).mean(axis=0)
    k = -eps * np.mean(s * d_hp)  # d(risk)/d||theta||
    if r == 0 and adversary == "worst":  # near 0 each sample moves h' the way that increases its loss
        k = eps * np.mean(np.abs(d_hp))
    if r > 0:
        grad = grad + k * theta / r
    elif k > 0:
        gn = np.linalg.norm(grad)
        grad = grad * max(0.0, 1 - k / gn) if gn > 0 else grad
    return float(value.mean()), grad


def fit(x, y, method, lam, args):
    """One ERM solution theta (footnote 4: BFGS from theta = 0), or on the circle ||theta|| = R."""
    kw = dict(method=method, lam=lam, eps=args.eps, trades_ce=args.trades_ce, adversary=args.adversary)
    if args.theta_norm <= 0:
        res = minimize(lambda t: risk(t, x, y, **kw), np.zeros(2), jac=True, method="BFGS",
                       options={"gtol": args.gtol})
        return res.x, bool(res.success), int(res.nit)
    R = args.theta_norm

    def on_circle(a):
        v = unit(a[0])
        value, grad = risk(R * v, x, y, **kw)
        return value, np.array([R * (grad[1] * v[0] - grad[0] * v[1])])

    a0 = float(angle((y[:, None] * x).mean(axis=0)))
    res = minimize(on_circle, np.array([a0]), jac=True, method="BFGS", options={"gtol": args.gtol})
    return R * unit(res.x[0]), bool(res.success), int(res.nit)


def sample_data(mu, sigma, n_per_class, seed):
    """n_per_class samples of each class, x | y ~ N(y mu, Sigma)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([-1.0, 1.0], n_per_class)
    x = y[:, None] * mu + rng.standard_normal((2 * n_per_class, 2)) @ np.linalg.cholesky(sigma).T
    return x, y


# ---------------------------------------------------------------- coverage of the Pareto set

def coverage(solutions, curve, metric, tol):
    """Share of the Pareto points within tol of some solution, whether the MAA point is reached,
    the angles spanned and the largest angle jump between consecutive lambdas."""
    sols = [s for s in solutions if s["alpha"] is not None]
    out = {"n_solutions": len(solutions), "n_theta_zero": len(solutions) - len(sols), "pareto_share": 0.0,
           "maa_reached": False, "maa_distance": None, "alpha_min": None, "alpha_max": None,
           "max_alpha_jump": None, "best_avg_acc": None}
    if not sols:
        return out
    par = curve["pareto"]
    p_alpha, p_nat, p_adv = curve["alphas"][par], curve["nat"][par], curve["adv"][par]
    s_alpha = np.array([s["alpha"] for s in sols])
    s_acc = np.array([[s["nat"], s["adv"]] for s in sols])
    maa_point = np.array([[curve["maa_nat"], curve["maa_adv"]]])

    def dist(alpha_pts, acc_pts):
        if metric == "angle":
            d = np.abs(alpha_pts[:, None] - s_alpha[None, :])
            return np.minimum(d, 2 * np.pi - d).min(axis=1)
        return np.linalg.norm(acc_pts[:, None, :] - s_acc[None, :, :], axis=-1).min(axis=1)

    out["pareto_share"] = float(np.mean(dist(p_alpha, np.stack([p_nat, p_adv], -1)) <= tol))
    d_maa = float(dist(np.array([curve["a_maa"]]), maa_point)[0])
    out.update(maa_distance=d_maa, maa_reached=d_maa <= tol,
               alpha_min=float(s_alpha.min()), alpha_max=float(s_alpha.max()),
               best_avg_acc=float(s_acc.mean(axis=1).max()))
    if len(sols) > 1:
        jumps = np.abs(np.diff(s_alpha))
        out["max_alpha_jump"] = float(np.minimum(jumps, 2 * np.pi - jumps).max())
    return out


# ---------------------------------------------------------------- sweep, table, figures

def lambda_grid(args):
    if args.lam_grid is not None:
        return [float(v) for v in args.lam_grid]
    return [0.0] + [float(v) for v in np.logspace(np.log10(args.lam_min), np.log10(args.lam_max), args.n_lam)]


def solve_method(x, y, method, lams, mu, sigma, args):
    """ERM solutions over the lambda grid (ACE has no lambda: one fit), with exact accuracies. Then, up
    to --refine times, a lambda is inserted between consecutive solutions further apart than --cover-tol
    (in the --cover-metric), so that coverage measures where the solution path goes, not how dense the
    grid is: a gap that survives the refinement is a jump of the path, not a coarse grid."""

    def solve(lam, refined):
        theta, converged, nit = fit(x, y, method, lam, args)
        row = {"lam": lam, "theta": [float(t) for t in theta], "theta_norm": float(np.linalg.norm(theta)),
               "alpha": None, "nat": None, "adv": None, "converged": converged, "nit": nit, "refined": refined}
        if row["theta_norm"] > args.zero_tol:  # accuracies depend on the direction only
            nat, adv = accuracies(angle(theta), mu, sigma, args.eps)
            row.update(alpha=float(angle(theta)), nat=float(nat), adv=float(adv))
        return row

    def gap(a, b):
        if a["alpha"] is None or b["alpha"] is None:
            return 0.0
        if args.cover_metric == "angle":
            d = abs(a["alpha"] - b["alpha"])
            return min(d, 2 * np.pi - d)
        return float(np.hypot(a["nat"] - b["nat"], a["adv"] - b["adv"]))

    solutions = [solve(lam, False) for lam in ([0.0] if method == "ace" else lams)]
    for _ in range(args.refine if method != "ace" else 0):
        solutions.sort(key=lambda s: s["lam"])
        mids = [np.sqrt(a["lam"] * b["lam"]) if a["lam"] > 0 else b["lam"] / 2
                for a, b in zip(solutions[:-1], solutions[1:]) if gap(a, b) > args.cover_tol]
        if not mids:
            break
        solutions += [solve(float(lam), True) for lam in mids]
    solutions.sort(key=lambda s: s["lam"])
    return solutions


def method_label(method, args):
    if method == "trades":
        return "TRADES(CE x*)" if args.trades_ce == "adv" else "TRADES(CE x)"
    return {"ace": "ACE", "fire": "FIRE", "hellinger": "Hellinger"}[method]


def format_table(results, curve, args):
    unit_ = "rad" if args.cover_metric == "angle" else "acc"
    lines = [f"coverage of the Pareto set (reached = a solution within {args.cover_tol:g} {unit_}, metric "
             f"'{args.cover_metric}'); MAA = {curve['maa']:.5f} at alpha = {curve['a_maa']:.3f}",
             f"{'method':<14}{'fits':>5}{'theta=0':>8}{'Pareto':>8}{'MAA':>5}{'d(MAA)':>8}"
             f"{'alpha range':>17}{'max jump':>9}{'best avg':>9}"]
    for method, res in results.items():
        c = res["coverage"]
        span = "-" if c["alpha_min"] is None else f"[{c['alpha_min']:.3f}, {c['alpha_max']:.3f}]"
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"{method_label(method, args):<14}{c['n_solutions']:>5}{c['n_theta_zero']:>8}"
                     f"{100 * c['pareto_share']:>7.1f}%{('yes' if c['maa_reached'] else 'no'):>5}"
                     f"{fmt(c['maa_distance'], '.4f'):>8}{span:>17}{fmt(c['max_alpha_jump'], '.3f'):>9}"
                     f"{fmt(c['best_avg_acc'], '.5f'):>9}")
    return "\n".join(lines)


def tradeoff_figure(curve, panels, path):
    """Fig. 6 / Fig. 9: all (1 - P_e, 1 - P'_e) in blue, Pareto set in red, ERM solutions in black."""
    fig = Figure(figsize=(5 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True)
    for ax, (title, sols) in zip(np.atleast_1d(axes), panels):
        ax.plot(curve["nat"], curve["adv"], ".", ms=1.5, color="tab:blue", label="all theta")
        par = curve["pareto"]
        ax.plot(curve["nat"][par], curve["adv"][par], ".", ms=3, color="red", label="Pareto-optimal")
        ax.plot(curve["maa_nat"], curve["maa_adv"], "*", ms=12, mfc="none", color="green", label="MAA")
        if sols is not None:
            pts = np.array([[s["nat"], s["adv"]] for s in sols if s["alpha"] is not None]).reshape(-1, 2)
            n0 = len(sols) - len(pts)
            ax.plot(pts[:, 0], pts[:, 1], "o", ms=3.5, color="black",
                    label=f"ERM solutions ({len(pts)}" + (f"; {n0} more are theta = 0)" if n0 else ")"))
        ax.set_title(title)
        ax.set_xlabel(r"natural accuracy $1-P_e(\theta)$")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel(r"adversarial accuracy $1-P'_e(\theta)$")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True, what="--out-dir output")


def fig3(curve, args, path, n=201):
    """Fig. 3: FRD between q(.|0) and q(.|delta), delta in the l_inf ball of radius eps, for the natural
    and adversarial optima, both scaled to ||theta||_2 = --fig3-norm."""
    grid = np.linspace(-args.eps, args.eps, n)
    d1, d2 = np.meshgrid(grid, grid)
    maps = []
    for a in (curve["a_nat"], curve["a_adv"]):
        theta = args.fig3_norm * unit(a)
        maps.append(np.abs(gd_half(theta[0] * d1 + theta[1] * d2) - gd_half(0.0)))  # Eq. 9 with h(0) = 0
    vmax = max(m.max() for m in maps)
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, m, a, name in zip(axes, maps, (curve["a_nat"], curve["a_adv"]), ("P_e", "P'_e")):
        im = ax.contourf(d1, d2, m, levels=30, vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(f"theta minimising ${name}$: alpha={a:.3f}, ||theta||={args.fig3_norm:g}")
        ax.set_xlabel(r"$\delta_1$")
        ax.set_ylabel(r"$\delta_2$")
        ax.set_aspect("equal")
    fig.colorbar(im, ax=axes, label=r"$d_{R}(q(\cdot|0), q(\cdot|\delta))$")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True, what="--out-dir output")


def main(argv=None):
    args = get_args(argv)
    prepare_out_dir(args.out_dir)  # before the work: an unwritable folder is not found after it
    print("args:", json.dumps(vars(args)))
    t0 = time.time()
    mu, sigma = np.array(args.mu), np.array(args.sigma).reshape(2, 2)

    curve = exact_curve(mu, sigma, args.eps, args.n_angles)
    nat_n, adv_n = accuracies(curve["a_nat"], mu, sigma, args.eps)
    nat_a, adv_a = accuracies(curve["a_adv"], mu, sigma, args.eps)
    par_alpha = curve["alphas"][curve["pareto"]]
    print(f"natural optimum   alpha={curve['a_nat']:.4f}  nat={nat_n:.4f}  adv={adv_n:.4f}"
          "  (footnote 3: 1.814, 0.784, 0.183)")
    print(f"adversarial opt.  alpha={curve['a_adv']:.4f}  nat={nat_a:.4f}  adv={adv_a:.4f}"
          "  (footnote 3: 2.783, 0.608, 0.309)")
    print(f"MAA (Eq. 24)      alpha={curve['a_maa']:.4f}  nat={curve['maa_nat']:.4f}  adv={curve['maa_adv']:.4f}"
          f"  avg={curve['maa']:.4f}")
    print(f"Pareto set: {curve['pareto'].sum()} of {args.n_angles} angles, alpha in "
          f"[{par_alpha.min():.4f}, {par_alpha.max():.4f}]")
    print(f"Proposition 2: min slack lower (Eq. 22) {curve['prop2_lower_slack']:.2e}, "
          f"upper (Eq. 23) {curve['prop2_upper_slack']:.2e} (>= 0: holds on every angle)")

    x, y = sample_data(mu, sigma, args.n_per_class, args.seed)
    print(f"||mean(y x)|| = {np.linalg.norm((y[:, None] * x).mean(0)):.4f} vs eps = {args.eps:g} "
          "(<= eps: theta = 0 minimises ACE)")
    lams = lambda_grid(args)
    results = {}
    for method in args.methods:
        t = time.time()
        sols = solve_method(x, y, method, lams, mu, sigma, args)
        results[method] = {"label": method_label(method, args), "solutions": sols,
                           "coverage": coverage(sols, curve, args.cover_metric, args.cover_tol)}
        print(f"{method_label(method, args)}: {len(sols)} fits in {time.time() - t:.1f}s, "
              f"{sum(not s['converged'] for s in sols)} not converged")
    print(format_table(results, curve, args))

    sol = {m: results[m]["solutions"] if m in results else None for m in METHODS}
    top = ("(a) Pareto set", None)
    fig3(curve, args, os.path.join(args.out_dir, "fig3.png"))  # write_atomic: one line if unwritable
    tradeoff_figure(curve, [top, ("(b) " + method_label("trades", args), sol["trades"]),
                            ("(c) FIRE", sol["fire"])], os.path.join(args.out_dir, "fig6.png"))
    tradeoff_figure(curve, [top, ("(b) Hellinger", sol["hellinger"]), ("(c) FIRE", sol["fire"])],
                    os.path.join(args.out_dir, "fig9.png"))

    record = {"args": vars(args),
              "alpha_nat": curve["a_nat"], "nat_acc_at_alpha_nat": float(nat_n), "adv_acc_at_alpha_nat": float(adv_n),
              "alpha_adv": curve["a_adv"], "nat_acc_at_alpha_adv": float(nat_a), "adv_acc_at_alpha_adv": float(adv_a),
              "maa": curve["maa"], "alpha_maa": curve["a_maa"], "nat_acc_at_maa": curve["maa_nat"],
              "adv_acc_at_maa": curve["maa_adv"],
              "pareto_alpha_range": [float(par_alpha.min()), float(par_alpha.max())],
              "prop2_lower_slack": curve["prop2_lower_slack"], "prop2_upper_slack": curve["prop2_upper_slack"],
              "methods": results, "seconds": time.time() - t0}
    write_atomic(os.path.join(args.out_dir, "results.json"), lambda f: json.dump(record, f, indent=1),
                 what="--out-dir output")
    print(f"wrote {args.out_dir}/results.json, fig3.png, fig6.png, fig9.png in {time.time() - t0:.1f}s")
    return record


if __name__ == "__main__":
    cli(main)
