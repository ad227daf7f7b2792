"Taxonomy stage: validation, the offline and sandbox writers, the LLM writers over real HTTP, and resuming a killed run."
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _loopback import completion, transformers_serve
from instructengine.core import RecordStore
from instructengine.taxonomy import (DIMENSIONS, ChatWriterConfig, OpenAIChatWriter, SandboxWriter, Taxonomy, TaxonomyError,
                                     TemplateWriter, TransformersWriter, extract_json, sandbox_taxonomy, verify_sandbox_pair,
                                     write_pairs)

ROOT = Path(__file__).resolve().parents[1]
MINI = {"name": "mini", "slots": {"counts": ["one", "two", "three"], "attributes": ["red", "blue", "wooden"],
                                  "styles": ["a photograph", "a watercolor painting"], "counterfactuals": ["made of glass"]},
        "themes": [{"name": "food", "subtopics": [{"name": "fruit", "objects": ["apple", "pear", "plum"]}]}]}


def mini(**edit) -> dict:
    d = json.loads(json.dumps(MINI))
    for path, value in edit.items():
        node, *keys = path.split("__")
        tgt = d if node == "root" else d["themes"][0] if node == "theme" else d["themes"][0]["subtopics"][0]
        tgt[keys[0]] = value
    return d


@pytest.mark.parametrize("data, message", [
    (mini(theme__subtopics=[{"name": "fruit", "objects": ["apple"]}, {"name": "Fruit", "objects": ["pear"]}]), "subtopics[1].name: duplicate subtopic 'Fruit'"),
    (mini(sub__name="  "), "themes[0].subtopics[0].name: expected a non-empty name"),
    (mini(root__themes=[MINI["themes"][0], MINI["themes"][0]]), "themes[1].name: duplicate theme 'food'"),
    (mini(sub__colours=["red"]), "subtopics[0].colours: unknown slot"),
    (mini(sub__objects=["apple", "apple"]), "subtopics[0].objects[1]: duplicate 'apple'"),
    (mini(sub__objects=[]), "subtopics[0].objects: expected a non-empty list"),
    ({"name": "x", "themes": [{"name": "t", "subtopics": [{"name": "s"}]}]}, "no objects"),
    ({"name": "x", "themes": []}, "themes: expected a non-empty list"),
    (mini(root__slots={"counts": ["two", "12"]}), "slots.counts[1]: '12' is not a count from one to six"),
    (mini(sub__counts=["0"]), "subtopics[0].counts[0]: '0' is not a count from one to six"),
])
def test_validation_errors_name_the_item(data, message):
    with pytest.raises(TaxonomyError, match=message.replace("[", r"\[").replace("]", r"\]")): Taxonomy.from_dict(data)


def test_default_taxonomy_and_yaml_json_round_trip(tmp_path):
    t = Taxonomy.default()
    assert len(t.themes) == 20 and all(len(th.subtopics) == 20 for th in t.themes)
    assert len({s.id for s in t.subtopics}) == 400
    for suffix in (".yaml", ".json"):
        back = Taxonomy.load(t.save(tmp_path / f"t{suffix}"))
        assert back.to_dict() == t.to_dict() and [s.vocab for s in back.subtopics] == [s.vocab for s in t.subtopics]


def test_template_writer_2000_pairs_one_structured_edit_each(tmp_path):
    t = Taxonomy.default()
    counts = write_pairs(TemplateWriter(t), t, tmp_path / "raw.jsonl", n=5)
    recs = list(RecordStore(tmp_path / "raw.jsonl").latest().values())
    assert counts == {"ok": 2000} and len(recs) == 2000
    mix = {d: sum(r["dimension"] == d for r in recs) for d in DIMENSIONS}
    assert all(600 <= v <= 740 for v in mix.values()), mix
    for r in recs:
        assert r["a"] != r["b"] and len(r["diff"]) == 1, r
        d = r["diff"][0]
        slot = "count" if r["kind"] == "count" else r["kind"]
        assert d["slot"] == slot and r["spec_b"].get(slot) == d["value_b"] and r["spec_a"].get(slot) == d["value_a"]


