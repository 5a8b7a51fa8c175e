"""README and docs/: every relative link resolves, every method ``dire-apply --list`` names has its
page, README stays short enough to read, and CI's commands are still where .ci/run reads them."""
import re
from pathlib import Path

import pytest

from dire_plugin.hooks.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: ``[text](target)``; images too. Absolute URLs are not checked (no network here).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for target in _links(page):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path = target.split("#")[0]
        if not path:
            continue
        assert (page.parent / path).resolve().exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_every_method_has_its_page_and_a_row_in_readme():
    readme = (ROOT / "README.md").read_text()
    for method in METHODS:
        page = ROOT / "docs" / "methods" / f"{method}.md"
        assert page.is_file(), f"dire-apply --list names {method}, but {page.relative_to(ROOT)} is missing"
        assert f"(docs/methods/{method}.md)" in readme, f"README's methods table does not link {method}'s page"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_ci_finds_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    for heading in ("## Install", "## Test", "## Run the main job"):
        block = readme[readme.index(heading):]
        assert "```bash" in block.split("\n## ")[0], f"{heading} has no bash block for .ci/run"
