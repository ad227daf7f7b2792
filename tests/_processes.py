"Run a script as two real processes on the CPU (torchrun, gloo), the way `accelerate launch` runs it on two GPUs."
import json
import os
import re
import subprocess
import sys


def run_processes(script, *args, n: int = 2, timeout: int = 300) -> list:
    """Run `script` with `args` as `n` processes (`n=1`: a plain `python script`) and return what each printed on its
    lines starting with "RESULT ", parsed as JSON, ordered by process index. The script prints
    `RESULT {"rank": ..., "world": ..., ...}`. `ACCELERATE_USE_CPU=1` makes accelerate share the work over the processes on the CPU
    (`accelerate launch --cpu` runs one process only)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", INSTRUCTENGINE_PROGRESS="0")
    launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    out = subprocess.run([*launcher, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    # The processes share one stdout, and unbuffered (PYTHONUNBUFFERED=1) a print writes its text and its newline apart,
    # so two results can land on one line: read each JSON object that follows a "RESULT ", wherever it is.
    decode = json.JSONDecoder().raw_decode
    found = [decode(out.stdout, m.end())[0] for m in re.finditer(r"RESULT (?=\{)", out.stdout)]
    assert sorted(r["rank"] for r in found) == list(range(n)) and all(r["world"] == n for r in found), (found, out.stderr[-2000:])
    return sorted(found, key=lambda r: r["rank"])
