"Repository hygiene: nothing machine-specific is committed, and notebooks carry only small, error-free outputs."
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
# absolute paths of somebody's machine: home folders, temp folders, our build machines (split so this file does not match)
MACHINE_PATH = re.compile("(" + "|".join(["/" + "home/[A-Za-z0-9_.-]+/", "/" + "Users/[A-Za-z0-9_.-]+/", "/" + "root/",
                                         "/" + "work/", "/" + "tmp/[A-Za-z0-9_]", r"[A-Z]:\\\\" + "Users"]) + ")")


def tracked_files():
    try: out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError): pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_absolute_machine_paths():
    hits = []
    for f in tracked_files():
        if f.suffix in (".png", ".safetensors", ".parquet") or not f.is_file(): continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if m := MACHINE_PATH.search(line): hits.append(f"{f.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert not hits, "absolute paths of a machine are committed:\n" + "\n".join(hits[:20])


def test_notebook_outputs_small_and_clean():
    for f in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = nbformat.read(f, as_version=4)
        total = 0
        for c in nb.cells:
            for o in c.get("outputs", []):
                assert o.output_type != "error", f"{f.name}: cell {c.id} has an error output"
                size = len(str(o))
                assert size < 100_000, f"{f.name}: cell {c.id} has an output of {size} bytes"
                total += size
        assert total < 300_000, f"{f.name}: outputs total {total} bytes"


def test_every_import_of_the_package_is_a_runtime_requirement():
    """Every third-party module that the package imports (at the top or inside a function), or that a stage notebook the
    batch runner executes imports, comes from a distribution that settings.ini's `requirements` install, not only the dev
    ones: `pip install instructengine` must run every stage. (The runner once imported fastcore, a dev requirement, and the
    notebooks' test cells import fastcore.test: `instructengine batch` failed outside a dev install.)"""
    import ast
    import sys
    from importlib import metadata

    from instructengine.batch import STAGES
    sys.path.insert(0, str(ROOT / "tools"))   # only for this import: tools/ is not a package, and the other tests need not see it
    try: from gpu_figures import _norm, runtime_closure   # what `gpu_figures.py wheels` carries to a GPU is cut from the same closure
    finally: sys.path.remove(str(ROOT / "tools"))
    closure, dists = set(runtime_closure()), metadata.packages_distributions()
    sources = {f.name: f.read_text() for f in sorted((ROOT / "instructengine").glob("*.py"))}
    for nb in STAGES.values():   # code cells, IPython's magics and shell lines left out
        cells = nbformat.read(ROOT / "nbs" / nb, as_version=4).cells
        sources[nb] = "\n".join(line for c in cells if c.cell_type == "code" for line in c.source.splitlines() if not line.lstrip().startswith(("%", "!")))
    missing = {}
    for name, src in sources.items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import): names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module: names = [node.module]
            else: continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"instructengine"}:
                assert top in dists, f"{name} imports {top}, which no installed distribution provides"
                if not {_norm(d) for d in dists[top]} & closure: missing.setdefault(top, set()).add(name)
    assert not missing, f"imported, but not installed by settings.ini's requirements: { {k: sorted(v) for k, v in missing.items()} }"
