"""Is the sandbox's fidelity label learnable from the pixels, and how much data does a scorer need for it?
(05a_reward_train, "Is the backbone the limit?")

The oracle rates fidelity from the image alone (`sandbox.rate`): 1 plus the number of thresholds (0.5, 0.65, 0.75, 0.85)
that the mean shape fit of the drawn objects passes, the fit being the soft IoU of each object with its best template.
Every reward model we trained stops near 0.69 on fidelity pairs. This probe asks why, on images of the base generator
drawn by `dpo_probe.py data` (a folder's `images.csv`: category, prompt, path):

1. **How far apart are the fits of a decided pair?** Every two images of a prompt with different fidelity ratings form a
   pair, as in the reward study. It prints the rating gaps, the quantiles of the fit difference of the one-point pairs,
   and the accuracy of a scorer that reads each image's fit with a Gaussian error of standard deviation `s`: how exact a
   fit estimate must be to reach 0.9.
2. **How does a learnt scorer grow with data?** The prompts of all the folders are split 80/20 (seed 0); the small CNN of
   `reward_image_only_probe.py` (no prompt, random initialisation) is trained with the pairwise loss on the fidelity
   pairs of a quarter, a half and all of the training prompts, and scored on every held-out pair.

    python tools/dpo_probe.py data runs/probe                                   # 800 prompts x 4 images (10 min)
    python tools/dpo_probe.py data runs/probe-fid --per-category 200 --seed 126  # 1,600 more prompts (21 min)
    python tools/dpo_probe.py data runs/probe-fid2 --per-category 200 --seed 127 # and 1,600 more
    # 16,000 images; about 12 min a seed on 2 CPU cores (05a's tables: seeds 0 and 1)
    python tools/reward_fidelity_probe.py runs/probe runs/probe-fid runs/probe-fid2 --seeds 0
    python tools/reward_fidelity_probe.py runs/probe runs/probe-fid runs/probe-fid2 --seeds 1
    # the largest share only: three times the steps (0.816, seed 0), or a CNN twice as wide, 4 times the compute (0.808)
    python tools/reward_fidelity_probe.py runs/probe runs/probe-fid runs/probe-fid2 --shares 1 --steps 6000
    python tools/reward_fidelity_probe.py runs/probe runs/probe-fid runs/probe-fid2 --shares 1 --width 32

It prints one JSON line a part.
"""
import argparse, itertools, json, sys, time
from pathlib import Path

import numpy as np, pandas as pd, torch, torch.nn.functional as F
from PIL import Image

from instructengine.sandbox import fidelity_rating, mean_fit, read_image

sys.path.insert(0, str(Path(__file__).parent))
from reward_image_only_probe import scorer   # noqa: E402


