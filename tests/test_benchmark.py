"""benchmark.py: the timed FIRE, TRADES and floor steps and their ratios, the forward passes each step
runs, and its flag checks (one line, exit 2, nothing timed)."""
import json
import math
import os
import statistics

import pytest
import torch

import benchmark
from fire_repro import common
from fire_repro import data
from conftest import make_bench, run_script


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
    assert "FIRE / TRADES-public =" in printed and "FIRE+AWP / FIRE =" in printed and "FIRE+EMA / FIRE =" in printed
    for row in ("| floor |", "| FIRE |", "| TRADES |", "| TRADES-public |", "| FIRE+AWP |", "| FIRE+EMA |",
                "| 2 | 0 |", "| 2 | 1 |"):
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
    rounds = zip(result["steps"]["FIRE+AWP"]["all_ms"], result["steps"]["FIRE"]["all_ms"])
    assert result["ratios"]["FIRE+AWP/FIRE"] == pytest.approx(statistics.median(a / b for a, b in rounds))
    assert "FIRE+EMA/FIRE" in result["ratios"] and "FIRE+AWP" not in report["sweep"][0]["steps"]
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


def test_every_step_runs_the_floors_forward_passes():
    """FIRE, TRADES and the floor each run K + 3 forwards: the natural one once, K in the attack,
    two for the update; TRADES-public (TRADES' own attack) K more; FIRE with AWP two more (the
    ascent pass on the same x'), FIRE with the average none. The floor leaves the weights alone
    (lr 0); the real steps train."""
    k = 3
    bench = make_bench(batch_size=4)
    calls = []
    bench.model.register_forward_hook(lambda module, inputs, output: calls.append(module.training))
    for name, step in bench.steps(k).items():
        before = [p.detach().clone() for p in bench.model.parameters()]
        calls.clear()
        step()
        attack = k + 1 + (k if name == "TRADES-public" else 0)
        update = [True] * (4 if name == "FIRE+AWP" else 2)
        assert calls == [False] * attack + update, name  # eval for the attack, train after
        moved = any(not torch.equal(a, p) for a, p in zip(before, bench.model.parameters()))
        assert moved == (name != "floor"), name


# ---- Bad flags and outputs: one line, exit 2, before any timing


def one_benchmark_error_line(stderr, needle):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmark.py: error: ") and needle in lines[0], lines
    assert "Traceback" not in stderr


BENCH_TINY = ["--batch-size", "2", "--attack-steps", "0", "--reps", "1", "--warmup", "0"]


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size"), (["--attack-steps", "-1"], "--attack-steps"),
    (["--model", "vgg"], "--model"), (["--reps", "0"], "--reps"),
    (["--model", "wrn-10-0"], "--model"),  # refused before building the network
    (["--shape", "1", "2", "2"], "--shape"),  # too small for the network: refused before timing
    (["--shape", "1", "32", "32"], "--shape"),  # SmallCNN takes 28x28 only
    (["--shape", "0", "28", "28"], "--shape"),
    (["--lam", "nan"], "--lam"), (["--beta", "-1"], "--beta"),  # not finite, negative
    (["--lam", "inf"], "--lam"), (["--num-classes", "0"], "--num-classes"), (["--num-classes", "1"], "--num-classes"),
    (["--eps", "1.5"], "--eps"), (["--eps", "nan"], "--eps"), (["--eps", "-0.1"], "--eps"),
    (["--step-size", "0"], "--step-size"), (["--step-size", "inf"], "--step-size"),
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--warmup", "-1"], "--warmup"), (["--threads", "-1"], "--threads"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"),
    (["--sweep-steps", "1", "-1"], "--sweep-steps"), (["--sweep-batch-sizes", "0"], "--sweep-batch-sizes"),
    (["--sweep-reps", "0"], "--sweep-reps"), (["--compile-mode", "reduce-overhead"], "--compile-mode"),
    (["--compile-mode", "fast"], "--compile-mode"), (["--batch-size", "two"], "--batch-size"),
    (["--model", "resnet18", "--shape", "3", "100000", "100000"], "--shape"),
    # upper bounds: beyond them an allocation fails or a run does not end
    (["--batch-size", "100000000"], "--batch-size"), (["--num-classes", "100000000"], "--num-classes"),
    (["--threads", "100000"], "--threads"), (["--model", "wrn-1000000-10"], "depth"),
    (["--attack-steps", "100000000"], "--attack-steps"), (["--reps", "100000000"], "--reps"),
    (["--sweep-batch-sizes", "2", "100000000"], "--sweep-batch-sizes"),
    (["--lr", "1e308"], "--lr"), (["--lam", "1e308"], "--lam"),
])
def test_benchmark_bad_flags_exit_2(args, needle, capsys, one_thread):
    """In-process through benchmark.cli (fast); the subprocess test below covers the command line."""
    with pytest.raises(SystemExit) as e:
        common.cli(benchmark.main, [*BENCH_TINY, *args])
    assert e.value.code == 2
    captured = capsys.readouterr()
    one_benchmark_error_line(captured.err, needle)
    assert "| floor |" not in captured.out  # nothing was timed


