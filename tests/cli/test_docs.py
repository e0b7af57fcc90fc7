"""The README and docs cite results files by name: each one must exist under benchmarks/results/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"`((?:gpu_hstu|ws_probe|variants_ab|sustained_ab|clock_probe|attn_ncu|graph_copy_probe|"
                   r"batch16_probe|compile_debug|aoti_load_repro|cpu_bench)[A-Za-z0-9_.-]*\.(?:json|log|csv))`")


def test_every_cited_results_file_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    cited = {(doc.name, name) for doc in docs for name in CITED.findall(doc.read_text())}
    assert len(cited) > 20  # the pattern still finds the citations
    missing = sorted(f"{doc}: {name}" for doc, name in cited if not (ROOT / "benchmarks" / "results" / name).is_file())
    assert not missing, "cited but not in benchmarks/results/:\n" + "\n".join(missing)
