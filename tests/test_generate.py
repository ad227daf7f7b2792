"Generation stage: tiny SD v1.5 and SDXL pipelines by folder and by hub id offline, LoRA, scheduler swap, resume after SIGKILL."
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _processes import run_processes

from instructengine.core import RecordStore, RunDir
from instructengine.generate import GeneratorSpec, generate_images, image_jobs, image_seed, load_generator
from instructengine.sandbox_generator import clip_tokenizer

TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def tiny_parts():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8)
    pipe = StableDiffusionPipeline(vae=tiny_parts(), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)), tokenizer=clip_tokenizer(77),
                                   unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64)
    pipe = StableDiffusionXLPipeline(vae=tiny_parts(), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=32)),
                                     tokenizer=clip_tokenizer(77), tokenizer_2=clip_tokenizer(77), unet=unet, scheduler=EulerDiscreteScheduler())
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipe.save_pretrained(folder)
    return folder


PAIRS = [{"id": f"t/s#{i}", "a": f"a red apple number {i}", "b": f"a blue apple number {i}"} for i in range(3)]


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_folder_pipelines_generate_with_recorded_seeds(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    pipe = load_generator(GeneratorSpec(model=str(folder), scheduler="ddim", device="cpu"))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    run = RunDir(tmp_path / "run")
    counts = generate_images(pipe, image_jobs(PAIRS, 1), run, batch_size=4, generator_name=which, num_inference_steps=2, height=32, width=32)
    by_id = RecordStore(run.image_records).latest()
    recs = list(by_id.values())
    assert counts == {"ok": 6} and {r["side"] for r in recs} == {"a", "b"}
    assert all((run.root / r["path"]).is_file() and r["num_inference_steps"] == 2 for r in recs)
    assert all(r["seed"] == image_seed(r["id"].split("|")[0], 0) for r in recs)     # both sides of a pair share its seed
    assert len({r["seed"] for r in recs}) == 3
    one = generate_images(pipe, image_jobs(PAIRS[:1], 1), RunDir(tmp_path / "alone"), batch_size=1, num_inference_steps=2, height=32, width=32)
    first = RecordStore(RunDir(tmp_path / "alone").image_records).latest()["t/s#0|a|0"]
    from instructengine.core import ImageStore
    pixels = lambda r, x: np.asarray(ImageStore(r.images).get(x["sha256"]), float)
    a, b = pixels(RunDir(tmp_path / "alone"), first), pixels(run, by_id["t/s#0|a|0"])
    assert one == {"ok": 2} and np.abs(a - b).max() <= 2      # an image does not depend on its batch (up to float rounding)
    assert np.abs(a - pixels(run, by_id["t/s#0|b|0"])).max() > 2   # while another prompt with the same seed gives another image


def test_lora_changes_the_output_and_scale_zero_restores_it(tiny_sd, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
                                              safe_serialization=True)
    def draw(**kw):
        p = load_generator(GeneratorSpec(model=str(tiny_sd), device="cpu", **kw))
        return np.asarray(p(["a red apple"], num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images)
    base, lora, off = draw(), draw(lora=str(tmp_path / "lora")), draw(lora=str(tmp_path / "lora"), lora_scale=0.0)
    assert np.abs(base - lora).max() > 0.01 and np.abs(base - off).max() < 1e-5
    with pytest.raises(FileNotFoundError, match="LoRA folder"): load_generator(GeneratorSpec(model=str(tiny_sd), lora=str(tmp_path / "nope")))


def test_hub_ids_load_from_an_offline_cache(tiny_sd, tiny_sdxl, tmp_path):
    cache = tmp_path / "hub"
    for repo, folder in (("stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_sd), ("stabilityai/stable-diffusion-xl-base-1.0", tiny_sdxl)):
        root = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(folder, root / "snapshots" / ("0" * 40))
        (root / "refs").mkdir(); (root / "refs" / "main").write_text("0" * 40)
    code = ("from instructengine.generate import load_generator\n"
            "for m in ['stable-diffusion-v1-5/stable-diffusion-v1-5', 'stabilityai/stable-diffusion-xl-base-1.0']:\n"
            "    p = load_generator(m); im = p(['a cat'], num_inference_steps=2, height=32, width=32).images[0]\n"
            "    print(type(p).__name__, im.size)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), INSTRUCTENGINE_PROGRESS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["StableDiffusionPipeline (32, 32)", "StableDiffusionXLPipeline (32, 32)"]


def test_unreachable_hub_loads_the_cache_at_once(tiny_sd, tmp_path):
    import socket
    cache = tmp_path / "hub"
    root = cache / "models--org--tiny-sd"
    shutil.copytree(tiny_sd, root / "snapshots" / ("0" * 40))
    (root / "refs").mkdir(); (root / "refs" / "main").write_text("0" * 40)
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]   # a port nobody listens on
    code = ("import time\nfrom instructengine.generate import load_generator\n"
            "t = time.time(); p = load_generator('org/tiny-sd'); print(type(p).__name__, round(time.time() - t, 1))\n"
            "t = time.time()\ntry: load_generator('org/not-cached')\n"
            "except FileNotFoundError as e: print('missing', round(time.time() - t, 1), e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") and not k.lower().endswith("_proxy")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(cache), INSTRUCTENGINE_PROGRESS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, missing = out.stdout.strip().split("\n")[:2]
    assert loaded.startswith("StableDiffusionPipeline") and float(loaded.split()[1]) < 15   # huggingface_hub alone retries for ~23 s
    assert missing.startswith("missing") and float(missing.split()[1]) < 5 and "'org/not-cached' is not a local folder" in missing


def test_failing_batch_is_recorded_and_retried(tiny_sd, tmp_path):
    pipe = load_generator(GeneratorSpec(model=str(tiny_sd), device="cpu"))
    run = RunDir(tmp_path)
    bad = generate_images(pipe, image_jobs(PAIRS[:1], 1), run, num_inference_steps=2, height=33, width=32)   # not a multiple of 8
    recs = RecordStore(run.image_records).latest()
    assert bad == {"error": 2} and "height" in recs["t/s#0|a|0"]["error"]
    assert generate_images(pipe, image_jobs(PAIRS[:1], 1), run, num_inference_steps=2, height=32, width=32) == {"ok": 2}


SCRIPT = """
import sys, json
from instructengine.core import RunDir
from instructengine.generate import generate_images, image_jobs, load_generator
pairs = [{"id": f"p#{i}", "a": f"a red circle", "b": f"two blue squares"} for i in range(40)]
print(generate_images(load_generator("sandbox"), image_jobs(pairs, 2), RunDir(sys.argv[1]), batch_size=4, num_inference_steps=4))
"""


def test_killed_generation_resumes_each_image_exactly_once(tmp_path):
    script = tmp_path / "g.py"; script.write_text(SCRIPT)
    run, clean = tmp_path / "run", tmp_path / "clean"
    env = dict(os.environ, INSTRUCTENGINE_PROGRESS="0")
    p = subprocess.Popen([sys.executable, str(script), str(run)], env=env)
    rec = run / "images.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not rec.exists() or rec.read_bytes().count(b"\n") < 64): time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert 64 <= rec.read_bytes().count(b"\n") < 160
    for d in (run, clean): subprocess.run([sys.executable, str(script), str(d)], env=env, check=True, capture_output=True)
    ids = [json.loads(line)["id"] for line in rec.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 160
    assert RecordStore(rec).latest() == RecordStore(clean / "images.jsonl").latest()


def test_two_processes_share_the_work(tmp_path):
    run = tmp_path / "run"; run.mkdir()
    pairs = [{"id": f"p#{i}", "a": "a red circle", "b": "two blue squares"} for i in range(6)]
    (run / "instructions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    script = tmp_path / "s.py"
    script.write_text("import json, sys\nfrom instructengine.core import process_state\nfrom instructengine.generate import GenerateConfig, run_generate\n"
                      "m = run_generate(GenerateConfig(run_dir=sys.argv[1], images_per_instruction=1, num_inference_steps=2, batch_size=2))\n"
                      "s = process_state(); print('RESULT ' + json.dumps({'rank': s.process_index, 'world': s.num_processes, 'metrics': m}))\n")
    results = run_processes(script, run)
    ids = [json.loads(line)["id"] for line in (run / "images.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 12   # each image made once, by one of the two processes
    assert [r["metrics"]["images"] for r in results] == [12, 12]
    assert json.loads((run / "metrics.json").read_text())["generate"]["images"] == 12



def test_a_shard_that_starts_late_makes_its_whole_share(tmp_path):
    "Shard 1 starting after shard 0 has written its records still makes all of its own share: shards are cut before what is done is skipped."
    pipe, run = load_generator("sandbox"), RunDir(tmp_path / "run")
    jobs = image_jobs([{"id": f"p#{i}", "a": "a red circle", "b": "two blue squares"} for i in range(3)], 1)
    assert generate_images(pipe, jobs, run, batch_size=2, shard=(0, 2), num_inference_steps=2) == {"ok": 3}
    assert generate_images(pipe, jobs, run, batch_size=2, shard=(1, 2), num_inference_steps=2) == {"ok": 6}   # 4 when the cut came after
    ids = [json.loads(line)["id"] for line in run.image_records.read_text().splitlines()]
    assert sorted(ids) == sorted(j["id"] for j in jobs)   # each image once


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_long_prompts_are_reported_once_not_once_a_batch(which, request, tmp_path):
    import logging
    import warnings
    pipe = load_generator(GeneratorSpec(model=str(request.getfixturevalue(which)), device="cpu"))
    seen = []
    handler = logging.Handler(); handler.emit = seen.append
    logging.getLogger("diffusers").addHandler(handler)   # diffusers' own loggers do not propagate to the root
    long = [{"id": f"t/s#{i}", "a": "a red apple " * 40 + str(i), "b": f"a blue apple {i}"} for i in range(3)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counts = generate_images(pipe, image_jobs(long, 1), RunDir(tmp_path / "run"), batch_size=1, num_inference_steps=1, height=32, width=32)
    finally: logging.getLogger("diffusers").removeHandler(handler)
    cut = [str(w.message) for w in caught if "longer than the text encoder" in str(w.message)]
    assert counts == {"ok": 6}
    assert len(cut) == 1 and cut[0].startswith("3 of 6 prompts are longer than the text encoder's 77 tokens"), cut
    assert not [r for r in seen if "truncated" in r.getMessage()]   # six batches, and not one per-batch warning from diffusers


def test_other_settings_make_the_images_again(tmp_path):
    "A generation stage run again with another seed or scheduler makes its images again, and counts this run's images."
    from instructengine.generate import GenerateConfig, image_seed, run_generate
    run = tmp_path / "run"; run.mkdir()
    (run / "instructions.jsonl").write_text(json.dumps({"id": "p#0", "a": "a red circle", "b": "two blue squares"}) + "\n")
    cfg = GenerateConfig(run_dir=str(run), images_per_instruction=1, num_inference_steps=2, batch_size=2)
    assert run_generate(cfg)["images"] == 2
    assert run_generate(cfg)["images"] == 2 and len((run / "images.jsonl").read_text().splitlines()) == 2   # the same: nothing made
    run_generate(cfg.with_overrides(seed=1, scheduler="ddim"))
    latest = RecordStore(run / "images.jsonl").latest()
    assert len((run / "images.jsonl").read_text().splitlines()) == 4
    assert {r["seed"] for r in latest.values()} == {image_seed("p#0", 0, 1)} and {r["scheduler"] for r in latest.values()} == {"ddim"}
    run_generate(cfg.with_overrides(seed=1))   # back to the default scheduler: made again
    assert len((run / "images.jsonl").read_text().splitlines()) == 6
    assert {r["scheduler"] for r in RecordStore(run / "images.jsonl").latest().values()} == {None}
