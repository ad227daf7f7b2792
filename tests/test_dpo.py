"""DPO: the losses against hand values and the diffusers convention, training of tiny SD and SDXL pipelines of the real
classes (saved and loaded with from_pretrained) on rendered quads, a killed and resumed process, the LoRA round trip
through load_lora_weights, the options (full fine-tuning, v-prediction, pairs data) and bad input."""
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest
from _processes import run_processes
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from instructengine.core import ConfigError
from instructengine.dpo import COMBOS, TERMS, DPOCache, cv_loss, dpo_loss, model_key, render_quads, term_weights, tiny_pipeline
from instructengine.dpo_train import DPOConfig, load_dpo_data, train_dpo
from instructengine.generate import GeneratorSpec, load_generator

QUIET = dict(log=None)   # the trainer takes None for "quiet", as the other stages do


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folders = {k: tiny_pipeline(root / f"tiny-{k}", k) for k in ("sd", "sdxl")}
        folders["sd-v"] = tiny_pipeline(root / "tiny-sd-v", "sd", prediction_type="v_prediction")
    render_quads(root / "run", n=8)
    return root, folders


def _cfg(root, model, out, **kw):
    return DPOConfig(**{"run_dir": str(root / "run"), "model": str(model), "max_steps": 6, "batch_size": 4, "warmup_steps": 2,
                        "checkpoint_every": 1, "tensorboard": False, "out": str(out), **kw})


def test_loss_hand_values_and_the_diffusers_beta():
    loss, margin = dpo_loss(torch.tensor([0.1, 0.1]), torch.tensor([0.1002, 0.0998]), torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.1]))
    assert margin.tolist() == pytest.approx([0.5, -0.5], abs=1e-3)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.5))], abs=1e-4)
    g = torch.Generator().manual_seed(1)
    e_w, e_l, r_w, r_l = (0.1 + 0.001 * torch.randn(32, generator=g) for _ in range(4))
    diffusers_script = -F.logsigmoid(-2500 * ((e_w - e_l) - (r_w - r_l)))   # train_diffusion_dpo.py, beta_dpo = 2500
    assert torch.allclose(dpo_loss(e_w, e_l, r_w, r_l, beta=5000)[0], diffusers_script, atol=1e-6)


def test_cross_validation_terms():
    g = torch.Generator().manual_seed(2)
    e = {c: 0.1 + 0.001 * torch.randn(6, generator=g) for c in COMBOS}
    r = {c: 0.1 + 0.001 * torch.randn(6, generator=g) for c in COMBOS}
    only_image = cv_loss(e, r, {"image_a": 1.0})[0]
    assert torch.allclose(only_image, dpo_loss(e["aa"], e["ba"], r["aa"], r["ba"])[0].mean(), atol=1e-7)
    # the text-side term for x_a keeps the image and swaps the instruction
    assert torch.allclose(cv_loss(e, r, {"text_a": 1.0})[0], dpo_loss(e["aa"], e["ab"], r["aa"], r["ab"])[0].mean(), atol=1e-7)
    weighted = cv_loss(e, r, {"image_a": 3.0, "text_b": 1.0})[0]
    expect = (3 * dpo_loss(e["aa"], e["ba"], r["aa"], r["ba"])[0].mean() + dpo_loss(e["bb"], e["ba"], r["bb"], r["ba"])[0].mean()) / 4
    assert torch.allclose(weighted, expect, atol=1e-7)
    assert set(TERMS) == set(term_weights("cv"))
    with pytest.raises(ConfigError, match="image_c"): term_weights("cv", {"image_c": 1})
    with pytest.raises(ConfigError, match="method 'ppo'"): DPOConfig(method="ppo")
    with pytest.raises(ConfigError, match="only the image_a term"): DPOConfig(data="pairs", method="cv")


TRAIN = """
import sys
from instructengine.dpo_train import DPOConfig, train_dpo
train_dpo(DPOConfig.load(sys.argv[1]), log=lambda *a: None)
"""


