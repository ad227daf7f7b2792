"""Attention views of the MPS reward model on real tiny models (the shipped sandbox CLIP, a tiny transformers CLIPModel):
Grad-CAM's shapes, range and arithmetic, a model left as it was found, maps that ignore the condition without the mask,
the figure, and the view of a run folder."""
import json
import random

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from instructengine.attention import (AttentionConfig, cam_layer, cam_shift, grad_cam, grad_cams, mask_table, mean_shift, plot_attention,
                                      run_attention, unmask)
from instructengine.reward import SANDBOX_CONDITIONS, MPSConfig, MPSModel, save_reward, tiny_clip_folder
from instructengine.sandbox import caption, render, sample_scene

SANDBOX = dict(mask_similarity="lexical", threshold=0.9, conditions=SANDBOX_CONDITIONS)
DIMS = list(SANDBOX_CONDITIONS)


@pytest.fixture(scope="module")
def sandbox():
    torch.manual_seed(0)
    return MPSModel(MPSConfig(layers=1, **SANDBOX)).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch.manual_seed(0)
    folder = tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")
    return MPSModel(MPSConfig(backbone=f"hf:{folder}", layers=1, heads=2, conditions=SANDBOX_CONDITIONS)).eval()


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(3)
    scs = [sample_scene(rng) for _ in range(4)]
    return [render(s, seed=k) for k, s in enumerate(scs)], [caption(s, k=k, template=k % 3) for k, s in enumerate(scs)]


def _state(model):
    return ([p.requires_grad for p in model.parameters()], model.training, sum(len(m._forward_hooks) for m in model.modules()))


@pytest.mark.parametrize("which, grid", [("sandbox", (8, 8)), ("hf", (4, 4))])   # 32 px in 4 px patches; 32 px in 8 px patches
def test_grad_cam_shape_and_range_on_both_backbones(which, grid, request, scenes):
    model, (images, caps) = request.getfixturevalue(which), scenes
    maps, scores = grad_cams(model, images, caps, "fidelity")
    assert maps.shape == (len(images), *grid) and scores.shape == (len(images),) and torch.isfinite(scores).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    for m in maps: assert m.max() == 0 or abs(m.max() - 1) < 1e-6      # each map scaled to its own maximum, or empty
    assert grad_cam(model, images[0], caps[0], "fidelity").shape == grid


def test_grad_cam_matches_a_hand_computation(sandbox, scenes):
    images, caps = scenes
    bb, v = sandbox.backbone, sandbox.backbone.model.visual
    px, ids, cond = bb.pixels(images[:2]), bb.tokenize(caps[:2]), sandbox.condition_ids(["aesthetic", "fidelity"])
    with torch.enable_grad():
        A = v.transformer(v._embeds(px)).detach().requires_grad_(True)
        img, (txt, eos) = A @ v.proj, bb.encode_text(ids)
        keep = sandbox.mask(ids, cond, txt)[0]
        for f in sandbox.fusion: img = f(img, txt, keep)
        s = bb.logit_scale.exp() * torch.cosine_similarity(img[:, 0], eos)
        dA = torch.autograd.grad(s.sum(), A)[0]
    L = torch.einsum("bnk,bk->bn", A[:, 1:].detach(), dA[:, 1:].mean(1)).clamp_min(0)
    L = L / L.amax(1, keepdim=True).clamp_min(1e-12)
    maps, scores = grad_cams(sandbox, images[:2], caps[:2], ["aesthetic", "fidelity"])
    assert np.allclose(maps.reshape(2, -1), L.numpy(), atol=1e-5) and torch.allclose(scores, s.detach(), atol=1e-4)
    # the last block's output is the transformer's output: the same map through `layer=`
    same = grad_cams(sandbox, images[:2], caps[:2], ["aesthetic", "fidelity"], layer=v.transformer.resblocks[-1])[0]
    assert np.allclose(same, maps, atol=1e-6)


def test_grad_cam_leaves_the_model_as_it_was(hf, scenes):
    images, caps = scenes
    hf.train()
    for p in hf.fusion.parameters(): p.requires_grad_(False)          # a mix of frozen and trainable weights
    try:
        before = _state(hf)
        cam = grad_cam(hf, images[0], caps[0], "aesthetic")
        assert _state(hf) == before and all(p.grad is None for p in hf.parameters())
        with pytest.raises(ValueError, match="did not run"): grad_cam(hf, images[0], caps[0], "aesthetic", layer=torch.nn.Linear(1, 1))
        assert _state(hf) == before                                    # hook removed and mode restored after an error too
        for p in hf.parameters(): p.requires_grad_(False)             # nothing trainable: the map does not need it
        assert np.allclose(grad_cam(hf, images[0], caps[0], "aesthetic"), cam, atol=1e-6)
    finally:
        for p in hf.parameters(): p.requires_grad_(True)
        hf.eval()


