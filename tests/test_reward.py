"""Reward model: real backbones (the shipped sandbox CLIP, a tiny transformers CLIPModel saved and loaded with
from_pretrained, open_clip checkpoint files), the condition mask, training with a killed and resumed process, saving
and loading, scoring, and the reward model as a judge of the annotation stage."""
import argparse
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from _processes import run_processes
import torch
from safetensors.torch import save_file

from instructengine.annotate import make_judge, pairs_frame
from instructengine.core import ConfigError
from instructengine.reward import (SANDBOX_CONDITIONS, MPSConfig, MPSModel, condition_mask, load_backbone, load_reward, mask_quality, save_reward,
                                   score, tiny_clip_folder)
from instructengine.reward_train import RewardTrainConfig, evaluate_reward, run_reward, train_reward
from instructengine.sandbox import caption, render, sample_scene

SANDBOX = dict(mask_similarity="lexical", threshold=0.9, conditions=SANDBOX_CONDITIONS)


def test_hf_clip_backbone_extends_clip_features(tmp_path):
    bb = load_backbone(f"hf:{tiny_clip_folder(tmp_path)}")
    ids = bb.tokenize(["two red circles on the left", "a cat"])
    assert ids.shape == (2, 77) and bb.valid(ids).sum(1).tolist() == [8, 4]     # BOS, the words, EOS
    with torch.no_grad():
        tokens, eos = bb.encode_text(ids)
        px = torch.randn(2, 3, 32, 32)
        assert torch.allclose(eos, bb.model.get_text_features(input_ids=ids).pooler_output, atol=1e-6)
        assert bb.encode_image(px).shape == (2, 17, 16) and tokens.shape == (2, 77, 16)
        assert torch.allclose(bb.encode_image(px, norm=True)[:, 0], bb.model.get_image_features(pixel_values=px).pooler_output, atol=1e-6)
        model = MPSModel(MPSConfig(backbone=f"hf:{tmp_path}", layers=1, heads=2), backbone=bb).eval()
        scores = model(bb.pixels([render(sample_scene(random.Random(0)))] * 2), ids, model.condition_ids(["semantic", "overall"]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_condition_mask_normalises_per_prompt_and_ignores_padding():
    text = torch.tensor([[[1.0, 0], [0, 2.0], [0.5, 0.5], [9.0, 9.0]]])   # the last token is padding
    cond = torch.tensor([[[1.0, 0], [0, 1.0], [50.0, 50.0]]])              # so is the last condition token
    tv, cv = torch.tensor([[True, True, True, False]]), torch.tensor([[True, True, False]])
    keep, sim = condition_mask(text, tv, cond, cv, threshold=0.3)
    assert torch.allclose(sim, torch.tensor([[0.5, 1.0, 0.25, 0.0]]))        # max over real condition tokens, / the prompt's max
    assert keep.tolist() == [[True, True, False, False]]
    assert condition_mask(text, tv, cond, cv, threshold=0.01)[0].tolist() == [[True, True, True, False]]
    keep, sim = condition_mask(text, tv, cond, cv, threshold=0.9, normalize=False)   # cosine, as it is; the first token always kept
    assert torch.allclose(sim, torch.tensor([[1.0, 1.0, 0.7071, 0.0]]), atol=1e-4) and keep.tolist() == [[True, True, False, False]]


def test_sandbox_mask_keeps_the_naming_words():
    rng = random.Random(5)
    caps = [caption(sample_scene(rng), k=rng.randrange(6), template=rng.randrange(3)) for _ in range(200)]
    q = mask_quality(MPSModel(MPSConfig(**SANDBOX)).eval(), caps)
    assert (q["precision"] >= 0.98).all() and (q["recall"] == 1.0).all(), q   # the README's figures


def test_open_clip_checkpoint_files_load_and_pickles_are_refused(tmp_path):
    from instructengine.sandbox_clip import SANDBOX_CLIP, register_sandbox_clip
    register_sandbox_clip()
    shipped = load_backbone("sandbox")
    sd = shipped.model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "clip.safetensors")
    torch.save(sd, tmp_path / "clip.bin")
    ids = shipped.tokenize(["two red circles"])
    for f in ("clip.safetensors", "clip.bin"):
        bb = load_backbone(SANDBOX_CLIP, weights=str(tmp_path / f))
        assert torch.equal(bb.encode_text(ids)[1], shipped.encode_text(ids)[1])
    torch.save({"state_dict": sd, "evil": argparse.Namespace(run="anything")}, tmp_path / "evil.bin")   # needs unpickling a class
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_backbone(SANDBOX_CLIP, weights=str(tmp_path / "evil.bin"))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_backbone(SANDBOX_CLIP, weights=str(tmp_path / "missing.bin"))


@pytest.fixture(scope="module")
def lesson_run(tmp_path_factory):
    "A run folder with 16 aesthetic pairs: each scene rendered clean (the winner) and noisy."
    root = tmp_path_factory.mktemp("reward-run")
    (root / "images").mkdir()
    rng, rows = random.Random(0), []
    for k in range(16):
        sc = sample_scene(rng)
        for j, fin in enumerate(("clean", "noisy")): render(dataclasses.replace(sc, finish=fin), seed=k).save(root / "images" / f"{k}-{j}.png")
        rows.append({"id": f"p{k}", "prompt": caption(sc), "image_w": f"images/{k}-0.png", "image_l": f"images/{k}-1.png",
                     "dimension": "aesthetic", "tie": k % 5 == 0, "scores": "{}", "quad_id": None, "source": "test"})
    pairs_frame(rows).to_parquet(root / "pairs.parquet")
    return root


TRAIN = """
import sys, pandas as pd
from instructengine.reward_train import RewardTrainConfig, train_reward
cfg = RewardTrainConfig.from_yaml(open(sys.argv[1]).read())
train_reward(cfg, pd.read_parquet(sys.argv[2]), log=lambda *a: None)
"""


def _cfg(run, out, **kw):
    return RewardTrainConfig(run_dir=str(run), model=MPSConfig(layers=1, **SANDBOX), max_steps=8, batch_size=4, grad_accum=2,
                             warmup_steps=2, checkpoint_every=1, out=str(out), **kw)


def test_killed_training_resumes_to_the_same_losses(lesson_run, tmp_path):
    pairs = pd.read_parquet(lesson_run / "pairs.parquet")
    _, straight = train_reward(_cfg(lesson_run, tmp_path / "straight"), pairs, log=lambda *a: None)
    cfg = _cfg(lesson_run, tmp_path / "killed")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    env = os.environ | {"INSTRUCTENGINE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(tmp_path / "cfg.yaml"), str(lesson_run / "pairs.parquet")], env=env)
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpt.glob("step-3")) and proc.poll() is None: time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    steps = sorted(int(p.name[5:]) for p in ckpt.glob("step-*") if p.name[5:].isdigit())
    assert steps and steps[-1] < 8, f"the process was not killed mid-way (checkpoints {steps})"
    ran, said = [], []
    model, resumed = train_reward(cfg, pairs, callback=lambda step, rec: ran.append(step), log=said.append)
    assert ran == list(range(steps[-1] + 1, 9)), f"the rerun did not go on after checkpoint step-{steps[-1]}: it ran steps {ran}"
    assert any(f"resuming from checkpoint step-{steps[-1]}" in line for line in said), said
    assert [h["step"] for h in resumed] == list(range(1, 9))    # the history before the kill comes from the checkpoint
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(straight, resumed, strict=True))
    print(f"killed at checkpoint step-{steps[-1]}; largest loss difference over 8 steps: {gap:.1e}")
    assert gap <= 1e-4, (straight, resumed)
    # a checkpoint made with other parameters is not resumed: the run starts over, and says so
    with pytest.warns(UserWarning, match="other training parameters.*starting over") as warned:
        _, other = train_reward(cfg.with_overrides(lr=1e-2, max_steps=3), pairs, log=lambda *a: None)
    assert {w.filename for w in warned if "starting over" in str(w.message)} == {__file__}, "the warning does not name the line that called train_reward"
    assert [h["step"] for h in other] == [1, 2, 3] and other[0]["loss"] == pytest.approx(straight[0]["loss"], abs=1e-6)


