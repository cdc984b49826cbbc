"""Sphinx configuration of the qvec_jax docs (MyST Markdown, as flax, optax and orbax).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (README, "Docs").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "qvec_jax"
author = "the qvec_jax developers"
copyright = "2026, the qvec_jax developers"  # noqa: A001

extensions = [
    "myst_nb",  # Markdown pages and the notebooks
    "sphinx.ext.autodoc",  # the API reference, from docstrings
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",  # the CLI reference, from qvec_jax.cli.build_parser
]

# .rst first: autosummary writes its generated API pages with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_autosummary_unused", "**.ipynb_checkpoints"]
root_doc = "index"

# Markdown: heading anchors so that [text](page.md#section) links are checked.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
# Notebooks render from their stored source; tests/test_notebooks.py executes them in CI.
# QVEC_DOCS_EXECUTE=1 executes them during the build instead (minutes on a CPU).
nb_execution_mode = "force" if os.environ.get("QVEC_DOCS_EXECUTE") == "1" else "off"
nb_execution_timeout = 1800

autosummary_generate = True
# Each object is documented once, on the page of the module that defines it (a
# package's __all__ re-exports would document it twice and break viewcode's links).
autodoc_default_options = {"members": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = ["tensorflow", "tensorflow_datasets", "torch", "timm", "transformers"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "qvec_jax"
html_static_path = []
suppress_warnings = [
    "myst.header",
    # sphinx-argparse's domain does not resolve MyST's any-xrefs: a note, not a broken link
    "myst.domains",
    # the notebooks' Colab install cell uses IPython's `!` and `%`: rendered without colour
    "misc.highlighting_failure",
]


# ---------------------------------------------------------------- the CLI's epilog
# sphinx-argparse reads descriptions and epilogs as reStructuredText; the epilog of
# `qvec --help` (exit codes) is plain preformatted text, so it is rendered verbatim by
# this directive, from the parser itself (``:noepilog:`` on the argparse directive).

from docutils import nodes  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402


class QvecEpilog(SphinxDirective):
    def run(self):
        from qvec_jax.cli import build_parser

        text = build_parser().epilog.rstrip()
        return [nodes.literal_block(text, text)]


def _skip_type_aliases(app, what, name, obj, skip, options):
    """Module-level type aliases (``Entry = tuple[str, View]``) are not API objects, and
    viewcode would file them under ``builtins``."""
    import types

    return True if isinstance(obj, types.GenericAlias) else None


def setup(app):
    app.add_directive("qvec-epilog", QvecEpilog)
    app.connect("autodoc-skip-member", _skip_type_aliases)