def test_errors_are_measured_against_the_schedulers_target():
    "A UNet that returns exactly the v target has zero error under v-prediction and not under epsilon, and the reverse."
    from types import SimpleNamespace
    from diffusers import DDPMScheduler
    from instructengine.dpo import combo_errors
    g = torch.Generator().manual_seed(0)
    z0, noise, t = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100, 700])
    batch = {"combos": ["aa"], "latents": z0, "noise": noise, "timesteps": t, "embeds": torch.zeros(2, 3, 8), "pooled": None, "time_ids": None}
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(prediction_type=kind)
        returns = {"epsilon": noise, "v_prediction": sched.get_velocity(z0, noise, t)}
        for made, out in returns.items():
            unet = lambda zt, t, encoder_hidden_states, out=out: SimpleNamespace(sample=out)
            e = combo_errors(unet, sched, batch, "cpu")["aa"]
            assert (e.abs().max() < 1e-10) if made == kind else (e.min() > 0.1), (kind, made, e)


def test_flip_caches_the_mirror_and_mirrors_a_quad_whole(tiny, tmp_path):
    from PIL import Image
    from instructengine.dpo import load_image, quad_batch
    root, models = tiny
    rng = torch.Generator().manual_seed(0)
    paths = []
    for k in range(2):   # 49 x 32: the centre crop's left edge is 8 px, and 9 px in the mirror
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray((torch.rand(32, 49, 3, generator=rng) * 255).byte().numpy()).save(paths[-1])
    x, tid, tid_flip = load_image(paths[0], 32)
    assert tid[3] == 8 and tid_flip[3] == 9 and tid[:3].tolist() == tid_flip[:3].tolist() == [32, 49, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_generator(GeneratorSpec(str(models["sd"]), device="cpu"))
    cache = DPOCache(tmp_path / "cache", "k")
    cache.fill(pipe, [str(p) for p in paths], ["a", "b"], 32, flip=True)
    key = cache.image_key(str(paths[0]))
    with torch.no_grad():
        for view, suffix in ((x, ""), (x.flip(-1), ":flip")):
            assert torch.allclose(cache.lat[key + suffix], pipe.vae.encode(view[None]).latent_dist.parameters[0], atol=1e-5)
    assert not torch.allclose(cache.lat[key], cache.lat[key + ":flip"])
    rows = pd.DataFrame({"image_a": [str(paths[0])] * 8, "image_b": [str(paths[1])] * 8, "instr_a": ["a"] * 8, "instr_b": ["b"] * 8})
    batch = quad_batch(cache, rows, ["ab"], torch.Generator().manual_seed(3), 1000, flip=True, sample=False)
    flips = (torch.rand(8, generator=torch.Generator().manual_seed(3)) < 0.5).tolist()
    assert 0 < sum(flips) < 8
    want_a, ids_a = cache.latents([str(paths[0])] * 8, flips, sample=False)
    assert torch.equal(batch["latents"], want_a) and torch.equal(batch["time_ids"], ids_a)   # combo "ab": x_a's latents, mirrored where the quad is
    batch_b = quad_batch(cache, rows, ["ba"], torch.Generator().manual_seed(3), 1000, flip=True, sample=False)
    assert torch.equal(batch_b["latents"], cache.latents([str(paths[1])] * 8, flips, sample=False)[0])   # x_b mirrored in the same quads


def test_killed_training_resumes_to_the_same_losses(tiny, tmp_path):
    root, models = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, straight = train_dpo(_cfg(root, models["sd"], tmp_path / "straight", lora_dropout=0.1), **QUIET)
    cfg = _cfg(root, models["sd"], tmp_path / "killed", lora_dropout=0.1)   # dropout: the resumed run needs the saved random state
    cfg.save(tmp_path / "cfg.yaml")
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(tmp_path / "cfg.yaml")], env=os.environ | {"INSTRUCTENGINE_PROGRESS": "0"},
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpt / "step-3").is_dir() and proc.poll() is None: time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    steps = sorted(int(p.name[5:]) for p in ckpt.glob("step-*") if p.name[5:].isdigit())
    assert steps and steps[-1] < 6, f"the process was not killed mid-way (checkpoints {steps})"
    ran, said = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = train_dpo(cfg, callback=lambda step, rec: ran.append(step), log=said.append)
    assert not [w for w in caught if "starting over" in str(w.message)], "the checkpoint was not resumed"
    assert ran == list(range(steps[-1] + 1, 7)), f"the rerun did not go on after checkpoint step-{steps[-1]}: it ran steps {ran}"
    assert any(f"resuming from checkpoint step-{steps[-1]}" in line for line in said), said
    assert [h["step"] for h in resumed] == list(range(1, 7))    # the history before the kill comes from the checkpoint
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(straight, resumed, strict=True))
    print(f"killed at checkpoint step-{steps[-1]}; largest loss difference over 6 steps: {gap:.1e}")
    assert gap <= 1e-5, (straight, resumed)
    with pytest.warns(UserWarning, match="other training parameters.*starting over") as warned:
        _, other = train_dpo(cfg.with_overrides(beta=100.0, max_steps=2), **QUIET)
    assert {w.filename for w in warned if "starting over" in str(w.message)} == {__file__}, "the warning does not name the line that called train_dpo"
    assert [h["step"] for h in other] == [1, 2]


