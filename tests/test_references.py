"""docs/references.md: every paper the course cites, by arXiv id; no file names a private brief."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCES = (REPO / "docs" / "references.md").read_text()
ARXIV_ID = r"\b\d{4}\.\d{4,5}\b"


def project_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return [REPO / f for f in listed if (REPO / f).is_file()]


def test_every_arxiv_id_cited_in_the_course_is_on_the_references_page():
    cited = set()
    for path in REPO.glob("notebooks/*.ipynb"):
        cited |= set(re.findall(r"arXiv[: ]+(\d{4}\.\d{4,5})", path.read_text()))
    for path in [*REPO.glob("course/*.py"), *REPO.glob("minimoe/**/*.py"), REPO / "README.md"]:
        cited |= set(re.findall(r"arXiv[: ]+(\d{4}\.\d{4,5})", path.read_text()))
    listed = set(re.findall(ARXIV_ID, REFERENCES))
    assert cited <= listed, sorted(cited - listed)
    assert len(listed) >= 15


def test_each_paper_named_on_the_course_map_has_an_id():
    for name in ("Shazeer", "Switch", "Mixtral", "GW-MoE", "Huang", "Li et al", "GShard"):
        rows = [line for line in REFERENCES.splitlines() if name in line and line.startswith("|")]
        assert rows and all(re.search(ARXIV_ID, r) for r in rows), name
    assert "docs/references.md" in (REPO / "index.md").read_text()


def test_no_project_file_names_the_private_briefing():
    brief = "PAPERS" + ".md"  # spelled apart, so this file does not name it either
    named = [p.relative_to(REPO) for p in project_files() if brief in p.read_text(errors="ignore")]
    assert not named, named