def test_two_processes_train_like_one(lesson_run, tmp_path):
    """DDP on two CPU processes: each scores every other pair of a batch, and the logged figures are the whole batch's,
    so the run follows the one-process run (only the order of sums differs)."""
    from safetensors.torch import load_file
    script = tmp_path / "train.py"
    script.write_text("import json, os, sys, pandas as pd\nfrom instructengine.core import process_state\n"
                      "from instructengine.reward_train import RewardTrainConfig, train_reward\n"
                      "cfg = RewardTrainConfig.from_yaml(open(sys.argv[1]).read())\n"
                      "_, h = train_reward(cfg, pd.read_parquet(sys.argv[2]), log=None)\n"
                      "saved = os.path.isfile(os.path.join(cfg.out, 'model.safetensors'))   # on every process, once train_reward returns\n"
                      "s = process_state(); print('RESULT ' + json.dumps({'rank': s.process_index, 'world': s.num_processes, 'history': h, 'saved': saved}))\n")
    runs = {}
    for n in (1, 2):
        (tmp_path / f"p{n}.yaml").write_text(_cfg(lesson_run, tmp_path / f"p{n}").to_yaml())
        runs[n] = run_processes(script, tmp_path / f"p{n}.yaml", lesson_run / "pairs.parquet", n=n)
    assert runs[2][0]["history"] == runs[2][1]["history"]
    assert [r["saved"] for r in runs[2]] == [True, True]   # no process returns before the model is on disk
    one, two = runs[1][0]["history"], runs[2][0]["history"]
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True))
    print(f"largest loss difference over {len(one)} steps, two processes against one: {gap:.1e}")
    assert gap <= 1e-5 and [h["accuracy"] for h in one] == [h["accuracy"] for h in two], (one, two)
    assert all(b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5) for a, b in zip(one, two, strict=True))
    w1, w2 = load_file(tmp_path / "p1" / "model.safetensors"), load_file(tmp_path / "p2" / "model.safetensors")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-4
    (tmp_path / "big.yaml").write_text(_cfg(lesson_run, tmp_path / "big").with_overrides(batch_size=100_000).to_yaml())
    with pytest.raises(AssertionError, match=r"less than one batch of 100000: the 2 processes cannot take equal shares"):
        run_processes(script, tmp_path / "big.yaml", lesson_run / "pairs.parquet", n=2)