def test_sandbox_pairs_all_verified_and_outside_shapesbench(tmp_path):
    from instructengine.sandbox import Scene, bench_keys
    t = sandbox_taxonomy()
    counts = write_pairs(SandboxWriter(), t, tmp_path / "raw.jsonl", n=8)
    recs = list(RecordStore(tmp_path / "raw.jsonl").latest().values())
    assert counts == {"ok": 8 * 35}
    assert all(verify_sandbox_pair(r) for r in recs)
    keys = bench_keys()
    assert not any(Scene.from_dict(r["spec_a"]).key() in keys or Scene.from_dict(r["spec_b"]).key() in keys for r in recs)
    bad = dict(recs[0], diff=[{"slot": "groups[0].color", "value_a": "red", "value_b": "blue"}])
    assert verify_sandbox_pair(bad) is (bad["diff"] == recs[0]["diff"])


def test_extract_json_tolerates_fences_and_prose():
    assert extract_json('Sure! ```json\n{"a": {"b": "}"}}\n``` hope it helps') == {"a": {"b": "}"}}
    assert extract_json('{broken} then {"ok": 1}') == {"ok": 1}
    with pytest.raises(ValueError, match="no JSON object"): extract_json("no braces here")


# ---- LLM writers over real HTTP on loopback

def sub():
    return Taxonomy.from_dict(MINI).subtopics[0]


def test_retry_after_429_then_cache(scripted_server, tmp_path, monkeypatch):
    good = completion(json.dumps({"instructions": ["a red apple on a plate", "two pears in a bowl"]}))
    srv, url = scripted_server([(429, b'{"error": "slow down"}'), (503, b"busy"), (200, good)])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    w = OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m", backoff=0.01, cache_dir=str(tmp_path / "cache")))
    out = w.write_base(sub(), 2)
    assert [r["status"] for r in out] == ["ok", "ok"] and out[0]["text"] == "a red apple on a plate"
    assert len(srv.requests) == 3 and srv.requests[0]["auth"] == "Bearer sk-secret-123"
    assert srv.requests[0]["body"]["response_format"]["type"] == "json_schema"
    assert "sk-secret" not in repr(w) and "sk-secret" not in json.dumps(w.cfg.to_dict())
    again = OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m", cache_dir=str(tmp_path / "cache"))).write_base(sub(), 2)
    assert again == out and len(srv.requests) == 3          # answered from the disk cache


def test_malformed_output_is_retried_then_recorded(scripted_server):
    srv, url = scripted_server([(200, completion("I would rather write a poem."))])
    w = OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m", max_parse_retries=2, backoff=0.01))
    r = w.write_contrast({"text": "a red apple"}, "content")
    assert r["status"] == "malformed" and r["raw"] == "I would rather write a poem." and "no JSON object" in r["error"]
    assert len(srv.requests) == 3
    srv.script = [(200, completion(json.dumps({"instruction": "a blue apple", "slot": "attribute", "value_a": "red", "value_b": "green"})))]
    r = OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m", max_parse_retries=0)).write_contrast({"text": "a red apple"}, "content")
    assert r["status"] == "malformed" and "does not occur" in r["error"]


def test_server_that_never_answers_times_out_into_a_record():
    with socket.socket() as s:                    # accepts connections, never replies
        s.bind(("127.0.0.1", 0)); s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        w = OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m", timeout=0.3, max_retries=1, backoff=0.01))
        t0 = time.time()
        out = w.write_base(sub(), 3)
    assert time.time() - t0 < 5
    assert [r["status"] for r in out] == ["timeout"] * 3 and "within 0.3 s" in out[0]["error"] and "after 2 tries" in out[0]["error"]


