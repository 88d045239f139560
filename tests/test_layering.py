"""Layers point down (STYLE.md 12): library packages never import pipelines, launch, experiments or
bench; experiment and study files never import the launcher (it imports them); no module imports another
package's private `_module`; no import cycle, function-local imports included. The checker reads the
source with `ast` (nothing is imported) and is itself tested on a small tree with one violation of each
kind."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = (
    "losses", "models", "sharding", "sampling", "scoring", "train", "rejection", "data", "interop", "rewards",
    "kernels",
)  # fmt: skip
UPPER = ("rlhf_jax.pipelines", "launch", "experiments", "bench")


def _modules(root: str, packages) -> dict[str, str]:
    """{dotted module name: path} of every .py file under `root`'s `packages`."""
    out = {}
    for package in packages:
        for dirpath, _, files in os.walk(os.path.join(root, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules: dict[str, str]) -> list[tuple[str, int]]:
    """(imported module or name, line) of every absolute import in the file, at any depth (function-local
    too); `from pkg import name` gives `pkg.name` (a module, or a name defined in `pkg`)."""
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def _private_attributes(path: str, modules: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """(alias, module, attribute, line) of every `alias._private` where `alias` names a module of the
    tree bound by an import in the file (`from rlhf_jax import sampling`, `import rlhf_jax.x as y`)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in modules:
                    bound[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in modules:
                    bound[a.asname or a.name] = full
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
            out.append((node.value.id, bound[node.value.id], node.attr, node.lineno))
    return out


def violations(root: str, packages=("rlhf_jax", "launch", "experiments", "bench")) -> list[str]:
    """Every upward import, private import and import cycle in `root`'s packages, as messages."""
    modules = _modules(root, packages)
    found, graph = [], {}
    for name, path in modules.items():
        parts = name.split(".")
        layer = parts[1] if parts[0] == "rlhf_jax" and len(parts) > 1 else ""
        graph[name] = set()
        for target, line in _imports(path, modules):
            where = f"{os.path.relpath(path, root)}:{line}"
            # A package's command line (__main__) is an edge, like launch/, and may reach up.
            if layer in LIBRARY and parts[-1] != "__main__" and target.startswith(UPPER):
                found.append(f"{where}: library module {name} imports {target} (upward)")
            if parts[0] == "experiments" and target.split(".")[0] == "launch":
                found.append(
                    f"{where}: experiment module {name} imports {target} (the launcher imports them)"
                )
            tparts = target.split(".")
            for i, part in enumerate(tparts[1:], 1):
                owner = ".".join(tparts[:i])
                private = part.startswith("_") and not part.startswith("__")
                if private and not (name == owner or name.startswith(owner + ".")):
                    found.append(f"{where}: {name} imports {target}, private to {owner}")
            module = target if target in modules else target.rpartition(".")[0]
            if module in modules and module != name:
                graph[name].add(module)
        # `module._name` through an imported module of another package (`sampling._generate`).
        for alias, target, attr, line in _private_attributes(path, modules):
            owner = target.rpartition(".")[0] if target.rpartition(".")[2].startswith("_") else target
            package = owner if owner in modules and modules[owner].endswith("__init__.py") else (
                owner.rpartition(".")[0])  # fmt: skip
            if not (name == target or name.startswith(package + ".") or name == package):
                where = f"{os.path.relpath(path, root)}:{line}"
                found.append(f"{where}: {name} reads {alias}.{attr}, private to {target}")
    # Cycles: strongly connected components of more than one module (Tarjan, iterative).
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(f"import cycle: {' -> '.join(sorted(component))}")
    return found


def test_the_code_base_keeps_its_layers():
    assert violations(ROOT) == []


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    files = {
        "rlhf_jax/__init__.py": "",
        "rlhf_jax/losses/__init__.py": "from rlhf_jax.losses import _core\n",
        "rlhf_jax/losses/_core.py": "",
        "rlhf_jax/train/__init__.py": "",
        "rlhf_jax/train/steps.py": "from rlhf_jax.losses import _core\n",  # private of another package
        "rlhf_jax/sampling.py": "def f():\n    from rlhf_jax.pipelines import reward\n",  # upward, local
        "rlhf_jax/pipelines/__init__.py": "",
        "rlhf_jax/pipelines/reward.py": "from rlhf_jax.pipelines import common\n",
        "rlhf_jax/pipelines/common.py": "def g():\n    from rlhf_jax.pipelines import reward\n",  # cycle
        "rlhf_jax/pipelines/config.py": "def _fields():\n    pass\n",
        "launch/__init__.py": "",
        "launch/train.py": "from rlhf_jax.pipelines.config import _fields\n",  # a private name
        "rlhf_jax/interop/__init__.py": "",
        "rlhf_jax/interop/__main__.py": "from rlhf_jax.pipelines import common\n",  # an edge: allowed
        "experiments/__init__.py": "from experiments._study import Study\n",  # its own private: allowed
        "experiments/_study.py": "",
        "experiments/s.py": "def get_study():\n    from launch.study import Study\n",  # the launcher
        "bench/__init__.py": "",
        "bench/b.py": "from rlhf_jax.pipelines import config\nconfig._fields()\n",  # a private attribute
        "rlhf_jax/pipelines/evaluation.py": "from rlhf_jax.pipelines import config\nconfig._fields()\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(str(tmp_path), packages=("rlhf_jax", "launch", "experiments", "bench"))
    assert len(found) == 6, found  # evaluation.py reads its own package's private name: allowed
    assert any("bench/b.py:2" in v and "reads config._fields, private to rlhf_jax.pipelines.config" in v
               for v in found)  # fmt: skip
    assert any("experiments/s.py:2" in v and "imports launch.study.Study" in v for v in found)
    assert any("launch/train.py:1" in v and "private to rlhf_jax.pipelines.config" in v for v in found)
    assert any("rlhf_jax/train/steps.py:1" in v and "private to rlhf_jax.losses" in v for v in found)
    assert any("rlhf_jax/sampling.py:2" in v and "(upward)" in v for v in found)
    assert any(v == "import cycle: rlhf_jax.pipelines.common -> rlhf_jax.pipelines.reward" for v in found)
