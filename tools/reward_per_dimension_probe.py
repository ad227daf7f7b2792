"""Does a model per dimension do better with more steps? (05a_reward_train, "Why one model per dimension wins here")

The ablation "one model per dimension" shares the recipe's step budget out by each dimension's share of the training
pairs (on the reward study: prompt following 465 steps, fidelity 321, aesthetic 154, harmlessness 60). This trains one
model per dimension with the study's own reward config (read from RUN/reward/config.json) and the same split, but
STEPS steps each (`reward_ablations` with `per_dimension_steps`), and prints each model's held-out accuracy on its
dimension's decided test pairs. The models go to RUN/reward-per-dimension-STEPS/ablations/one-model-per-dimension/<dimension>.

    python tools/reward_per_dimension_probe.py runs/reward-study 1000 [DIMENSION ...]   # after make reward-study; about 5 min a dimension

Measured on 2026-12-06 (1,000 steps each; the ablation column's figures in parentheses): prompt following 0.841
(0.852), aesthetic 0.809 (0.867), fidelity 0.650 (0.635), harmlessness 0.653 (0.586). More steps raise harmlessness and
fidelity and lower aesthetics and prompt following; none reaches 0.9.
"""
import sys

from instructengine.core import RunDir
from instructengine.reward_train import RewardTrainConfig, load_training_pairs, reward_ablations


def main(run_dir: str, steps: int, dims: list):
    cfg = RunDir(run_dir, create=False).read_config("reward", RewardTrainConfig)
    cfg = cfg.with_overrides(run_dir=run_dir, out=f"reward-per-dimension-{steps}", dimensions=dims or cfg.dimensions)
    train, test = load_training_pairs(cfg)
    table = reward_ablations(cfg, train, test, variants={"one model per dimension": "per_dimension"},
                             per_dimension_steps=steps, log=None)
    print(table.round(3).to_string())


if __name__ == "__main__":
    if len(sys.argv) < 3: sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
