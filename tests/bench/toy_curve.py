"""Learning curves on the toy set: J&F overall and on the motion-only expressions (with their
floors) after every `--every` steps of one training run, for the full model and each variant.

The run is trained in segments with the method's own CLI: `--train --steps S --resume` continues the
same run to step S (its schedule counts absolute steps) and evaluates at the end; each evaluation
is kept as <runs>/<variant>/curve/<S>.json. (A resumed segment restarts the data epoch it stopped
in, so the data order differs a little from one uninterrupted run.) A point that exists is not
trained again. Writes <runs>/curves.json and prints one line per point.

Run from the repository root (about 20 minutes a curve on 2 CPU cores):
    python tests/bench/toy_curve.py --method dshmp --variants=",--no-hmp" --every 250
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def curve(method, variant, out, steps, every, extra, seed):
    """The (step, J&F, motion-only J&F) points of one run, training the missing segments."""
    points = []
    for step in range(every, steps + every, every):
        step = min(step, steps)
        point = out / "curve" / f"{step}.json"
        if not point.is_file():
            resume = ["--resume"] if (out / "last.pt").is_file() else []
            command = [sys.executable, f"{method}.py", "--data", "toy", "--train", "--steps", str(step), "--seed",
                       str(seed), "--out", str(out), *resume, *variant.split(), *extra]
            print(" ".join(command), flush=True)
            subprocess.run(command, cwd=REPO, check=True)
            point.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "eval.json", point)
        result = json.loads(point.read_text())
        points.append({"step": step, "J&F": result["J&F"], "motion_only": result.get("motion_only", {}).get("J&F"),
                       "floor_every_look_alike":
                           result.get("motion_only_references", {}).get("every_look_alike", {}).get("J&F")})
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dshmp")
    parser.add_argument("--variants", default="", help='comma-separated flags, "" the full model')
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="", help="folder of the runs (default runs/toy-curve-<method>)")
    parser.add_argument("--extra", default="", help="flags added to every segment")
    args = parser.parse_args(argv)
    runs = Path(args.runs or REPO / "runs" / f"toy-curve-{args.method}")
    curves = {}
    for variant in args.variants.split(","):
        name = variant.replace("--", "").replace(" ", "_") or "full"
        curves[variant] = curve(args.method, variant, runs / name, args.steps, args.every, args.extra.split(),
                                args.seed)
        for p in curves[variant]:
            print(f"{name:12s} step {p['step']:6d}  J&F {p['J&F']:.3f}  motion-only {p['motion_only']:.3f}"
                  f"  (floor {p['floor_every_look_alike']:.3f})")
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "curves.json").write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
