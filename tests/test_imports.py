"""The package's import graph: no module imports one that imports it back, not even inside a
function (shared pieces, errors, atomic writes, inference, live in small modules below their
users); inside the package every import of the package is relative, and nothing edits
sys.path."""
import ast
import glob
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "imgclf")


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def package_modules():
    """{dotted module name: path} for every module of the package."""
    paths = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    return {module_name(p): p for p in sorted(paths)}


def resolve(current, node, is_package):
    """The dotted names a relative or absolute ImportFrom node brings in (module and each name)."""
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def project_imports():
    """{module: set of package modules it imports anywhere in its file}."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= set(resolve(name, node, path.endswith("__init__.py")))
        # a package's __init__ is imported with each of its modules: not an edge of its own
        graph[name] = {m for m in imported if m in modules and m != name
                       and not name.startswith(m + ".")}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_project_import_graph_has_no_cycle():
    graph = project_imports()
    assert {"imgclf.cli.train", "imgclf.cli.predict", "imgclf.app.inference", "imgclf.errors",
            "imgclf.engine.feature_trainer"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_imports_itself_relatively_and_never_edits_sys_path():
    for name, path in package_modules().items():
        with open(path) as f:
            source = f.read()
        tree = ast.parse(source, path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("imgclf") for a in node.names), name
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("imgclf"), name
        assert "sys.path" not in source, f"{name} edits sys.path"


def test_the_top_level_scripts_only_consume_the_package():
    for script in ("train", "predict", "export", "serve", "model_utils", "data_utils"):
        with open(os.path.join(ROOT, script + ".py")) as f:
            tree = ast.parse(f.read())
        defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defined, f"{script}.py defines {defined[0].name}: it belongs in imgclf/"


# Bottom to top: a module may import from its own layer and the layers below it.
LAYERS = [{"utils", "errors", "version"}, {"data", "models"}, {"heads", "checkpoints"},
          {"app"}, {"analysis"}, {"engine"}, {"export"}, {"cli", "api", "__init__"}]


def layer_of(module):
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_each_layer_imports_only_from_the_layers_below():
    upward = [(a, b) for a, imported in project_imports().items() for b in imported
              if layer_of(b) > layer_of(a)]
    assert upward == []
