"""Check every internal link of the built docs site: the target page exists, and so does
the ``#anchor`` it names. External links (http, mailto) are not followed (CI is offline).

    python docs/check_links.py docs/_build/html

Sphinx's ``-W`` already fails on a broken cross-reference it resolves itself; this catches
what it does not resolve: raw Markdown links to pages and anchors, links inside the
generated pages and notebooks. Exit 1 with one line per broken link.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def broken_links(site: Path) -> list[str]:
    """``"page.html: href"`` for every internal link whose target or anchor is missing."""
    pages = {p.resolve(): _parse(p) for p in site.rglob("*.html")}
    bad = []
    for path, page in sorted(pages.items()):
        for href in page.links:
            url = urlsplit(href)
            if url.scheme or url.netloc or href.startswith(("mailto:", "javascript:")):
                continue
            target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                bad.append(f"{path.relative_to(site.resolve())}: {href} (no such file)")
            elif url.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(url.fragment) not in ids:
                    bad.append(f"{path.relative_to(site.resolve())}: {href} (no such anchor)")
    return bad


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python docs/check_links.py BUILT_HTML_DIR (e.g. docs/_build/html)")
        return 2
    bad = broken_links(Path(argv[0]))
    for line in bad:
        print(f"broken link: {line}")
    n = sum(1 for _ in Path(argv[0]).rglob("*.html"))
    print(f"{n} pages, {len(bad)} broken internal links")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
