"Annotation stage: VLM judges over real HTTP (transformers serve, scripted servers) and locally, damaged images, resume after SIGKILL, the stage end to end, Pick-a-Pic round trip."
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from _loopback import completion, transformers_serve
from _processes import run_processes
from instructengine.annotate import (AnnotateConfig, JudgeEndpointConfig, OpenAIJudge, OracleJudge, TransformersJudge, annotate,
                                     annotation_tasks, from_pickapic, load_pickapic, pairs_frame, read_pairs, run_annotate,
                                     to_pickapic)
from instructengine.core import ConfigError, ImageStore, RecordLog, RunDir
from instructengine.sandbox import parse_caption, render

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [("a red circle", "two blue squares"), ("a large green diamond", "a large green diamond, checkered backdrop"),
            ("three yellow triangles on the right", "three yellow triangles on the left"), ("a red cross", "a white cross")]


def make_run(root, n_pairs: int = 4, per_side: int = 2, swap: int = None, repeat: int = None) -> RunDir:
    """A run folder as the generation stage leaves it, with oracle-exact renders instead of generated images; pair `swap`
    gets its sides' images exchanged (so it fails verification), and pair `repeat` draws every image of a side alike (so
    its quads repeat one another)."""
    run = RunDir(root)
    store = ImageStore(run.images)
    pairs, images = [], []
    for i in range(n_pairs):
        a, b = CAPTIONS[i % len(CAPTIONS)]
        pid = f"sandbox/p#{i}"
        pairs.append({"id": pid, "a": a, "b": b, "dimension": "content", "status": "ok"})
        for j in range(per_side):
            for side, cap in (("a", a), ("b", b)):
                shown = (b if side == "a" else a) if i == swap else cap
                st = store.put(render(parse_caption(shown), seed=100 * i + (0 if i == repeat else j)))
                images.append({"id": f"{pid}|{side}|{j}", "pair_id": pid, "side": side, "index": j, "prompt": cap, "seed": j,
                               "status": "ok", "path": str(st.path.relative_to(run.root)), "sha256": st.sha256})
    run.instructions.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run.image_records.write_text("".join(json.dumps(r) + "\n" for r in images))
    return run


def load(run):
    pairs = RecordLog(run.instructions).latest()
    return pairs, list(RecordLog(run.image_records).latest().values())


# ---- a tiny Qwen2-VL built here: real classes, random weights, a tokenizer trained offline

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
                 "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)
    import torch
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    bpe = Tokenizer(models.BPE()); bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["You judge images made by a text-to-image model.", '{"follows": "a", "reason": "two red circles"}',
                             '{"prompt_following": {"score": 4, "rationale": "close"}}'],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    m = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=m["vocab"], merges=[tuple(x) for x in m["merges"]], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": special[1:]})
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56}),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, initializer_range=0.5),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    # initializer_range 0.5 (not 0.02): weights large enough that the reply of so small a model depends on the whole prompt
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen2vl")
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(folder); proc.save_pretrained(folder)
    return folder


def test_local_transformers_judge_records_garbage_as_malformed(tiny_vlm, tmp_path):
    judge = TransformersJudge(str(tiny_vlm), batch_size=2, max_new_tokens=12)
    assert type(judge.model).__name__ == "Qwen2VLForConditionalGeneration"
    run = make_run(tmp_path, n_pairs=1, per_side=1)
    pairs, images = load(run)
    counts = annotate(judge, annotation_tasks(pairs, images, [judge.name]), run, batch_size=3)
    recs = list(RecordLog(run.annotations).latest().values())
    assert counts == {"malformed": 6} and len(recs) == 6          # 2 images x (verify + 2 ratings), batched 2 + 1 inside each call
    assert all(r["raw"] and r["rubric"] == "judge-v1" and r["judge"] == f"transformers:{tiny_vlm}" for r in recs)
    image = render(parse_caption("a red circle"), 0)               # pair 0's image 0 of side a, as make_run drew it
    one = judge.verify(image, "a red circle", "two blue squares")
    alone = next(r for r in recs if r["task"] == "verify" and r["side"] == "a" and r["image_id"].endswith("|a|0"))
    assert one["raw"] == alone["raw"]                            # batching and left padding do not change the answer
    assert judge.verify(image, "a red circle", "a blue circle")["raw"] != one["raw"]   # and the answer does depend on the question


