"""The parity table of tests/bench/README.md, written from the test suite's own output: runs
`python -m pytest tests/test_parity.py -s`, reads the `PARITY | module | repo @ commit | ours or
broken | difference` lines its tests print (tests/test_parity.py `report`), and writes one row per
module: the largest max abs difference of our module from the official one over the fixture's
cases, and the smallest of its deliberately broken variants (which the suite requires to be over
100 x the tolerance). The block between <!-- parity-table --> and <!-- /parity-table --> of
--readme is replaced. A failing parity test stops the script: no table is written from it.

    python tests/parity/parity_table.py --readme tests/bench/README.md
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def read_lines(output: str) -> dict:
    """{module: {"official": "repo @ commit", "ours": [differences], "broken": [differences]}}, in
    the order the modules are first reported."""
    rows = {}
    for line in output.splitlines():
        match = re.search(r"PARITY \| (.+?) \| (.+?) \| (ours|broken) \| (\S+)$", line.strip())
        if match:
            module, official, kind, value = match.groups()
            row = rows.setdefault(module, {"official": official, "ours": [], "broken": []})
            row[kind].append(float(value))
    return rows


def table(rows: dict, torch_version: str) -> str:
    lines = ["| module | official code | max abs difference, ours | a broken variant (smallest) |",
             "|---|---|---|---|"]
    for module, row in rows.items():
        ours = f"{max(row['ours']):.1e}" if row["ours"] else "n/a"
        broken = f"{min(row['broken']):.1e}" if row["broken"] else "n/a"
        lines.append(f"| {module} | {row['official']} | {ours} | {broken} |")
    lines += ["", "Written by `tests/parity/parity_table.py` from the output of `python -m pytest "
              f"tests/test_parity.py -s` (fp32 on the CPU, torch {torch_version}); the suite fails "
              "when a difference of ours is over 1e-4 or one of a broken variant is not over 1e-2."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default="", help="replace this file's parity-table block")
    args = parser.parse_args(argv)
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_parity.py", "-s", "-q",
                             "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stdout[-3000:] + result.stderr[-2000:] + "\nthe parity tests failed; no table")
    import torch  # only to name the build the table was made with
    block = table(read_lines(result.stdout), torch.__version__)
    print(block)
    if args.readme:
        readme = Path(args.readme)
        text = readme.read_text()
        start, end = "<!-- parity-table -->", "<!-- /parity-table -->"
        if start not in text or end not in text:
            sys.exit(f"{readme} has no {start} ... {end} block to replace")
        before, rest = text.split(start, 1)
        readme.write_text(f"{before}{start}\n{block}\n{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    main()
