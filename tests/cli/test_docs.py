"""The README and docs cite results files by name: each one must exist under benchmarks/results/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a results file as the docs cite it: `name_<date>....json` (also .log/.csv/.png/.md), with or without its folder
CITED = re.compile(r"`(?:benchmarks/results/)?([A-Za-z0-9_.-]*_20\d\d-\d\d-\d\d[A-Za-z0-9_.-]*\.(?:json|log|csv|png|md))`")


def test_every_cited_results_file_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    cited = {(doc.name, name) for doc in docs for name in CITED.findall(doc.read_text())}
    assert len(cited) > 60  # the pattern still finds the citations
    missing = sorted(f"{doc}: {name}" for doc, name in cited if not (ROOT / "benchmarks" / "results" / name).is_file())
    assert not missing, "cited but not in benchmarks/results/:\n" + "\n".join(missing)
