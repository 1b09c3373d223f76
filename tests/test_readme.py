"""The README and docs/ say only what is true of the repository: every relative link points at an
existing file (and an existing heading, for #anchors), and every command shown runs: its script
exists, answers --help (reproduce scripts: --dry-run), and every flag it passes is one the script
accepts. The reproduce scripts' dry runs are read the same way, so a command they would run with a
flag that no longer exists fails here too."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from helptext import REPO, run_help

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
# Written on other branches and merged by the lead: their absence is excused here, nothing else is.
# Remove an entry once it exists in the repository.
PENDING = {"docs/DATA.md", "pretrain_simclr.py"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```bash\n(.*?)```", re.S)


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    with open(path) as f:
        return {slug(line.lstrip("#")) for line in f if line.startswith("#")}


def links(doc):
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    text = FENCE.sub("", text)  # code blocks hold commands, not links
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]


NOT_FOR_USERS = ("../shared", "issue ", "quality bar", "was lent")  # the project's workshop, not the user's


def test_the_docs_exist_and_the_readme_is_a_guide_not_a_notebook():
    assert {"docs/RESULTS.md", "docs/REPRODUCING.md", "docs/BENCHMARKS.md"} <= set(DOCS)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 320
    for doc in DOCS:
        with open(os.path.join(REPO, doc)) as f:
            text = f.read()
        for word in NOT_FOR_USERS:
            assert word not in text.lower(), (doc, word)


def test_code_comments_and_configs_speak_to_users_too():
    # a user reads the configs' and scripts' comments as documentation
    patterns = ("*.py", "common/*.py", "scripts/*", "scripts/slurm/*", "configs/*.yaml", "benchmarks/*.py")
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(REPO, p)) if os.path.isfile(f)})
    assert len(files) > 40
    for path in files:
        with open(path) as f:
            text = f.read().lower()
        for word in NOT_FOR_USERS:
            assert word not in text, (os.path.relpath(path, REPO), word)


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_points_at_an_existing_file_and_heading(doc):
    found = links(doc)
    assert found or doc != "README.md"
    for target in found:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else os.path.join(REPO, doc)
        rel = os.path.relpath(full, REPO)
        if rel in PENDING and not os.path.exists(full):
            continue
        assert os.path.exists(full), f"{doc} links to {target}, which does not exist"
        if anchor and full.endswith(".md"):
            assert anchor in anchors(full), f"{doc} links to {target}: no such heading"


def commands(doc):
    """Each shell command in the doc's ```bash blocks, as tokens (continuations joined, comments and
    `for ...; do` / `done` wrappers dropped)."""
    with open(os.path.join(REPO, doc)) as f:
        blocks = FENCE.findall(f.read())
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(";"):
                try:
                    tokens = shlex.split(part, comments=True)
                except ValueError:  # an unbalanced quote spanning parts
                    continue
                while tokens and tokens[0] in ("do", "then", "time"):
                    tokens = tokens[1:]
                if tokens:
                    found.append(tokens)
    return found


def script_of(tokens):
    """(environment, script, its arguments) of a command that runs a script of the repository, else None."""
    env = {}
    while tokens and re.match(r"[A-Z_]+=", tokens[0]):
        key, _, value = tokens[0].partition("=")
        env[key] = value
        tokens = tokens[1:]
    if not tokens:
        return None
    runner = os.path.basename(tokens[0])
    if runner.startswith("python") or runner == "bash":
        rest = tokens[1:]
    elif runner == "torchrun":  # torchrun's own flags come before the script
        rest = tokens[next((i for i, t in enumerate(tokens) if t.endswith(".py")), len(tokens)):]
    else:
        return None
    if not rest or not rest[0].endswith((".py", ".sh")):
        return None
    return env, os.path.normpath(rest[0]), rest[1:]


def flags(args):
    return [a.split("=")[0] for a in args if re.match(r"--[a-z]", a)]


def accepted(script, flag):
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", run_help(script).stdout) is not None


def check_python_command(script, args, where):
    if script in PENDING and not os.path.exists(os.path.join(REPO, script)):
        return
    assert os.path.isfile(os.path.join(REPO, script)), f"{where}: {script} does not exist"
    h = run_help(script)
    assert h.returncode == 0, f"{where}: {script} --help failed: {h.stderr}"
    unknown = [f for f in flags(args) if not accepted(script, f)]
    assert not unknown, f"{where}: {script} has no flag {unknown}"


def placeholders(env, tmp_path):
    """DATA= / UNLABELED= of a documented command (the user's own dataset) as an empty file or folder of
    that name in tmp_path, so that its dry run lists the commands that read it."""
    env = dict(env)
    for key in ("DATA", "UNLABELED"):
        if key in env:
            path = tmp_path / "own" / env[key]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch() if os.path.splitext(env[key])[1] else path.mkdir(exist_ok=True)
            env[key] = str(path)
    return env


def dry_run(script, env, tmp_path):
    env = placeholders(env, tmp_path)
    full = {**os.environ, **env, "PY": sys.executable, "RUNS": str(tmp_path / "runs"),
            "RESULTS": str(tmp_path / "results"), "MEDSSL_NO_DOWNLOAD": "1"}
    return subprocess.run(["bash", os.path.join(REPO, script), "--dry-run"], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=120)


ALL = [(doc, " ".join(tokens), found) for doc in DOCS for tokens in commands(doc)
       if (found := script_of(tokens)) is not None]


def test_the_readme_shows_commands_of_every_kind():
    shown = {script for doc, _, (_, script, _) in ALL if doc == "README.md"}
    assert {"pretrain_byol.py", "evaluate.py", "scripts/report.py", "scripts/compare.py",
            "scripts/reproduce_byol.sh"} <= shown


@pytest.mark.parametrize("doc,command,found", ALL, ids=[f"{d}: {c[:70]}" for d, c, _ in ALL])
def test_every_command_runs_its_help_or_dry_run_with_flags_the_script_accepts(doc, command, found, tmp_path):
    env, script, args = found
    if script.endswith(".py"):
        check_python_command(script, args, f"{doc}: {command}")
        return
    assert os.path.isfile(os.path.join(REPO, script)), f"{doc}: {script} does not exist"
    if not os.path.basename(script).startswith("reproduce_"):
        assert run_help(script).returncode == 0, f"{doc}: {script} --help failed"
        assert not [a for a in args if a not in ("--help", "-h")], f"{doc}: {script} takes no arguments"
        return
    assert set(args) <= {"--dry-run", "--help"}, f"{doc}: {command}"
    r = dry_run(script, env, tmp_path)
    assert r.returncode == 0, f"{doc}: {command} --dry-run: {r.stderr}"
    listed = 0
    for line in r.stdout.splitlines():  # "run  <python> <script>.py <flags>" for every step
        tokens = line.split()
        py = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if tokens and tokens[0] in ("run", "report") and py is not None:
            listed += 1
            check_python_command(os.path.relpath(tokens[py], REPO) if os.path.isabs(tokens[py]) else tokens[py],
                                 tokens[py + 1:], f"{script} --dry-run: {line}")
    assert listed > 0, r.stdout
    if "DATA" in env:  # the user's dataset is what the listed commands read
        assert f"--data {tmp_path / 'own' / env['DATA']}" in r.stdout, r.stdout
