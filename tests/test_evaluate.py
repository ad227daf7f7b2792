"""Evaluation: DrawBench from the shared CSV and from small ones (and the offline hub), the stage end to end on a tiny SD
pipeline of the real classes with a LoRA (DrawBench, all 11 categories, CLIP and PickScore), resume after a rerun and after
a kill, every scorer on a tiny stand-in with its missing-weights errors, the ImageReward key mapping checked against a
timm-style ViT block written out here, and the metrics against hand values."""
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from instructengine.core import ConfigError
from instructengine.evaluate import (EvaluateConfig, benchmark_name, compare, eval_jobs, format_table, load_benchmark, load_drawbench,
                                     relative_improvement, run_evaluate, win_outcomes, win_rate)
from instructengine.scorers import (IMAGEREWARD_HEAD, IMAGEREWARD_MEAN, IMAGEREWARD_STD, ClipScorer, HPSv2Scorer, ImageRewardScorer, MPSScorer,
                                    OracleScorer, PickScoreScorer, convert_imagereward, imagereward_key, load_state_dict_file, make_scorer,
                                    parse_scorer, tiny_imagereward)
from instructengine.generate import LORA_FILE
from instructengine.sandbox import parse_caption, render

DRAWBENCH_CATEGORIES = {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20, "Descriptions": 20, "Gary Marcus et al.": 10,
                        "Misspellings": 10, "Positional": 20, "Rare Words": 7, "Reddit": 38, "Text": 21}
CAPTIONS = ["two red circles", "a large blue square on the left", "a yellow triangle, blurry"]


class Pickled:
    "An object in a checkpoint: loading it would run unpickling code."


def drawbench_csv() -> Path:
    "The DrawBench CSV: $INSTRUCTENGINE_DRAWBENCH, else the shared copy beside the checkout; skip when neither exists."
    for p in (os.environ.get("INSTRUCTENGINE_DRAWBENCH"), Path(__file__).resolve().parents[1].parent / "shared" / "data" / "drawbench.csv"):
        if p and Path(p).is_file(): return Path(p)
    pytest.skip("no DrawBench CSV: the project ships none; set INSTRUCTENGINE_DRAWBENCH to a copy (columns Prompts, Category) "
                "or place it at ../shared/data/drawbench.csv beside the checkout")


OWN_PROMPTS = ["a red apple on a wooden table", "a square circle", "three green bottles", "a teapot shaped like a snail",
               "a lighthouse on a cliff at dusk", "a horse riding an astronaut", "a yelow bycicle", "a cup to the left of a book",
               "a pangolin in the snow", "a cat wearing sunglasses at the beach", "a sign that says hello"]


def prompts_csv(root) -> Path:
    """The DrawBench CSV when there is one; else a table of our own prompts, one a DrawBench category, so that the stage
    tests (which take one prompt a category) run on any checkout instead of skipping."""
    try: return drawbench_csv()
    except pytest.skip.Exception:
        path = Path(root) / "prompts.csv"
        pd.DataFrame({"Prompts": OWN_PROMPTS, "Category": list(DRAWBENCH_CATEGORIES)}).to_csv(path, index=False)
        return path


