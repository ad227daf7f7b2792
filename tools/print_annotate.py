"Print the annotation stage's figures from a run folder's metrics.json (used by `make sandbox`)."
import json
import sys
from pathlib import Path

m = json.loads((Path(sys.argv[1]) / "metrics.json").read_text())["annotate"]
print(f"images {m['images']}; ok judgments {m['judged']}; candidate quads {m['candidates']}")
for r in m["rules"]:
    print(f"  rule {r['rule']:<12} removed {r['removed']:>4}  {json.dumps(r['reasons'])}")
print(f"quads {m['quads']}; pairs {m['pairs']} {json.dumps(m['pairs_by_source'])}; seconds {json.dumps(m['seconds'])}")