def test_http_400_is_not_retried(scripted_server):
    srv, url = scripted_server([(400, b'{"detail": "bad model"}')])
    r = OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m")).write_contrast({"text": "a red apple"}, "aesthetics")
    assert r["status"] == "http_error" and "bad model" in r["error"] and len(srv.requests) == 1


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    "A tiny Qwen2 chat model with random weights and a tokenizer trained here: a real model folder, no download."
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE()); bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["You write instructions for a text-to-image model.", '{"instructions": ["a red apple"]}'],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    m = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=m["vocab"], merges=[tuple(x) for x in m["merges"]], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": special[1:]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = tmp_path_factory.mktemp("tiny-llm")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    Qwen2ForCausalLM(cfg).save_pretrained(folder); tok.save_pretrained(folder)
    return folder


def test_transformers_writer_records_garbage_as_malformed(tiny_llm):
    w = TransformersWriter(str(tiny_llm), max_new_tokens=12, max_parse_retries=1)
    out = w.write_base(sub(), 2)
    assert [r["status"] for r in out] == ["malformed"] * 2 and out[0]["raw"] and out[0]["error"]


@pytest.mark.slow
def test_openai_writer_against_transformers_serve(tiny_llm, tmp_path):
    with transformers_serve(tmp_path, tiny_llm) as url:
        w = OpenAIChatWriter(ChatWriterConfig(base_url=url, model=str(tiny_llm), max_tokens=16, temperature=0.0, response_format="none",
                                              max_parse_retries=1, timeout=60))
        base = w.write_base(sub(), 2)
        con = w.write_contrast({"text": "a red apple"}, "counterfactual")
    assert [r["status"] for r in base] == ["malformed"] * 2 and base[0]["raw"], base   # a real reply: random tokens, no JSON
    assert con["status"] == "malformed" and con["raw"]


# ---- killed mid-run, rerun: each pair exactly once