def read_folders(folders) -> pd.DataFrame:
    """The `images.csv` rows of every folder, with the folder's name, and whether the image's prompt is held out: 20% of
    the prompts, drawn with seed 0 (`reward_scale_probe.py` uses the same split)."""
    frames = []
    for f in folders:
        d = pd.read_csv(Path(f) / "images.csv")
        if d.empty or not {"prompt", "path"} <= set(d.columns): raise ValueError(f"{f}/images.csv: expected rows with prompt and path")
        frames.append(d.assign(folder=str(f)))
    df = pd.concat(frames, ignore_index=True)
    prompts = sorted(df.prompt.unique())
    np.random.default_rng(0).shuffle(prompts)
    return df.assign(test=df.prompt.isin(set(prompts[: len(prompts) // 5])))


def training_prompts(df: pd.DataFrame) -> list:
    "The training prompts in the order whose prefixes make the nested shares (seed 1)."
    prompts = sorted(df[~df.test].prompt.unique())
    np.random.default_rng(1).shuffle(prompts)
    return prompts


def load(folders) -> tuple:
    """One row an image of every folder (folder, prompt, path, whether its prompt is held out, fit, fidelity rating), and
    the images' pixels as a uint8 array (N, H, W, 3), each file read once."""
    df = read_folders(folders)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in df.path])
    df["fit"] = [mean_fit(read_image(a)) for a in pixels]   # the oracle's reading, as sandbox.rate makes it
    df["fidelity"] = [fidelity_rating(f) for f in df.fit]
    return df, pixels


def decided_pairs(df: pd.DataFrame) -> pd.DataFrame:
    "Every two images of one prompt in one folder whose fidelity ratings differ: rows w, l (index into df), gap, fit difference."
    rows = []
    for _, g in df.groupby(["folder", "prompt"]):
        for i, j in itertools.combinations(g.index, 2):
            if g.fidelity[i] == g.fidelity[j]: continue
            w, l = (i, j) if g.fidelity[i] > g.fidelity[j] else (j, i)
            rows.append((w, l, g.fidelity[w] - g.fidelity[l], g.fit[w] - g.fit[l]))
    return pd.DataFrame(rows, columns=["w", "l", "gap", "dfit"])


def ceiling(pairs: pd.DataFrame, sds=(0.01, 0.02, 0.03, 0.05, 0.1), draws: int = 200, seed: int = 0) -> dict:
    "Accuracy of a scorer that reads each image's fit with Gaussian error `sd`: P(dfit + e_w - e_l > 0), averaged over pairs."
    rng = np.random.default_rng(seed)
    d = pairs.dfit.to_numpy()[:, None]
    one = pairs.gap.to_numpy() == 1
    out = {}
    for sd in sds:
        right = (d + rng.normal(0, sd, (len(d), draws)) - rng.normal(0, sd, (len(d), draws))) > 0
        out[str(sd)] = {"all": round(float(right.mean()), 3), "gap 1": round(float(right[one].mean()), 3)}
    return out


def train_eval(px, train: pd.DataFrame, test: pd.DataFrame, steps: int, seed: int = 0, width: int = 16) -> float:
    "The image-only CNN trained pairwise on `train` pairs; its accuracy on `test` pairs (a predicted tie is wrong)."
    torch.manual_seed(seed)
    net = scorer(width)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    w, l = torch.tensor(train.w.to_numpy()), torch.tensor(train.l.to_numpy())
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(w), (64,), generator=g)
        s = net(torch.cat([px[w[i]], px[l[i]]]))[:, 0]
        loss = F.softplus(-(s[:64] - s[64:])).mean()   # -log sigmoid(s_w - s_l)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
    net.eval()
    with torch.no_grad():
        s = torch.cat([net(px[k:k + 512])[:, 0] for k in range(0, len(px), 512)])
    return float((s[torch.tensor(test.w.to_numpy())] > s[torch.tensor(test.l.to_numpy())]).float().mean())


def main(folders, steps: int, seeds=(0,), shares=(0.25, 0.5, 1.0), width: int = 16):
    df, pixels = load(folders)
    pairs = decided_pairs(df)
    pairs["test"] = df.test.to_numpy()[pairs.w]
    one = pairs[pairs.gap == 1].dfit
    print(json.dumps({"part": "ceiling", "images": len(df), "decided pairs": len(pairs),
                      "gap shares": {int(k): round(v, 3) for k, v in pairs.gap.value_counts(normalize=True).sort_index().items()},
                      "fit difference of one-point pairs, quantiles": {str(q): round(v, 3) for q, v in one.quantile([0.1, 0.25, 0.5, 0.75, 0.9]).items()},
                      "accuracy of a fit read with error sd": ceiling(pairs)}), flush=True)
    px = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float() / 255   # (N, 3, H, W), the layout the CNN was measured with
    test = pairs[pairs.test]
    if test.empty or len(test) == len(pairs): sys.exit(f"{', '.join(map(str, folders))}: expected decided fidelity pairs on both sides "
                                                        f"of the split, found {len(pairs) - len(test)} to train on and {len(test)} to test")
    train_prompts = training_prompts(df)
    for share, seed in itertools.product(shares, seeds):
        keep = set(train_prompts[: round(share * len(train_prompts))])
        train = pairs[~pairs.test & pd.Series(df.prompt.to_numpy()[pairs.w]).isin(keep).to_numpy()]
        images = int((~df.test & df.prompt.isin(keep)).sum())
        t0 = time.time()
        acc = train_eval(px, train, test, steps, seed, width)
        print(json.dumps({"part": "data", "train prompts": len(keep), "train images": images, "train pairs": len(train),
                          "test pairs": len(test), "steps": steps, "seed": seed, "width": width, "accuracy": round(acc, 3), "train_s": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="dpo_probe.py data folders drawn by the same generator")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="shares of the training prompts, nested")
    ap.add_argument("--width", type=int, default=16, help="the CNN's first channel count (it doubles twice)")
    a = ap.parse_args()
    if a.steps < 40: ap.error(f"--steps {a.steps}: expected at least 40 (the one-cycle schedule warms up over 5% of them)")
    if not all(0 < x <= 1 for x in a.shares): ap.error(f"--shares {a.shares}: expected shares in (0, 1]")
    main(a.folders, a.steps, a.seeds, a.shares, a.width)
