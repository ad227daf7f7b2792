"The `instructengine` console script: its help lists every option, and `bench reward` runs on a CPU with the sandbox CLIP."
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from instructengine.batch import app

OPTIONS = "device backbone images batch-size dtype layers heads loop-pairs loop-batch loop-dtype warmup seed json".split()


def run_cli(*args, timeout=120):
    "Run the installed console script (the one beside this Python, else on PATH) and return the finished process."
    exe = shutil.which("instructengine", path=str(Path(sys.executable).parent)) or shutil.which("instructengine")
    assert exe, "no `instructengine` command: install the package (pip install -e .) so its console script exists"
    env = {k: v for k, v in os.environ.items() if k not in ("INSTRUCTENGINE_DEVICE", "INSTRUCTENGINE_DTYPE")}
    env["OMP_NUM_THREADS"] = "1"   # a smoke run of tiny models: one thread is faster than two fighting a busy CI machine
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_the_commands_and_every_option():
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    assert "bench" in top.stdout
    reward = run_cli("bench", "reward", "--help")
    assert reward.returncode == 0, reward.stderr
    missing = [o for o in OPTIONS if f"--{o} " not in reward.stdout]
    assert not missing, f"options missing from `bench reward --help`: {missing}\n{reward.stdout}"


def test_bench_reward_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    p = run_cli("bench", "reward", "--device", "cpu", "--backbone", "sandbox", "--images", "24", "--batch-size", "8",
                "--loop-pairs", "4", "--warmup", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    for words in ("batched (ours)", "reference loop", "images/s", "peak memory", "speedup", "scores agree", "target >= 20x", "target >= 1,000"):
        assert words in p.stdout, f"{words!r} not in the table:\n{p.stdout}"
    r = json.loads(out.read_text())
    assert r["device_type"] == "cpu" and r["model"]["backbone"] == "sandbox" and r["model"]["image_size"] == 32
    assert (r["batched"]["images"], r["batched"]["images_per_forward"], r["loop"]["images"], r["loop"]["images_per_forward"]) == (24, 8, 8, 2)
    for path in ("batched", "loop"):
        assert r[path]["seconds"] > 0 and r[path]["images_per_s"] > 0
        assert r[path]["peak_memory_gib"] is None or r[path]["peak_memory_gib"] > 0
    assert r["speedup"] > 0
    s = r["scores"]
    assert s["agree"] and s["compared"] == 8 and 0 <= s["max_abs_diff"] <= s["tolerance"]
    assert r["targets"]["applies"] is False   # the targets are judged on an H100 in bf16 only


def test_bad_values_are_refused_before_anything_is_built():
    cli = CliRunner()
    r = cli.invoke(app, ["bench", "reward", "--images", "4", "--loop-pairs", "3"], prog_name="instructengine")
    assert r.exit_code == 2 and "loop_pairs = 3" in r.stderr
    r = cli.invoke(app, ["bench", "reward", "--batch-size", "0"], prog_name="instructengine")
    assert r.exit_code == 2 and "--batch-size" in r.stderr
