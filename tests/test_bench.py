"The `instructengine` console script: its help lists every option, `bench reward` runs on a CPU with the sandbox CLIP, `bench dpo` with tiny UNets."
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from instructengine.batch import app
from instructengine.bench_diffusion import (DPO_ARCHS, build_dpo_models, dpo_arch, dpo_inputs, dpo_step_fast, encode_pairs,
                                            reference_dpo_step)

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


# ---------------------------------------------------------------- bench dpo
@pytest.fixture
def one_thread():
    "Tiny UNets run fastest on one thread, and far faster than on two that fight another busy process for two cores."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def test_bench_dpo_tiny_on_cpu(tmp_path, one_thread):
    out = tmp_path / "dpo.json"
    r = CliRunner().invoke(app, ["bench", "dpo", "--device", "cpu", "--size", "tiny", "--model", "all", "--pairs", "2", "--steps", "2",
                                 "--warmup", "1", "--json", str(out)], prog_name="instructengine")
    assert r.exit_code == 0, r.stderr
    for words in ("fast (ours)", "reference loop", "pairs/s", "TFLOP a pair", "TFLOP/s", "% of matmul peak", "peak memory", "speedup",
                  "losses agree", "target >= 70", "target >= 6", "sd15: SD v1.5 UNet", "sdxl: SDXL UNet"):
        assert words in r.stdout, f"{words!r} not in the table:\n{r.stdout}"
    res = json.loads(out.read_text())
    assert res["benchmark"] == "dpo" and res["device_type"] == "cpu" and res["dtype"] == "float32" and res["matmul_peak_tflops"] > 0
    assert [m["model"] for m in res["models"]] == ["sd15", "sdxl"]
    for m in res["models"]:
        assert (m["size"], m["resolution"], m["latent_size"], m["pairs"]) == ("tiny", 64, 8, 2)
        for path in ("fast", "loop"):
            p = m[path]
            for k in ("seconds_per_step", "pairs_per_s", "tflop_per_pair", "tflops", "pct_of_peak"):
                assert p[k] > 0, (m["model"], path, k, p[k])
            assert p["peak_memory_gib"] is None or p["peak_memory_gib"] > 0
        assert m["loop"]["tflop_per_pair"] > m["fast"]["tflop_per_pair"]   # the loop also runs the VAE and the text encoders
        assert not m["fast"]["compiled"] and m["speedup"] > 0
        c = m["check"]
        assert c["agree"] and (c["margin_atol"], c["margin_rtol"]) == (1e-2, 1e-3) and c["margin_max_abs_diff"] <= 1e-3 and c["margin_std"] > 0
        assert abs(c["loss_fast"] - c["loss_loop"]) <= 1e-5 * c["loss_loop"], c
        assert m["target"]["applies"] is False   # judged on an H100 in bf16 at full size only


def test_bench_dpo_refuses_bad_values():
    cli = CliRunner()
    r = cli.invoke(app, ["bench", "dpo", "--model", "sd3"], prog_name="instructengine")
    assert r.exit_code == 2 and "expected one of sd15, sdxl" in r.stderr
    r = cli.invoke(app, ["bench", "dpo", "--size", "huge"], prog_name="instructengine")
    assert r.exit_code == 2 and "expected 'full' or 'tiny'" in r.stderr


@pytest.mark.parametrize("name", list(DPO_ARCHS))
def test_fast_step_equals_reference_step_in_fp32(name, one_thread):
    "Same inputs (generators seeded alike), same LoRA: our step and the research script's give the same loss and the same update."
    m = build_dpo_models(dpo_arch(name, "tiny"), "cpu", seed=3)
    inputs = dpo_inputs(m, 3, seed=4)
    lora = [p.detach().clone() for p in m.params]

    def step(fn):
        with torch.no_grad():
            for p, v in zip(m.params, lora, strict=True): p.copy_(v)
        loss = fn(torch.optim.SGD(m.params, lr=1.0))
        return float(loss), [p.detach().clone() for p in m.params]

    loop, after_loop = step(lambda opt: reference_dpo_step(m, opt, inputs, dtype=torch.float32, generator=torch.Generator().manual_seed(5))["loss"])
    fast, after_fast = step(lambda opt: dpo_step_fast(m.unet, opt, m.scheduler, encode_pairs(m, inputs, seed=5, dtype=torch.float32),
                                                      dtype=torch.float32)[0])
    assert abs(fast - loop) <= 1e-5 * abs(loop), (fast, loop)
    moved = max(float((a - v).abs().max()) for a, v in zip(after_loop, lora, strict=True))
    assert moved > 1e-4   # the step did change the LoRA, so equal updates mean equal gradients
    for a, b in zip(after_fast, after_loop, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), float((a - b).abs().max())


def test_a_disagreeing_reference_makes_the_exit_status_1(monkeypatch):
    "The agreement check can fail: with the reference loop's scores shifted by 1, the table says NO and the status is 1."
    import instructengine.bench as bench
    looped = bench.score_looped
    monkeypatch.setattr(bench, "score_looped", lambda *a, **k: looped(*a, **k) + 1.0)
    r = CliRunner().invoke(app, ["bench", "reward", "--device", "cpu", "--backbone", "sandbox", "--images", "8", "--batch-size", "8",
                                 "--loop-pairs", "2", "--warmup", "0"], prog_name="instructengine")
    assert r.exit_code == 1 and "NO" in r.output, r.output


def test_a_disagreeing_dpo_reference_makes_the_exit_status_1(monkeypatch, one_thread):
    import instructengine.bench_diffusion as bd
    loop = bd._loop_loss
    monkeypatch.setattr(bd, "_loop_loss", lambda *a, **k: (lambda r: (r[0] + 1.0, -r[1]))(loop(*a, **k)))   # another loss, opposite margins
    r = CliRunner().invoke(app, ["bench", "dpo", "--device", "cpu", "--size", "tiny", "--model", "sd15", "--pairs", "2", "--steps", "1",
                                 "--warmup", "0"], prog_name="instructengine")
    assert r.exit_code == 1 and "NO" in r.output, r.output
