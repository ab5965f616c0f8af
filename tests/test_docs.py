"""The docs stay an index the code can point at: every page is listed in docs/README.md, every
`docs/<page>.md#<anchor>` a comment or doc cites exists, and code cites papers by name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "actors", "rollout", "learner", "reward_service", "feedback", "driver", "commands")


def _sources() -> list[Path]:
    code = [p for pkg in PACKAGES for p in (ROOT / pkg).glob("**/*.py")]
    return code + sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"] + sorted((ROOT / "configs").glob("**/*.yaml"))


def test_the_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    missing = [p for p in pages if f"]({p})" not in index]
    assert not missing, f"docs/README.md does not index {missing}"


def anchors(page: Path) -> set[str]:
    """Explicit <a id="..."> anchors and GitHub's heading slugs."""
    text = page.read_text()
    found = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        found.add(re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-"))
    return found


def test_every_cited_docs_anchor_exists():
    bad = []
    for path in _sources():
        # a citation, not the pattern docs describe it with (`#d<N>`, `#p-...`)
        for page, anchor in re.findall(r"docs/([a-z_]+\.md)#([A-Za-z0-9_-]+)(?![-\w<.])", path.read_text()):
            target = ROOT / "docs" / page
            if not target.is_file() or anchor not in anchors(target):
                bad.append(f"{path.relative_to(ROOT)}: docs/{page}#{anchor}")
    assert not bad, "citations of missing docs anchors:\n" + "\n".join(sorted(set(bad)))


def test_code_and_docs_cite_papers_not_the_teams_reading_list():
    bad = [str(p.relative_to(ROOT)) for p in _sources() if re.search(r"\bseeds'", p.read_text())]
    assert not bad, f"'the seeds' is not a citation; name the paper: {bad}"
