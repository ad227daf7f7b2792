"""Does the MPS reward model itself get better with more images? (05a_reward_train, "Are the fidelity labels too fine to learn?")

`reward_fidelity_probe.py` showed that an image-only CNN learns the oracle's fidelity rating better with every doubling of
the images (0.74 to 0.80 from 3k to 13k). This probe asks the same of the model the issue is about: MPS on the sandbox
CLIP, trained with the reward study's recipe (lexical mask, threshold 0.9, the sandbox conditions, lr 1e-3 and 1e-4 for
the backbone, warmup 100, batches of 32, ties left out), on all four of the oracle's aspects at once.

The images are `dpo_probe.py data` folders (the base generator on prompts of ShapesBench's categories, several images a
prompt). The oracle rates every image under its own prompt (`sandbox.rate`); every two images of a prompt whose ratings
differ on an aspect form a pair of that aspect, as `aspect_pairs` makes them from the data engine's ratings. The prompts
are split 80/20 exactly as in `reward_fidelity_probe.py` (so its held-out fidelity pairs are the same ones); MPS is
trained on nested shares of the training prompts and scored on every held-out pair, per aspect.

    # after the three `dpo_probe.py data` runs of reward_fidelity_probe.py's docstring (16,000 images)
    python tools/reward_scale_probe.py runs/probe runs/probe-fid runs/probe-fid2 --shares 0.25 1 --steps 3000

It prints one JSON line a share; each model goes to runs/reward-scale/<share>-<steps>-<seed> (a rerun resumes it).
On 2 CPU cores: 2 min to rate the 16,000 images, then 15 min a share. Measured, all four aspects, seed 0 / seed 1
(`--seed 1`): 0.712 / 0.716 with 3,056 training images, 0.749 / 0.753 with 6,432 (`--shares 0.5`), 0.792 / 0.786 with 12,820
(fidelity 0.690 / 0.704, 0.702 / 0.729, then 0.751 / 0.750).
Twice the steps on all the images (`--shares 1 --steps 6000`, 31 min a seed): 0.789 / 0.793, no gain overall.
"""
import argparse, itertools, json, sys, time
from pathlib import Path

import pandas as pd
from PIL import Image

from instructengine import reward_train as rt
from instructengine.annotate import pairs_frame
from instructengine.reward import SANDBOX_CONDITIONS, MPSConfig
from instructengine.sandbox import ASPECTS, parse_caption, rate

sys.path.insert(0, str(Path(__file__).parent))
from reward_fidelity_probe import read_folders, training_prompts   # noqa: E402  (the same split and nesting)


def rated_images(folders) -> pd.DataFrame:
    "One row an image of every folder: folder, prompt, path, held out or not, and the oracle's four ratings under its prompt."
    df = read_folders(folders)
    scenes = {p: parse_caption(p) for p in df.prompt.unique()}
    ratings = [rate(Image.open(path), scenes[p]) for p, path in zip(df.prompt, df.path, strict=True)]
    for a in ASPECTS: df[a] = [r[a] for r in ratings]
    return df


def decided_pairs(df: pd.DataFrame) -> pd.DataFrame:
    "Every two images of one prompt in one folder that the oracle rates differently on an aspect, as a pairs table."
    rows = []
    for (folder, prompt), g in df.groupby(["folder", "prompt"], sort=False):
        for i, j in itertools.combinations(g.index, 2):
            for a in ASPECTS:
                si, sj = g.at[i, a], g.at[j, a]
                if si == sj: continue
                w, l = (i, j) if si > sj else (j, i)
                rows.append({"id": f"scale|{df.path[w]}|{df.path[l]}|{a}", "prompt": prompt, "image_w": df.path[w], "image_l": df.path[l],
                             "dimension": a, "tie": False, "quad_id": f"{folder}|{prompt}", "source": "aspect",
                             "scores": json.dumps({a: [int(max(si, sj)), int(min(si, sj))]}), "test": bool(df.test[w])})
    test = [r.pop("test") for r in rows]
    return pairs_frame(rows).assign(test=test)


def main(folders, shares, steps: int, seed: int, out: Path):
    t0 = time.time()
    df = rated_images(folders)
    pairs = decided_pairs(df)
    test = pairs[pairs.test].drop(columns="test").reset_index(drop=True)
    if test.empty or len(test) == len(pairs):
        sys.exit(f"{', '.join(map(str, folders))}: expected decided pairs on both sides of the split, found "
                 f"{len(pairs) - len(test)} to train on and {len(test)} to test")
    print(json.dumps({"part": "data", "images": len(df), "rated_s": round(time.time() - t0),
                      "decided pairs": pairs.groupby(["dimension", "test"]).size().unstack().rename(columns={False: "train", True: "test"}).to_dict("index")}),
          flush=True)
    train_prompts = training_prompts(df)
    for share in shares:
        keep = set(train_prompts[: round(share * len(train_prompts))])
        train = pairs[~pairs.test & pairs.prompt.isin(keep)].drop(columns="test").reset_index(drop=True)
        cfg = rt.RewardTrainConfig(run_dir=str(out), model=MPSConfig(mask_similarity="lexical", threshold=0.9, conditions=SANDBOX_CONDITIONS),
                                   epochs=1.0, max_steps=steps, batch_size=32, lr=1e-3, backbone_lr=1e-4, warmup_steps=100,
                                   freeze="none", ties=False, seed=seed, out=str((out / f"{share:g}-{steps}-{seed}").resolve()))
        t1 = time.time()
        model, hist = rt.train_reward(cfg, train, log=None)
        train_s = time.time() - t1
        scored = rt.prepare_pairs(test, model, decided=True)
        acc = rt.evaluate_reward(model, scored, out)["accuracy"]
        print(json.dumps({"part": "mps", "share": share, "train images": int((~df.test & df.prompt.isin(keep)).sum()),
                          "train pairs": train.dimension.value_counts().to_dict(), "steps": steps, "seed": seed,
                          "final_loss": round(hist[-1]["loss"], 4), "train_s": round(train_s),
                          "accuracy": acc["accuracy"].round(3).to_dict(), "test pairs": acc["pairs"].astype(int).to_dict()}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="dpo_probe.py data folders drawn by the same generator")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 1.0], help="shares of the training prompts, nested")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0, help="the training seed (the split is fixed)")
    ap.add_argument("--out", type=Path, default=Path("runs/reward-scale"))
    a = ap.parse_args()
    if a.steps < 1: ap.error(f"--steps {a.steps}: expected at least 1")
    if not all(0 < x <= 1 for x in a.shares): ap.error(f"--shares {a.shares}: expected shares in (0, 1]")
    main(a.folders, a.shares, a.steps, a.seed, a.out)