def test_one_model_per_dimension_skips_dimensions_without_pairs(lesson_run, tmp_path):
    "The sandbox conditions have four dimensions and the lesson run's pairs only aesthetic ones: one model, one row."
    from instructengine.reward_train import reward_ablations
    pairs = pd.read_parquet(lesson_run / "pairs.parquet")
    seen = []
    table = reward_ablations(_cfg(lesson_run, tmp_path / "abl").with_overrides(max_steps=2, grad_accum=1), pairs.iloc[:12], pairs.iloc[12:],
                             variants={"one model per dimension": "per_dimension"}, log=seen.append)
    assert list(table.index) == ["aesthetic"] and 0 <= table.loc["aesthetic", "one model per dimension"] <= 1
    assert sorted(p.name for p in (tmp_path / "abl" / "ablations" / "one-model-per-dimension").iterdir()) == ["aesthetic"]
    assert sum("no training pairs of" in m for m in seen) == len(SANDBOX_CONDITIONS) - 1
    log = lambda run: pd.read_csv(tmp_path / run / "ablations" / "one-model-per-dimension" / "aesthetic" / "train_log.csv")
    assert len(log("abl")) == 2   # the only dimension with pairs takes the whole shared budget
    reward_ablations(_cfg(lesson_run, tmp_path / "abl3").with_overrides(max_steps=2, grad_accum=1), pairs.iloc[:12], pairs.iloc[12:],
                     variants={"one model per dimension": "per_dimension"}, per_dimension_steps=3, log=None)
    assert len(log("abl3")) == 3   # a step count of its own for each model


def test_ablation_models_go_inside_a_relative_run_folder(lesson_run, tmp_path, monkeypatch):
    "A relative run folder and out (as the stage notebook has them): the models land in <run>/<out>/ablations, not a copy of the path."
    from instructengine.reward_train import reward_ablations
    shutil.copytree(lesson_run, tmp_path / "runs" / "r")
    pairs = pd.read_parquet(lesson_run / "pairs.parquet")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("runs/r", "abl").with_overrides(max_steps=1, grad_accum=1)
    reward_ablations(cfg, pairs.iloc[:12], pairs.iloc[12:], variants={"one model per dimension": "per_dimension"}, log=None)
    assert (tmp_path / "runs" / "r" / "abl" / "ablations" / "one-model-per-dimension" / "aesthetic" / "train_log.csv").is_file()
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("ablations")] == ["runs/r/abl/ablations"]