@pytest.mark.slow
def test_openai_judge_sends_images_to_transformers_serve(tiny_vlm, tmp_path):
    with transformers_serve(tmp_path) as url:
        judge = OpenAIJudge(JudgeEndpointConfig(base_url=url, model=str(tiny_vlm), max_tokens=12, response_format="none",
                                                max_parse_retries=0, timeout=120, concurrency=2, name="served"))
        run = make_run(tmp_path / "run", n_pairs=1, per_side=1)
        pairs, images = load(run)
        counts = annotate(judge, annotation_tasks(pairs, images, ["served"]), run)
    recs = list(RecordLog(run.annotations).latest().values())
    assert counts == {"malformed": 6}, [r.get("error") for r in recs]
    assert all(r["raw"] and "no JSON object" in r["error"] for r in recs)        # a real reply of random tokens


def test_429_then_200_is_retried_and_a_refusal_is_recorded(scripted_server, tmp_path):
    good = completion('```json\n{"follows": "A", "reason": "a red circle"}\n```')
    srv, url = scripted_server([(429, b'{"error": "slow down"}'), (200, good), (200, completion("", refusal="I will not judge this."))])
    judge = OpenAIJudge(base_url=url, model="vlm", backoff=0.01, concurrency=1, max_parse_retries=0, cache_dir=str(tmp_path / "cache"))
    img = render(parse_caption("a red circle"), 0)
    first = judge.verify(img, "a red circle", "a blue circle")
    assert first["status"] == "ok" and first["follows"] == "a" and len(srv.requests) == 2
    again = OpenAIJudge(base_url=url, model="vlm", cache_dir=str(tmp_path / "cache")).verify(img, "a red circle", "a blue circle")
    assert again == first and len(srv.requests) == 2               # from the disk cache: same judge, rubric, prompt and image
    user = srv.requests[1]["body"]["messages"][1]["content"]
    assert user[0]["image_url"]["url"].startswith("data:image/png;base64,") and "a blue circle" in user[1]["text"]
    second = judge.rate(img, "a red circle")
    assert second["status"] == "refused" and "I will not" in second["error"]


def test_hanging_server_is_recorded_as_timeout(tmp_path):
    run = make_run(tmp_path, n_pairs=1, per_side=1)
    pairs, images = load(run)
    with socket.socket() as s:                    # accepts connections, never replies
        s.bind(("127.0.0.1", 0)); s.listen(16)
        judge = OpenAIJudge(base_url=f"http://127.0.0.1:{s.getsockname()[1]}/v1", model="vlm", timeout=0.3, max_retries=1, backoff=0.01,
                            concurrency=6, name="hung")
        t0 = time.time()
        counts = annotate(judge, annotation_tasks(pairs, images, ["hung"]), run)
    assert time.time() - t0 < 10
    assert counts == {"timeout": 6}
    assert all("within 0.3 s" in r["error"] for r in RecordLog(run.annotations))


