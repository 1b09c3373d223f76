"""How long each script takes to answer --help, --version and a mistyped flag: the median wall time of
--repeats runs, each a fresh `python <script> ...` from the repository's root, and the median CPU time
(user + system) of the same runs, which other load on the machine does not inflate; printed as a
Markdown table with each run's exit code where it is not the expected one (0 for --help and --version,
2 for the bad flag).

    python benchmarks/bench_startup.py                        # this checkout, about 20 s
    git archive HEAD | tar -x -C /tmp/before && ln -s "$PWD/.venv" /tmp/before/.venv
    python benchmarks/bench_startup.py --repo /tmp/before     # another checkout, with its own .venv

A script answers at once when it parses its flags before importing torch (common/cli.py, parse_early);
importing torch, torchvision, timm or medmnist first costs seconds on a small CPU."""
import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cli  # noqa: E402
from common.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = (("--help", ["--help"], 0), ("--version", ["--version"], 0), ("bad flag", ["--no-such-flag"], 2))


def get_args_parser():
    parser = argparse.ArgumentParser("bench_startup", description=__doc__, formatter_class=cli.HelpFormatter)
    cli.one_line_errors(parser)
    # * What to time
    g = parser.add_argument_group("what to time")
    g.add_argument("--repo", default=REPO, help="the checkout whose scripts are timed (default: this one)")
    g.add_argument("--python", default=None,
                   help="interpreter to run them with (default: <repo>/.venv/bin/python if there, else this one)")
    g.add_argument("--scripts", nargs="+", default=None, metavar="PATH",
                   help="scripts relative to --repo (default: every *.py at its root and in scripts/)")
    g.add_argument("--repeats", type=int, default=3, help="runs of each command; the median is reported")
    # * Output
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, help="also write the times as JSON to this file")
    return parser


def timed_run(python, script, args, repo):
    """(wall seconds, CPU seconds, exit code) of one `python script args` run from `repo`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSSL_NO_DOWNLOAD": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([python, script, *args], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, r.returncode


def main():
    args = cli.parse_args(get_args_parser(), ranges={"repeats": cli.AT_LEAST_1})
    repo = os.path.abspath(args.repo)
    python = args.python or next((p for p in [os.path.join(repo, ".venv", "bin", "python")] if os.path.exists(p)),
                                 sys.executable)
    scripts = args.scripts or sorted(os.path.relpath(p, repo) for pattern in ("*.py", "scripts/*.py")
                                     for p in glob.glob(os.path.join(repo, pattern)))
    if not scripts:
        raise UserError(f"--repo {repo} has no *.py scripts at its root or in scripts/; give a MedSSL checkout")

    results = {}
    print(f"{repo}: median of {args.repeats} runs, wall seconds (CPU seconds)\n")
    print("| script | " + " | ".join(name for name, _, _ in CASES) + " |")
    print("|---|" + "---:|" * len(CASES))
    for script in scripts:
        row = {}
        for name, flags, expected in CASES:
            runs = [timed_run(python, script, flags, repo) for _ in range(args.repeats)]
            row[name] = {"seconds": statistics.median(t for t, _, _ in runs),
                         "cpu_seconds": statistics.median(c for _, c, _ in runs),
                         "exit_codes": sorted({code for _, _, code in runs})}
        results[script] = row
        cells = [f"{row[name]['seconds']:.2f} ({row[name]['cpu_seconds']:.2f})" + ("" if row[name]["exit_codes"] == [expected]
                                                 else f" (exit {', '.join(map(str, row[name]['exit_codes']))})")
                 for name, _, expected in CASES]
        print(f"| {script} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        from common.rundir import atomic_write_text  # torch: only once the table is done
        atomic_write_text(args.out, json.dumps({"repo": repo, "python": python, "repeats": args.repeats,
                                                "times": results}, indent=1) + "\n")


if __name__ == "__main__":
    cli.run_main(main)
