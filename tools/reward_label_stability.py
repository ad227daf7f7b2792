"""How much of the reward model's shortfall is fragile labels? (05a_reward_train, "Why one model per dimension wins here")

Each image of a reward run's decided held-out pairs is read again by the oracle after a one-pixel shift in each of four
directions. A pair is stable when its winner out-rates its loser on the pair's dimension in all five readings. The
script prints the model's accuracy (from `reward/test_scores.parquet`) on stable and on fragile pairs.

    python tools/reward_label_stability.py runs/reward-big      # after make reward-study STUDY=runs/reward-big ...
"""
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from instructengine.core import RunDir
from instructengine.reward_train import aspect_pairs
from instructengine.sandbox import rate

SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


@cache
def readings(path: Path, instruction: str) -> list:
    "The oracle's ratings of the image as it is and shifted by one pixel each way (edges repeated)."
    a = np.asarray(Image.open(path).convert("RGB"))
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    views = [a] + [p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in SHIFTS]
    return [rate(Image.fromarray(np.ascontiguousarray(v)), instruction) for v in views]


def main(run: Path):
    scores = pd.read_parquet(run / "reward" / "test_scores.parquet")
    # the held-out pairs' prompts and images, from the same annotations the reward stage read
    s = scores[~scores["tie"]].merge(aspect_pairs(RunDir(run, create=False))[["id", "prompt", "image_w", "image_l"]], on="id", validate="1:1")
    s["stable"] = [all(x[d] > y[d] for x, y in zip(readings(run / w, p), readings(run / l, p), strict=True))
                   for w, l, p, d in zip(s.image_w, s.image_l, s.prompt, s.dimension, strict=True)]
    s["right"] = s["score_w"] > s["score_l"]
    t = s.groupby(["dimension", "stable"])["right"].agg(accuracy="mean", pairs="size").unstack("stable")
    print(t.round(3).to_string())
    print(f"stable pairs: {s.stable.mean():.3f} of {len(s)}; accuracy on them {s[s.stable].right.mean():.3f}, on the fragile ones {s[~s.stable].right.mean():.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/reward-big"))
