"Notebooks run by papermill the way the README says: parameters injected, outputs into a run folder, never into nbs/."
import json
from pathlib import Path

import nbformat
import papermill as pm

NBS = Path(__file__).resolve().parents[1] / "nbs"


def test_index_tour_under_papermill(tmp_path):
    run = tmp_path / "runs" / "hello"
    (run / "notebooks").mkdir(parents=True)
    out = run / "notebooks" / "index.ipynb"
    pm.execute_notebook(str(NBS / "index.ipynb"), str(out), parameters={"run_dir": str(run), "n": 7, "word": "disc"},
                        cwd=str(NBS), kernel_name="python3", progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "n = 7" in injected[0].source
    recs = [json.loads(l) for l in (run / "hello.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == [f"disc {i}" for i in range(9)]   # 7, then the 2 added by the rerun with n + 2
    assert json.loads((run / "metrics.json").read_text()) == {"hello": {"records": 9}}
    assert "n: 9" in (run / "config.yaml").read_text()
