"""The docs site's own checks: the internal-link checker CI runs on the built site finds
what it should, and every page the README links to exists (the site itself is built with
``-W`` in ``.ci/run``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_links", ROOT / "docs" / "check_links.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_link_checker_finds_missing_pages_and_anchors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="sub/page.html#here">ok</a> <a href="sub/page.html#gone">anchor</a>'
        '<a href="missing.html">page</a> <a href="https://example.com/x.html">external</a>'
        '<a href="#top">self</a><h1 id="top">t</h1>'
    )
    (tmp_path / "sub" / "page.html").write_text('<section id="here"><a href="../index.html">'
                                                 "up</a></section>")  # fmt: skip
    bad = _checker().broken_links(tmp_path)
    assert bad == [
        "index.html: sub/page.html#gone (no such anchor)",
        "index.html: missing.html (no such file)",
    ]
    assert _checker().main([str(tmp_path)]) == 1
    (tmp_path / "index.html").write_text('<a href="sub/page.html#here">ok</a>')
    assert _checker().main([str(tmp_path)]) == 0


def test_readme_links_into_docs_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(set(links)) >= 12, links  # one per page of the site
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README links to missing docs pages: {missing}"
    toc = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    orphans = [p.stem for p in (ROOT / "docs").glob("*.md") if p.stem != "index"
               and not re.search(rf"^{p.stem}$", toc, re.M)]  # fmt: skip
    assert not orphans, f"docs pages in no toctree: {orphans}"
