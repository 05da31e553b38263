"""benches/efficiency.py: the ratio comes from the logged curves, FLOPs from the models that ran, and
``--quick`` runs end to end."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench

from arbor.model.config import ArborConfig
from arbor.training.flops import training_flops_per_token


@pytest.fixture(scope="module")
def bench():
    return load_bench("efficiency")


def curve(*points):
    return [{"flops": f, "tokens": 10 * f, "val_loss": loss} for f, loss in points]


def test_flops_to_target_interpolates_between_evaluations(bench):
    c = curve((0, 6.0), (10, 4.0), (20, 3.0), (30, 2.9))
    assert bench.flops_to_target(c, 3.5) == pytest.approx(15.0)
    assert bench.flops_to_target(c, 4.0) == 10  # reached exactly at an evaluation
    assert bench.flops_to_target(c, 6.5) == 0  # the first evaluation already meets it
    assert bench.flops_to_target(c, 2.0) is None


def test_flops_to_target_takes_the_first_crossing(bench):
    c = curve((0, 6.0), (10, 3.0), (20, 3.4), (30, 2.0))  # down, back up after a growth step, down again
    assert bench.flops_to_target(c, 3.2) == pytest.approx(10 * (6.0 - 3.2) / 3.0)


def test_loss_at_interpolates_and_refuses_to_extrapolate(bench):
    c = curve((0, 6.0), (10, 4.0), (20, 3.0))
    assert bench.loss_at(c, 5) == pytest.approx(5.0)
    assert bench.loss_at(c, 20) == 3.0
    assert bench.loss_at(c, 25) is None


def test_compare_ratio_and_cap(bench):
    scratch = {"evaluations": curve((0, 6.0), (50, 4.0), (100, 3.0)), "budget_flops": 100}
    growth = {"evaluations": curve((0, 6.0), (20, 4.0), (40, 3.5), (60, 2.5), (70, 2.4)), "budget_flops": 70}
    result = bench.compare(scratch, growth)
    assert result["target"] == 3.0
    assert result["ratio"] == pytest.approx(0.5)  # 3.0 is crossed halfway between 40 and 60
    assert result["growth_loss_at_equal"] == 2.4 and result["scratch_loss_at_equal"] == pytest.approx(3.6)
    assert result["tokens_at_target"] == pytest.approx(500) and result["scratch_tokens"] == 1000
    slow = {"evaluations": curve((0, 6.0), (100, 3.5), (200, 2.9)), "budget_flops": 100}
    assert bench.compare(scratch, slow)["ratio"] is None  # reached only after 1.5x the scratch FLOPs
    assert bench.ratio_text(None) == ">1.5" and bench.ratio_text(0.4321) == "0.43"


def test_plan_turns_fractions_into_growth_steps(bench):
    final = {"num_hidden_layers": 6, "intermediate_size": 288}
    p = bench.plan(bench.SCHEDULES["both"], final, steps=100, tokens_per_step=10)
    assert (p["start"]["num_hidden_layers"], p["start"]["intermediate_size"]) == (2, 144)
    assert [e["step"] for e in p["events"]] == [10, 30]
    assert p["events"][0]["specs"] == [{"axis": "depth", "num_layers": 2, "policy": "middle", "init": "zero"}]
    assert p["events"][1]["specs"] == [{"axis": "ffn", "add": 144, "init": "split"},
                                       {"axis": "depth", "num_layers": 2, "policy": "middle", "init": "zero"}]
    with pytest.raises(ValueError, match="must end at the final model"):
        bench.plan({"stages": [[0, {"layers": 0.5}]]}, final, 100, 10)


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    lines = []
    import builtins

    real_print = builtins.print
    builtins.print = lambda *a, **k: lines.append(" ".join(map(str, a))) if "file" not in k else real_print(*a, **k)
    try:
        assert bench.main(["--quick", "--no-progress", "--out", str(out)]) == 0
    finally:
        builtins.print = real_print
    return out, lines, json.loads((out / "efficiency.json").read_text())


def test_quick_run_prints_the_ratio_recomputed_from_its_json(bench, quick):
    out, lines, report = quick
    assert (out / "efficiency.png").stat().st_size > 0
    assert lines[-1].startswith("FLOPs ratio ")
    runs = report["runs"]
    scratch = [r for r in runs if r["arm"] == "scratch"]
    assert len(scratch) >= 3 and len({r["lr"] for r in scratch}) == len(scratch)
    best = min(scratch, key=lambda r: r["final_val_loss"])
    target = best["evaluations"][-1]["val_loss"]
    assert target == report["scratch"]["final_val_loss"]
    name = report["winner"]
    chosen = next(r for r in runs if r["arm"] == name and r["lr"] == report["comparisons"][name]["lr"])
    reached = bench.flops_to_target(chosen["evaluations"], target)
    ratio = None if reached is None or reached > 1.5 * best["budget_flops"] else reached / best["budget_flops"]
    assert report["comparisons"][name]["ratio"] == ratio
    assert lines[-1].startswith(f"FLOPs ratio {bench.ratio_text(ratio)} ")


def test_quick_run_counts_flops_of_the_model_that_ran(quick):
    _, _, report = quick
    tokens_per_step = report["batch_size"] * report["seq_len"]
    final = ArborConfig(**report["final_model"])
    per_step = training_flops_per_token(final, report["seq_len"]) * tokens_per_step
    scratch = next(r for r in report["runs"] if r["arm"] == "scratch")
    assert all(e["flops"] == e["step"] * per_step for e in scratch["evaluations"])
    plan = next(iter(report["schedules"].values()))["plan"]
    start = ArborConfig(**plan["start"])
    small = training_flops_per_token(start, report["seq_len"]) * tokens_per_step
    assert small < per_step
    grown = next(r for r in report["runs"] if r["arm"] != "scratch" and r["growth"])
    first = grown["growth"][0]
    assert first["flops"] == first["step"] * small  # every step before the growth ran the small model
    last = grown["evaluations"][-1]
    assert last["flops"] < last["step"] * per_step


@pytest.mark.parametrize("argv, message", [
    (["--lrs", "1e-3,2e-3"], "at least three"),
    (["--growth-lrs", "1e-3,x"], "comma-separated numbers"),
    (["--schedules", "sideways"], "unknown schedule sideways"),
    (["--preset", "huge"], "--preset 'huge' is unknown"),
])
def test_bad_options_are_one_line_with_exit_code_2(bench, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--no-progress", "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_schedule_file_with_an_unknown_key_is_refused_naming_it(bench, capsys, tmp_path):
    path = tmp_path / "typo.json"
    path.write_text('{"late": {"stages": [[0, {"layers": 0.5}], [0.5, {"layers": 1}]], "rewarm_step": 30}}')
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--no-progress", "--out", str(tmp_path / "out"), "--schedules", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "schedule 'late' has unknown key 'rewarm_step'" in err and "rewarm_steps" in err


def test_tokens_to_target_reads_the_same_curve(bench):
    c = [{"flops": 0, "tokens": 0, "val_loss": 6.0}, {"flops": 10, "tokens": 100, "val_loss": 4.0},
         {"flops": 30, "tokens": 200, "val_loss": 3.0}]
    assert bench.flops_to_target(c, 3.5) == pytest.approx(20.0)
    assert bench.flops_to_target(c, 3.5, key="tokens") == pytest.approx(150.0)


def test_scratch_runs_are_taken_from_an_earlier_report_made_alike(bench, quick, tmp_path, capsys):
    out, _, first = quick
    again = tmp_path / "again"
    assert bench.main(["--quick", "--no-progress", "--out", str(again), "--scratch-from",
                       str(out / "efficiency.json")]) == 0
    report = json.loads((again / "efficiency.json").read_text())
    scratch = [r for r in report["runs"] if r["arm"] == "scratch"]
    assert scratch == [r for r in first["runs"] if r["arm"] == "scratch"]  # not trained again: the same records
    assert report["scratch"] == first["scratch"] and report["scratch_from"] == str(out / "efficiency.json")
    # The growth runs were trained again, on the same data in the same order: the same curves.
    growth = [r["evaluations"] for r in report["runs"] if r["arm"] != "scratch"]
    assert growth == [r["evaluations"] for r in first["runs"] if r["arm"] != "scratch"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # another seed: other batches, so other scratch runs
        bench.main(["--quick", "--no-progress", "--out", str(tmp_path / "other"), "--seed", "1", "--scratch-from",
                    str(out / "efficiency.json")])
    assert exit_info.value.code == 2
    assert "its runs were made with other settings (seed: 0 there, 1 here)" in capsys.readouterr().err
