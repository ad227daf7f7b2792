"""Probes of the sandbox DPO gain (07a_dpo_train, "What the sandbox study found"): where does training data help ShapesBench?

    # on-distribution pairs: prompts drawn from ShapesBench's categories (its own 200 prompts left out), N images each
    # from the base generator, oracle-checked; a pair is (an image that passes, one that fails) of the same prompt
    python tools/dpo_probe.py data runs/probe --per-category 100 --images 4
    # train with any DPOConfig field set, then score ShapesBench (200 prompts x 2 images) before and after
    python tools/dpo_probe.py train runs/probe beta=1000   # into runs/probe/probe/beta1000, the LoRA that in-sample and cond-only read
    python tools/dpo_probe.py train runs/probe beta=1000 --swap            # the labels reversed: a sign check
    python tools/dpo_probe.py train runs/probe beta=1000 --timesteps 500:1000   # only the high-noise half of the schedule
    python tools/dpo_probe.py train runs/sandbox-ablation beta=1000 max_steps=150   # a data-engine run: its quads, cross-validation
    python tools/dpo_probe.py train runs/probe beta=1000 full_finetune=true lr=1e-5   # the whole UNet against a frozen copy (200 steps)
    # a second round on the policy's own images: fuse round 1 (a LoRA, or a whole UNet) into a pipeline folder, draw new
    # data from it, train against it as the reference
    python tools/dpo_probe.py fuse runs/probe/probe/beta1000-full_finetuneTrue-lr1e-05 runs/probe-r1/model
    python tools/dpo_probe.py data runs/probe-r2 --model runs/probe-r1/model --seed 124   # its exact match: round 1 on fresh prompts
    python tools/dpo_probe.py data runs/probe-base124 --seed 124                         # the base on the same prompts and seeds
    python tools/dpo_probe.py train runs/probe-r2 beta=1000 full_finetune=true lr=1e-5 model=$PWD/runs/probe-r1/model
    # more data: 2.7 times the pairs (300 prompts a category), 400 steps (4.4 epochs); then its exact match on the fresh prompts
    python tools/dpo_probe.py data runs/probe-3x --per-category 300 --seed 125
    python tools/dpo_probe.py train runs/probe-3x beta=1000 full_finetune=true lr=1e-5 max_steps=400
    python tools/dpo_probe.py fuse runs/probe-3x/probe/beta1000-full_finetuneTrue-lr1e-05-max_steps400 runs/probe-3x/model
    python tools/dpo_probe.py data runs/probe-3x-eval124 --model runs/probe-3x/model --seed 124
    # the text encoder trainable too (train_dpo caches text embeddings, so this is a loop of its own): the whole text
    # tower or a LoRA on it, optionally with a UNet LoRA; --keep-uncond gives CFG's empty prompt the frozen encoder's embedding
    python tools/dpo_probe.py train-te runs/probe --text-encoder full --lr-te 1e-4 --keep-uncond
    # the rendered truth as the winner: every failed sample of a probe folder against a render of its prompt
    python tools/dpo_probe.py truth runs/probe runs/probe-truth
    python tools/dpo_probe.py train runs/probe-truth beta=1000 full_finetune=true lr=1e-5
    # no preferences at all: the generator's own recipe (stage 2, on the sandbox CLIP's 40,000 renders) run on for N steps
    python tools/dpo_probe.py continue runs/probe --steps 1000 --lr 1e-4 --ema 0.999
    # the headroom: ShapesBench's own renders, and the same through the generator's VAE, scored by the oracle
    python tools/dpo_probe.py ceiling --per-prompt 4
    # does training move the sampler on its own prompts? a trained LoRA (or whole UNet) against the base on the probe
    # folder's prompts with fresh seeds, split into the prompts that gave pairs and those that did not
    python tools/dpo_probe.py in-sample runs/probe runs/probe/probe/beta1000
    python tools/dpo_probe.py train runs/probe beta=1000 max_steps=600
    python tools/dpo_probe.py in-sample runs/probe runs/probe/probe/beta1000-max_steps600
    # a trained LoRA on classifier-free guidance's conditional branch only (the unconditional one from the base UNet)
    python tools/dpo_probe.py cond-only runs/probe/probe/beta1000
    # a base whose failures come from its captions: the shipped UNet's stage 2 run on with a share p of the captions
    # mislabelled by one content edit (as web alt-text names a wrong colour, count or object), saved and scored; then
    # the data engine on it, then DPO (or method=sft, beta=1000, full_finetune=true lr=1e-5) on its quads against it
    python tools/dpo_probe.py noisy-base runs/noisy-base --p 0.3 --steps 1500
    instructengine run taxonomy --run-dir runs/noisy-check -p pairs_per_subtopic=5
    instructengine run generate --run-dir runs/noisy-check -p limit=0 -p images_per_instruction=4 -p model=runs/noisy-base/model
    instructengine run annotate --run-dir runs/noisy-check -p limit=0 -p pairing=all -p 'judges=[{kind: oracle}]' \
        -p 'rules=[{rule: follows_own, judge: oracle}]'
    python tools/dpo_probe.py train runs/noisy-check model=$PWD/runs/noisy-base/model
    python tools/dpo_probe.py data runs/probe-noisy --model runs/noisy-base/model   # its on-distribution pairs
    python tools/dpo_probe.py train runs/probe-noisy beta=1000 model=$PWD/runs/noisy-base/model
    # a base with systematic confusions instead: each caption names right for left, purple for blue, three for two (and
    # back) with probability p per confusion; then the same data engine and trainings on it
    python tools/dpo_probe.py biased-base runs/biased-base --p 0.5 --steps 1200 --ema 0.995
    instructengine run taxonomy --run-dir runs/biased-check -p pairs_per_subtopic=5
    instructengine run generate --run-dir runs/biased-check -p limit=0 -p images_per_instruction=4 -p model=runs/biased-base/model
    instructengine run annotate --run-dir runs/biased-check -p limit=0 -p pairing=all -p 'judges=[{kind: oracle}]' \
        -p 'rules=[{rule: follows_own, judge: oracle}]'
    python tools/dpo_probe.py train runs/biased-check model=$PWD/runs/biased-base/model [method=sft]
    python tools/dpo_probe.py data runs/probe-biased --model runs/biased-base/model
    python tools/dpo_probe.py train runs/probe-biased beta=1000 model=$PWD/runs/biased-base/model

`train` saves to <folder>/probe/<its settings joined in the order given>, e.g. beta1000-full_finetuneTrue-lr1e-05.
Each `train`, `train-te`, `continue` and `in-sample` appends one line to <folder>/probe-results.jsonl. On 2 CPU cores `data` takes
about 10 min at the sizes above (300 prompts a category: 28 min), `train` about 3-6 min (the trainer's default of 200 steps,
or the `max_steps` given, and the scoring; 6 min on the 3,489 quads of `runs/topup8`), and `in-sample` about 7 min (150
prompts a group, 2 images each, base and trained).
"""
import argparse, json, os, random, sys, time
from pathlib import Path

