"""RecordStore and ImageStore against real processes: SIGKILL during appends, torn lines, two writers at once.

Each child is a separate Python process running the installed package. A writer prints the number of records
it has flushed after every `flush()` returns, so the parent knows which records were *completed* (fsynced)
before it killed the writer.
"""
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from instructengine.core import ImageStore, RecordLog, RecordStore

N = 400              # records a writer is asked for
PAYLOAD = 2_000      # bytes of payload per record
BIG_PAYLOAD = 200_000  # kill test: ~1 MB batches; the random kill tears a line in ~1 run of 10 (fsync dominates), the test below always does

WRITER = textwrap.dedent("""
    import sys, hashlib
    from instructengine.core import RecordStore
    path, tag, n, payload, batch, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    store = RecordStore(path, batch_size=batch)
    print("ready", flush=True)
    import os, time
    while go != "-" and not os.path.exists(go): time.sleep(0.001)
    todo = [i for i in range(n) if f"{tag}{i}" not in store.done_ids()]
    for k, i in enumerate(todo, 1):
        body = hashlib.sha256(f"{tag}{i}".encode()).hexdigest() * (payload // 64)
        store.append({"id": f"{tag}{i}", "i": i, "body": body, "sum": hashlib.sha256(body.encode()).hexdigest()})
        if k % batch == 0: print("flushed", i + 1, flush=True)   # append() flushed this batch before returning
    store.flush()
    print("flushed", n, flush=True)
    print("done", flush=True)
""")


@pytest.fixture
def start_writer(tmp_path):
    "Start writer processes; each reports flushed counts on stdout (drained by a thread), stderr goes to a file."
    procs = []
    def start(path, tag="r", n=N, batch=5, go="-", payload=PAYLOAD):
        err = open(tmp_path / f"writer-{tag}-{len(procs)}.err", "w+")
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(n), str(payload), str(batch), str(go)],
                             stdout=subprocess.PIPE, stderr=err, text=True)
        p.errors = lambda: (err.seek(0), err.read())[1]
        state = {"flushed": 0, "ready": threading.Event(), "odd": []}
        def read():
            for line in p.stdout:                      # a report cut short by the kill is kept aside, not counted
                if line == "ready\n": state["ready"].set()
                elif m := re.fullmatch(r"flushed (\d+)\n", line): state["flushed"] = int(m.group(1))
                elif line != "done\n": state["odd"].append(line)
        state["reader"] = threading.Thread(target=read, daemon=True)
        state["reader"].start()
        procs.append((p, err, state))
        return p, state
    yield start
    for p, err, state in procs:
        if p.poll() is None: p.kill()
        p.wait()
        state["reader"].join(5)
        p.stdout.close()
        err.close()


def read_lines(path):
    "Every line of the file, parsed; fails the test on a line that is not a whole, intact record."
    raw = Path(path).read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "file does not end with a newline"
    recs = []
    for n, line in enumerate(raw.split(b"\n")[:-1]):
        rec = json.loads(line)                                  # raises on a torn or glued line
        assert hashlib.sha256(rec["body"].encode()).hexdigest() == rec["sum"], f"line {n}: payload damaged"
        recs.append(rec)
    return recs


def kill_midway(p, state, min_flushed=50):
    "Wait until the writer has flushed a few batches, then SIGKILL it at a random moment."
    deadline = time.time() + 120
    while state["flushed"] < min_flushed:
        assert p.poll() is None, p.errors()
        assert time.time() < deadline, "writer made no progress"
        time.sleep(0.002)
    time.sleep(random.uniform(0, 0.05))
    p.send_signal(signal.SIGKILL)
    p.wait()
    state["reader"].join(5)                                     # every report the writer made is read
    return state["flushed"]


def test_sigkill_while_appending_then_resume(tmp_path, start_writer):
    path = tmp_path / "records.jsonl"
    p, state = start_writer(path, payload=BIG_PAYLOAD)
    completed, odd = kill_midway(p, state), state["odd"]
    assert p.returncode == -signal.SIGKILL

    torn = not path.read_bytes().endswith(b"\n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        store = RecordStore(path)
    assert any("torn last line" in str(x.message) for x in w) == torn
    recs = read_lines(path)                                     # the torn line is gone, the rest intact
    ids = [r["i"] for r in recs]
    assert len(ids) == len(set(ids)), "a record was duplicated"
    assert ids == list(range(len(ids))), "the records on disk are not a prefix of what was appended"
    assert len(ids) >= completed, f"{completed} records were flushed before the kill, only {len(ids)} survived"
    assert store.done_ids() == {f"r{i}" for i in ids}

    p, state = start_writer(path, payload=BIG_PAYLOAD)          # resume: only the missing records are written
    assert p.wait(timeout=120) == 0, p.errors()
    recs = read_lines(path)
    assert [r["i"] for r in recs] == list(range(N))
    print(f"killed after {completed} flushed, {len(ids)} on disk, torn tail: {torn}, odd reports: {odd}")


def test_torn_line_from_killed_writer_never_glues_onto_next_append(tmp_path):
    "Deterministic: the writer dies with exactly half a batch written, then a second process appends."
    path = tmp_path / "records.jsonl"
    code = textwrap.dedent("""
        import os, signal, sys
        from instructengine.core import RecordStore
        store = RecordStore(sys.argv[1], batch_size=100)
        store.extend({"id": i, "v": "x" * 50} for i in range(10))
        store.flush()
        store.extend({"id": i, "v": "y" * 50} for i in range(10, 20))
        real_write = os.write
        def half_then_die(fd, data):                 # the kill lands in the middle of the batch's write
            real_write(fd, bytes(data[: len(data) // 2 + 7]))   # ends inside a line
            os.kill(os.getpid(), signal.SIGKILL)
        os.write = half_then_die
        store.flush()
    """)
    assert subprocess.run([sys.executable, "-c", code, str(path)]).returncode == -signal.SIGKILL
    raw = path.read_bytes()
    assert not raw.endswith(b"\n")
    intact = raw[: raw.rindex(b"\n") + 1].count(b"\n")          # 10 + the whole lines of the half batch
    assert 10 < intact < 20

    code2 = ("import sys; from instructengine.core import RecordStore\n"
             "with RecordStore(sys.argv[1]) as s: s.extend({'id': i, 'v': 'z'} for i in range(100, 105))")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code2, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "dropped a torn last line" in out.stderr
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["id"] for r in lines] == list(range(intact)) + list(range(100, 105))


