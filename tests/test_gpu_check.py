"""benchmarks/gpu_check.py --dry-run lists every step of the GPU check, and every command it lists would
start: its script exists and takes each flag given (read from the script's --help, shared with
test_help.py), and a pytest step names an existing test file."""
import os
import re
import shlex
import subprocess
import sys

from conftest import REPO, cli_env
from helptext import run_help


def listed_commands(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                       env=cli_env(), capture_output=True, text=True)
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
    assert {"pretrain_byol.py", "pretrain_barlow.py", "pretrain_simclr.py", "evaluate.py", "finetune_beit.py",
            "benchmarks/gpu_check.py", "benchmarks/bench_lightly.py"} <= scripts
    compiled = [line for line in lines if line.startswith("[smoke] pretrain_")]
    assert len(compiled) == 3 and all("--compile" in line and "--device cuda" in line for line in compiled)
