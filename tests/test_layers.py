"""common/ is layered: every module imports only modules below it, errors.py at the bottom. An import
inside a function counts too: a cycle hidden in one still ties the modules into one."""
import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imports_of(path):
    """The common/ modules one file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module == "common":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("common."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("common.")}
    return found


def graph():
    modules = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(REPO, "common", "*.py"))}
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(edges):
    """One import cycle of `edges` as a list of module names, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_common_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle in common/: " + " -> ".join(cycle)


def test_errors_is_the_bottom():
    edges = graph()
    assert edges["errors"] == set()
    # every module that raises a UserError takes it from the bottom, not through a module above it
    for path in glob.glob(os.path.join(REPO, "common", "*.py")):
        assert "from common.cli import UserError" not in open(path).read(), path