SCRIPT = """
import sys, time
from instructengine.taxonomy import Taxonomy, TemplateWriter, write_pairs
class Slow(TemplateWriter):
    def write_contrast(self, base, dimension, seed=0):
        time.sleep(float(sys.argv[2])); return super().write_contrast(base, dimension, seed)
t = Taxonomy.default()
print(write_pairs(Slow(t), t, sys.argv[1], n=5), flush=True)
"""


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    script = tmp_path / "w.py"; script.write_text(SCRIPT)
    raw, clean = tmp_path / "raw.jsonl", tmp_path / "clean.jsonl"
    env = dict(os.environ, INSTRUCTENGINE_PROGRESS="0")
    p = subprocess.Popen([sys.executable, str(script), str(raw), "0.004"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not raw.exists() or raw.read_bytes().count(b"\n") < 300): time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    lines_at_kill = raw.read_bytes().count(b"\n")
    assert 300 <= lines_at_kill < 2000
    subprocess.run([sys.executable, str(script), str(raw), "0"], env=env, check=True)
    subprocess.run([sys.executable, str(script), str(clean), "0"], env=env, check=True)
    ids = [json.loads(line)["id"] for line in raw.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 2000
    resumed, fresh = RecordStore(raw).latest(), RecordStore(clean).latest()
    assert resumed == fresh


def test_failed_pairs_are_written_again_on_rerun(scripted_server, tmp_path):
    srv, url = scripted_server([(500, b"down")])
    t = Taxonomy.from_dict(MINI)
    w = OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m", max_retries=0))
    assert write_pairs(w, t, tmp_path / "raw.jsonl", n=2) == {"http_error": 2}
    srv.script = [(200, completion(json.dumps({"instructions": ["a red apple", "two pears"]}))),
                  (200, completion(json.dumps({"instruction": "a blue apple", "slot": "attribute", "value_a": "red", "value_b": "blue"})))]
    srv.requests.clear()
    assert write_pairs(w, t, tmp_path / "raw.jsonl", n=2, cycle="content") == {"ok": 2}
    assert len(srv.requests) == 3
    latest = RecordStore(tmp_path / "raw.jsonl").latest()
    assert set(latest) == {"food/fruit#0", "food/fruit#1"} and latest["food/fruit#1"]["b"] == "a blue apple"
    assert write_pairs(w, t, tmp_path / "raw.jsonl", n=2, cycle="content") == {"ok": 2} and len(srv.requests) == 3   # nothing left


def test_stage_survives_a_writer_that_fails_everything(scripted_server, tmp_path):
    from instructengine.taxonomy import finalize_pairs, pair_table, plot_pair_counts
    srv, url = scripted_server([(500, b"down")])
    t = Taxonomy.from_dict(MINI)
    write_pairs(OpenAIChatWriter(ChatWriterConfig(base_url=url, model="m", max_retries=0)), t, tmp_path / "raw.jsonl", n=3)
    s = finalize_pairs(tmp_path / "raw.jsonl", tmp_path / "instructions.jsonl", encoder=_Encoder())
    assert s["records"] == 3 and s["ok"] == 0 and s["failed"] == {"http_error": 3} and s["kept"] == 0
    table = pair_table(tmp_path / "instructions.jsonl")
    assert table.empty and plot_pair_counts(table) is None


class _Encoder:
    "Never called when there is nothing to embed."
    def encode(self, *a, **k): raise AssertionError("nothing to encode")


def test_a_cached_malformed_reply_is_asked_again_on_rerun(scripted_server, tmp_path):
    "The disk cache keeps what the model said, but a reply that did not validate is not an answer: a rerun asks again."
    srv, url = scripted_server([(200, completion("I would rather write a poem."))])
    cfg = ChatWriterConfig(base_url=url, model="m", max_parse_retries=0, cache_dir=str(tmp_path / "cache"))
    assert OpenAIChatWriter(cfg).write_base(sub(), 2)[0]["status"] == "malformed" and len(srv.requests) == 1
    srv.script = [(200, completion(json.dumps({"instructions": ["a red apple on a plate", "two pears in a bowl"]})))]
    again = OpenAIChatWriter(cfg).write_base(sub(), 2)
    assert [r["status"] for r in again] == ["ok", "ok"] and len(srv.requests) == 2
    assert OpenAIChatWriter(cfg).write_base(sub(), 2) == again and len(srv.requests) == 2   # a valid reply is served from the cache


def test_another_plan_writes_its_own_pairs(tmp_path):
    "Fewer pairs, another seed or another taxonomy in the same folder: the output holds this run's plan only."
    from instructengine.taxonomy import TemplateWriter, finalize_pairs
    t = Taxonomy.from_dict(MINI)
    raw, out, w = tmp_path / "raw.jsonl", tmp_path / "instructions.jsonl", TemplateWriter(t)
    write_pairs(w, t, raw, n=3)
    first = RecordStore(raw).latest()
    ids = lambda n: {f"{s.id}#{i}" for s in t.subtopics for i in range(n)}
    assert finalize_pairs(raw, out, encoder=_Words(), ids=ids(1))["records"] == 1
    assert len(out.read_text().splitlines()) == 1
    write_pairs(w, t, raw, n=3, seed=1)   # another seed: every pair written again, the seed recorded
    latest = RecordStore(raw).latest()
    assert {r["seed"] for r in latest.values()} == {1} and any(latest[i]["a"] != first[i]["a"] for i in first)
    other = Taxonomy.from_dict(mini(subtopic__name="berries"))   # another taxonomy in the same folder
    write_pairs(TemplateWriter(other), other, raw, n=2)
    plan = {f"{s.id}#{i}" for s in other.subtopics for i in range(2)}
    assert finalize_pairs(raw, out, encoder=_Words(), ids=plan)["records"] == 2
    assert {json.loads(line)["id"] for line in out.read_text().splitlines()} <= plan and len(RecordStore(raw).latest()) == 5


class _Words:
    "A stand-in sentence encoder: hashed bags of words (texts that share no word are far apart)."
    def encode(self, texts, **kw):
        import hashlib
        import numpy as np
        v = np.zeros((len(texts), 256))
        for i, t in enumerate(texts):
            for w in t.split(): v[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % 256] = 1.0
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
