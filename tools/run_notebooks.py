"""Execute notebooks in place, as `nbdev_test` does, so that their committed outputs match the code.

Cells flagged with a `tst_flags` flag (slow, gpu) or `eval: false`, and `nbdev_export()` cells, are skipped and
keep no output, unless `--flags` names the flag. Progress bars are off. Run `nbdev_clean` afterwards
(`make outputs` does both).

    python tools/run_notebooks.py nbs/00_core.ipynb [more.ipynb ...] [--flags slow]
"""
import argparse, configparser, os, re, sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

def directives(src: str) -> dict:
    "The nbdev `#| key value` lines at the top of a cell, as {key: value}."
    out = {}
    for line in src.splitlines():
        if not line.startswith("#|"): break
        key, _, val = line[2:].strip().partition(" ")
        out[key.rstrip(":")] = val.strip()
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--flags", default="", help="space-separated flags to run that are normally skipped")
    args = ap.parse_args()
    cfg = configparser.ConfigParser(); cfg.read(Path(__file__).parents[1] / "settings.ini")
    skip = set(cfg["DEFAULT"].get("tst_flags", "").split()) - set(args.flags.split())
    os.environ["INSTRUCTENGINE_PROGRESS"] = "0"
    failed = 0
    for fn in args.notebooks:
        fn = fn.resolve()
        nb = read_nb(fn)
        def no_eval(cell):
            if cell.cell_type != "code": return True
            d = directives(cell.source)
            if skip & d.keys() or d.get("eval", "").lower() == "false" or re.search(r"nbdev_export\(", cell.source):
                cell.outputs, cell.execution_count = [], None
                return True
            return False
        shell, cwd = CaptureShell(fn), os.getcwd()
        os.chdir(fn.parent)
        try:
            shell.run_all(nb, exc_stop=True, preproc=no_eval)
            write_nb(nb, fn)
            print(f"ran {fn.name}")
        except Exception:
            failed += 1
            sys.stderr.write(shell.prettytb(fname=fn) + "\n")
        finally: os.chdir(cwd)
    sys.exit(1 if failed else 0)

if __name__ == "__main__": main()
