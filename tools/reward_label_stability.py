"""How much of the reward model's shortfall is fragile labels? (05_reward, "Why one model per dimension wins here")

Each image of a reward run's decided held-out pairs is read again by the oracle after a one-pixel shift in each of four
directions. A pair is stable when its winner out-rates its loser on the pair's dimension in all five readings. The
script prints the model's accuracy (from `reward/test_scores.parquet`) on stable and on fragile pairs.

    python tools/reward_label_stability.py runs/reward-big      # after make reward-study STUDY=runs/reward-big ...
"""
import json, sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from instructengine.sandbox import rate

SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _split_id(pair_id: str) -> tuple:
    "aspect|<winner id>|<loser id>|<under>|<dimension>, where an image id itself holds two '|'."
    body, _ = pair_id.removeprefix("aspect|").rsplit("|", 1)
    body, under = body.rsplit("|", 1)
    parts = body.split("|")
    return "|".join(parts[:3]), "|".join(parts[3:]), under


def readings(path: Path, instruction: str) -> list:
    "The oracle's ratings of the image as it is and shifted by one pixel each way (edges repeated)."
    a = np.asarray(Image.open(path).convert("RGB"))
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    views = [a] + [p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in SHIFTS]
    return [rate(Image.fromarray(np.ascontiguousarray(v)), instruction) for v in views]


def main(run: Path):
    s = pd.read_parquet(run / "reward" / "test_scores.parquet")
    s = s[~s["tie"] & s["id"].str.startswith("aspect|")].copy()
    s[["w", "l", "under"]] = pd.DataFrame([_split_id(i) for i in s["id"]], index=s.index)
    paths = {r["id"]: run / r["path"] for r in map(json.loads, open(run / "images.jsonl"))}
    said = {(r["image_id"], r["under"]): r["instruction"] for r in map(json.loads, open(run / "annotations.jsonl")) if r["task"] == "rate"}
    cache = {}
    def get(i, u):
        if (i, u) not in cache: cache[i, u] = readings(paths[i], said[i, u])
        return cache[i, u]
    s["stable"] = [all(x[d] > y[d] for x, y in zip(get(w, u), get(l, u), strict=True)) for w, l, u, d in zip(s.w, s.l, s.under, s.dimension, strict=True)]
    s["right"] = s["score_w"] > s["score_l"]
    t = s.groupby(["dimension", "stable"])["right"].agg(accuracy="mean", pairs="size").unstack("stable")
    print(t.round(3).to_string())
    print(f"stable pairs: {s.stable.mean():.3f} of {len(s)}; accuracy on them {s[s.stable].right.mean():.3f}, on the fragile ones {s[~s.stable].right.mean():.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/reward-big"))