def test_batches_give_the_maps_of_single_images(sandbox, scenes):
    images, caps = scenes
    dims = (DIMS * 2)[:len(images)]
    maps = grad_cams(sandbox, images, caps, dims, batch_size=3)[0]
    one = np.stack([grad_cam(sandbox, im, c, d) for im, c, d in zip(images, caps, dims, strict=True)])
    assert np.allclose(maps, one, atol=1e-5)


def test_without_the_mask_the_maps_ignore_the_condition(sandbox, scenes):
    images, caps = scenes
    plain = unmask(sandbox)
    assert plain.backbone is sandbox.backbone and not plain.cfg.use_mask and sandbox.cfg.use_mask
    maps = grad_cams(plain, [images[0]] * len(DIMS), caps[0], DIMS)[0]
    assert all(np.array_equal(m, maps[0]) for m in maps)
    table = cam_shift(plain, images, caps)
    assert table.shape == (4, 4) and (table.to_numpy() == 0).all() and mean_shift(table) == 0
    moved = cam_shift(sandbox, images, caps)
    assert mean_shift(moved) > 0 and np.allclose(moved.to_numpy(), moved.to_numpy().T) and (np.diag(moved.to_numpy()) == 0).all()
    assert mask_table(plain, caps[0])["kept"].all()


def test_mask_table_keeps_each_dimensions_words(sandbox, hf):
    for model in (sandbox, hf):
        t = mask_table(model, "two red crosses on the left, noisy")
        assert list(t.columns) == ["dimension", "position", "token", "similarity", "kept"] and len(t) == 4 * 10   # BOS, 8 words, EOS
        kept = {d: t[(t.dimension == d) & t.kept].token.tolist() for d in DIMS}
        assert all(k[0] == "<bos>" for k in kept.values())
        if model is sandbox: assert kept["aesthetic"] == ["<bos>", "noisy"] and kept["harmlessness"] == ["<bos>", "red", "crosses"]


def test_fusion_free_model_needs_an_earlier_layer(sandbox, scenes):
    images, caps = scenes
    clip = MPSModel(MPSConfig(use_fusion=False, **SANDBOX), backbone=sandbox.backbone).eval()
    assert grad_cam(clip, images[1], caps[1], "fidelity").max() == 0           # the score reads only CLS at the output
    earlier = grad_cam(clip, images[1], caps[1], "fidelity", layer=cam_layer(clip.backbone).resblocks[-2])
    assert earlier.shape == (8, 8) and earlier.max() > 0


def test_bad_inputs_are_named(sandbox, scenes):
    images, caps = scenes
    with pytest.raises(ValueError, match="3 images, 2 prompts"): grad_cams(sandbox, images[:3], caps[:2], "fidelity")
    with pytest.raises(KeyError, match="no condition words"): grad_cam(sandbox, images[0], caps[0], "beauty")
    with pytest.raises(TypeError, match="no default layer"): cam_layer(object())
    assert _state(sandbox)[2] == 0


def test_plot_attention_draws_a_row_per_condition(hf, scenes):
    images, caps = scenes
    fig = plot_attention(hf, images[0], caps[0], ["aesthetic", "fidelity"])
    try: assert len(fig.axes) == 4 and caps[0] in fig._suptitle.get_text()
    finally: plt.close(fig)


def test_run_attention_records_the_shift_in_the_run(hf, scenes, tmp_path):
    images, caps = scenes
    (tmp_path / "images").mkdir()
    with open(tmp_path / "images.jsonl", "w") as f:
        for k, (im, c) in enumerate(zip(images, caps, strict=True)):   # pairs p0, p1, p2, a and b sides; one failed image
            im.save(tmp_path / "images" / f"{k}.png")
            f.write(json.dumps({"id": f"p{k // 2}|{'ab'[k % 2]}|0", "pair_id": f"p{k // 2}", "side": "ab"[k % 2], "prompt": c,
                                "path": f"images/{k}.png", "status": "ok"}) + "\n")
        f.write(json.dumps({"id": "p3|a|0", "pair_id": "p3", "side": "a", "prompt": "x", "status": "error"}) + "\n")
    save_reward(hf, tmp_path / "reward")
    out = run_attention(AttentionConfig(run_dir=str(tmp_path), pairs=2))
    assert out["images"] == 4 and [p for _, p in out["examples"]] == caps[:4]
    assert out["cam_shift_no_mask"] == 0 and out["cam_shift"] == round(mean_shift(out["shift"]), 4)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["attention"]
    assert metrics == {"images": 4, "cam_shift": out["cam_shift"], "cam_shift_no_mask": 0.0}
    assert "attention:" in (tmp_path / "config.yaml").read_text()


def test_map_distance_by_hand():
    "cam_shift's distance: 0 for maps equal up to scale, 2 for opposite ones, 1 for a constant map against another."
    from instructengine.attention import _decorrelation
    a = np.array([0, 1, 2, 0.0])
    assert _decorrelation(a, 3 * a) == pytest.approx(0.0) and _decorrelation(a, -a) == pytest.approx(2.0)
    assert _decorrelation(np.zeros(4), a) == 1.0 and _decorrelation(a, a) == 0.0
