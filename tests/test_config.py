"Config ↔ YAML: round trips of every supported field type, and the errors bad files get."
import dataclasses
import enum
from pathlib import Path
from typing import Literal

import pytest

from instructengine.core import Config, ConfigError, RunDir


class Sched(enum.Enum):
    COSINE = "cosine"
    CONSTANT = "constant"


@dataclasses.dataclass
class Inner(Config):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Outer(Config):
    name: str = "demo"
    steps: int = 10
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["sft", "dpo", "cv"] = "cv"
    sched: Sched = Sched.COSINE
    out: Path | None = None
    targets: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_k"])
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"image": 1.0})
    sizes: tuple[int, ...] = (32, 64)
    inner: Inner = dataclasses.field(default_factory=Inner)


@dataclasses.dataclass
class Required(Config):
    model: str
    steps: int = 1


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_round_trip_every_type(tmp_path):
    cfg = Outer(name="x", steps=3, ratio=2, flag=True, mode="dpo", sched=Sched.CONSTANT, out=Path("runs/x"),
                targets=["to_v"], weights={"image": 0.5, "text": 2.0}, sizes=(16,), inner=Inner(lr=3e-4, betas=(0.5, 0.9)))
    assert isinstance(cfg.ratio, float)
    back = Outer.load(cfg.save(tmp_path / "c.yaml"))
    assert back == cfg
    assert back.sizes == (16,) and back.inner.betas == (0.5, 0.9) and back.sched is Sched.CONSTANT


def test_defaults_from_empty_file(tmp_path):
    assert Outer.load(write(tmp_path, "")) == Outer()


def test_scientific_notation_is_a_float(tmp_path):
    assert Outer.load(write(tmp_path, "inner: {lr: 1e-4}\nratio: -2.5E+3\n")).inner.lr == 1e-4


def test_unknown_key_names_key_value_valid_keys_and_file(tmp_path):
    p = write(tmp_path, "steps: 5\nstpes: 7\n")
    with pytest.raises(ConfigError) as e: Outer.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: Outer: unknown key 'stpes' (value 7)")
    assert "did you mean 'steps'" in msg and "Valid keys: name, steps, ratio, flag, mode, sched, out" in msg


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"Outer\.inner: unknown key 'momentum' \(value 0\.9\).*Valid keys: lr, betas"):
        Outer.load(write(tmp_path, "inner:\n  momentum: 0.9\n"))


@pytest.mark.parametrize("yaml_text, expected", [
    ("steps: ten", "Outer.steps = 'ten': expected int, got str"),
    ("steps: 1.5", "Outer.steps = 1.5: expected int, got float"),
    ("steps: true", "Outer.steps = True: expected int, got bool"),
    ("ratio: yes", "Outer.ratio = True: expected float, got bool"),
    ("flag: 1", "Outer.flag = 1: expected bool, got int"),
    ("mode: ppo", "Outer.mode = 'ppo': expected one of 'sft', 'dpo', 'cv', got str"),
    ("sched: linear", "Outer.sched = 'linear': expected one of ['cosine', 'constant']"),
    ("out: 3", "Outer.out = 3: expected Path | None, got int"),
    ("targets: to_q", "Outer.targets = 'to_q': expected list[str], got str"),
    ("targets: [to_q, 3]", "Outer.targets[1] = 3: expected str, got int"),
    ("weights: {image: high}", "Outer.weights.image = 'high': expected float, got str"),
    ("inner: {lr: fast}", "Outer.inner.lr = 'fast': expected float, got str"),
    ("inner: {betas: [0.9]}", "Outer.inner.betas = [0.9]: expected 2 items (tuple[float, float])"),
    ("inner: 0.1", "Outer.inner = 0.1: expected Inner, got float"),
])
def test_wrong_type_names_key_value_and_type(tmp_path, yaml_text, expected):
    p = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e: Outer.load(p)
    assert str(e.value) == f"{p}: {expected}"