def test_non_finite_gradients_stop_reward_training(lesson_run, tmp_path):
    pairs = pd.read_parquet(lesson_run / "pairs.parquet")
    model = MPSModel(MPSConfig(layers=1, **SANDBOX))
    def poison(step, rec):   # after step 1, one fusion weight's gradient turns NaN; the loss stays finite
        if step == 1: next(model.fusion.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 2 .*last good checkpoint is .*step-1"):
        train_reward(_cfg(lesson_run, tmp_path / "nan"), pairs, model=model, callback=poison, log=None)


def test_freeze_modes_train_what_they_say():
    from instructengine.reward_train import freeze_backbone
    ids = lambda ps: {id(p) for p in ps}
    for mode in ("none", "text", "all-but-last-1", "all"):
        bb = load_backbone("sandbox")
        counts = freeze_backbone(bb, mode)
        trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
        named = dict(bb.model.named_parameters())
        unused = ids(bb.unused())
        assert unused and not any(id(named[n]) in unused for n in trainable)   # the final image norm never trains
        assert counts["trainable"] == sum(named[n].numel() for n in trainable)
        if mode == "none": assert {id(p) for n, p in named.items() if n not in trainable} == unused
        if mode == "all": assert not trainable
        if mode == "text":
            assert not any(bb.is_text_param(n) for n in trainable) and ids(bb.blocks()[1].parameters()) <= {id(named[n]) for n in trainable}
        if mode == "all-but-last-1":
            last = ids(p for blocks in bb.blocks() for p in blocks[-1].parameters()) | (ids(bb.heads()) - unused)
            assert {id(named[n]) for n in trainable} == last


def test_calibration_by_hand():
    import math
    import pandas as pd
    from instructengine.reward_train import calibration_table
    pairs = pd.DataFrame({"tie": [False, False, False, True]})
    table, ece = calibration_table(pairs, torch.tensor([2.0, 0.0, 0.1, 3.0]), torch.tensor([0.0, 2.0, 0.0, 0.0]))
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert table["bin"].tolist() == ["0.5-0.6", "0.8-0.9"] and table["pairs"].tolist() == [1, 2] and table["accuracy"].tolist() == [1.0, 0.5]
    assert ece == pytest.approx(abs(1 - sig(0.1)) / 3 + 2 * abs(0.5 - sig(2.0)) / 3, abs=1e-6)   # the tie is left out


def test_aspect_pairs_label_every_two_images_on_every_aspect(tmp_path):
    "One contrast pair, two images on side a and one on side b, each rated under both instructions by the oracle."
    import json
    from instructengine.core import RunDir
    from instructengine.reward_train import aspect_pairs
    run = RunDir(tmp_path / "run")
    put = lambda path, recs: path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    put(run.instructions, [{"id": "t/s#0", "a": "one red circle", "b": "two red circles", "status": "ok"}])
    ims = [("a", 0), ("a", 1), ("b", 0)]
    put(run.image_records, [{"id": f"t/s#0|{s}|{i}", "pair_id": "t/s#0", "side": s, "index": i, "status": "ok", "path": f"images/{s}{i}.png"} for s, i in ims])
    scores = {"a": {"a0": (5, 3), "a1": (4, 3), "b0": (2, 3)}, "b": {"a0": (1, 3), "a1": (2, 3), "b0": (5, 3)}}   # (prompt_following, aesthetic)
    put(run.annotations, [{"image_id": f"t/s#0|{s}|{i}", "id": f"oracle|rate:{u}|t/s#0|{s}|{i}", "judge": "oracle", "task": "rate", "under": u,
                           "status": "ok", "scores": dict(zip(("prompt_following", "aesthetic"), scores[u][f"{s}{i}"], strict=True))}
                          for u in "ab" for s, i in ims])
    df = aspect_pairs(run, "oracle", aspects=("prompt_following", "aesthetic"))
    assert len(df) == 2 * 3 * 2   # two instructions x three image pairs x two aspects
    pf = {(r.prompt, r.image_w[7:9], r.image_l[7:9]) for r in df[df["dimension"] == "prompt_following"].itertuples()}
    assert pf == {("one red circle", "a0", "a1"), ("one red circle", "a0", "b0"), ("one red circle", "a1", "b0"),       # the higher score wins
                  ("two red circles", "a1", "a0"), ("two red circles", "b0", "a0"), ("two red circles", "b0", "a1")}
    assert df[df["dimension"] == "aesthetic"]["tie"].all() and not df[df["dimension"] == "prompt_following"]["tie"].any()
    assert set(df["quad_id"]) == {"t/s#0"}
    assert len(aspect_pairs(run, "oracle", aspects=("prompt_following", "aesthetic"), ties=False)) == 6   # the equal aesthetic scores dropped


def test_evaluation_scores_each_pair_under_its_own_dimension(lesson_run, tmp_path):
    "Accuracy and the confusion view's diagonal agree with scoring each pair under its own condition, pair by pair."
    import pandas as pd
    from instructengine.reward_train import accuracy_table, pair_scores, prepare_pairs
    pairs = pd.read_parquet(lesson_run / "pairs.parquet")
    pairs.loc[pairs.index % 2 == 1, "dimension"] = "fidelity"
    model = MPSModel(MPSConfig(layers=1, **SANDBOX)).eval()
    test = prepare_pairs(pairs, model, decided=True)
    ev = evaluate_reward(model, test, lesson_run)
    want = accuracy_table(test, *pair_scores(model, test, lesson_run))
    assert ev["accuracy"]["accuracy"].to_dict() == pytest.approx(want["accuracy"].to_dict())
    for d in ("aesthetic", "fidelity"):
        assert ev["confusion"].loc[d, d] == pytest.approx(want.loc[d, "accuracy"])
        assert ev["confusion"].loc[d].drop(d).notna().all()   # and scored under the other condition too
    assert ev["scores"]["score_w"].tolist() == pytest.approx(pair_scores(model, test, lesson_run)[0].tolist(), abs=1e-5)


def test_hf_clip_with_the_old_eos_id_still_finds_the_end(tmp_path):
    "CLIP configs saved before transformers fixed eos_token_id (openai's, with 2) still mark the tokens from BOS to EOS."
    import json
    folder = tiny_clip_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"].update(eos_token_id=2, bos_token_id=0, pad_token_id=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    bb = load_backbone(f"hf:{folder}")
    assert bb.valid(bb.tokenize(["two red circles on the left", "a cat"])).sum(1).tolist() == [8, 4]


def test_open_clip_folder_backbones_save_and_load_without_their_folder(tmp_path):
    import shutil
    from instructengine.sandbox_clip import sandbox_clip_path
    shutil.copytree(sandbox_clip_path(), tmp_path / "clip")
    for spec, weights in ((f"local-dir:{tmp_path / 'clip'}", ""), ("sandbox", str(tmp_path / "clip"))):
        model = MPSModel(MPSConfig(backbone=spec, backbone_weights=weights, layers=1, **SANDBOX))
        with torch.no_grad(): model.backbone.model.logit_scale.add_(0.5)   # unlike the shipped CLIP
        save_reward(model, tmp_path / "saved")
        keep = {k: v.clone() for k, v in model.state_dict().items()}
        shutil.move(tmp_path / "clip", tmp_path / "away")
        loaded = load_reward(tmp_path / "saved")
        shutil.move(tmp_path / "away", tmp_path / "clip")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in keep.items())


