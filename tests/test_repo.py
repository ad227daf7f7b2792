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
