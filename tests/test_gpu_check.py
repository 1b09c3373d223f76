"""benchmarks/gpu_check.py --dry-run lists every step of the GPU check, and every command it lists would
start: its script exists and takes each flag given (read from the script's --help, shared with
test_help.py), and a pytest step names an existing test file. Every pretraining method of
common/methods.py has its compiled smoke run and its step speeds; BYOL, or each --resume method, its
kill -9 and resume."""
import os
import re
import shlex
import subprocess
import sys

from conftest import REPO, cli_env
from helptext import run_help

from common import methods


def listed_commands(tmp_path, *flags):
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path), *flags],
                       cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not os.listdir(tmp_path)                          # a dry run writes nothing
    return [line for line in r.stdout.splitlines() if line.startswith("[")]


def test_dry_run_lists_every_step_and_each_command_exists(tmp_path):
    lines = listed_commands(tmp_path)
    parts = {line[1:line.index("]")] for line in lines}
    assert parts == {"smoke", "steps", "audit", "resume", "beit", "lightly"}
    scripts = set()
    for line in lines:
        argv = [a for a in shlex.split(line.split(": ", 1)[1]) if "=" not in a or a.startswith("-")]
        assert argv[0] == "python"
        if argv[1] == "-m":
            assert argv[2] == "pytest" and all(os.path.isfile(os.path.join(REPO, a)) for a in argv[3:]
                                               if a.endswith(".py"))
            continue
        script = argv[1]
        assert os.path.isfile(os.path.join(REPO, script)), script
        scripts.add(script)
        help_text = run_help(script).stdout
        for flag in (a for a in argv[2:] if a.startswith("--")):
            assert re.search(rf"^\s+(?:-\w, )?{re.escape(flag)}(?=[\s,=]|$)", help_text, re.M), (script, flag)
    every = methods.all_methods()
    assert {m.script for m in every} | {"evaluate.py", "finetune_beit.py", "benchmarks/gpu_check.py",
                                        "benchmarks/bench_lightly.py"} <= scripts
    compiled = [line for line in lines if line.startswith("[smoke] pretrain_")]
    assert sorted(line.split(": ", 1)[1].split()[2] for line in compiled) == sorted(m.script for m in every)
    assert all("--compile" in line and "--device cuda" in line for line in compiled)
    (speeds,) = [shlex.split(line.split(": ", 1)[1]) for line in lines if line.startswith("[steps]")]
    assert speeds[speeds.index("--methods") + 1].split(",") == [m.name for m in every]
    resume = [line for line in lines if line.startswith("[resume]")]
    assert len(resume) == 4 and all(" pretrain_byol.py " in line for line in resume)


def test_resume_all_kills_and_resumes_every_method(tmp_path):
    lines = listed_commands(tmp_path, "--only", "resume", "--resume", "all")
    assert {line[1:line.index("]")] for line in lines} == {"resume"}
    for m in methods.all_methods():
        runs = [line for line in lines if f" {m.script} " in line]
        assert len(runs) == 4 and all(" ".join(m.smoke_flags) in line for line in runs), m.name
        assert sum("--save-every" in line for line in runs) == 2