def test_reward_judge_maps_aspects_and_score_needs_no_grad(lesson_run, tmp_path):
    from PIL import Image
    from instructengine.reward import RewardJudge
    model = MPSModel(MPSConfig(layers=1, **SANDBOX)).eval()
    im, prompt = Image.open(lesson_run / "images" / "0-0.png"), "a red circle"
    with torch.enable_grad():
        s = score(model, [im], prompt, "aesthetic")
    assert not s.requires_grad
    rated = RewardJudge(model, aspect_map={"style": "aesthetic"}).rate(im, prompt, ["style"])
    assert rated["scores"]["style"] == pytest.approx(float(s[0]), abs=1e-3)
    assert RewardJudge(model).rate(im, prompt, ["style"])["status"] == "unsupported"


def test_nothing_held_out_trains_on_every_pair(lesson_run, tmp_path):
    import json, shutil
    run = shutil.copytree(lesson_run, tmp_path / "run")
    cfg = _cfg(run, tmp_path / "all", data="pairs", test_fraction=0.0)
    result = run_reward(cfg)
    assert result["evaluation"] is None and result["test_pairs"] == 0 and result["train_pairs"] == 16 and result["accuracy"] == {}
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["test_pairs"] == 0 and (tmp_path / "all" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="holds out no pairs"):
        run_reward(cfg, ablations=True)
    with pytest.raises(ValueError, match="no test pairs"):
        evaluate_reward(load_reward(tmp_path / "all"), pd.read_parquet(run / "pairs.parquet").iloc[:0], run)