os.environ.setdefault("INSTRUCTENGINE_PROGRESS", "0")
import pandas as pd
import torch

from instructengine.core import load_yaml
from instructengine.dpo import DPOCache, default_resolution, denoise_errors, dpo_loss, model_key
from instructengine.dpo_train import (DPOConfig, _bench_table, _summary, base_table, bench_subset, load_dpo_data, shapesbench_eval,
                                      train_dpo)
from instructengine.generate import GeneratorSpec, aligned_weights, load_generator
from instructengine.sandbox import CATEGORIES, caption, check, load_shapesbench, sample_scene
from instructengine.sandbox_generator import generate


def make_data(out: Path, per_category: int, images: int, seed: int, model: str = "sandbox"):
    (out / "images").mkdir(parents=True, exist_ok=True)
    held, rng, jobs = {r["prompt"] for r in load_shapesbench()}, random.Random(seed), []
    for cat in CATEGORIES:
        n = 0
        while n < per_category:
            p = caption(sample_scene(rng, cat), rng.randrange(3), rng.randrange(3))
            if p in held: continue
            jobs += [(cat, p)] * images; n += 1
    t0 = time.time()
    imgs = generate(load_generator(GeneratorSpec(model, device="cpu")), [p for _, p in jobs],
                    [1000 + i for i in range(len(jobs))], batch_size=128)
    rows = []
    for i, ((cat, p), im) in enumerate(zip(jobs, imgs, strict=True)):
        path = out / "images" / f"{i}.png"; im.save(path)
        rows.append({"category": cat, "prompt": p, "path": str(path.resolve()), "ok": check(im, p).overall})
    df = pd.DataFrame(rows); df.to_csv(out / "images.csv", index=False)
    pairs = []
    for p, g in df.groupby("prompt", sort=False):
        for w, l in list(zip(g[g.ok].path, g[~g.ok].path, strict=False))[:2]:
            pairs.append({"prompt": p, "category": g.category.iloc[0], "image_w": w, "image_l": l})
    pd.DataFrame(pairs).to_parquet(out / "pairs.parquet")
    print(f"{len(df)} images in {time.time() - t0:.0f} s, exact match {df.ok.mean():.3f}; {len(pairs)} pairs "
          f"{pd.DataFrame(pairs).category.value_counts().to_dict()}")