def test_two_writers_at_once(tmp_path, start_writer):
    path, go = tmp_path / "records.jsonl", tmp_path / "go"
    writers = [start_writer(path, tag=t, n=300, batch=b, go=go) for t, b in (("a", 7), ("b", 3))]
    for p, state in writers: assert state["ready"].wait(60), p.errors()
    go.touch()
    reader, seen = RecordLog(path), 0                            # read-only: never locks, never truncates
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # a reader must never meet a partial line
        while any(p.poll() is None for p, _ in writers):
            n = len(reader.done_ids())
            assert n >= seen
            seen = n
    for p, _ in writers: assert p.returncode == 0, p.errors()
    recs = read_lines(path)
    assert len(recs) == 600 and len({r["id"] for r in recs}) == 600
    for tag in "ab":                                             # each writer's records in its own order
        assert [r["i"] for r in recs if r["id"][0] == tag] == list(range(300))
    assert len(reader) == 600


def test_killed_writer_beside_a_live_one(tmp_path, start_writer):
    "Writer a is SIGKILLed mid-batch while writer b is still appending: b's later appends cut a's torn tail, no line is damaged."
    path, go = tmp_path / "records.jsonl", tmp_path / "go"
    (pa, sa), (pb, sb) = start_writer(path, tag="a", n=2000, batch=5, go=go), start_writer(path, tag="b", n=1500, batch=3, go=go)
    for p, s in ((pa, sa), (pb, sb)): assert s["ready"].wait(60), p.errors()
    go.touch()
    completed = kill_midway(pa, sa, min_flushed=20)
    assert pb.poll() is None, "writer b finished before a was killed: the scenario did not happen"
    assert pb.wait(timeout=180) == 0, pb.errors()
    recs = read_lines(path)                                     # b's appends left the file whole, with no repair on open
    a = [r["i"] for r in recs if r["id"][0] == "a"]
    assert a == list(range(len(a))) and len(a) >= completed
    assert [r["i"] for r in recs if r["id"][0] == "b"] == list(range(1500))


def test_image_store_killed_before_rename_leaves_no_partial_png(tmp_path):
    code = textwrap.dedent("""
        import os, signal, sys
        import numpy as np
        from instructengine.core import ImageStore
        store = ImageStore(sys.argv[1])
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)    # die between the write and the rename
        store.put(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    """)
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == -signal.SIGKILL
    assert list(tmp_path.rglob("*.png")) == []                    # only a hidden temp file is left behind
    assert [p.name.startswith(".") for p in tmp_path.rglob("*.tmp")] == [True]
    store = ImageStore(tmp_path)
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    s = store.put(img)
    assert np.array_equal(np.asarray(store.get(s.sha256)), img)


def test_status_counts_follow_the_latest_record_of_each_id(tmp_path):
    with RecordStore(tmp_path / "r.jsonl") as s:
        s.extend([{"id": 1, "status": "error"}, {"id": 2, "status": "ok"}, {"id": 3, "status": "error"}])
    with RecordStore(tmp_path / "r.jsonl") as s: s.append({"id": 1, "status": "ok"})
    assert RecordLog(tmp_path / "r.jsonl").status_counts() == {"ok": 2, "error": 1}


def test_a_damaged_image_is_replaced_by_putting_it_again(tmp_path):
    import numpy as np
    from instructengine.core import ImageStore, ImageStoreError
    store = ImageStore(tmp_path / "images")
    im = (np.arange(48).reshape(4, 4, 3) * 5).astype(np.uint8)
    st = store.put(im)
    st.path.write_bytes(st.path.read_bytes()[:20])   # a torn file
    with pytest.raises(ImageStoreError, match="corrupt"): store.get(st)
    assert store.put(im) == st and store.get(st, verify=True).size == (4, 4)
