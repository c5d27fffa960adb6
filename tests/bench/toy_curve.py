"""Learning curves on the toy set: J&F overall and on the motion-only expressions (with their
floor) after every `--every` steps of training, for the full model and each variant, over seeds.

Each (variant, seed) run is trained in segments with the method's own CLI: `--train --steps S
--resume` continues the same run to step S (its schedule counts absolute steps) and evaluates at
the end; each evaluation is kept as <runs>/<variant>-seed<S>/curve/<step>.json. (A resumed segment
restarts the data epoch it stopped in, so the data order differs a little from one uninterrupted
run.) A point that exists is not trained again, so an interrupted curve resumes. Writes
<runs>/curves.json and a markdown table, mean ± std over the seeds at each step, which --readme
puts between <!-- toy-curve:<method> --> and <!-- /toy-curve:<method> -->.

With --jobs N, N runs train at a time, each with (CPU cores / N) threads (OMP_NUM_THREADS).

Run from the repository root (about 40 minutes for three curves at a time on 2 CPU cores, so about
80 for these six):
    python tests/bench/toy_curve.py --method dshmp --variants=",--no-hmp" --seeds 0 1 2 --jobs 3 --every 300
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from toy_table import mean_std, threads_per_job, write_readme

REPO = Path(__file__).resolve().parents[2]


def curve(method, variant, seed, out, steps, every, extra, threads=None):
    """The (step, J&F, motion-only J&F, floor) points of one run, training the missing segments."""
    points = []
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    for step in range(every, steps + every, every):
        step = min(step, steps)
        point = out / "curve" / f"{step}.json"
        if not point.is_file():
            resume = ["--resume"] if (out / "last.pt").is_file() else []
            command = [sys.executable, f"{method}.py", "--data", "toy", "--train", "--steps", str(step), "--seed",
                       str(seed), "--out", str(out), *resume, *variant.split(), *extra]
            print(" ".join(command), flush=True)
            subprocess.run(command, cwd=REPO, check=True, env=env)
            point.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "eval.json", point)
        result = json.loads(point.read_text())
        points.append({"step": step, "J&F": result["J&F"], "motion_only": result.get("motion_only", {}).get("J&F"),
                       "floor_every_look_alike":
                           result.get("motion_only_references", {}).get("every_look_alike", {}).get("J&F")})
    return points


def table(curves, extra, threads):
    """Markdown: one row per step, J&F and motion-only J&F (mean ± std over seeds) per variant."""
    variants = list(curves)
    names = [" ".join(f"{v or 'full model'} {' '.join(extra)}".split()) for v in variants]
    lines = ["| step | " + " | ".join(f"`{n}` J&F | `{n}` motion-only" for n in names) + " |",
             "|---|" + "---|---|" * len(variants)]
    runs = [list(curves[v].values()) for v in variants]  # per variant: one list of points per seed
    for i, step in enumerate(p["step"] for p in runs[0][0]):
        cells = [mean_std([points[i][key] for points in seeds]) for seeds in runs for key in ("J&F", "motion_only")]
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    floor = runs[0][0][-1]["floor_every_look_alike"]
    seeds = sorted({int(s) for c in curves.values() for s in c})
    import torch  # only to name the build the runs used
    shared = f" Runs with {threads} thread(s) shared the cores (--jobs)." if threads else ""
    lines += ["", f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))} at each step, written by "
              f"`tests/bench/toy_curve.py` from the runs' evaluations (floor of motion-only J&F, segmenting every "
              f"look-alike: {floor:.3f}); {os.cpu_count()} CPU cores ({platform.machine()}), torch "
              f"{torch.__version__}.{shared}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dshmp")
    parser.add_argument("--variants", default="", help='comma-separated flags, "" the full model')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--runs", default="", help="folder of the runs (default runs/toy-curve-<method>)")
    parser.add_argument("--extra", default="", help="flags added to every segment")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores / jobs threads")
    parser.add_argument("--readme", default="", help="replace this file's toy-curve block")
    args = parser.parse_args(argv)
    runs = Path(args.runs or REPO / "runs" / f"toy-curve-{args.method}")
    threads = threads_per_job(args.jobs)
    tasks = [(variant, seed) for seed in args.seeds for variant in args.variants.split(",")]  # seed 0 first

    def one(task):
        variant, seed = task
        name = variant.replace("--", "").replace(" ", "_") or "full"
        return curve(args.method, variant, seed, runs / f"{name}-seed{seed}", args.steps, args.every,
                     args.extra.split(), threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the subprocesses
        results = list(pool.map(one, tasks))
    curves = {variant: {} for variant in args.variants.split(",")}
    for (variant, seed), points in zip(tasks, results):
        curves[variant][str(seed)] = points
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "curves.json").write_text(json.dumps(curves, indent=1))
    block = table(curves, args.extra.split(), threads)
    print(block)
    if args.readme:
        write_readme(Path(args.readme), args.method, block, tag="toy-curve")


if __name__ == "__main__":
    main()