def truth(src: Path, out: Path):
    """A probe folder whose pairs are (a render of the prompt's scene, a sample of `src` that failed the oracle): the
    renderer as a generator that is always right. Renders the oracle rejects (a few) are left out."""
    import shutil
    from instructengine.sandbox import parse_caption, render
    (out / "truth").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "eval", out / "eval", dirs_exist_ok=True)   # the base table is the same
    shutil.copy(src / "images.csv", out / "images.csv")
    d, rows = pd.read_csv(src / "images.csv"), []
    for i, r in enumerate(d[~d.ok].itertuples()):
        img = render(parse_caption(r.prompt), seed=5000 + i)
        if not check(img, r.prompt).overall: continue
        path = (out / "truth" / f"{i}.png").resolve(); img.save(path)
        rows.append({"prompt": r.prompt, "category": r.category, "image_w": str(path), "image_l": r.path})
    pd.DataFrame(rows).to_parquet(out / "pairs.parquet")
    print(f"{len(rows)} pairs: rendered truth against {(~d.ok).sum()} failed samples")


def fuse(lora: Path, out: Path):
    """The sandbox generator with a trained folder applied (a LoRA merged into its UNet, or a full fine-tune's UNet), saved
    as a diffusers pipeline folder: the base, and the reference, of the next round."""
    pipe = load_generator(GeneratorSpec("sandbox", lora=str(lora), device="cpu"))
    if aligned_weights(lora)[0] == "lora": pipe.fuse_lora(); pipe.unload_lora_weights()
    pipe.save_pretrained(out)
    print(f"{lora} fused into {out}")


def record(folder: Path, name: str, rows: int, after, secs: float, hist: list = None, model: str = "sandbox"):
    """Score against the base `model` (ShapesBench, 200 prompts x 2 images, seeds 0-1; its table cached in the folder's eval/),
    append the result to <folder>/probe-results.jsonl and print it. `after` is a per-category table or a pipeline."""
    bench = bench_subset(0)
    before = base_table(DPOConfig(run_dir=str(folder), model=model, eval_per_prompt=2, eval_seed=0), bench)["exact_match"]
    if not isinstance(after, pd.DataFrame): after = shapesbench_eval(after, bench, 2, 0)[1]
    gain = (100 * (after["exact_match"] - before)).round(1)
    rec = {"name": name, "rows": rows, "gain_points": float(gain["overall"]), "per_category": gain.drop("overall").to_dict()}
    if hist is not None: rec["implicit_accuracy"] = _summary(hist).get("implicit_accuracy")
    rec["train_s"] = round(secs)
    with open(folder / "probe-results.jsonl", "a") as f: f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


