"""Train and evaluate a method on the toy set for several seeds and variants (the full model and
each ablation flag), and write the README's toy table from the eval.json files the runs produced:
J&F overall and on the motion-only expressions as mean ± std over the seeds (and on their
order-free and order-dependent parts, for runs whose eval.json has them), the floors on those
expressions (the same for every run: they come from the ground truth), the wall time per run, and
the training steps (the last step of each run's log.jsonl).

Each run is `python <method>.py --data toy --train --seed S --out <runs>/<variant>-seed<S> <flags>`;
a run whose eval.json exists is not run again, so an interrupted table resumes. All runs and their
numbers are also written to <runs>/table.json. The block between <!-- toy-table:<block> --> and
<!-- /toy-table:<block> --> of the file --readme names (tests/bench/README.md, where every toy
table lives) is replaced (the block is named after the method unless --block names it). Image
methods (vatex, mracl) get mIoU, oIoU, Pr@0.5, Oc-IoU and mIoU on the motion-only sentences
instead of J&F. --summary writes the front page's one table instead: the full model of every
method, copied from the toy tables of tests/bench/README.md (no training).

With --jobs N, N runs train at a time, each with (CPU cores / N) threads (OMP_NUM_THREADS); the
table says so, since a run's wall time then is not the time of a run alone. --threads N gives each
run N threads (for two tables trained side by side, each --threads 1); the table says so too.

Run from the repository root (10-20 minutes a run on 2 CPU cores):
    python tests/bench/toy_table.py --method dshmp --variants=",--no-hmp" --readme tests/bench/README.md
    python tests/bench/toy_table.py --summary --readme README.md
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = ("dshmp", "dmvs", "vatex", "mracl")
METHOD_NAMES = {"dshmp": "DsHmp", "dmvs": "DMVS", "vatex": "VATEX", "mracl": "MRaCL"}
IMAGE_COLUMNS = ["mIoU", "oIoU", "Pr@0.5", "Oc-IoU"]  # the image methods' eval.json keys in the table
# the motion-only expressions split by whether the answer depends on which way time runs
# (data.toy.motion_only_order_keys); runs evaluated before that split have no such columns
ORDER_SUBSETS = {"order_free": "motion_only_order_free", "order_dependent": "motion_only_order_dependent"}
FLOORS = {"every_look_alike": "floor: segment every look-alike of the target (no motion)",
          "wrong_look_alikes": "floor: only the wrong look-alike(s)"}


def run(method, variant, seed, out, extra, train=True, threads=None):
    """Train and evaluate one (variant, seed) with `threads` torch threads (default: all); returns
    its record (reads the run's eval.json), or None when it has no eval.json and `train` is False."""
    eval_path = out / "eval.json"
    seconds, timing = None, {}
    if not eval_path.is_file() and not train:
        return None
    if not eval_path.is_file():
        command = [sys.executable, f"{method}.py", "--data", "toy", "--train", "--seed", str(seed), "--out", str(out),
                   *variant.split(), *extra]
        print(" ".join(command), flush=True)
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        start = time.time()
        subprocess.run(command, cwd=REPO, check=True, env=env)
        seconds = time.time() - start
        timing = {"seconds": seconds, **({"threads": threads} if threads else {})}
        (out / "wall_time.json").write_text(json.dumps(timing))
    elif (out / "wall_time.json").is_file():
        timing = json.loads((out / "wall_time.json").read_text())
        seconds = timing["seconds"]
    result = json.loads(eval_path.read_text())
    log = out / "log.jsonl"  # the run's training log: its last line is its last step
    steps = json.loads(log.read_text().splitlines()[-1]).get("step") if log.is_file() else None
    if "J&F" not in result:  # an image method (vatex.py, mracl.py): RefCOCO metrics, motion sentences
        return {"variant": variant, "seed": seed, "steps": steps, "seconds": seconds, "threads": timing.get("threads"),
                "references": {},
                **{k: result[k] for k in IMAGE_COLUMNS if k in result},
                "motion mIoU": result.get("motion", {}).get("mIoU")}
    return {"variant": variant, "seed": seed, "steps": steps, "J&F": result["J&F"], "J": result["J"], "F": result["F"],
            "motion_only": result.get("motion_only", {}).get("J&F"),
            **{column: result.get(subset, {}).get("J&F") for column, subset in ORDER_SUBSETS.items()},
            "seconds": seconds, "threads": timing.get("threads"),
            "references": {column: result.get(f"{subset}_references", {})
                           for column, subset in {"motion_only": "motion_only", **ORDER_SUBSETS}.items()}}


def wall_time(records) -> str:
    """Mean seconds of the runs that trained alone on the machine; "shared" when none did (a run
    that shared the cores, --jobs, or whose time was not recorded, is left out)."""
    alone = [r["seconds"] for r in records if r["seconds"] is not None and not r.get("threads")]
    return f"{statistics.mean(alone):.0f} s" if alone else "shared"


def threads_per_job(jobs):
    """Torch threads of each of `jobs` runs sharing the CPU cores (None: one run, all threads)."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(method, records, extra):
    """The markdown block: one row per variant, then the floors and how the numbers were made. With
    one seed per variant only the wall times are written: a score of one run is not a result."""
    video = "J&F" in records[0]
    columns = ["J&F", "motion_only", *(c for c in ORDER_SUBSETS if any(r.get(c) is not None for r in records))] \
        if video else [*IMAGE_COLUMNS, "motion mIoU"]
    one_seed = len({r["seed"] for r in records}) == 1
    columns = [] if one_seed else columns
    names = {"motion_only": "J&F, motion-only", "motion mIoU": "mIoU, motion-only",
             "order_free": "motion-only, order-free", "order_dependent": "motion-only, order-dependent"}
    def row(cells):
        return "| " + " | ".join(cells) + " |"
    lines = [row(["command", "seeds", *(names.get(c, c) for c in columns), "wall time per run"]),
             "|---|---|" + "---|" * len(columns) + "---|"]
    for variant in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in records if r["variant"] == variant]
        command = " ".join(f"python {method}.py --data toy --train {variant} {' '.join(extra)}".split())
        lines.append(row([f"`{command}`", str(len(mine)),
                          *(mean_std([r.get(c) for r in mine]) for c in columns), wall_time(mine)]))
    references = records[0]["references"]
    if video and references.get("motion_only") and columns:  # the same for every run: from the ground truth
        for floor, label in FLOORS.items():
            cells = [label, "", *(f"{references[c][floor]['J&F']:.3f}" if references.get(c) else ""
                                  for c in columns), ""]
            lines.append("|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|")
    lines.append("")
    seeds = sorted({r["seed"] for r in records})
    import torch  # only to name the build the runs used
    shared = (" A wall time is that of runs trained alone on the machine (train and evaluation); "
              "\"shared\": the runs shared the cores with other runs (--jobs, --threads), so their time is "
              "not given.") if any(r.get("threads") or r["seconds"] is None for r in records) else ""
    steps = sorted({r["steps"] for r in records if r.get("steps")})
    trained = f"{' or '.join(f'{s:,}' for s in steps)} training steps per run (log.jsonl); " if steps else ""
    made = (f"Seed {seeds[0]} only, so no scores (the 3-seed tables give them), written by "
            if one_seed else f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}, written by ")
    lines.append(f"{made}"
                 f"`tests/bench/toy_table.py` from the runs' eval.json files; {trained}{os.cpu_count()} CPU cores "
                 f"({platform.machine()}), torch {torch.__version__}.{shared}")
    return "\n".join(lines)


def summary(bench_readme: Path) -> str:
    """The front page's table: the full model of each method, copied from that method's block of
    the bench page (the row of its plain `python <method>.py --data toy --train` command and the
    first floor row), so the front page shows exactly the numbers the toy table wrote there."""
    text = bench_readme.read_text()
    lines = ["| method | command | seeds | J&F or mIoU | the same, motion-only | floor, motion-only |",
             "|---|---|---|---|---|---|"]
    for method in METHODS:
        block = re.search(f"<!-- toy-table:{method} -->(.*?)<!-- /toy-table:{method} -->", text, re.DOTALL)
        if block is None:
            raise SystemExit(f"--summary: {bench_readme} has no toy-table:{method} block (write its table first)")
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
                for line in block.group(1).splitlines() if line.startswith("|")]
        full = [r for r in rows if r[0] == f"`python {method}.py --data toy --train`"]
        if not full:
            raise SystemExit(f"--summary: the toy-table:{method} block of {bench_readme} has no row of the full "
                             f"model (variant \"\")")
        header = rows[0]
        score = "J&F" if "J&F" in header else "mIoU"
        motion = header.index(f"{score}, motion-only")
        floor = [r for r in rows if r[0] == FLOORS["every_look_alike"]]
        lines.append(f"| {METHOD_NAMES[method]} | {full[0][0]} | {full[0][1]} | {full[0][2]} ({score}) | "
                     f"{full[0][motion]} | {floor[0][motion] if floor else 'n/a'} |")
    lines += ["", "Mean ± standard deviation over the seeds of each method's toy table in "
              "[tests/bench/README.md](tests/bench/README.md), copied by `tests/bench/toy_table.py --summary`."]
    return "\n".join(lines)


def write_readme(readme: Path, method: str, block: str, tag: str = "toy-table") -> None:
    """Replace the text between <!-- tag:method --> and <!-- /tag:method --> with `block`."""
    text = readme.read_text()
    start, end = f"<!-- {tag}:{method} -->", f"<!-- /{tag}:{method} -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {start} ... {end} block to replace")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{block}\n{end}", text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dshmp")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", default="", help='comma-separated flags of each row, "" the full model '
                        '(e.g. --variants=",--no-hmp")')
    parser.add_argument("--runs", default="", help="folder of the runs (default runs/toy-table-<method>)")
    parser.add_argument("--extra", default="", help="flags added to every run (e.g. a smaller --steps)")
    parser.add_argument("--readme", default="", help="replace this file's toy-table block")
    parser.add_argument("--block", default="", help="the README block's name (default: the method)")
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the finished runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores / jobs threads")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of each run (default: cores / jobs); "
                        "runs given threads are marked as sharing the cores")
    parser.add_argument("--summary", action="store_true", help="the front page's table of every method's full "
                        "model, copied from the toy tables of the bench page (--bench)")
    parser.add_argument("--bench", default="", help="--summary: the page holding the toy tables "
                        "(default tests/bench/README.md)")
    args = parser.parse_args(argv)
    if args.summary:
        block = summary(Path(args.bench or REPO / "tests" / "bench" / "README.md"))
        print(block)
        if args.readme:
            write_readme(Path(args.readme), "summary", block)
        return
    runs = Path(args.runs or REPO / "runs" / f"toy-table-{args.method}")
    extra = args.extra.split()
    threads = args.threads or threads_per_job(args.jobs)
    tasks = [(variant, seed, runs / f"{variant.replace('--', '').replace(' ', '_') or 'full'}-seed{seed}")
             for variant in args.variants.split(",") for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the subprocesses
        records = [r for r in pool.map(lambda t: run(args.method, *t, extra, train=not args.table_only,
                                                     threads=threads), tasks) if r is not None]
    if not records:
        raise SystemExit(f"no finished runs in {runs}")
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "table.json").write_text(json.dumps(records, indent=1))
    block = table(args.method, records, extra)
    print(block)
    if args.readme:
        write_readme(Path(args.readme), args.block or args.method, block)


if __name__ == "__main__":
    main()
