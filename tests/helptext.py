"""`<script> --help`, run once per test session and shared by test_help.py and test_readme.py (a
benchmark's run imports torch: seconds), with what the run wrote, in the repository or its working directory."""
import functools
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache"}


@dataclass
class Help:
    returncode: int
    stdout: str
    stderr: str
    new_in_repo: list      # files the run created in the repository
    changed_in_repo: list  # files whose size or mtime changed
    new_in_cwd: list       # files it left in the (empty, temporary) directory it ran from


def tree(root):
    """Every file under root (but caches, .git and the venv) with its size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


@functools.lru_cache(maxsize=None)
def run_help(script):
    """Run `python|bash REPO/script --help` from an empty temporary directory."""
    command = ["bash"] if script.endswith(".sh") else [sys.executable]
    env = {**os.environ, "MEDSSL_NO_DOWNLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    before = tree(REPO)
    with tempfile.TemporaryDirectory() as cwd:
        r = subprocess.run([*command, os.path.join(REPO, script), "--help"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300)
        left = sorted(os.listdir(cwd))
    after = tree(REPO)
    return Help(r.returncode, r.stdout, r.stderr, sorted(set(after) - set(before)),
                sorted(p for p in before if p in after and before[p] != after[p]), left)
