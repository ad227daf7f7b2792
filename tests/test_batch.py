"The batch runner through its command: real stage notebooks executed by papermill, a killed batch resumed, a sweep and its report."
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from instructengine.batch import STAGES, BatchConfig, app, config_fields, stage_parameters

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from instructengine.batch import main; main()"]


def cli(*args, cwd=None, timeout=1800):
    "The console command in a process of its own."
    return subprocess.run(CLI + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


def invoke(*args):
    """The same command in this process (typer's runner), as `subprocess.run` reports it: for checks that need no process
    of their own, since each new process spends seconds importing torch."""
    r = CliRunner().invoke(app, list(args), prog_name="instructengine")
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def test_help_lists_every_stage_parameter():
    r = CliRunner().invoke(app, ["run", "--help"], prog_name="instructengine")
    assert r.exit_code == 0
    for stage in STAGES: assert f"  {stage} " in r.output
    for stage in STAGES:
        r = CliRunner().invoke(app, ["run", stage, "--help"], prog_name="instructengine")
        assert r.exit_code == 0, stage
        for p in [*stage_parameters(stage), *(config_fields(stage) if "config" in stage_parameters(stage) else [])]:
            assert p in ("run_dir", "config") or f"  {p} (" in r.output, (stage, p)
        if "config" in stage_parameters(stage):   # every field the help lists says what it is
            assert not [k for k, v in config_fields(stage).items() if not v["help"] and k != "run_dir"], stage


def test_shipped_configs_are_valid():
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = BatchConfig.find(p.stem)
        assert cfg.name == p.stem and cfg.stages, p
        from instructengine.batch import check_params
        for s, params in cfg.stages.items(): check_params(s, params or {})


def test_bad_input_is_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: {taxonomy: {pairs_per_subtopc: 1}}\n")
    r = cli("batch", str(bad), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and "did you mean 'pairs_per_subtopic'" in r.stderr
    r = invoke("batch", "no-such-config")
    assert r.returncode == 2 and "sandbox-smoke" in r.stderr
    r = invoke("batch", "sandbox-smoke", "--set", "dpo.max_step=3", "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and "did you mean 'max_steps'" in r.stderr
    cases = {"stages: {taxonomy: {}, generate: {}}\nsweep: {grid: {generate.limt: [1, 2]}}\n": "did you mean 'limit'",   # a grid typo
             "stages: {taxonomy: {}}\nsweep: {from: taxonomy}\n": "sweep.grid = None: expected a mapping",
             "stages: {taxonomy: {}}\nsweep: {grid: [taxonomy.seed]}\n": "expected a mapping {STAGE.PARAM: [values]}",
             "": "has no stages"}
    for text, message in cases.items():
        bad.write_text(text)
        r = invoke("batch", str(bad), "--runs", str(tmp_path / "runs"))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (text, r.stderr[-500:])
    assert not (tmp_path / "runs").exists()
    (tmp_path / "a-file").write_text("")
    for args, message in ((["run", "taxonomy", "--run-dir", str(tmp_path / "a-file")], "error: "),
                          (["batch", "sandbox-smoke", "--runs", str(tmp_path / "a-file")], "error: "),
                          (["report", str(tmp_path / "a-file")], "is a file"),
                          (["run", "dpo", "--run-dir", str(tmp_path / "r"), "-p", "config=5"], "expected a mapping of DPOConfig fields")):
        r = invoke(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-500:])


def test_damaged_stage_marker_means_not_finished(tmp_path):
    from instructengine.batch import stage_done
    (tmp_path / ".stages").mkdir()
    (tmp_path / ".stages" / "taxonomy.json").write_text('{"stage": "taxo')
    with pytest.warns(UserWarning, match="not valid JSON: stage 'taxonomy' runs again"):
        assert stage_done(tmp_path, "taxonomy") is None


def test_failed_stage_is_recorded_and_reported(tmp_path):
    cfg = tmp_path / "fail.yaml"
    cfg.write_text(yaml.safe_dump({"name": "fail", "stages": {"taxonomy": {"taxonomy": "no-such-taxonomy.yaml"}, "generate": {"limit": 2}}}))
    r = cli("batch", str(cfg), "--runs", str(tmp_path))
    assert r.returncode == 1
    rec = json.loads((tmp_path / "fail" / ".stages" / "taxonomy.failed.json").read_text())
    assert "no-such-taxonomy.yaml" in rec["error"], rec
    assert "taxonomy: FAILED" in r.stderr and "generate: running" not in r.stderr   # what depends on it does not run
    assert "| . | FAILED |" in (tmp_path / "fail" / "report.md").read_text()


def test_sweep_and_report(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"name": "sw", "stages": {"taxonomy": {"pairs_per_subtopic": 1}},
                                   "sweep": {"grid": {"taxonomy.seed": [0, 1]}}, "report": ["taxonomy.kept", "taxonomy.records"]}))
    r = cli("batch", str(cfg), "--runs", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "sw"
    for seed in (0, 1):
        v = root / "variants" / f"seed-{seed}"
        assert (v / "notebooks" / "02_taxonomy.ipynb").is_file() and (v / "instructions.jsonl").is_file()
        assert yaml.safe_load((v / "config.yaml").read_text())["taxonomy"]["seed"] == seed
    report = (root / "report.md").read_text()
    assert "mean ± std over seeds" in report and "| all |" in report and "report/taxonomy.kept.png" in report
    assert (root / "report" / "taxonomy.kept.png").is_file()
    again = cli("batch", str(cfg), "--runs", str(tmp_path))
    assert again.returncode == 0 and again.stderr.count("skipped, finished before") == 2 and "running" not in again.stderr
    cfg.write_text(cfg.read_text().replace("pairs_per_subtopic: 1", "pairs_per_subtopic: 2"))   # other parameters: both run again
    changed = cli("batch", str(cfg), "--runs", str(tmp_path))
    assert changed.returncode == 0 and changed.stderr.count("taxonomy: running") == 2 and "skipped" not in changed.stderr


def test_a_failed_variant_does_not_stop_the_others(tmp_path):
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(yaml.safe_dump({"name": "mx", "stages": {"taxonomy": {"pairs_per_subtopic": 1}},
                                   "sweep": {"grid": {"taxonomy.taxonomy": ["no-such-taxonomy.yaml", "sandbox"]}}}))   # the failing one first
    r = cli("batch", str(cfg), "--runs", str(tmp_path))
    assert r.returncode == 1 and r.stderr.count("taxonomy: FAILED") == 1 and r.stderr.count("taxonomy: done") == 1, r.stderr[-3000:]
    variants = sorted((tmp_path / "mx" / "variants").iterdir())
    done = [v for v in variants if (v / ".stages" / "taxonomy.json").is_file()]
    failed = [v for v in variants if (v / ".stages" / "taxonomy.failed.json").is_file()]
    assert len(done) == len(failed) == 1 and (done[0] / "instructions.jsonl").is_file()
    assert "no-such-taxonomy.yaml" in (failed[0] / ".stages" / "taxonomy.failed.json").read_text()


@pytest.mark.slow
def test_sandbox_smoke_killed_mid_stage_resumes(tmp_path):
    """The CI config through the command: killed while the generation stage runs, then run again. Finished stages are skipped,
    the killed one resumes from its records, every stage completes, and no image is made twice."""
    args = CLI + ["batch", "sandbox-smoke", "--runs", str(tmp_path)]
    root = tmp_path / "sandbox-smoke"
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while not any((root / "images").glob("*/*.png")):   # the generation stage has stored its first batch
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() - t0 < 600, "the generation stage did not start writing images"
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait(); log.close()
    assert (root / ".stages" / "taxonomy.json").is_file() and not (root / ".stages" / "generate.json").is_file()
    r = cli("batch", "sandbox-smoke", "--runs", str(tmp_path))
    print(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taxonomy: skipped, finished before" in r.stderr and "generate: running" in r.stderr
    for s in BatchConfig.find("sandbox-smoke").ordered:
        assert (root / ".stages" / f"{s}.json").is_file() and (root / "notebooks" / STAGES[s]).is_file(), s
    ids = [json.loads(line)["id"] for line in (root / "images.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6 * 2 * 2   # 6 pairs x 2 sides x 2 images, none twice
    assert "before and after alignment" in r.stdout


def test_sd15_smoke_runs_every_stage_on_a_random_sd_pipeline(tmp_path):
    """`make gpu-smoke`'s config on the CPU: a tiny SD v1.5-architecture pipeline with random weights, saved with
    `save_pretrained` and loaded from its folder by every stage, through the whole batch (2 sampling steps, 4 DPO steps)."""
    from instructengine.bench_diffusion import random_pipeline
    model = random_pipeline(tmp_path / "sd15-tiny", "sd15", size="tiny")
    sets = [f"{s}.model={model}" for s in ("generate", "dpo", "evaluate")] + [
        "generate.limit=4", "generate.num_inference_steps=2", "evaluate.limit=1", "evaluate.num_inference_steps=2",
        "dpo.max_steps=4", "dpo.config={resolution: 64, gradient_checkpointing: true, checkpoint_every: 50}"]
    r = cli("batch", "sd15-smoke", "--runs", str(tmp_path / "runs"), *(x for s in sets for x in ("--set", s)))
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "runs" / "sd15-smoke"
    for s in BatchConfig.find("sd15-smoke").ordered:
        assert (root / ".stages" / f"{s}.json").is_file(), s
    m, dpo = json.loads((root / "metrics.json").read_text()), json.loads((root / "dpo" / "metrics.json").read_text())
    assert (m["generate"]["images"], m["annotate"]["quads"], dpo["steps"], m["evaluate"]["prompts"]) == (16, 16, 4, 8)
    times = next(line for line in (root / "report.md").read_text().splitlines() if line.startswith("| . |"))
    assert len([float(x) for x in times.strip("| ").split("|")[1:]]) == 5, times   # the wall time of each of the five stages
    assert (root / "dpo" / "pytorch_lora_weights.safetensors").is_file()


def test_report_groups_by_grid_values_that_are_mappings_or_null(tmp_path):
    "A sweep over DPO's term weights (a mapping) or a value that may be null: one report row per value, none dropped."
    from instructengine.batch import BatchConfig, expand_sweep, sweep_table, write_report
    from instructengine.core import RunDir
    for grid in ({"dpo.weights": [{"image_a": 1}, {"text_a": 1}], "dpo.seed": [0, 1]}, {"dpo.lora": [None, "x"], "dpo.seed": [0, 1]}):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        cfg = BatchConfig(name=root.name, runs=str(tmp_path), stages={"dpo": {}}, sweep={"grid": grid}, report=["dpo.x"])
        root.mkdir(); cfg.save(root / "batch.yaml")
        for k, (name, _) in enumerate(expand_sweep(cfg)):
            RunDir(root / "variants" / name).update_metrics({"dpo": {"x": k}})
        table = sweep_table(root, ["dpo.x"])
        assert len(table) == 2 and table[("n", "dpo.x")].tolist() == [2, 2], table
        assert "mean ± std" in write_report(root).read_text()
        r = invoke("report", str(root))
        assert r.returncode == 0 and "mean ± std" in r.stdout + r.stderr + (root / "report.md").read_text()
    assert invoke("report", str(tmp_path / "missing")).returncode != 0


def _with_stage_notebook(tmp_path, monkeypatch, stage, code):
    "A copy of nbs/ (links) whose notebook for `stage` is a parameters cell and then `code`, used by run_stage from now on."
    import nbformat
    from instructengine.batch import notebooks_dir
    nbs = tmp_path / "nbs"; nbs.mkdir()
    for f in notebooks_dir().glob("*.ipynb"):
        if f.name != STAGES[stage]: (nbs / f.name).symlink_to(f)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('run_dir: str = "x"  # the run folder', metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(code)],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, nbs / STAGES[stage])
    monkeypatch.setenv("INSTRUCTENGINE_NOTEBOOKS", str(nbs))
    return nbs


def test_a_dead_kernel_fails_its_stage_and_the_batch_reports_it(tmp_path, monkeypatch):
    """A stage whose kernel dies (killed for memory, a signal) is recorded as failed, as one whose cell raises is, and the
    batch goes on to its report instead of stopping with a traceback. The stage notebooks come from a copy of nbs/ whose
    attention notebook kills its own kernel."""
    from instructengine.batch import run_batch
    _with_stage_notebook(tmp_path, monkeypatch, "attention", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    said = []
    r = run_batch(BatchConfig(name="dead", runs=str(tmp_path / "runs"), stages={"attention": {}}), log=said.append)
    (rec,) = r["runs"]["."]
    assert r["failed"] == [".:attention"] and rec["status"] == "failed" and rec["error"].startswith("DeadKernelError") and rec["cell"] is None
    stages = tmp_path / "runs" / "dead" / ".stages"
    assert (stages / "attention.failed.json").is_file() and not (stages / "attention.json").exists()
    assert any("attention: FAILED (the kernel died)" in m for m in said) and Path(r["report"]).is_file()


@pytest.mark.skipif(os.name != "posix" or not __import__("zmq").has("ipc"), reason="no Unix sockets here (Windows): stages use TCP")
def test_stage_kernels_talk_over_private_unix_sockets(tmp_path, monkeypatch, capfd):
    """A stage's kernel listens on Unix sockets in a folder only this user can enter, not on TCP ports of localhost, so
    ipykernel has no plain-text-over-TCP warning to print; the folder is gone once the stage ends."""
    from instructengine.batch import run_stage
    code = ("import json, os\nfrom ipykernel.kernelapp import IPKernelApp\nk = IPKernelApp.instance()\n"
            "d = os.path.dirname(k.ip) if k.transport == 'ipc' else None\n"
            "json.dump({'transport': k.transport, 'ip': k.ip, 'mode': d and oct(os.stat(d).st_mode & 0o777), 'sockets': d and sorted(os.listdir(d))},"
            " open(os.path.join(run_dir, 'kernel.json'), 'w'))")
    _with_stage_notebook(tmp_path, monkeypatch, "attention", code)
    r = run_stage("attention", tmp_path / "run", log=None)
    assert r["status"] == "done", r
    k = json.loads((tmp_path / "run" / "kernel.json").read_text())
    assert k["transport"] == "ipc" and k["mode"] == "0o700" and len(k["sockets"]) == 5, k
    assert not Path(k["ip"]).parent.exists()   # removed with its sockets
    assert "without encryption" not in capfd.readouterr().err


def test_a_second_command_in_a_busy_run_folder_is_refused(tmp_path):
    "While one command runs a stage in a run folder, another that would run a stage there is refused, naming the folder."
    from filelock import FileLock
    from instructengine.batch import RunFolderBusy, run_stage
    run = tmp_path / "run"; (run / ".stages").mkdir(parents=True)
    with FileLock(run / ".stages" / "lock"):   # what a running stage holds
        with pytest.raises(RunFolderBusy, match=r"run is in use: another command is running a stage there"):
            run_stage("taxonomy", run, log=None)
        r = CliRunner().invoke(app, ["run", "taxonomy", "--run-dir", str(run)])
        assert r.exit_code == 2 and "error:" in r.output and "is in use" in r.output, r.output
    assert not (run / "notebooks").exists()   # nothing ran
