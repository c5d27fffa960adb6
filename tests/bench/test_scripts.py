"""The bench scripts that write the tables of tests/bench/README.md, on made-up runs (nothing
trains): the toy table's rows, floors and footer from the runs' eval.json files, the front page's
summary copied from those tables, wall times only from runs alone, and the learning curves'
resumed segments."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "bench"))
import toy_curve  # noqa: E402
import toy_table  # noqa: E402


def test_toy_table_script_writes_the_readme_block_from_the_runs(tmp_path):
    """tests/bench/toy_table.py: the README block is made of the numbers in the runs' eval.json
    files, as mean ± std over the seeds; runs that already have an eval.json are not run again
    (here every run has one, written by hand, so nothing trains; --jobs 2 keeps the rows' order)."""
    runs, values = tmp_path / "runs", {}
    floors = {"every_look_alike": {"J&F": 0.556}, "wrong_look_alikes": {"J&F": 0.001}}
    for name, base in (("full", 0.6), ("no-cl", 0.5)):
        for seed in (0, 1, 2):
            values[name, seed] = (base + 0.01 * seed, base - 0.1 + 0.02 * seed)
            (runs / f"{name}-seed{seed}").mkdir(parents=True)
            (runs / f"{name}-seed{seed}" / "log.jsonl").write_text('{"step": 10}\n{"step": 1500}\n')
            (runs / f"{name}-seed{seed}" / "eval.json").write_text(json.dumps({
                "J&F": values[name, seed][0], "J": 0.0, "F": 0.0, "motion_only": {"J&F": values[name, seed][1]},
                "motion_only_references": floors}))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- toy-table:dshmp -->\nold\n<!-- /toy-table:dshmp -->\nafter\n")
    toy_table.main(["--variants=,--no-cl", "--runs", str(runs), "--readme", str(readme), "--jobs", "2"])
    text = readme.read_text()
    for name in ("full", "no-cl"):
        overall = [values[name, s][0] for s in range(3)]
        motion = [values[name, s][1] for s in range(3)]
        row = next(line for line in text.splitlines() if line.startswith("| `python dshmp.py --data toy --train"
                                                                           + (" --no-cl`" if name == "no-cl" else "`")))
        assert f"{np.mean(overall):.3f} ± {np.std(overall, ddof=1):.3f}" in row
        assert f"{np.mean(motion):.3f} ± {np.std(motion, ddof=1):.3f}" in row
    assert "| floor: segment every look-alike of the target (no motion) | | | 0.556 | |" in text
    assert "eval.json files; 1,500 training steps per run (log.jsonl); " in text
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert len(json.loads((runs / "table.json").read_text())) == 6


def test_toy_table_splits_motion_only_by_time_order_when_the_runs_have_it(tmp_path):
    """Runs evaluated with the order split get two more columns and their floors; the floor of a
    column is the one eval.json gives for that subset."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        (runs / f"full-seed{seed}").mkdir(parents=True)
        (runs / f"full-seed{seed}" / "eval.json").write_text(json.dumps({
            "J&F": 0.6, "J": 0.0, "F": 0.0, "motion_only": {"J&F": 0.5},
            "motion_only_order_free": {"J&F": 0.52 + 0.02 * seed}, "motion_only_order_dependent": {"J&F": 0.3},
            "motion_only_references": {"every_look_alike": {"J&F": 0.556}, "wrong_look_alikes": {"J&F": 0.0}},
            "motion_only_order_free_references": {"every_look_alike": {"J&F": 0.561}, "wrong_look_alikes": {"J&F": 0.0}},
            "motion_only_order_dependent_references": {"every_look_alike": {"J&F": 0.518},
                                                       "wrong_look_alikes": {"J&F": 0.0}}}))
    toy_table.main(["--seeds", "0", "1", "--runs", str(runs)])
    records = json.loads((runs / "table.json").read_text())
    text = toy_table.table("dshmp", records, [])
    assert "| J&F | J&F, motion-only | motion-only, order-free | motion-only, order-dependent |" in text
    assert "| 2 | 0.600 ± 0.000 | 0.500 ± 0.000 | 0.530 ± 0.014 | 0.300 ± 0.000 |" in text
    assert "| floor: segment every look-alike of the target (no motion) | | | 0.556 | 0.561 | 0.518 | |" in text


def test_toy_curve_script_trains_in_resumed_segments(tmp_path, monkeypatch):
    """tests/bench/toy_curve.py: each seed's run continued to each step with --resume, every
    evaluation kept, mean ± std over the seeds per step in the README block; points that exist are
    not trained again (the training command is faked here)."""
    commands = []

    def fake_run(command, cwd, check, env):
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "last.pt").write_text("")
        step = int(command[command.index("--steps") + 1])
        seed = int(command[command.index("--seed") + 1])
        (out / "eval.json").write_text(json.dumps({
            "J&F": step / 1000, "motion_only": {"J&F": step / 2000 + seed / 10},
            "motion_only_references": {"every_look_alike": {"J&F": 0.556}}}))

    monkeypatch.setattr(toy_curve.subprocess, "run", fake_run)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- toy-curve:dshmp -->\nold\n<!-- /toy-curve:dshmp -->\nb\n")
    toy_curve.main(["--runs", str(tmp_path), "--steps", "500", "--every", "200", "--variants=,--no-hmp",
                    "--seeds", "0", "1", "--readme", str(readme)])
    steps = [(c[c.index("--steps") + 1], "--resume" in c, "--no-hmp" in c, c[c.index("--seed") + 1])
             for c in commands]
    assert steps == [("200", False, False, "0"), ("400", True, False, "0"), ("500", True, False, "0"),
                     ("200", False, True, "0"), ("400", True, True, "0"), ("500", True, True, "0"),
                     ("200", False, False, "1"), ("400", True, False, "1"), ("500", True, False, "1"),
                     ("200", False, True, "1"), ("400", True, True, "1"), ("500", True, True, "1")]
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert [p["motion_only"] for p in curves[""]["1"]] == [0.2, 0.30000000000000004, 0.35]
    text = readme.read_text()
    assert "| step | `full model` J&F | `full model` motion-only | `--no-hmp` J&F | `--no-hmp` motion-only |" in text
    assert "| 400 | 0.400 ± 0.000 | 0.250 ± 0.071 | 0.400 ± 0.000 | 0.250 ± 0.071 |" in text
    assert "over seeds 0, 1 at each step" in text and "old" not in text and text.endswith("b\n")
    commands.clear()
    toy_curve.main(["--runs", str(tmp_path), "--steps", "500", "--every", "200", "--seeds", "0", "1"])
    assert commands == []  # every point exists


def test_toy_table_threads_sets_each_runs_threads_and_marks_its_time_shared(tmp_path, monkeypatch):
    """--threads N (two tables trained side by side): every run gets OMP_NUM_THREADS=N, and the
    table gives no wall time for them, since they shared the cores (the training is faked)."""
    envs = []

    def fake_run(command, cwd, check, env):
        envs.append(env.get("OMP_NUM_THREADS"))
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "eval.json").write_text(json.dumps({"J&F": 0.5, "J": 0.5, "F": 0.5,
                                                   "motion_only": {"J&F": 0.4}}))

    monkeypatch.setattr(toy_table.subprocess, "run", fake_run)
    toy_table.main(["--seeds", "0", "1", "--runs", str(tmp_path), "--threads", "1"])
    records = json.loads((tmp_path / "table.json").read_text())
    assert envs == ["1", "1"] and [r["threads"] for r in records] == [1, 1]
    text = toy_table.table("dshmp", records, [])
    assert "| 2 | 0.500 ± 0.000 | 0.400 ± 0.000 | shared |" in text and "(--jobs, --threads)" in text


def test_toy_table_gives_the_wall_time_of_runs_alone_only():
    alone = [{"seconds": 600.0, "threads": None}, {"seconds": 700.0, "threads": None}]
    shared = [{"seconds": 2000.0, "threads": 1}, {"seconds": None, "threads": None}]
    assert toy_table.wall_time(alone) == "650 s"
    assert toy_table.wall_time(alone + shared) == "650 s"
    assert toy_table.wall_time(shared) == "shared"


def test_toy_table_summary_takes_each_methods_full_model(tmp_path):
    """--summary: one row per method, copied from the full model's row of the method's toy table on
    the bench page (written here by the same script from made-up runs), the video methods' J&F and
    the image methods' mIoU, each with its motion-only score and floor; ablation rows are left out."""
    floors = {"motion_only": {"every_look_alike": {"J&F": 0.556}, "wrong_look_alikes": {"J&F": 0.0}}}
    bench = tmp_path / "bench.md"
    bench.write_text("".join(f"<!-- toy-table:{m} -->\n<!-- /toy-table:{m} -->\n" for m in toy_table.METHODS))
    for method in toy_table.METHODS:
        video = method in ("dshmp", "dmvs")
        records = [{"variant": variant, "seed": seed, "seconds": None, "references": floors if video else {},
                    **({"J&F": base + 0.01 * seed, "motion_only": base - 0.1} if video
                       else {"mIoU": base + 0.01 * seed, "motion mIoU": base - 0.1})}
                   for variant, base in (("--no-x", 0.9), ("", 0.5)) for seed in (0, 1, 2)]
        toy_table.write_readme(bench, method, toy_table.table(method, records, []))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- toy-table:summary -->\n<!-- /toy-table:summary -->\n")
    toy_table.main(["--summary", "--bench", str(bench), "--readme", str(readme)])
    text = readme.read_text()
    assert "| DsHmp | `python dshmp.py --data toy --train` | 3 | 0.510 ± 0.010 (J&F) | 0.400 ± 0.000 | 0.556 |" in text
    assert "| MRaCL | `python mracl.py --data toy --train` | 3 | 0.510 ± 0.010 (mIoU) | 0.400 ± 0.000 | n/a |" in text
    assert "0.910" not in text  # the ablation rows stay in the method's own table
    bench.write_text(bench.read_text().replace("`python vatex.py --data toy --train` |", "`python vatex.py` |"))
    with pytest.raises(SystemExit, match="no row of the full model"):
        toy_table.main(["--summary", "--bench", str(bench)])


def test_toy_table_of_one_seed_gives_wall_times_and_no_scores():
    """A score of one run is not a result: with one seed per variant the block holds the command,
    the seed count and the wall time of a run alone, and says why there are no scores."""
    records = [{"variant": "", "seed": 0, "seconds": 612.4, "threads": None, "steps": 1500,
                "J&F": 0.579, "motion_only": 0.463,
                "references": {"motion_only": {"every_look_alike": {"J&F": 0.556},
                                               "wrong_look_alikes": {"J&F": 0.0}}}}]
    text = toy_table.table("dshmp", records, [])
    assert "| command | seeds | wall time per run |" in text
    assert "| `python dshmp.py --data toy --train` | 1 | 612 s |" in text
    assert "0.579" not in text and "0.463" not in text and "floor" not in text
    assert text.splitlines()[-1].startswith("Seed 0 only, so no scores")
    records.append({**records[0], "seed": 1, "J&F": 0.581})
    assert "0.580 ± 0.001" in toy_table.table("dshmp", records, [])  # two seeds: scores again


def test_parity_table_takes_the_largest_difference_of_ours_and_the_smallest_broken():
    """tests/parity/parity_table.py reads the suite's PARITY lines: one row per module, in the
    order reported, the worst case of ours and the closest broken variant."""
    sys.path.insert(0, str(REPO / "tests" / "parity"))
    import parity_table
    output = ("tests/test_parity.py::x PARITY | VITA module | a/b @ 1234567 | ours | 3.0e-06\n"
              ".PARITY | LAVT | c/d @ 89abcde | broken | 2.0e+00\n"
              "PARITY | VITA module | a/b @ 1234567 | ours | 8.6e-06\n"
              "PARITY | VITA module | a/b @ 1234567 | broken | 1.1e+00\nunrelated | line\n")
    rows = parity_table.read_lines(output)
    assert list(rows) == ["VITA module", "LAVT"]
    text = parity_table.table(rows, "2.x")
    assert "| VITA module | a/b @ 1234567 | 8.6e-06 | 1.1e+00 |" in text
    assert "| LAVT | c/d @ 89abcde | n/a | 2.0e+00 |" in text
