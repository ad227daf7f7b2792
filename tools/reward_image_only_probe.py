"""Is the reward model short of 0.9 because of what its backbone sees, or are the labels hard to learn from these pixels?
(05a_reward_train, the sandbox results)

Three of the oracle's four aspects are read from the image alone (`sandbox.rate`): fidelity is the mean fit of the drawn
shapes, aesthetic the finish and backdrop, harmlessness the emblem. Only prompt following needs the prompt. So a scorer
that sees the image alone can learn those three. This trains a small CNN per aspect (no CLIP, no prompt, random
initialisation) with the reward model's pairwise loss on a reward study's split (the same held-out contrast pairs, ties
left out), and prints its held-out accuracy (MPS's convention: ties skipped, a predicted tie wrong) beside the MPS
model's from `reward/metrics.json`, as one JSON line.

    python tools/reward_image_only_probe.py runs/reward-study [STEPS]   # after make reward-study; 600 steps: about 2 min an aspect on 2 CPU cores
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from instructengine import reward_train as rt
from instructengine.reward import SANDBOX_CONDITIONS, MPSConfig

IMAGE_ONLY = ("fidelity", "aesthetic", "harmlessness")


def scorer(width: int = 16) -> nn.Module:
    "A small CNN: 32 px RGB -> one score."
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.GELU(), nn.Conv2d(o, o, 3, padding=1), nn.GELU()]
    return nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2), *block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 1))


def pixels(root: Path, paths) -> dict:
    "Every image once, as a float tensor (3, H, W) in [0, 1]."
    return {p: torch.from_numpy(np.asarray(Image.open(root / p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            for p in set(paths)}


def train_one(train, test, px: dict, steps: int, seed: int = 0) -> float:
    "Train a scorer on `train` pairs (image_w preferred), return its accuracy on `test`."
    torch.manual_seed(seed)
    net = scorer()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    w = torch.stack([px[p] for p in train["image_w"]]); l = torch.stack([px[p] for p in train["image_l"]])
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        i = torch.randint(len(train), (64,), generator=g)
        s = net(torch.cat([w[i], l[i]]))[:, 0]
        loss = F.softplus(-(s[:64] - s[64:])).mean()   # -log sigmoid(s_w - s_l): the KL loss with a (1, 0) label
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
    net.eval()
    with torch.no_grad():
        score = lambda paths: torch.cat([net(torch.stack([px[p] for p in paths[k:k + 512]]))[:, 0] for k in range(0, len(paths), 512)])
        sw, sl = score(list(test["image_w"])), score(list(test["image_l"]))
    return float((sw > sl).float().mean())


def main(run_dir: str, steps: int = 600):
    cfg = rt.RewardTrainConfig(run_dir=run_dir, model=MPSConfig(mask_similarity="lexical", threshold=0.9, conditions=SANDBOX_CONDITIONS), ties=False)
    train, test = rt.load_training_pairs(cfg)
    train, test = train[~train["tie"]], test[~test["tie"]]
    root = Path(run_dir)
    px = pixels(root, list(train["image_w"]) + list(train["image_l"]) + list(test["image_w"]) + list(test["image_l"]))
    mps = json.loads((root / "reward" / "metrics.json").read_text())["accuracy"] if (root / "reward" / "metrics.json").is_file() else {}
    out = {"steps": steps, "images": len(px)}
    for d in IMAGE_ONLY:
        tr, te = train[train["dimension"] == d].reset_index(drop=True), test[test["dimension"] == d].reset_index(drop=True)
        t0 = time.time()
        acc = train_one(tr, te, px, steps)
        out[d] = {"cnn": round(acc, 3), "mps": round(mps[d], 3) if d in mps else None, "train_pairs": len(tr), "test_pairs": len(te),
                  "seconds": round(time.time() - t0, 1)}
        print(d, out[d], file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
