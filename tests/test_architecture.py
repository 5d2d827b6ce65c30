"""The shape of the code: one-way imports (no cycles), one name per module, a torch-free core, small
modules. Built from every import statement in every module, function-level ones included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> the package name it is installed as ([tool.setuptools] package-dir)
PACKAGES = {"vqdiff": "vqdiff", "training": "vqdiff.training", "export": "vqdiff.export", "service": "vqdiff.service"}
MAX_LINES = 400


def project_modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name ``path`` imports (absolute, relative resolved), at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in imported_names(path, name):
            target = imp if imp in mods else imp.rpartition(".")[0]
            if target in mods and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_graph_sees_function_level_imports_and_cycles():
    assert "vqdiff.codec" in import_graph()["vqdiff.batch.stages"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stages_depend_one_way():
    """service -> export -> vqdiff core; batch -> export; training -> vqdiff core; the core imports none."""
    allowed = {
        "vqdiff.service": ("vqdiff.service", "vqdiff.export", "vqdiff"),
        "vqdiff.batch": ("vqdiff.batch", "vqdiff.export", "vqdiff"),
        "vqdiff.export": ("vqdiff.export", "vqdiff"),
        "vqdiff.training": ("vqdiff.training", "vqdiff"),
    }
    stages = ("vqdiff.service", "vqdiff.batch", "vqdiff.export", "vqdiff.training")
    bad = []
    for mod, deps in import_graph().items():
        stage = next((s for s in stages if mod == s or mod.startswith(s + ".")), "vqdiff")
        for dep in deps:
            dep_stage = next((s for s in stages if dep == s or dep.startswith(s + ".")), "vqdiff")
            if dep_stage != stage and dep_stage not in allowed.get(stage, ("vqdiff",)):
                bad.append(f"{mod} -> {dep}")
    assert not bad, bad


def test_one_name_per_module():
    """No code imports the source folders under their top-level names (``service.x``, ``export.x``)."""
    files = [*project_modules().values(), *REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")]
    bad = []
    for path in files:
        for imp in imported_names(path, "tests.x"):
            if imp.split(".")[0] in ("service", "export", "training"):
                bad.append(f"{path.relative_to(REPO)}: {imp}")
    assert not bad, bad
    for bentofile in ("bentofile.yaml", "service/bentofile-gpu.yaml"):
        assert 'service: "vqdiff.service.app:VQDiff"' in (REPO / bentofile).read_text()


def test_the_service_uses_public_apis_only():
    """No import of BentoML's private packages (``bentoml._internal``, ``_bentoml_impl``, ``_bentoml_sdk``)
    or of any library's private module, anywhere in service/; and at most 1,000 lines in all."""
    mods = {n: p for n, p in project_modules().items() if n == "vqdiff.service" or n.startswith("vqdiff.service.")}
    private = sorted(f"{n}: {imp}" for n, p in mods.items() for imp in imported_names(p, n)
                     if not imp.startswith("vqdiff") and any(part.startswith("_") and part != "__future__"
                                                             for part in imp.split(".")))
    assert not private, private
    text = "\n".join(p.read_text() for p in mods.values())
    assert "_internal" not in text and "_bentoml_impl" not in text
    assert sum(len(p.read_text().splitlines()) for p in mods.values()) <= 1000


def test_modules_stay_small():
    long = {str(p.relative_to(REPO)): n for p in project_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _without_torch(code: str) -> subprocess.CompletedProcess:
    prog = "import sys\n" + code + "\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    return subprocess.run([sys.executable, "-c", prog], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_core_gateway_and_batch_import_without_torch():
    res = _without_torch("import vqdiff, vqdiff.codec, vqdiff.api, vqdiff.checkpoint, vqdiff.io, vqdiff.metrics\n"
                         "import vqdiff.batch.job, vqdiff.export.runtime, vqdiff.service.uploads\n"
                         "from vqdiff import Codec, Latents, load_bundle")
    assert res.returncode == 0, res.stderr[-3000:]


def test_gateway_service_imports_without_torch():
    pytest.importorskip("bentoml")
    res = _without_torch("import vqdiff.service.app")  # the arbiter and `bentoml build` import it
    assert res.returncode == 0, res.stderr[-3000:]