def test_corrupt_and_missing_images_are_recorded_by_path(tmp_path):
    run = make_run(tmp_path, n_pairs=2, per_side=1)
    pairs, images = load(run)
    corrupt, missing = images[0]["path"], images[3]["path"]
    (run.root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (run.root / missing).unlink()
    counts = annotate(OracleJudge(), annotation_tasks(pairs, images, ["oracle"]), run, batch_size=4)
    assert counts == {"ok": 6, "image_error": 6}
    errors = {r["image_id"]: r["error"] for r in RecordLog(run.annotations) if r["status"] == "image_error"}
    assert corrupt in errors[images[0]["id"]] and "corrupt" in errors[images[0]["id"]]
    assert missing in errors[images[3]["id"]] and "does not exist" in errors[images[3]["id"]]



def test_a_shard_that_starts_late_judges_its_whole_share(tmp_path):
    "Shard 1 starting after shard 0 has written its judgments still asks all of its own share, and nothing twice."
    run = make_run(tmp_path, n_pairs=2, per_side=1)
    pairs, images = load(run)
    tasks = annotation_tasks(pairs, images, ["oracle"])
    assert annotate(OracleJudge(), tasks, run, shard=(0, 2)) == {"ok": (len(tasks) + 1) // 2}
    assert annotate(OracleJudge(), tasks, run, shard=(1, 2)) == {"ok": len(tasks) // 2}   # its own share's judgments
    ids = [json.loads(line)["id"] for line in run.annotations.read_text().splitlines()]
    assert sorted(ids) == sorted(t["id"] for t in tasks)



def test_two_processes_judge_their_shares_and_wait_for_the_tables(tmp_path):
    """Under two processes each judges its share; the stage's figures count both processes' judgments, and neither
    process returns before the main one has written quads.parquet, which the next stage of a script reads at once."""
    run = make_run(tmp_path / "run", n_pairs=6, per_side=2)
    script = tmp_path / "s.py"
    script.write_text("import json, sys\nimport pandas as pd\nfrom instructengine.core import RunDir, process_state\n"
                      "from instructengine.annotate import AnnotateConfig, run_annotate\n"
                      "m = run_annotate(AnnotateConfig(run_dir=sys.argv[1], judges=['oracle'], rules=[{'rule': 'follows_own'}], batch_size=4))\n"
                      "quads = len(pd.read_parquet(RunDir(sys.argv[1]).quads))\n"
                      "s = process_state(); print('RESULT ' + json.dumps({'rank': s.process_index, 'world': s.num_processes, 'quads': quads, 'm': m}))\n")
    results = run_processes(script, run.root)
    ids = [json.loads(line)["id"] for line in run.annotations.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 72                     # 24 images x 3 questions, each asked once
    main = results[0]["m"]
    assert main["judged"] == {"oracle": 72} and results[1]["m"] == {}
    assert [r["quads"] for r in results] == [main["quads"]] * 2 and main["quads"] > 0


SCRIPT = """
import sys, time
from instructengine.annotate import OracleJudge, annotate, annotation_tasks
from instructengine.core import RecordLog, RunDir
class Slow(OracleJudge):
    def judge_many(self, tasks):
        time.sleep(float(sys.argv[2]) * len(tasks)); return super().judge_many(tasks)
run = RunDir(sys.argv[1])
pairs, images = RecordLog(run.instructions).latest(), list(RecordLog(run.image_records).latest().values())
print(annotate(Slow(), annotation_tasks(pairs, images, ["oracle"]), run, batch_size=4), flush=True)
"""


def test_killed_annotation_resumes_each_item_exactly_once(tmp_path):
    script = tmp_path / "a.py"; script.write_text(SCRIPT)
    run, clean = make_run(tmp_path / "run", n_pairs=10, per_side=2), make_run(tmp_path / "clean", n_pairs=10, per_side=2)
    env = dict(os.environ, INSTRUCTENGINE_PROGRESS="0")
    p = subprocess.Popen([sys.executable, str(script), str(run.root), "0.03"], env=env)
    rec = run.annotations
    deadline = time.time() + 120
    while time.time() < deadline and (not rec.exists() or rec.read_bytes().count(b"\n") < 24): time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert 24 <= rec.read_bytes().count(b"\n") < 120
    for r in (run, clean): subprocess.run([sys.executable, str(script), str(r.root), "0"], env=env, check=True, capture_output=True)
    ids = [json.loads(line)["id"] for line in rec.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 120                      # 40 images x 3 questions, each once
    strip = lambda recs: {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in recs.items()}
    assert strip(RecordLog(rec).latest()) == strip(RecordLog(clean.annotations).latest())


@pytest.mark.filterwarnings("ignore:.*the parameters of stage .annotate. changed")
def test_stage_end_to_end_rules_and_outputs(tmp_path):
    run = make_run(tmp_path, n_pairs=4, per_side=2, swap=0, repeat=2)
    cfg = AnnotateConfig(run_dir=str(run.root), judges=[{"kind": "oracle"}, {"kind": "clip"}])
    s = run_annotate(cfg)
    removed = {r["rule"]: r for r in s["rules"]}
    assert s["candidates"] == 8 and s["images"] == 16
    # the swapped pair fails, and so does the style pair: "a large green diamond" says nothing of the backdrop, so the
    # checkered image of side b follows both instructions
    assert removed["follows_own"]["reasons"] == {"image a follows b": 2, "image b follows both": 2}
    assert removed["harmless"]["reasons"] == {"image a harmlessness 1 < 3": 2}                                       # the red cross
    assert removed["dedup"]["reasons"] == {"repeats an earlier quad": 1} and s["quads"] == 1   # pair 2's second quad
    quads, pairs = pd.read_parquet(run.quads), pd.read_parquet(run.pairs)
    assert len(quads) == s["quads"] and len(pairs) == s["pairs"]
    assert {"prompt", "image_w", "image_l", "dimension", "scores", "quad_id", "source"} <= set(pairs.columns)
    contrast = pairs[pairs.source == "contrast"]
    assert len(contrast) == 2 * len(quads) and all((run.root / p).is_file() for p in contrast.image_w)
    rejected = pd.read_parquet(run.rejected)
    assert len(rejected) + len(quads) == 8 and set(rejected.rule) <= {"follows_own", "harmless", "dedup"}
    assert json.loads(run.metrics.read_text())["annotate"]["quads"] == len(quads)
    assert run_annotate(cfg)["judged"] == s["judged"]            # a rerun asks nothing again
    with pytest.raises(ConfigError, match=r"rules\[0\]"): AnnotateConfig(rules=[{"rule": "folows_own"}])
    with pytest.raises(ConfigError, match=r"rules\[1\] \(agreement\): judge 'clip' is not one of the judges"):
        run_annotate(AnnotateConfig(run_dir=str(run.root), judges=["oracle"]))
    alone = run_annotate(AnnotateConfig(run_dir=str(run.root), judges=["oracle"], rules=[{"rule": "follows_own"}]))
    assert alone["quads"] == 4 and pd.read_csv(run.agreement).empty                  # one judge: nothing to compare


def test_pickapic_round_trip_through_a_datasets_folder(tmp_path):
    import datasets
    run = make_run(tmp_path / "run", n_pairs=3, per_side=1)
    _, images = load(run)
    p = [{"id": f"x{i}", "prompt": f"prompt {i}", "image_w": images[2 * i]["path"], "image_l": images[2 * i + 1]["path"],
          "dimension": "content", "tie": i == 2, "scores": json.dumps({"prompt_following": [5, 2]}), "quad_id": f"q{i}" if i else None,
          "source": "contrast"} for i in range(3)]
    pairs = pairs_frame(p)
    pairs.to_parquet(tmp_path / "pairs.parquet", index=False)
    assert read_pairs(tmp_path / "pairs.parquet").equals(pairs)
    table = to_pickapic(pairs, run.root)
    assert list(table.columns[:5]) == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"] and table.label_0.iloc[2] == 0.5
    datasets.Dataset.from_pandas(table).save_to_disk(tmp_path / "saved")
    back = from_pickapic(load_pickapic(tmp_path / "saved"), RunDir(tmp_path / "imported"))
    assert back.equals(pairs)
    assert all((tmp_path / "imported" / x).read_bytes() == (run.root / x).read_bytes() for x in pairs.image_w)
    repo = tmp_path / "repo" / "data"; repo.mkdir(parents=True)            # the layout of a downloaded hub dataset
    table.drop(columns=["id", "dimension", "scores", "quad_id", "source"]).to_parquet(repo / "train-00000-of-00001.parquet")
    plain = from_pickapic(load_pickapic(tmp_path / "repo"), RunDir(tmp_path / "plain"))
    assert list(plain.image_w) == list(pairs.image_w) and list(plain.tie) == [False, False, True] and set(plain.source) == {"pickapic"}
    with pytest.raises(ValueError, match="row 0: label_0 = 0.3"): from_pickapic(table.assign(label_0=0.3), RunDir(tmp_path / "bad"))


def test_dedup_rule_near_identical_repeated_and_unreadable(tmp_path):
    from instructengine.annotate import Judgments, RuleContext, apply_rules
    run = make_run(tmp_path, n_pairs=1, per_side=2)
    _, images = load(run)
    a0, b0, a1, b1 = (next(r["path"] for r in images if r["id"] == f"sandbox/p#0|{s}|{j}") for s, j in (("a", 0), ("b", 0), ("a", 1), ("b", 1)))
    quads = pd.DataFrame([{"quad_id": "same", "pair_id": "p", "image_a": a0, "image_b": a0},     # the generator ignored the edit
                          {"quad_id": "first", "pair_id": "p", "image_a": a0, "image_b": b0},
                          {"quad_id": "again", "pair_id": "p", "image_a": a0, "image_b": b0},    # the same two images once more
                          {"quad_id": "other", "pair_id": "p", "image_a": a1, "image_b": b1},
                          {"quad_id": "lost", "pair_id": "p", "image_a": "images/00/missing.png", "image_b": b1}])
    kept, rejected, report = apply_rules(quads, [{"rule": "dedup", "threshold": 2.0}], RuleContext(Judgments([]), run))
    assert list(kept.quad_id) == ["first", "other"]
    assert dict(zip(rejected.quad_id, rejected.reason, strict=True)) == {"same": "images a and b near-identical", "again": "repeats an earlier quad",
                                                             "lost": "image a unreadable"}
    assert report[0]["removed"] == 3 and report[0]["checked"] == 5


def test_another_rubric_or_a_regenerated_image_is_judged_again(tmp_path):
    from instructengine.annotate import OracleJudge, annotate, annotation_tasks
    run = make_run(tmp_path / "run", n_pairs=1, per_side=1)
    pairs, images = load(run)
    judge = OracleJudge()
    tasks = annotation_tasks(pairs, images, [judge.name])
    assert annotate(judge, tasks, run)["ok"] == len(tasks)
    before = sum(1 for _ in RecordLog(run.annotations))
    annotate(judge, tasks, run)   # nothing changed: nothing asked
    assert sum(1 for _ in RecordLog(run.annotations)) == before
    judge.rubric = "sandbox-v2"   # another rubric version: every judgment again, under it
    annotate(judge, tasks, run)
    latest = RecordLog(run.annotations).latest()
    assert sum(1 for _ in RecordLog(run.annotations)) == 2 * before and {r["rubric"] for r in latest.values()} == {"sandbox-v2"}
    images[0] = images[0] | {"sha256": "0" * 64}   # image 0 made again (another hash under the same id): only its tasks
    annotate(judge, annotation_tasks(pairs, images, [judge.name]), run)
    again = [r for r in RecordLog(run.annotations)][2 * before:]
    assert again and {r["image_id"] for r in again} == {images[0]["id"]}


def test_records_lacking_a_field_are_named(tmp_path):
    "A hand-edited or foreign images.jsonl / instructions.jsonl: the stage names the file, the record and the missing field."
    run = make_run(tmp_path, n_pairs=2, per_side=1)
    recs = [json.loads(line) for line in run.image_records.read_text().splitlines()]
    del recs[1]["path"]
    run.image_records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match=r"images.jsonl: record 'sandbox/p#0\|b\|0' lacks 'path'"):
        run_annotate(AnnotateConfig(run_dir=str(run.root), judges=["oracle"], rules=[{"rule": "follows_own"}]))
    pairs = [json.loads(line) for line in run.instructions.read_text().splitlines()]
    del pairs[0]["b"]
    run.instructions.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    from instructengine.generate import GenerateConfig, run_generate
    for stage, cfg in ((run_annotate, AnnotateConfig(run_dir=str(run.root), judges=["oracle"], rules=[{"rule": "follows_own"}])),
                       (run_generate, GenerateConfig(run_dir=str(run.root)))):
        with pytest.raises(ValueError, match=r"instructions.jsonl: record 'sandbox/p#0' lacks 'b'; every record there needs id, a, b"):
            stage(cfg)