TRAIN_JSON = """
import json, os, sys
from instructengine.core import process_state
from instructengine.dpo_train import DPOConfig, train_dpo
cfg = DPOConfig.from_yaml(open(sys.argv[1]).read())
_, h = train_dpo(cfg, log=None)
saved = os.path.isfile(os.path.join(cfg.out, "pytorch_lora_weights.safetensors"))   # on every process, once train_dpo returns
s = process_state(); print("RESULT " + json.dumps({"rank": s.process_index, "world": s.num_processes, "history": h, "saved": saved}))
"""


@pytest.mark.parametrize("method", ["cv", "sft"])
def test_two_processes_train_like_one(tiny, tmp_path, method):
    """DDP on two CPU processes: each takes every other quad of a batch, with the noise and timesteps drawn for the whole
    batch, and the logged figures are the whole batch's, so the run follows the one-process run."""
    root, models = tiny
    script = tmp_path / "train.py"; script.write_text(TRAIN_JSON)
    runs = {}
    for n in (1, 2):
        cfg = _cfg(root, models["sd"], tmp_path / f"p{n}", method=method)
        cfg.save(tmp_path / f"p{n}.yaml")
        runs[n] = run_processes(script, tmp_path / f"p{n}.yaml", n=n)
    assert runs[2][0]["history"] == runs[2][1]["history"]       # both processes log the same, whole-batch figures
    assert [r["saved"] for r in runs[2]] == [True, True]          # no process returns before the LoRA is on disk
    one, two = runs[1][0]["history"], runs[2][0]["history"]
    assert [b["lr"] for b in two] == [a["lr"] for a in one]       # one schedule step a step, however many processes
    for a, b in zip(one[:2], two[:2], strict=False):               # before any update: the same gradient, summed in another order
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5) and b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True))
    print(f"{method}: largest loss difference over {len(one)} steps, two processes against one: {gap:.1e}")
    # SFT's loss is the denoising error, so rounding stays at rounding; DPO's logit multiplies differences of errors by
    # beta/2 = 2,500, so a one-ulp difference in an error (1.2e-7, from kernels that depend on the batch size) moves it by ~3e-4
    assert gap <= (1e-4 if method == "sft" else 2e-3), (one, two)
    assert (tmp_path / "p2" / "pytorch_lora_weights.safetensors").is_file() and not list((tmp_path / "p2" / "checkpoints").glob("*.tmp"))
    files = [sorted(p.name for p in (tmp_path / f"p{n}" / "cache").iterdir()) for n in (1, 2)]
    assert files[0] == files[1] and len(files[1]) == 2            # the two processes' parts are merged into the cache files
    for name in files[1]:
        a, b = load_file(tmp_path / "p1" / "cache" / name), load_file(tmp_path / "p2" / "cache" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    if method == "sft": return
    with pytest.raises(Exception, match=r"batch_size = 3: expected a multiple of the 2 processes"):
        _cfg(root, models["sd"], tmp_path / "odd", batch_size=3).save(tmp_path / "odd.yaml")
        run_processes(script, tmp_path / "odd.yaml", n=2)
    with pytest.raises(Exception, match=r"less than one batch of 1000: the 2 processes cannot take equal shares"):
        _cfg(root, models["sd"], tmp_path / "big", batch_size=1000).save(tmp_path / "big.yaml")
        run_processes(script, tmp_path / "big.yaml", n=2)


def test_gradient_checkpointing_changes_nothing_and_tensorboard_logs(tiny, tmp_path):
    root, models = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, plain = train_dpo(_cfg(root, models["sd"], tmp_path / "plain", max_steps=4), **QUIET)
        _, ckpt = train_dpo(_cfg(root, models["sd"], tmp_path / "gc", max_steps=4, gradient_checkpointing=True, tensorboard=True, log_every=3), **QUIET)
    assert [h["loss"] for h in ckpt] == pytest.approx([h["loss"] for h in plain], abs=1e-6) and plain[2]["loss"] != plain[0]["loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "gc" / "logs" / "dpo")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [3, 4]   # every log_every steps, and the last
    assert pd.read_csv(tmp_path / "gc" / "train_log.csv")["step"].tolist() == [1, 2, 3, 4]


def test_a_new_run_replaces_the_other_kind_of_output(tiny, tmp_path):
    "A full fine-tune into a folder that holds an earlier LoRA (and the reverse) leaves only its own output, so it is what loads."
    root, models = tiny
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dpo(_cfg(root, models["sd"], out, max_steps=1), **QUIET)
        assert (out / "pytorch_lora_weights.safetensors").is_file()
        train_dpo(_cfg(root, models["sd"], out, max_steps=1, full_finetune=True, lr=1e-3), **QUIET)
        assert not (out / "pytorch_lora_weights.safetensors").exists()
        loaded = load_generator(GeneratorSpec(str(models["sd"]), lora=str(out), device="cpu")).unet.state_dict()
        saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
        train_dpo(_cfg(root, models["sd"], out, max_steps=1), **QUIET)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()


def test_non_finite_gradients_stop_the_run_with_a_finite_loss(tiny, tmp_path):
    root, models = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_generator(GeneratorSpec(str(models["sd"]), device="cpu"))
    def poison(step, rec):   # after step 1, one LoRA weight's gradient turns NaN; the loss stays finite
        if step == 1: next(p for p in pipe.unet.parameters() if p.requires_grad).register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 2 .*last good checkpoint is .*step-1"):
        train_dpo(_cfg(root, models["sd"], tmp_path / "nan"), pipe=pipe, callback=poison, **QUIET)
    kept = load_file(tmp_path / "nan" / "checkpoints" / "step-1" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in kept.values())
    with pytest.raises(ValueError, match="'theme' is read from the quads' pair_id"):
        from instructengine.dpo_train import balance_weights
        balance_weights(pd.DataFrame({"prompt": ["a"], "image_a": ["x"]}), "theme")


def test_sft_weight_latent_sample_grad_accum_and_balance(tiny, tmp_path):
    from instructengine.dpo_train import balance_weights
    root, models = tiny
    run = lambda name, **kw: train_dpo(_cfg(root, models["sd"], tmp_path / name, **kw), **QUIET)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, mixed = run("plain", max_steps=1), run("mixed", max_steps=1, sft_weight=1.0)
        assert mixed[0]["loss"] == pytest.approx(plain[0]["loss"] + mixed[0]["sft"], abs=1e-6)      # DPO + 1 x SFT on the same inputs
        mean, drawn = run("mean", max_steps=1, method="sft"), run("drawn", max_steps=1, method="sft", latent_sample=True)
        assert abs(mean[0]["loss"] - drawn[0]["loss"]) > 1e-4                                        # a latent drawn from the VAE's distribution
        # with lr 0 nothing moves: one step of 2 x 2 quads logs the mean of two steps of 2 quads (the same quads and noise)
        two = run("two", max_steps=2, batch_size=2, method="sft", lr=0.0)
        acc = run("acc", max_steps=1, batch_size=2, grad_accum=2, method="sft", lr=0.0)
    assert acc[0]["loss"] == pytest.approx((two[0]["loss"] + two[1]["loss"]) / 2, abs=1e-6) and two[0]["loss"] != two[1]["loss"]
    w = balance_weights(pd.DataFrame({"pair_id": ["colors/x#0", "colors/y#1", "colors/x#2", "count/z#0"]}), "theme")
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])