@pytest.mark.parametrize("yaml_text, got", [("- 1\n- 2\n", "list [1, 2]"), ("just text", "str 'just text'"), ("42", "int 42")])
def test_not_a_mapping(tmp_path, yaml_text, got):
    p = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e: Outer.load(p)
    assert str(e.value) == f"{p}: Outer: expected a mapping of keys to values, got {got}"


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "steps: 3\ninner: {lr: 1\n")
    with pytest.raises(ConfigError) as e: Outer.load(p)
    assert str(e.value) == (f"{p}: not valid YAML at line 3, column 1: expected ',' or '}}', but got '<stream end>' "
                            "(while parsing a flow mapping that starts at line 2, column 8)")


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"Required: missing required key\(s\) model"): Required.load(write(tmp_path, "steps: 2"))


def test_yaml_cannot_build_python_objects(tmp_path):
    "The loader is a safe loader: a python/object tag is refused, not executed."
    with pytest.raises(ConfigError, match="not valid YAML"):
        Outer.load(write(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']"))


def test_with_overrides():
    cfg = Outer().with_overrides(steps=4, inner={"lr": 1e-3}, **{"inner.betas": [0.1, 0.2]})
    assert (cfg.steps, cfg.inner.lr, cfg.inner.betas) == (4, 1e-3, (0.1, 0.2))
    assert Outer().steps == 10                                   # the original is untouched
    with pytest.raises(ConfigError, match="unknown key 'stepz'"): Outer().with_overrides(stepz=1)
    with pytest.raises(ConfigError, match="'name' is not a nested config"): Outer().with_overrides(**{"name.x": 1})
    with pytest.raises(ConfigError, match="Outer.steps = 'many'"): Outer().with_overrides(steps="many")


def test_run_dir_stage_sections(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config("dpo", Outer())
    run.write_config("reward", Inner())
    assert run.read_config("dpo", Outer) == Outer() and run.read_config("reward", Inner) == Inner()
    with pytest.warns(UserWarning, match=r"stage 'dpo' changed.*'inner\.lr': \(0\.0001, 0\.01\)"):
        run.write_config("dpo", Outer().with_overrides(**{"inner.lr": 1e-2}))
    with pytest.raises(KeyError, match="no section for stage 'eval'"): run.read_config("eval")
    run.config.write_text("[]\n")                                # not "no stages": a file that is not a mapping
    with pytest.raises(ConfigError, match="expected a mapping of stage names to configs"): run.read_config()
    run.config.write_text("dpo:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: dpo: unknown key 'stepz'"): run.read_config("dpo", Outer)


def _stage_configs():
    from instructengine.annotate import AnnotateConfig
    from instructengine.dpo_train import DPOConfig
    from instructengine.generate import GenerateConfig
    from instructengine.reward_train import RewardTrainConfig
    from instructengine.taxonomy import TaxonomyRunConfig
    return {c.__name__: c for c in (AnnotateConfig, DPOConfig, GenerateConfig, RewardTrainConfig, TaxonomyRunConfig)}


@pytest.mark.parametrize("cls, field, value, expected", [
    ("GenerateConfig", "limit", -169, "expected at least 0"),          # pairs[:-169] used to drop pairs from the end
    ("GenerateConfig", "images_per_instruction", 0, "expected at least 1"),
    ("GenerateConfig", "num_inference_steps", 0, "expected at least 1"),
    ("GenerateConfig", "guidance_scale", -3.0, "expected at least 0"),
    ("AnnotateConfig", "limit", -1, "expected at least 0"),
    ("AnnotateConfig", "rating_margin", 0.0, "expected a number above 0"),
    ("DPOConfig", "beta", -5.0, "expected a number above 0"),          # a negative beta trains the loser up
    ("DPOConfig", "lr", -1.0, "expected at least 0"),
    ("RewardTrainConfig", "lr", 0.0, "expected a number above 0"),
    ("TaxonomyRunConfig", "pairs_per_subtopic", -2, "expected at least 1"),
])
def test_stage_configs_refuse_out_of_range_values(cls, field, value, expected):
    with pytest.raises(ConfigError) as e: _stage_configs()[cls].from_dict({field: value})
    assert str(e.value) == f"{cls}.{field} = {value}: {expected}"
