"""Does augmentation stop the reward model memorising its training images? (05a_reward_train, the table of changes)

Trains the reward-study recipe (lexical mask, threshold 0.9, sandbox conditions, lr 1e-3 / backbone 1e-4, warmup 100,
batches of 32, ties left out) on a study run's split while every training image is shifted at random by up to
SHIFT pixels each way, edge pixels repeated. The held-out pairs are scored on the images as they are. Prints one JSON
line with the training time and the per-dimension accuracy; the model goes to RUN/reward-shift-SHIFT-STEPS.

    python tools/reward_shift_probe.py runs/reward-study 1 1000     # after make reward-study
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

from instructengine import reward_train as rt
from instructengine.reward import SANDBOX_CONDITIONS, MPSConfig


def shifted(shift: int):
    "A `PairImages` whose batches are shifted by up to `shift` pixels, each image its own way."
    class ShiftedImages(rt.PairImages):
        def __call__(self, paths):
            px = super().__call__(paths)
            if shift == 0: return px
            B, _, H, W = px.shape
            p = F.pad(px, (shift,) * 4, mode="replicate")
            dx, dy = torch.randint(0, 2 * shift + 1, (B,)), torch.randint(0, 2 * shift + 1, (B,))
            return torch.stack([p[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    return ShiftedImages


def main(run_dir: str, shift: int, steps: int):
    cfg = rt.RewardTrainConfig(run_dir=run_dir, model=MPSConfig(mask_similarity="lexical", threshold=0.9, conditions=SANDBOX_CONDITIONS),
                               epochs=1.0, max_steps=steps, batch_size=32, lr=1e-3, backbone_lr=1e-4, warmup_steps=100,
                               freeze="none", ties=False, out=f"reward-shift-{shift}-{steps}")
    train, test = rt.load_training_pairs(cfg)
    t0, plain = time.time(), rt.PairImages
    rt.PairImages = shifted(shift)          # train_reward reads its images through this class
    try: model, hist = rt.train_reward(cfg, train, log=None)
    finally: rt.PairImages = plain
    train_s = time.time() - t0
    test = rt.prepare_pairs(test, model, cfg.dimensions, cfg.dimension_map, decided=True)
    acc = rt.evaluate_reward(model, test, cfg.run_dir)["accuracy"]["accuracy"].round(3).to_dict()
    print(json.dumps({"shift": shift, "steps": steps, "final_loss": round(hist[-1]["loss"], 4), "train_s": round(train_s), "accuracy": acc}))


if __name__ == "__main__":
    if len(sys.argv) != 4: sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