def test_sdxl_lora_round_trip(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    root, models = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # alpha 16 at rank 8, a scale of 2: the saved file must carry it, or the loader assumes alpha = rank
        trained, hist = train_dpo(_cfg(root, models["sdxl"], tmp_path / "xl", max_steps=3, lr=1e-2, flip=True, lora_alpha=16.0), **QUIET)
        fresh = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
        fresh.load_lora_weights(tmp_path / "xl")
    for p in (trained, fresh): p.to("cpu").set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    a = trained(["three blue squares"], generator=torch.Generator().manual_seed(0), **kw).images
    b = fresh(["three blue squares"], generator=torch.Generator().manual_seed(0), **kw).images
    fresh.unload_lora_weights()
    c = fresh(["three blue squares"], generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 1e-5 and abs(a - c).max() > 1e-3
    assert all(math.isfinite(h["loss"]) for h in hist) and "text_b/margin" in hist[0]
    # the generation stage loads the same folder as a LoRA
    pipe = load_generator(GeneratorSpec(str(models["sdxl"]), lora=str(tmp_path / "xl"), device="cpu"))
    assert abs(pipe(["three blue squares"], generator=torch.Generator().manual_seed(0), **kw).images - a).max() < 1e-5


def test_cache_is_reused_and_keyed_by_model(tiny, tmp_path):
    root, models = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dpo(_cfg(root, models["sd"], tmp_path / "c", max_steps=1), **QUIET)
        pipe = load_generator(GeneratorSpec(str(models["sd"]), device="cpu"))
    files = sorted(p.name for p in (tmp_path / "c" / "cache").iterdir())
    key = model_key(str(models["sd"]), pipe, 32)
    assert files == [f"latents-{key}.safetensors", f"text-{key}.safetensors"]
    quads = load_dpo_data(_cfg(root, models["sd"], tmp_path / "c"))
    cache = DPOCache(tmp_path / "c" / "cache", key)
    added = cache.fill(pipe, list(quads["image_a"]) + list(quads["image_b"]), list(quads["instr_a"]) + list(quads["instr_b"]), 32)
    assert added["images_encoded"] == 0 and added["prompts_encoded"] == 0 and added["images"] == 16
    assert model_key(str(models["sd"]), pipe, 64) != key


def test_processes_fill_their_shares_of_the_cache(tiny, tmp_path):
    """Under several processes each encodes every other image and prompt into a part file, whenever it read the cache;
    after `merge` each holds the cache one process makes, and `save` leaves the two cache files. A run killed before the
    save loses nothing: the next one reads the parts and encodes nothing again."""
    root, models = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_generator(GeneratorSpec(str(models["sd"]), device="cpu"))
    quads = load_dpo_data(_cfg(root, models["sd"], tmp_path / "x"))
    paths, prompts = list(quads["image_a"]) + list(quads["image_b"]), list(quads["instr_a"]) + list(quads["instr_b"])
    n_img, n_txt = len(set(paths)), len(set(prompts))
    one = DPOCache(tmp_path / "one", "k")
    one.fill(pipe, paths, prompts, 32, flip=True)
    first = DPOCache(tmp_path / "two", "k")
    filled = [first.fill(pipe, paths, prompts, 32, flip=True, shard=(0, 2))]
    assert len(first.parts()) == 2 and not first.lat_path.exists()   # its latents and text, no cache file yet
    late = DPOCache(tmp_path / "two", "k")                            # starts after the other wrote its part: the same share
    filled.append(late.fill(pipe, paths, prompts, 32, flip=True, shard=(1, 2)))
    assert [f["images_encoded"] for f in filled] == [(n_img + 1) // 2, n_img // 2] and n_img > 1
    assert [f["prompts_encoded"] for f in filled] == [(n_txt + 1) // 2, n_txt // 2] and n_txt > 1
    for c in (first, late):
        c.merge(); c.check_flips(paths)
        assert c.lat.keys() == one.lat.keys() and c.txt.keys() == one.txt.keys()
        assert all(torch.allclose(c.lat[k], one.lat[k], atol=1e-6) for k in one.lat) and all(torch.allclose(c.txt[k], one.txt[k], atol=1e-6) for k in one.txt)
    again = DPOCache(tmp_path / "two", "k")   # killed before the main process saved
    assert again.fill(pipe, paths, prompts, 32, flip=True) == {"images_encoded": 0, "prompts_encoded": 0, "images": n_img, "prompts": n_txt}
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["latents-k.safetensors", "text-k.safetensors"]
    assert DPOCache(tmp_path / "two", "k").lat.keys() == one.lat.keys()


@pytest.mark.parametrize("which,kw", [("sd-v", {}), ("sd", {"full_finetune": True}), ("sd", {"method": "sft"}),
                                      ("sd", {"data": "pairs", "method": "dpo", "latent_sample": False})])
def test_options_train(tiny, tmp_path, which, kw):
    root, models = tiny
    if kw.get("data") == "pairs":   # a pairs table: the quads' image-side pairs under y_a
        q = pd.read_parquet(root / "run" / "quads.parquet")
        q.rename(columns={"instr_a": "prompt", "image_a": "image_w", "image_b": "image_l"}).assign(tie=False).to_parquet(root / "run" / "pairs.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, hist = train_dpo(_cfg(root, models[which], tmp_path / "o", max_steps=2, **kw), **QUIET)
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    if kw.get("full_finetune"):   # the stages load the output folder as the aligned generator: its unet/ replaces the base's
        assert (tmp_path / "o" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        base, tuned = (load_generator(GeneratorSpec(str(models[which]), lora=lora, device="cpu")).unet.state_dict() for lora in ("", str(tmp_path / "o")))
        saved = load_file(tmp_path / "o" / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(tuned[k], saved[k]) for k in saved) and any(not torch.equal(base[k], saved[k]) for k in saved)
        with pytest.raises(ValueError, match="no scale"):
            load_generator(GeneratorSpec(str(models[which]), lora=str(tmp_path / "o"), lora_scale=0.5, device="cpu"))
    else: assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()
    if kw.get("method") == "sft": assert "implicit_accuracy" not in hist[0]
    if kw.get("data") == "pairs": assert set(k.split("/")[0] for k in hist[0] if "/" in k) == {"image_a"}


def test_precision_can_change_between_runs_of_one_process(tiny, tmp_path):
    root, models = tiny   # accelerate keeps its mixed precision for the process; a notebook kernel trains more than once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [train_dpo(_cfg(root, models["sd"], tmp_path / f"p{k}", max_steps=2, warmup_steps=0, lr=1e-2, mixed_precision=mp), **QUIET)[1][-1]["loss"]
                  for k, mp in enumerate(("no", "bf16", "no"))]
    assert all(map(math.isfinite, losses))
    # at step 1 the LoRA is zero and every loss is log 2; at step 2 bf16 autocast's rounding shows in the loss, and the
    # third run is back in fp32 and repeats the first exactly
    assert losses[1] != losses[0] and losses[2] == losses[0], losses


def test_trains_whatever_the_callers_grad_mode(tiny, tmp_path):
    root, models = tiny   # a notebook may have switched autograd off for its lessons (05_reward does)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, hist = train_dpo(_cfg(root, models["sd"], tmp_path / "g", max_steps=2, lr=1e-2), **QUIET)
    assert hist[-1]["grad_norm"] > 0 and torch.is_grad_enabled()


def test_bad_input_is_named(tiny, tmp_path):
    root, models = tiny
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        train_dpo(DPOConfig(run_dir=str(tmp_path / "nowhere"), model=str(models["sd"])), **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="quads.parquet does not exist: run the annotation stage"):
        train_dpo(DPOConfig(run_dir=str(tmp_path / "empty"), model=str(models["sd"])), **QUIET)
    q = pd.read_parquet(root / "run" / "quads.parquet").drop(columns="instr_b")
    (tmp_path / "bad").mkdir(); q.to_parquet(tmp_path / "bad" / "quads.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['instr_b'\]"):
        load_dpo_data(DPOConfig(run_dir=str(tmp_path / "bad")))
