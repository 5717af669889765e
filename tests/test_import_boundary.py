"""The math core stays torch-only: pipeline/diffusion and pipeline/models import no frameworks."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ["pipeline/diffusion", "pipeline/models"]
FORBIDDEN = {"ray", "prefect", "fsspec", "s3fs", "webdataset", "boto3", "botocore", "aiobotocore"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("pkg", CORE)
def test_core_sources_import_no_framework(pkg):
    files = sorted((ROOT / pkg).rglob("*.py"))
    assert files, f"no sources under {pkg}"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_importing_core_loads_no_framework_module():
    # Transitive check in a clean interpreter: importing every core module pulls in none of them.
    mods = [".".join(p.relative_to(ROOT).with_suffix("").parts) for pkg in CORE
            for p in sorted((ROOT / pkg).rglob("*.py")) if p.name != "__init__.py"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods)
            + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
            + "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_check_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import ray\nfrom prefect import flow\n")
    assert _imports(f) & FORBIDDEN == {"ray", "prefect"}


# ---- the boundaries of the redesign: one Ray adapter, Prefect only in flows/, no cycles ----------------

RAY_ALLOWED = {"pipeline/raykit.py", "pipeline/training/ray_train.py"}


def _all_imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports (module level and inside functions), resolved to dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}  # `from . import storage` names a module
    return names


def _sources(pkg: str) -> list[pathlib.Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_ray_is_imported_only_in_the_adapter_and_ray_train():
    bad = {str(f.relative_to(ROOT)) for f in _sources("pipeline")
           if any(m.split(".")[0] == "ray" for m in _all_imports(f))} - RAY_ALLOWED
    assert not bad, f"ray imported outside {sorted(RAY_ALLOWED)}: {sorted(bad)}"


def test_prefect_is_imported_only_under_flows():
    bad = [str(f.relative_to(ROOT)) for f in _sources("pipeline")
           if any(m.split(".")[0] in ("prefect", "flows") for m in _all_imports(f))]
    assert not bad, f"pipeline/ imports prefect or flows: {bad}"


def _module_graph() -> dict[str, set[str]]:
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in _sources("pipeline")}
    return {m: {d for d in _all_imports(f) if d in files and d != m} for m, f in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_pipeline():
    """Module level or inside functions, no module of pipeline/ reaches itself through its imports
    (package __init__ files re-export lazily and are left out)."""
    graph = {m: {d for d in deps if not _is_package(d)} for m, deps in _module_graph().items()
             if not _is_package(m)}
    assert _cycles(graph) == []


def _is_package(mod: str) -> bool:
    return (ROOT / mod.replace(".", "/") / "__init__.py").exists()


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _public_functions(pkg: str):
    """(file, qualified name, parameter count) of every public function and method under `pkg`."""
    for f in _sources(pkg):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                funcs = [(f"{node.name}.{n.name}", n) for n in node.body
                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            elif isinstance(node, ast.Module):
                funcs = [(n.name, n) for n in node.body
                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            else:
                continue
            for name, fn in funcs:
                if any(part.startswith("_") for part in name.split(".")):
                    continue
                a = fn.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs
                          if p.arg not in ("self", "cls")]
                params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                yield str(f.relative_to(ROOT)), name, len(params)


def test_no_public_function_takes_more_than_a_dozen_parameters():
    """Options that travel together are one small frozen dataclass (RunOptions, SamplingPlan, ...)."""
    big = [(f, name, n) for pkg in ("pipeline", "flows") for f, name, n in _public_functions(pkg)
           if n > 12 and not f.endswith("cli.py")]
    assert not big