def test_save_load_score_and_judge(lesson_run, tmp_path):
    pairs = pd.read_parquet(lesson_run / "pairs.parquet")
    model, _ = train_reward(_cfg(lesson_run, tmp_path / "m", freeze="all-but-last-1"), pairs, log=None)   # None: quiet
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["checkpoints", "config.json", "model.safetensors", "train_log.csv"]
    again = load_reward(tmp_path / "m")
    ims = [lesson_run / p for p in pairs["image_w"][:5]]
    s = score(again, ims, list(pairs["prompt"][:5]), "aesthetic", batch_size=2)
    assert s.shape == (5,) and torch.allclose(s, score(model, ims, list(pairs["prompt"][:5]), "aesthetic"), atol=1e-5)
    assert not torch.allclose(s, score(again, ims, list(pairs["prompt"][:5]), "fidelity"))   # the condition matters
    with pytest.raises(ValueError, match="3 prompts for 5 images"): score(again, ims, ["a", "b", "c"], "aesthetic")
    with pytest.raises(KeyError, match="no condition words for dimension"): score(again, ims, "a red circle", "style")
    judge = make_judge({"kind": "reward", "model": str(tmp_path / "m"), "name": "mps"})
    r = judge.rate(ims[0], pairs["prompt"][0], ["aesthetic", "prompt_following"])
    assert r["status"] == "ok" and abs(r["scores"]["aesthetic"] - float(s[0])) < 1e-3
    v = judge.verify(ims[0], pairs["prompt"][0], pairs["prompt"][1])
    assert v["status"] == "ok" and v["follows"] in ("a", "b")
    assert judge.rate(ims[0], "a red circle", ["style"])["status"] == "unsupported"
    bad = judge.judge_many([{"task": "rate", "image": tmp_path / "missing.png", "instruction": "a red circle", "aspects": ["aesthetic"]}])
    assert bad[0]["status"] == "error" and "missing.png" in bad[0]["error"]


def test_hf_backbone_reward_saves_and_loads_without_its_folder(tmp_path):
    folder = tiny_clip_folder(tmp_path / "clip")
    model = MPSModel(MPSConfig(backbone=f"hf:{folder}", layers=1, heads=2, conditions=SANDBOX_CONDITIONS)).eval()
    save_reward(model, tmp_path / "saved")
    for f in folder.iterdir(): f.unlink()
    again = load_reward(tmp_path / "saved")
    im = render(sample_scene(random.Random(1)))
    args = (model.backbone.pixels([im]), model.backbone.tokenize(["a red circle"]), model.condition_ids(["aesthetic"]))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # the same weights, bit for bit
    with torch.no_grad(): torch.testing.assert_close(again(*args), model(*args), rtol=0, atol=1e-6)   # kernels may differ with memory layout
    with pytest.raises(FileNotFoundError, match="no config.json"): load_reward(tmp_path / "clip")


def test_bad_training_configs_name_the_field():
    with pytest.raises(ConfigError, match="dimensions"): RewardTrainConfig(model=MPSConfig(**SANDBOX), dimensions=["style"])
    with pytest.raises(ConfigError, match="mask_similarity"): MPSConfig(mask_similarity="fuzzy")
    with pytest.raises(ConfigError, match="all-but-last-N"):
        from instructengine.reward_train import freeze_backbone
        freeze_backbone(load_backbone("sandbox"), "all-but-last-x")