@pytest.fixture(scope="module")
def renders():
    return [render(parse_caption(c), seed=1) for c in CAPTIONS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tiny SD pipeline folder, a diffusers-format LoRA for it with small random B matrices, a tiny CLIPModel folder."
    from diffusers import StableDiffusionPipeline
    from instructengine.dpo import add_lora, save_lora, tiny_pipeline
    from instructengine.reward import tiny_clip_folder
    root = tmp_path_factory.mktemp("evaluate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = tiny_pipeline(root / "tiny-sd", "sd")
        pipe = StableDiffusionPipeline.from_pretrained(sd)
        add_lora(pipe.unet, rank=4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                if "lora_B" in n: p.copy_(0.2 * torch.randn(p.shape, generator=g))
        save_lora(pipe.unet, root / "lora", "sd")
        clip = tiny_clip_folder(root / "tiny-clip")
    return {"root": root, "sd": sd, "lora": root / "lora", "clip": clip}


def _cfg(tiny, run, **kw) -> EvaluateConfig:
    return EvaluateConfig(**{"run_dir": str(run), "benchmark": f"drawbench:{prompts_csv(tiny['root'])}", "limit": 1, "model": str(tiny["sd"]),
                             "lora": str(tiny["lora"]), "per_prompt": 1, "num_inference_steps": 2, "n_boot": 200,
                             "scorers": f"clip,pickscore:{tiny['clip']}", **kw})


@pytest.fixture(scope="module")
def stage(tiny):
    run = tiny["root"] / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_evaluate(_cfg(tiny, run), log=None)
    return run, summary


def test_acceptance_drawbench_base_and_lora_all_categories(stage):
    run, summary = stage
    scores = pd.read_parquet(run / "eval" / "scores.parquet")
    assert set(scores["category"]) == set(DRAWBENCH_CATEGORIES)
    assert set(scores["variant"]) == {"base", "aligned"} and set(scores["scorer"]) == {"clip", "pickscore"}
    assert len(scores) == 11 * 2 * 2 and scores["score"].notna().all() and np.isfinite(scores["score"]).all()
    assert {"variant", "benchmark", "prompt_id", "category", "image", "seed", "scorer", "score"} <= set(scores.columns)
    assert (scores["benchmark"] == "drawbench").all() and (scores["seed"] == 0).all()
    # the LoRA changes the images: the aligned twin of some base image (same prompt, same seed) differs
    sha = scores[scores.scorer == "clip"].pivot(index="prompt_id", columns="variant", values="sha256")
    assert (sha["base"] != sha["aligned"]).any()
    table = pd.read_csv(run / "eval" / "evaluate.csv")
    for scorer in ("clip", "pickscore"):
        t = table[table.scorer == scorer]
        assert list(t["category"])[-1] == "overall" and set(t["category"]) == set(DRAWBENCH_CATEGORIES) | {"overall"}
        assert t["prompts"].iloc[-1] == 11 and t[["base", "aligned", "win_rate"]].notna().all().all()
        assert (run / "eval" / f"evaluate-{scorer}.png").is_file()
        s = summary["scorers"][scorer]
        assert set(s) >= {"base", "aligned", "relative_improvement_pct", "win_rate", "win_rate_ci", "per_category"} and len(s["per_category"]) == 11
        assert s["win_rate_ci"][0] <= s["win_rate"] <= s["win_rate_ci"][1]
        rel = relative_improvement(s["base"], s["aligned"])   # NaN (None in JSON) when the base scores 0, as CLIP score's clamp can give
        assert s["relative_improvement_pct"] is None if np.isnan(rel) else s["relative_improvement_pct"] == pytest.approx(rel, abs=0.05)
    assert (run / "eval" / "grid.png").is_file()
    assert summary["images"] == 22 and summary["generated"] == 22 and summary["variants"] == ["base", "aligned"]
    import json
    assert json.loads((run / "eval" / "metrics.json").read_text())["evaluate"]["prompts"] == 11
    assert set(json.loads((run / "metrics.json").read_text())["evaluate"]) >= {"clip", "pickscore"}
    assert "evaluate:" in (run / "config.yaml").read_text()
    text = format_table(run, "pickscore")
    assert all(c in text for c in DRAWBENCH_CATEGORIES) and "overall" in text


def test_rerun_regenerates_nothing(stage, tiny):
    run, _ = stage
    records = run / "eval" / "images.jsonl"
    before = records.read_bytes()
    pngs = {p: p.stat().st_mtime_ns for p in (run / "eval" / "images").rglob("*.png")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = run_evaluate(_cfg(tiny, run), log=None)
    assert again["generated"] == 0 and again["images"] == 22
    assert records.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in (run / "eval" / "images").rglob("*.png")} == pngs


def test_killed_run_resumes_and_new_settings_regenerate(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "run", lora="", scorers="clip")   # the base generator alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = run_evaluate(cfg, log=None)
        assert first["variants"] == ["base"] and first["generated"] == 11 and first["scorers"]["clip"]["aligned"] is None
        records = tmp_path / "run" / "eval" / "images.jsonl"
        lines = records.read_bytes().splitlines(keepends=True)
        records.write_bytes(b"".join(lines[:4]) + lines[4][:25])      # killed in the middle of an append
        assert run_evaluate(cfg, log=None)["generated"] == 7
        assert run_evaluate(cfg, log=None)["generated"] == 0
        assert run_evaluate(cfg.with_overrides(num_inference_steps=3), log=None)["generated"] == 11


def test_missing_lora_is_an_error_before_any_image(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-lora.*lora = ''"):
        run_evaluate(_cfg(tiny, tmp_path / "a", lora="no-such-lora"), log=None)
    (tmp_path / "b" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"has no {LORA_FILE}"):
        run_evaluate(_cfg(tiny, tmp_path / "b", lora="empty"), log=None)
    with pytest.raises(ValueError, match="not a ShapesWorld caption"):   # the oracle cannot read DrawBench: said before generating
        run_evaluate(_cfg(tiny, tmp_path / "c", lora="", scorers="oracle"), log=None)
    assert not any((tmp_path / r / "eval" / "images.jsonl").exists() for r in "abc")


def test_full_finetune_folder_is_the_aligned_variant(tiny, tmp_path):
    "A folder holding a whole fine-tuned UNet in unet/ (what the DPO stage saves with full_finetune) evaluates like a LoRA folder."
    from diffusers import UNet2DConditionModel
    run, g = tmp_path / "run", torch.Generator().manual_seed(0)

    def save_tuned(scale):
        unet = UNet2DConditionModel.from_pretrained(Path(tiny["sd"]) / "unet")
        with torch.no_grad():
            for p in unet.parameters(): p.add_(scale * torch.randn(p.shape, generator=g))
        unet.save_pretrained(run / "ft" / "unet")

    save_tuned(0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = run_evaluate(_cfg(tiny, run, lora="ft", scorers="clip"), log=None)
        assert first["variants"] == ["base", "aligned"] and first["generated"] == 22 and first["missing_images"] == 0
        scores = pd.read_parquet(run / "eval" / "scores.parquet").pivot(index="prompt_id", columns="variant", values="sha256")
        assert (scores["base"] != scores["aligned"]).any()
        save_tuned(0.05)   # other weights: only the aligned images are made again
        assert run_evaluate(_cfg(tiny, run, lora="ft", scorers="clip"), log=None)["generated"] == 11


def test_drawbench_shared_copy_and_limits():
    csv = drawbench_csv()
    rows = load_drawbench(csv)
    assert len(rows) == 200 and [r["id"] for r in rows[:2]] == ["drawbench-000", "drawbench-001"] and rows[-1]["id"] == "drawbench-199"
    assert pd.Series([r["category"] for r in rows]).value_counts().to_dict() == DRAWBENCH_CATEGORIES   # labels stripped
    assert all(r["prompt"] == r["prompt"].strip() and r["prompt"] for r in rows)
    limited = load_benchmark(f"drawbench:{csv}", limit=2)
    assert len(limited) == 22 and limited == [r for r in rows if r in limited]
    assert load_benchmark(str(csv)) == rows and benchmark_name(str(csv)) == "drawbench"


def test_drawbench_bad_input_and_offline_hub(tmp_path, monkeypatch):
    (tmp_path / "cols.csv").write_text("prompt,theme\na cat,animals\n")
    with pytest.raises(ValueError, match="Prompts and Category"): load_drawbench(tmp_path / "cols.csv")
    (tmp_path / "empty.csv").write_text("Prompts,Category\na cat,Animals\n,Animals\n")
    with pytest.raises(ValueError, match="row 2 has no prompt"): load_drawbench(tmp_path / "empty.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"): load_drawbench(tmp_path / "missing.csv")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'someone/DrawBench'.*local DrawBench CSV"): load_drawbench("someone/DrawBench")
    with pytest.raises(ValueError, match="expected 'shapesbench'"): load_benchmark("partiprompts")
    mine = tmp_path / "My Prompts.csv"
    mine.write_text("Prompt,Category\na cat,Animals\na dog,Animals\na car,Things\n")
    assert [r["id"] for r in load_benchmark(str(mine), limit=1)] == ["my_prompts-000", "my_prompts-002"]


def test_shapesbench_and_paired_seeds():
    bench = load_benchmark("shapesbench", limit=2)
    assert len(bench) == 16 and all("scene" in r for r in bench)
    assert all(parse_caption(r["prompt"]) is not None for r in bench)
    jobs = eval_jobs(bench[:2], per_prompt=3, seed=5)
    assert len(jobs) == 12 and jobs[0]["id"] == "base|shapesbench|colors-00|0"
    base = {(j["prompt_id"], j["index"]): j["seed"] for j in jobs if j["variant"] == "base"}
    assert base == {(j["prompt_id"], j["index"]): j["seed"] for j in jobs if j["variant"] == "aligned"}
    assert sorted(set(base.values())) == [5, 6, 7]


def test_oracle_scorer(renders):
    oracle = OracleScorer()
    assert oracle.score(renders, CAPTIONS).tolist() == [1.0, 1.0, 1.0]
    assert oracle.score(renders, CAPTIONS[1:] + CAPTIONS[:1]).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'A red colored car.' is not a ShapesWorld caption"): oracle.score(renders[:1], ["A red colored car."])
    with pytest.raises(ValueError, match="3 images for 2 prompts"): oracle.score(renders, CAPTIONS[:2])


def test_clip_scorer_conventions_and_weight_files(renders, tmp_path):
    import open_clip
    sandbox = ClipScorer(device="cpu")
    grid = np.stack([sandbox.score(renders, [c] * 3) for c in CAPTIONS], 1)
    assert grid.argmax(1).tolist() == [0, 1, 2] and (grid >= 0).all() and (grid <= 100).all()
    sd = {k: v.contiguous() for k, v in sandbox.model.state_dict().items()}
    from safetensors.torch import save_file
    save_file(sd, tmp_path / "clip.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "clip.pt")
    a = ClipScorer("sandbox-clip", str(tmp_path / "clip.safetensors"), device="cpu")
    b = make_scorer(f"clip:sandbox-clip:{tmp_path / 'clip.pt'}", device="cpu")
    with torch.no_grad():   # the formula written out: 100 * max(cos, 0), with open_clip's preprocessing of the architecture
        model, _, pre = open_clip.create_model_and_transforms("sandbox-clip", pretrained=None)
        model.load_state_dict(sd); model.eval()
        i = F.normalize(model.encode_image(torch.stack([pre(im) for im in renders])), dim=-1)
        t = F.normalize(model.encode_text(open_clip.get_tokenizer("sandbox-clip")(CAPTIONS)), dim=-1)
        expected = (100 * (i * t).sum(-1)).clamp(min=0).numpy()
    assert np.allclose(a.score(renders, CAPTIONS), expected, atol=1e-3) and np.allclose(b.score(renders, CAPTIONS), expected, atol=1e-3)

    torch.save({"state_dict": sd, "trainer": Pickled()}, tmp_path / "pickled.pt")   # weights_only refuses the object, and so do we
    with pytest.raises(ValueError, match="weights_only"): load_state_dict_file(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="no weights file given for ViT-B-32"): ClipScorer("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors does not exist"): ClipScorer("ViT-B-32", str(tmp_path / "nothing.safetensors"))
    with pytest.raises(ValueError, match="does not fit open_clip's ViT-B-32"): ClipScorer("ViT-B-32", str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match="no architecture 'ViT-Q-99'"): ClipScorer("ViT-Q-99", str(tmp_path / "clip.safetensors"))


def test_hpsv2_scorer(renders, tmp_path):
    sandbox = ClipScorer(device="cpu")
    torch.save({"state_dict": sandbox.model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    hps = make_scorer({"kind": "hpsv2", "arch": "sandbox-clip", "weights": "HPS_v2.1_compressed.pt"}, device="cpu", root=tmp_path)
    assert isinstance(hps, HPSv2Scorer) and hps.name == "hpsv2"
    s = hps.score(renders, CAPTIONS)
    assert np.allclose(s, hps.cosine(renders, CAPTIONS).numpy(), atol=1e-6) and (np.abs(s) <= 1).all()
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"): HPSv2Scorer()
    with pytest.raises(FileNotFoundError, match="gone.pt does not exist"): HPSv2Scorer(str(tmp_path / "gone.pt"))


def test_pickscore_scorer(renders, tiny, tmp_path):
    import shutil
    pick = PickScoreScorer(str(tiny["clip"]), device="cpu")
    m = pick.model
    with torch.no_grad():   # PickScore's formula: logit_scale.exp() * cos
        out_i = m.get_image_features(pixel_values=pick.processor(images=renders, return_tensors="pt").pixel_values)
        out_t = m.get_text_features(**pick.tokenizer(CAPTIONS, padding=True, return_tensors="pt"))
        feat = lambda o: o if torch.is_tensor(o) else o.pooler_output
        expected = (m.logit_scale.exp() * (F.normalize(feat(out_i), dim=-1) * F.normalize(feat(out_t), dim=-1)).sum(-1)).numpy()
    assert np.allclose(pick.score(renders, CAPTIONS), expected, atol=1e-4)
    broken = shutil.copytree(tiny["clip"], tmp_path / "broken")
    (broken / "preprocessor_config.json").unlink(); (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks the weights \(model.safetensors or pytorch_model.bin\); the image processor \(preprocessor_config.json\)"):
        PickScoreScorer(str(broken))
    with pytest.raises(FileNotFoundError, match="does not exist"): PickScoreScorer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no folder given"): make_scorer("pickscore")


def test_mps_scorer(renders, tmp_path):
    from instructengine.reward import MPSConfig, MPSModel, save_reward, score
    torch.manual_seed(0)
    model = MPSModel(MPSConfig(layers=1, conditions={"content": "shape, color, number", "style": "clean, blurry, noisy"}))
    save_reward(model, tmp_path / "reward")
    mps = make_scorer("mps:reward:style", device="cpu", root=tmp_path)
    assert isinstance(mps, MPSScorer) and mps.name == "mps-style"
    assert np.allclose(mps.score(renders, CAPTIONS), score(model, renders, CAPTIONS, "style").numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="content, style"): MPSScorer(str(tmp_path / "reward"))
    with pytest.raises(ValueError, match="'aesthetics'"): MPSScorer(str(tmp_path / "reward"), "aesthetics")
    with pytest.raises(FileNotFoundError, match="no reward folder"): MPSScorer()


def _vit_block(x, sd, p, heads):
    "One block of BLIP's timm-style ViT, written out from the official weights: x + attn(norm1(x)), then x + mlp(norm2(x))."
    B, N, D = x.shape
    h = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1) @ v
    x = x + F.linear(a.transpose(1, 2).reshape(B, N, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def test_imagereward_conversion_and_scores(renders, tmp_path):
    ckpt, bert = tiny_imagereward(tmp_path / "official")
    sd = torch.load(ckpt, weights_only=True)
    out = convert_imagereward(ckpt, bert, tmp_path / "converted", head_dim=8)
    ir = make_scorer(f"imagereward:{out}", device="cpu")
    assert isinstance(ir, ImageRewardScorer)
    m = ir.model
    # the ViT, computed from the official weights by hand, against transformers' BLIP vision model with the converted ones
    px = torch.stack([ir.preprocess(im) for im in renders])
    with torch.no_grad():
        v = "blip.visual_encoder."
        x = F.conv2d(px, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
        x = torch.cat([sd[v + "cls_token"].expand(len(px), -1, -1), x], 1) + sd[v + "pos_embed"]
        for i in range(2): x = _vit_block(x, sd, f"{v}blocks.{i}.", heads=4)
        x = F.layer_norm(x, (32,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)
        assert torch.allclose(m.vision_model(pixel_values=px).last_hidden_state, x, atol=1e-5)
    # BERT keeps its names; the head is ImageReward's MLP
    for official, ours in (("blip.text_encoder.encoder.layer.1.crossattention.self.value.weight", m.text_encoder.encoder.layer[1].crossattention.self.value.weight),
                           ("blip.text_encoder.embeddings.word_embeddings.weight", m.text_encoder.embeddings.word_embeddings.weight),
                           ("blip.vision_proj.weight", m.vision_proj.weight), ("mlp.layers.6.weight", ir.head[6].weight)):
        assert torch.equal(sd[official], ours), official
    assert imagereward_key("blip.text_encoder.embeddings.position_ids") is None and imagereward_key("mlp.layers.7.bias") == "head.7.bias"
    s = ir.score(renders, CAPTIONS)
    assert s.shape == (3,) and np.isfinite(s).all() and np.ptp(s) > 0
    with torch.no_grad(): ir.head[7].weight.zero_(); ir.head[7].bias.fill_(2.0)   # raw reward 2 for every image
    assert np.allclose(ir.score(renders, CAPTIONS), (2.0 - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-6)
    # missing pieces, named
    (out / IMAGEREWARD_HEAD).unlink()
    with pytest.raises(FileNotFoundError, match="lacks the reward head"): ImageRewardScorer(str(out))
    with pytest.raises(FileNotFoundError, match="convert_imagereward"): ImageRewardScorer(str(ckpt))
    with pytest.raises(FileNotFoundError, match="tokenizer folder"): convert_imagereward(ckpt, tmp_path / "no-bert", tmp_path / "x")
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected the official ImageReward.pt"): convert_imagereward(tmp_path / "other.pt", bert, tmp_path / "y")


def test_scorer_specs():
    assert parse_scorer("oracle") == {"kind": "oracle"}
    assert parse_scorer("clip") == {"kind": "clip"}
    assert parse_scorer("hpsv2:ViT-H-14:w/HPS.pt") == {"kind": "hpsv2", "arch": "ViT-H-14", "weights": "w/HPS.pt"}
    assert parse_scorer("mps:runs/x/reward") == {"kind": "mps", "path": "runs/x/reward"}
    assert parse_scorer({"kind": "pickscore", "path": "p", "name": "pick"}) == {"kind": "pickscore", "path": "p", "name": "pick"}
    with pytest.raises(ValueError, match="unknown kind 'aesthetic'"): parse_scorer("aesthetic")
    with pytest.raises(ValueError, match="takes no arguments"): parse_scorer("oracle:strict")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['folder'\]"): parse_scorer({"kind": "imagereward", "folder": "x"})
    assert isinstance(make_scorer("oracle"), OracleScorer)


def test_metrics_hand_values():
    assert win_outcomes([0.2, 0.5, 0.5, 0.9], [0.4, 0.5, 0.3, 1.0]).tolist() == [1.0, 0.5, 0.0, 1.0]
    wr, lo, hi = win_rate([0.2, 0.5, 0.5, 0.9], [0.4, 0.5, 0.3, 1.0], n_boot=2000, seed=0)
    assert wr == 0.625 and 0 <= lo <= wr <= hi <= 1
    assert win_rate([0.2, 0.5, 0.5, 0.9], [0.4, 0.5, 0.3, 1.0], n_boot=2000, seed=0) == (wr, lo, hi)   # seeded
    assert win_rate([1, 2, 3], [1, 2, 3]) == (0.5, 0.5, 0.5)
    assert win_rate([0] * 50, [1] * 50) == (1.0, 1.0, 1.0)
    wr, lo, hi = win_rate([0] * 100, [1] * 60 + [-1] * 40, n_boot=4000)   # 100 prompts, 60 won: the normal interval is 0.6 +- 0.096
    assert wr == 0.6 and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 100), rel=0.15) and lo < 0.6 < hi
    assert relative_improvement(0.38, 0.42) == pytest.approx(10.5263, abs=1e-4)   # the paper's +10.53% form
    assert relative_improvement(-0.5, -0.25) == pytest.approx(50.0) and relative_improvement(0.5, 0.25) == pytest.approx(-50.0)
    assert math.isnan(relative_improvement(0.0, 1.0))
    with pytest.raises(ValueError, match="base scores"): win_outcomes([1, 2], [1, 2, 3])
    # two images a prompt: a prompt's score is their mean; 'p3' has no aligned image and leaves the comparison
    rows = [("a", "p1", "base", 0.0), ("a", "p1", "base", 1.0), ("a", "p1", "aligned", 1.0), ("a", "p1", "aligned", 1.0),
            ("a", "p2", "base", 1.0), ("a", "p2", "base", 1.0), ("a", "p2", "aligned", 1.0), ("a", "p2", "aligned", 0.0),
            ("b", "p3", "base", 1.0), ("b", "p4", "base", 0.0), ("b", "p4", "aligned", 0.0)]
    scores = pd.DataFrame([{"scorer": "oracle", "category": c, "prompt_id": p, "variant": v, "score": s} for c, p, v, s in rows])
    t = compare(scores, n_boot=100).set_index("category")
    assert list(t.index) == ["a", "b", "overall"] and t["prompts"].tolist() == [2, 1, 3]
    assert t.loc["a", "base"] == pytest.approx(0.75) and t.loc["a", "aligned"] == pytest.approx(0.75) and t.loc["a", "win_rate"] == 0.5
    assert t.loc["overall", "base"] == pytest.approx((0.5 + 1.0 + 0.0) / 3) and t.loc["overall", "win_rate"] == pytest.approx(0.5)
    assert t.loc["b", "gain"] == 0 and math.isnan(t.loc["b", "rel_improvement_pct"])
    text = format_table(compare(scores.assign(score=lambda d: np.where(d.variant == "aligned", 1.0, d.score)), n_boot=100), "oracle")
    assert "gain (points)" in text and "50.0" in text   # overall 0.5 -> 1.0 on the paired prompts: +50 points
    base_only = compare(scores[scores.variant == "base"], n_boot=100).set_index("category")
    assert base_only.loc["overall", "prompts"] == 4 and base_only["aligned"].isna().all() and base_only["win_rate"].isna().all()


def test_config_validation():
    assert EvaluateConfig().scorer_specs == ["oracle"]
    assert EvaluateConfig(scorers=" oracle , clip ,").scorer_specs == ["oracle", "clip"]
    for kw, msg in ((dict(per_prompt=0), "per_prompt"), (dict(limit=-1), "limit"), (dict(scorers=""), "at least one scorer"),
                    (dict(scorers="oracle,aesthetic"), "unknown kind 'aesthetic'"), (dict(benchmark="parti"), "EvaluateConfig.benchmark"),
                    (dict(n_boot=0), "n_boot"), (dict(num_inference_steps="20"), "num_inference_steps")):
        with pytest.raises(ConfigError, match=msg): EvaluateConfig(**kw)
