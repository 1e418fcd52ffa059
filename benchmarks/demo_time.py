"""How long `fewstep demo` (the README's first command, after its install step) takes from an empty cache, with
its breakdown, and how long loading a shipped card takes.

Runs `python -m fewstep demo` in a fresh process with an empty FEWSTEP_CACHE (so the reference solve is part of
it) and reads the demo's own timing lines; then, in another fresh process, times `load_card` and
`resolve_method("auto", …)` of the shipped digits NFE 5 card (the imports excluded). Writes
`benchmarks/results/demo_time.json` / `.md`. Run it on an idle machine: the target is under 60 s on 2 cores.

    python benchmarks/demo_time.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"
LOAD = """
import time, json
from fewstep.learned.card import load_card
from fewstep.methods import resolve_method
from fewstep.models import load_model
from fewstep.shipped import shipped_cards
model = load_model("digits")
card = next(c for c in shipped_cards() if c.set == "digits" and c.nfe == 5)
t0 = time.perf_counter(); load_card(card.path, model); t1 = time.perf_counter()
resolve_method("auto", model, nfe=5); t2 = time.perf_counter()
print(json.dumps({"load_card_ms": 1e3 * (t1 - t0), "auto_ms": 1e3 * (t2 - t1)}))
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FEWSTEP_CACHE": str(Path(tmp) / "cache")}
        began = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "fewstep", "demo", "--out", str(Path(tmp) / "demo"),
                              "--no-progress"], capture_output=True, text=True, env=env)
        total = time.perf_counter() - began
        if run.returncode:
            sys.exit(run.stdout + run.stderr)
    parts = {}
    for key, pattern in (("reference", r"reference solve of \d+ samples: ([\d.]+) s"),
                         ("classic sweep", r"classic solvers at NFE [^:]*: ([\d.]+) s"),
                         ("table and plots", r"table and plots: ([\d.]+) s"),
                         ("demo (in process)", r"demo finished in ([\d.]+) s")):
        found = re.search(pattern, run.stdout)
        parts[key] = float(found.group(1)) if found else None
    live = re.search(r"learned live: .* in ([\d.]+) s", run.stdout)
    parts["live gmm card (training)"] = float(live.group(1)) if live else None
    load = json.loads(subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                                     check=True).stdout)
    result = {"total_seconds": total, "breakdown_seconds": parts, **load, "cpus": os.cpu_count(),
              "command": "python -m fewstep demo (empty FEWSTEP_CACHE)"}
    OUT.joinpath("demo_time.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"| {k} | {v:.1f} |" for k, v in parts.items() if v is not None]
    OUT.joinpath("demo_time.md").write_text(
        "# `fewstep demo` from an empty cache (python benchmarks/demo_time.py)\n\n"
        f"Total, process start to exit: **{total:.1f} s** on {os.cpu_count()} CPU cores.\n\n"
        "| part | seconds |\n|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Loading a shipped card: {load['load_card_ms']:.1f} ms (`load_card`), choosing it with `auto`: "
        f"{load['auto_ms']:.1f} ms.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