def test_benchmark_cuda_without_a_gpu_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    for args in (["--device", "cuda"], ["--clock", "cpu", "--device", "cuda"]):
        with pytest.raises(SystemExit) as e:
            common.cli(benchmark.get_args, args)
        assert e.value.code == 2
        one_benchmark_error_line(capsys.readouterr().err, "--device cuda")


def test_benchmark_boundary_values_are_accepted():
    args = benchmark.get_args(["--eps", "0", "--attack-steps", "0", "--warmup", "0", "--lam", "0", "--beta", "0",
                               "--seed", str(2 ** 32 - 1), "--threads", "0", "--sweep-steps", "0"])
    assert (args.eps, args.seed, args.lam) == (0.0, 2 ** 32 - 1, 0.0)
    args = benchmark.get_args(["--eps", "1", "--step-size", "1e-6", "--lr", "1e-9", "--compile",
                               "--compile-mode", "max-autotune"])
    assert (args.eps, args.step_size, args.lr, args.compile_mode) == (1.0, 1e-6, 1e-9, "max-autotune")
    assert benchmark.get_args([]).eps == data.DATASETS["mnist"].preset["eps"]  # unset: the preset's


@pytest.mark.parametrize("case", ["shape", "model", "json-out"])
def test_benchmark_bad_input_on_the_command_line(case, tmp_path):
    """Input only found wrong at run time (--shape too small, --model wrn-10-0, an unwritable --json-out
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
            common.cli(benchmark.main, [*BENCH_TINY, "--json-out", str(out)])
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

    monkeypatch.setattr(common, "json", SimpleNamespace(dump=dump_half_then_fail))
    with pytest.raises(SystemExit) as e:
        common.cli(benchmark.main, [*BENCH_TINY, "--json-out", str(out)])
    assert e.value.code == 2
    one_benchmark_error_line(capsys.readouterr().err, "--json-out")
    assert out.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_autoattack_throughput_is_timed_and_projected(fire_run, tmp_path, capsys):
    """--autoattack N: images/s of the standard (here the reduced) AutoAttack and the projected time for
    10,000 test images, on a fresh model of the data set's shape or on a checkpoint's test images."""
    timing = benchmark.main(["--autoattack", "4", "--dataset", "digits", "--smoke-aa", "--device", "cpu",
                             "--json-out", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text()) == timing and timing["images"] == 4
    assert timing["projected_test_set_s"] == pytest.approx(10_000 / timing["images_per_s"])
    assert timing["natural"] == 1.0  # labelled with its own predictions: every image is attacked
    assert timing["eps"] == data.DATASETS["digits"].preset["eps"]  # digits evaluates at its training radius
    assert "images/s" in capsys.readouterr().out
    timing = benchmark.main(["--autoattack", "3", "--checkpoint", str(fire_run[0] / "best.pt"), "--smoke-aa",
                             "--device", "cpu"])
    assert (timing["images"], timing["norm"], timing["eps"]) == (3, "linf", 0.1)