def train(folder: Path, sets: list, swap: bool, timesteps: str = ""):
    kw = {k: load_yaml(v) for k, v in (s.split("=", 1) for s in sets)}
    name = "-".join(f"{k}{v}" for k, v in kw.items()) + ("-swapped" if swap else "") + (f"-t{timesteps.replace(':', '-')}" if timesteps else "") or "defaults"
    if timesteps:   # every step's timesteps drawn from [lo, hi) instead of [0, T): the same draws, rescaled
        import instructengine.dpo_train as dt
        lo, hi = map(int, timesteps.split(":"))
        whole = dt.quad_batch
        def narrowed(*a, **k):
            b = whole(*a, **k)
            return b | {"timesteps": lo + b["timesteps"] * (hi - lo) // a[4]}   # a[4]: the schedule's T
        dt.quad_batch = narrowed
    quads = not (folder / "images.csv").is_file()   # a probe folder (from `data`) has images.csv; a run folder has quads
    if quads:
        base_kw = dict(run_dir=str(folder), data="quads", method="cv")
    else:
        p = pd.read_parquet(folder / "pairs.parquet")
        w, l = ("image_l", "image_w") if swap else ("image_w", "image_l")
        data = p.rename(columns={w: "image_a", l: "image_b"}).assign(instr_a=p.prompt, instr_b=p.prompt)
        base_kw = dict(run_dir=str(folder), data="pairs", method="dpo")
    cfg = DPOConfig(**{**base_kw, "checkpoint_every": 10 ** 9, "tensorboard": False, "eval_per_prompt": 2, "eval_seed": 0,
                       "out": str((folder / "probe" / name).resolve()), **kw})
    if quads:
        data = load_dpo_data(cfg)
        if swap: data = data.rename(columns={"image_a": "image_b", "image_b": "image_a"})
    t0 = time.time(); _, hist = train_dpo(cfg, data, log=lambda *a: None); secs = time.time() - t0
    record(folder, name, len(data), _bench_table(cfg, bench_subset(0), lora=cfg.out), secs, hist, cfg.model)


def train_te(folder: Path, text_encoder: str, unet: str, lr_te: float, lr_unet: float, beta: float, steps: int, batch_size: int,
             seed: int, keep_uncond: bool):
    """Plain Diffusion-DPO on a probe folder's pairs with the sandbox generator's text encoder trainable: `full` (every weight
    but the token embeddings, against a frozen copy) or `lora` (rank 8 on its attention and MLP, adapters off = reference),
    and the UNet frozen, a LoRA or whole. The prompt's embedding is computed every step; latents are the VAE means."""
    import copy
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    if text_encoder == "none" and unet == "none": raise SystemExit("train-te: --text-encoder none and --unet none leave nothing to train")
    torch.manual_seed(seed)
    pipe = load_generator(GeneratorSpec("sandbox", device="cpu", dtype="float32"))
    pairs = pd.read_parquet(folder / "pairs.parquet")
    t0 = time.time()
    res = default_resolution(pipe)   # the trainer's latent cache; text embeddings are computed every step here
    cache = DPOCache(folder / "probe" / "cache", model_key("sandbox", pipe, res))
    cache.fill(pipe, list(pairs.image_w) + list(pairs.image_l), [], res)
    zw, zl = (cache.latents(list(pairs[c]), sample=False, scaling=pipe.vae.config.scaling_factor)[0] for c in ("image_w", "image_l"))
    tok = lambda prompts: pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids
    ids = tok(pairs.prompt)
    te, un = pipe.text_encoder.requires_grad_(False), pipe.unet.requires_grad_(False)
    ref_te, ref_un, groups = te, un, []
    if text_encoder == "full":
        ref_te = copy.deepcopy(te).eval()
        ps = [p.requires_grad_(True) for n, p in te.named_parameters() if "token_embedding" not in n]
        groups.append({"params": ps, "lr": lr_te})
    elif text_encoder == "lora":
        te.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
        groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": lr_te})
    if unet == "full":
        ref_un = copy.deepcopy(un).eval(); groups.append({"params": list(un.requires_grad_(True).parameters()), "lr": lr_unet})
    elif unet == "lora":
        un.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        groups.append({"params": [p for p in un.parameters() if p.requires_grad], "lr": lr_unet})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    base_lrs = [g["lr"] for g in opt.param_groups]
    noise_sched, g, hist = DDPMScheduler.from_config(pipe.scheduler.config), torch.Generator().manual_seed(seed), []
    adapters = lambda on: [m.enable_adapters() if on else m.disable_adapters() for m, mode in ((te, text_encoder), (un, unet)) if mode == "lora"]
    with torch.enable_grad():
        for step in range(steps):
            for grp, lr in zip(opt.param_groups, base_lrs, strict=True): grp["lr"] = lr * min(1.0, (step + 1) / 20)
            i = torch.randint(0, len(pairs), (batch_size,), generator=g)
            z, noise = torch.cat([zw[i], zl[i]]), torch.randn(zw[i].shape, generator=g).repeat(2, 1, 1, 1)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g).repeat(2)
            zt, x = noise_sched.add_noise(z, noise, t), ids[i].repeat(2, 1)
            e = denoise_errors(un(zt, t, encoder_hidden_states=te(x)[0]).sample, noise)
            with torch.no_grad():
                adapters(False); r = denoise_errors(ref_un(zt, t, encoder_hidden_states=ref_te(x)[0]).sample, noise); adapters(True)
            loss, margin = dpo_loss(e[:batch_size], e[batch_size:], r[:batch_size], r[batch_size:], beta)
            opt.zero_grad(); loss.mean().backward()
            torch.nn.utils.clip_grad_norm_([p for grp in groups for p in grp["params"]], 1.0); opt.step()
            hist.append({"loss": loss.mean().item(), "implicit_accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()})
    te.eval(); un.eval()
    secs = time.time() - t0
    if keep_uncond and text_encoder != "none":   # CFG's unconditional half: the frozen text encoder's embedding of ""
        empty, forward = tok([""])[0], te.forward
        frozen = ref_te if text_encoder == "full" else None
        def keep(input_ids, *a, **k):
            out = forward(input_ids, *a, **k)
            hit = (input_ids == empty.to(input_ids.device)).all(1)
            if hit.any():
                if frozen is None: te.disable_adapters(); base = forward(input_ids, *a, **k); te.enable_adapters()
                else: base = frozen(input_ids, *a, **k)
                out[0][hit] = base[0][hit]
            return out
        te.forward = keep
    name = f"te-{text_encoder}" + (f"-lr{lr_te:g}" if text_encoder != "none" else "") + f"-unet-{unet}" + (f"-lr{lr_unet:g}" if unet != "none" else "") + (f"-beta{beta:g}" if beta != 1000 else "") + ("-keep_uncond" if keep_uncond else "")
    record(folder, name, len(pairs), pipe, secs, hist)


def _run_recipe_on(imgs, caps: list, steps: int, lr: float, ema: float, seed: int, log=None):
    "The shipped generator with its UNet run on for `steps` of stage 2 of `train_generator` (Min-SNR, optional EMA) on (imgs, caps)."
    from instructengine.sandbox_generator import GeneratorTrainConfig, train_unet
    pipe = load_generator(GeneratorSpec("sandbox", device="cpu", dtype="float32"))
    cfg = GeneratorTrainConfig(refine_steps=steps, refine_lr=lr, warmup=50, seed=seed, ema_decay=ema)
    pipe.unet, _ = train_unet(cfg, pipe.vae, pipe.text_encoder, pipe.tokenizer, imgs, caps, log=log, unet=pipe.unet, stage="refine")
    return pipe


def continue_training(folder: Path, steps: int, lr: float, ema: float, seed: int):
    """How far the shipped generator is from what its own supervised recipe reaches: stage 2 of `train_generator` (Min-SNR,
    optional EMA) warm-restarted from the shipped UNet on the rendered truth for `steps` more steps, then ShapesBench."""
    from instructengine.sandbox_clip import ClipTrainConfig, clip_data
    t0 = time.time()
    (imgs, caps, _), _ = clip_data(ClipTrainConfig())
    pipe = _run_recipe_on(imgs, caps, steps, lr, ema, seed, log=None)
    record(folder, f"continue-{steps}-lr{lr:g}-ema{ema:g}-seed{seed}", len(imgs), pipe, time.time() - t0)


def _save_and_score(out: Path, pipe, t0: float):
    "Save a probe base to out/model, score it on ShapesBench (200 prompts x 2 images, seeds 0-1) into out/shapesbench.csv."
    pipe.save_pretrained(out / "model")
    table = shapesbench_eval(pipe, load_shapesbench(), 2, 0)[1]
    table.to_csv(out / "shapesbench.csv")
    print(table.round(3).to_string(), f"\n{time.time() - t0:.0f} s")


def noisy_base(out: Path, p: float, steps: int, lr: float, ema: float, seed: int):
    """A base generator misaligned by its captions rather than limited by its capacity: stage 2 of `train_generator`
    warm-restarted from the shipped UNet on the same 40,000 renders, with a share `p` of the captions replaced by the
    caption of a one-edit variant of their scene (the ShapesWorld writer's content edits; never a ShapesBench scene).
    Saves the pipeline to out/model and scores it on ShapesBench (200 prompts x 2 images, seeds 0-1)."""
    from instructengine.sandbox import SceneError, bench_keys
    from instructengine.sandbox_clip import ClipTrainConfig, clip_data
    from instructengine.taxonomy import SandboxWriter
    t0 = time.time()
    (imgs, caps, scenes), _ = clip_data(ClipTrainConfig())
    rng, writer, held, noisy = random.Random(seed), SandboxWriter(), bench_keys(), list(caps)
    for i, s in enumerate(scenes):
        if rng.random() >= p: continue
        for _ in range(50):
            try: b = writer._edit(s, rng.choice(("attribute", "object", "count", "relation", "binding")), rng)
            except SceneError: continue
            if b is not None and b != s and b.key() not in held:
                noisy[i] = caption(b, rng.randrange(12), rng.randrange(3)); break
    print(f"{sum(a != b for a, b in zip(caps, noisy, strict=True))} of {len(caps)} captions mislabelled")
    _save_and_score(out, _run_recipe_on(imgs, noisy, steps, lr, ema, seed, log=print), t0)


SWAPS = {"position": ("left", "right"), "color": ("blue", "purple"), "count": (2, 3)}


def _swap(x, pair):
    "The other value of `pair` for either of its values; anything else unchanged."
    u, v = pair
    return v if x == u else u if x == v else x


def biased_base(out: Path, p: float, steps: int, lr: float, ema: float, seed: int):
    """A base with systematic confusions, as web-trained models have (left for right, a wrong hue, two for three): stage 2
    of `train_generator` warm-restarted from the shipped UNet on the same 40,000 renders, where each scene's caption, with
    probability `p` for each of SWAPS that applies to it, names the other of the pair (every group's slot swapped; a scene
    that cannot hold the swap keeps its words). Saves the pipeline to out/model and scores it on ShapesBench."""
    from dataclasses import replace
    from instructengine.sandbox import Scene, SceneError, bench_keys
    from instructengine.sandbox_clip import ClipTrainConfig, clip_data
    t0 = time.time()
    (imgs, caps, scenes), _ = clip_data(ClipTrainConfig())
    rng, held, biased, swapped = random.Random(seed), bench_keys(), list(caps), dict.fromkeys(SWAPS, 0)
    for i, s in enumerate(scenes):
        b = s
        for slot, pair in SWAPS.items():
            if not any(getattr(g, slot) in pair for g in b.groups) or rng.random() >= p: continue
            try: c = Scene(tuple(replace(g, **{slot: _swap(getattr(g, slot), pair)}) for g in b.groups), b.finish, b.backdrop)
            except SceneError: continue
            if c.key() not in held: b = c; swapped[slot] += 1
        if b != s: biased[i] = caption(b, rng.randrange(12), rng.randrange(3))
    print(f"{sum(a != b for a, b in zip(caps, biased, strict=True))} of {len(caps)} captions swapped: {swapped}")
    _save_and_score(out, _run_recipe_on(imgs, biased, steps, lr, ema, seed, log=print), t0)


def ceiling(per_prompt: int):
    """How much of ShapesBench the generator's latent space can hold at all: the oracle's exact match on renders of every
    ShapesBench scene (seeds 0..per_prompt-1), and on the same renders after the shipped VAE's encoder (its mean) and
    decoder. A UNet, however it is trained, draws latents that this decoder turns into pixels."""
    from instructengine.sandbox import Scene, render, score_bench
    bench, pipe = load_shapesbench(), load_generator(GeneratorSpec("sandbox", device="cpu"))
    renders = {r["id"]: [render(Scene.from_dict(r["scene"]), seed=j) for j in range(per_prompt)] for r in bench}
    proc = pipe.image_processor   # the pipeline's own conversions between PIL images and the VAE's [-1, 1] tensors
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(proc.preprocess([im for ims in renders.values() for im in ims])).latent_dist.mean).sample
    out = iter(proc.postprocess(y, output_type="pil"))
    decoded = {i: [next(out) for _ in ims] for i, ims in renders.items()}
    table = pd.DataFrame({"renders": score_bench(bench, renders)[1]["exact_match"], "through the VAE": score_bench(bench, decoded)[1]["exact_match"]})
    print(f"ShapesBench ({len(bench)} prompts x {per_prompt} renders), the oracle's exact match:")
    print(table.round(3).to_string())


def cond_only(lora: Path, per_prompt: int = 2):
    """ShapesBench for a trained LoRA two ways: as trained, and with the LoRA on classifier-free guidance's conditional
    branch only, the unconditional prediction coming from the base UNet (DPO trains on prompts, never on the empty one,
    so what the LoRA does to the unconditional branch is untrained drift that guidance multiplies)."""
    bench = load_shapesbench()
    pipe = load_generator(GeneratorSpec("sandbox", lora=str(lora), device="cpu"))
    unet, forward = pipe.unet, pipe.unet.forward

    def conditional_only(sample, timestep, encoder_hidden_states=None, **kw):   # the pipeline's batch: [unconditional, conditional]
        n = sample.shape[0] // 2
        unet.disable_adapters()
        try: u = forward(sample[:n], timestep, encoder_hidden_states=encoder_hidden_states[:n], **kw)[0]
        finally: unet.enable_adapters()
        return (torch.cat([u, forward(sample[n:], timestep, encoder_hidden_states=encoder_hidden_states[n:], **kw)[0]]),)
    for name, f in (("as trained", forward), ("conditional branch only", conditional_only)):
        unet.forward = f
        table = shapesbench_eval(pipe, bench, per_prompt, 0)[1]
        print(f"{name}: exact match {table.loc['overall', 'exact_match']:.4f}", table["exact_match"].round(3).to_dict())


def in_sample(folder: Path, lora: Path, images: int, max_prompts: int, seed: int, model: str = "sandbox"):
    """Does DPO move the policy on the prompts it trained on? The oracle's exact match of the base `model` and of it with
    `lora`, on a probe folder's own prompts with fresh seeds (5000 + 100,000 * seed + i; `data` drew its images with 1000 + i), split into
    the prompts that gave pairs (trained on) and those that did not (every image passed, or every one failed); each group
    capped at `max_prompts` prompts, drawn evenly. A gain here but not on ShapesBench is a generalisation gap; none here
    either means the training does not move the sampler."""
    d, trained = pd.read_csv(folder / "images.csv"), set(pd.read_parquet(folder / "pairs.parquet").prompt)
    by_prompt = d.groupby("prompt", sort=False).agg(category=("category", "first"), passed=("ok", "mean"))
    by_prompt["group"] = ["trained" if p in trained else "all passed" if r == 1 else "all failed"
                          for p, r in zip(by_prompt.index, by_prompt.passed, strict=True)]
    def evenly(g):   # the folder lists its prompts by category: spread the pick over all of them
        k = min(len(g), max_prompts)
        return g.iloc[[round(i * (len(g) - 1) / (k - 1)) for i in range(k)] if k > 1 else slice(0, k)]
    picked = pd.concat([evenly(g) for _, g in by_prompt.groupby("group")])
    prompts = [p for p in picked.index for _ in range(images)]
    seeds = [5000 + 100_000 * seed + i for i in range(len(prompts))]
    rows = []
    for name, spec in (("base", GeneratorSpec(model, device="cpu")), ("lora", GeneratorSpec(model, lora=str(lora), device="cpu"))):
        imgs = generate(load_generator(spec), prompts, seeds, batch_size=128)
        rows += [{"prompt": p, "seed": sd, "model": name, "ok": check(im, p).overall} for p, sd, im in zip(prompts, seeds, imgs, strict=True)]
    # one row per (prompt, seed), the base's verdict beside the trained model's
    paired = (pd.DataFrame(rows).join(picked[["group", "category"]], on="prompt")
              .pivot_table(index=["group", "category", "prompt", "seed"], columns="model", values="ok", aggfunc="first").astype(bool))
    table = paired.groupby(level="group").mean()
    table["gain_points"] = 100 * (table["lora"] - table["base"])
    table["prompts"] = picked.group.value_counts()
    # how many verdicts the training turned each way: a small gain from few changes, or from many that cancel?
    table["fail_to_pass"] = (~paired.base & paired.lora).groupby(level="group").sum()
    table["pass_to_fail"] = (paired.base & ~paired.lora).groupby(level="group").sum()
    print(f"{lora}: exact match on {folder}'s own prompts, {images} fresh seeds each")
    print(table.round(3).to_string())
    cats = paired.loc["trained"].groupby(level="category").mean()
    print("trained prompts by category:", (100 * (cats["lora"] - cats["base"])).round(1).to_dict())
    rec = {"name": f"in-sample {lora.name}", "images": images, "gain_points_by_group": table["gain_points"].round(1).to_dict(),
           "base_by_group": table["base"].round(3).to_dict(), "prompts_by_group": table["prompts"].to_dict(),
           "fail_to_pass": table["fail_to_pass"].to_dict(), "pass_to_fail": table["pass_to_fail"].to_dict()}
    with open(folder / "probe-results.jsonl", "a") as f: f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data"); d.add_argument("out", type=Path)
    d.add_argument("--per-category", type=int, default=100); d.add_argument("--images", type=int, default=4)
    d.add_argument("--seed", type=int, default=123)
    d.add_argument("--model", default="sandbox", help="the generator drawing the images: sandbox or a pipeline folder")
    tr = sub.add_parser("truth"); tr.add_argument("src", type=Path); tr.add_argument("out", type=Path)
    f = sub.add_parser("fuse"); f.add_argument("lora", type=Path); f.add_argument("out", type=Path)
    t = sub.add_parser("train"); t.add_argument("folder", type=Path); t.add_argument("sets", nargs="*", help="DPOConfig field=value")
    t.add_argument("--swap", action="store_true", help="reverse every preference (winner <-> loser)")
    t.add_argument("--timesteps", default="", help="LO:HI, train on timesteps in [LO, HI) only (the high-noise ones decide layout)")
    te = sub.add_parser("train-te", help="Diffusion-DPO on a probe folder's pairs with the text encoder trainable")
    te.add_argument("folder", type=Path)
    te.add_argument("--text-encoder", choices=["full", "lora", "none"], default="full")
    te.add_argument("--unet", choices=["none", "lora", "full"], default="none")
    te.add_argument("--lr-te", type=float, default=1e-4); te.add_argument("--lr-unet", type=float, default=1e-4)
    te.add_argument("--beta", type=float, default=1000.0); te.add_argument("--steps", type=int, default=150)
    te.add_argument("--batch-size", type=int, default=16); te.add_argument("--seed", type=int, default=0)
    te.add_argument("--keep-uncond", action="store_true", help="CFG's empty prompt keeps the frozen text encoder's embedding")
    c = sub.add_parser("continue", help="run the generator's own supervised recipe on from the shipped weights, then ShapesBench")
    c.add_argument("folder", type=Path, help="a probe folder: its eval/ holds the base table, its probe-results.jsonl the result")
    c.add_argument("--steps", type=int, default=1000); c.add_argument("--lr", type=float, default=1e-4)
    c.add_argument("--ema", type=float, default=0.999); c.add_argument("--seed", type=int, default=7)
    ce = sub.add_parser("ceiling", help="ShapesBench's renders, and the same through the generator's VAE, scored by the oracle")
    ce.add_argument("--per-prompt", type=int, default=4)
    co = sub.add_parser("cond-only", help="ShapesBench for a LoRA as trained and on guidance's conditional branch only")
    co.add_argument("lora", type=Path)
    ins = sub.add_parser("in-sample", help="a trained LoRA or UNet against the base on a probe folder's own prompts (fresh seeds)")
    ins.add_argument("folder", type=Path); ins.add_argument("lora", type=Path, help="a `train` output folder: a LoRA or a whole UNet")
    ins.add_argument("--images", type=int, default=2); ins.add_argument("--max-prompts", type=int, default=150)
    ins.add_argument("--seed", type=int, default=0); ins.add_argument("--model", default="sandbox")
    def probe_base(name, help, p, steps, ema):   # the defaults are the measured runs' settings
        b = sub.add_parser(name, help=help)
        b.add_argument("out", type=Path); b.add_argument("--p", type=float, default=p); b.add_argument("--steps", type=int, default=steps)
        b.add_argument("--lr", type=float, default=2e-4); b.add_argument("--ema", type=float, default=ema); b.add_argument("--seed", type=int, default=0)
    probe_base("noisy-base", "a base misaligned by mislabelled captions: stage 2 run on with a share p mislabelled", 0.3, 1500, 0.999)
    probe_base("biased-base", "a base with systematic confusions (left/right, blue/purple, two/three), each with probability p", 0.5, 1200, 0.995)
    a = ap.parse_args()
    if a.cmd == "data": make_data(a.out, a.per_category, a.images, a.seed, a.model)
    elif a.cmd == "fuse": fuse(a.lora, a.out)
    elif a.cmd == "truth": truth(a.src, a.out)
    elif a.cmd == "ceiling": ceiling(a.per_prompt)
    elif a.cmd == "cond-only": cond_only(a.lora)
    elif a.cmd == "in-sample": in_sample(a.folder, a.lora, a.images, a.max_prompts, a.seed, a.model)
    elif a.cmd == "noisy-base": noisy_base(a.out, a.p, a.steps, a.lr, a.ema, a.seed)
    elif a.cmd == "biased-base": biased_base(a.out, a.p, a.steps, a.lr, a.ema, a.seed)
    elif a.cmd == "continue": continue_training(a.folder, a.steps, a.lr, a.ema, a.seed)
    elif a.cmd == "train-te": train_te(a.folder, a.text_encoder, a.unet, a.lr_te, a.lr_unet, a.beta, a.steps, a.batch_size, a.seed, a.keep_uncond)
    else: train(a.folder, a.sets, a.swap, a.timesteps)
    sys.exit(0)
