"""The docs build, render (no reST, maths typeset) and document every public name."""

import ast
import html.parser
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _hook():
    spec = importlib.util.spec_from_file_location(
        "public_api", ROOT / "docs" / "hooks" / "public_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_is_documented():
    assert _hook().undocumented(ROOT / "docs") == []


def test_hook_catches_a_missing_entry(tmp_path):
    api = (ROOT / "docs" / "api.md").read_text()
    (tmp_path / "api.md").write_text(api.replace("::: sgld_optax.sgld\n", ""))
    problems = _hook().undocumented(tmp_path)
    assert any("sgld_optax.sgld has no" in p for p in problems)


HAS_MKDOCS = (shutil.which("mkdocs") is not None
              or importlib.util.find_spec("mkdocs") is not None)
needs_mkdocs = pytest.mark.skipif(not HAS_MKDOCS,
                                  reason="mkdocs is part of the test extra")


def _build(config, site):
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(config), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The docs site, built once for the tests of this module."""
    site = tmp_path_factory.mktemp("docs") / "site"
    return _build(ROOT / "mkdocs.yml", site), site


@needs_mkdocs
def test_docs_build_strict(site):
    result, site = site
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "api" / "index.html").exists()


# --- What a reader sees: no reST markup, no maths left as source. ----------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
        "meta", "param", "source", "track", "wbr"}
CODE = {"code", "pre", "kbd", "samp"}
HIDDEN = {"script", "style", "template"}

# Markup of reStructuredText (Sphinx roles and field lists, directives) and
# of maths that no renderer took up, as they read in the text of a page.
LITERAL = {
    "reST role": re.compile(
        r":(?:py:)?(?:func|class|math|meth|attr|mod|obj|exc|data|const|ref"
        r"|doc|term)s?:"),
    "reST field": re.compile(r":(?:param|type|raises?|returns?|rtype)\b[^:\n]*:"),
    "reST directive": re.compile(r"\.\.\s+[a-z][\w-]*::"),
    "backtick": re.compile(r"`+"),
    "doctest prompt": re.compile(r">>>"),
    "dollar": re.compile(r"\$+"),
    "TeX": re.compile(r"\\[A-Za-z]+|\\[()\[\]]"),
}


class _PageText(html.parser.HTMLParser):
    """Splits a page's visible text into prose and maths.

    Prose is the text outside code, scripts and the elements of class
    `arithmatex` that `pymdownx.arithmatex` wraps maths in; `maths` holds the
    text of each such element, `scripts` the `src` of each script, and
    `quoted` the first line of each quotation nested in a quotation (what a
    doctest's `>>>` becomes where it is read as Markdown, as in a section
    `Example:`, which Google style spells `Examples:`).
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []       # (tag, is maths)
        self.prose = []
        self.maths = []
        self.scripts = []
        self.quoted = []
        self._quote_opened = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.scripts.append(attrs["src"])
        if tag == "blockquote" and any(t == "blockquote" for t, _ in self.stack):
            self._quote_opened = True
        if tag in VOID:
            return
        maths = "arithmatex" in (attrs.get("class") or "").split()
        if maths and not any(m for _, m in self.stack):
            self.maths.append("")
        self.stack.append((tag, maths))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        if self._quote_opened and data.strip():
            self.quoted.append(data.strip().splitlines()[0])
            self._quote_opened = False
        tags = {t for t, _ in self.stack}
        if tags & HIDDEN:
            return
        if any(m for _, m in self.stack):
            self.maths[-1] += data
        elif not tags & CODE:
            self.prose.append(data)


def _parse(text: str) -> _PageText:
    page = _PageText()
    page.feed(text)
    page.close()
    return page


def render_problems(text: str) -> list[str]:
    """What a built page shows that is markup rather than rendered text."""
    page = _parse(text)
    prose = re.sub(r"\s+", " ", " ".join(page.prose))
    problems = []
    for kind, pattern in LITERAL.items():
        for m in pattern.finditer(prose):
            context = prose[max(0, m.start() - 30):m.end() + 30].strip()
            problems.append(f"{kind} {m.group(0)!r} in '...{context}...'")
    for line in page.quoted:
        problems.append(f"doctest read as Markdown {line!r} (a section "
                        "'Example:' that should be 'Examples:'?)")
    for maths in page.maths:
        # arithmatex's generic output, which the MathJax settings look for.
        m = maths.strip()
        if not ((m.startswith("\\(") and m.endswith("\\)"))
                or (m.startswith("\\[") and m.endswith("\\]"))):
            problems.append(f"maths element not in \\( \\) or \\[ \\]: {m!r}")
    if page.maths:
        srcs = [s.rsplit("/", 1)[-1] if "mathjax@" not in s else "MathJax"
                for s in page.scripts]
        if not ("mathjax.js" in srcs and "MathJax" in srcs
                and srcs.index("mathjax.js") < srcs.index("MathJax")):
            problems.append("maths without the MathJax settings followed by "
                            f"MathJax: scripts {page.scripts}")
    return list(dict.fromkeys(problems))


def _site_problems(site) -> dict:
    problems = {}
    for page in sorted(site.rglob("*.html")):
        found = render_problems(page.read_text())
        if found:
            problems[str(page.relative_to(site))] = found
    return problems


@needs_mkdocs
def test_built_pages_show_no_rest_markup_and_no_untypeset_maths(site):
    _, site = site
    # Every page was written (a strict build writes them all before it
    # fails on a warning; test_docs_build_strict reports the warning).
    for md in (ROOT / "docs").glob("*.md"):
        page = "index.html" if md.stem == "index" else f"{md.stem}/index.html"
        assert (site / page).exists(), page
    assert _site_problems(site) == {}

    # The settings select the elements arithmatex writes and its delimiters.
    settings = (site / "javascripts" / "mathjax.js").read_text()
    assert 'processHtmlClass: "arithmatex"' in settings
    assert r'inlineMath: [["\\(", "\\)"]]' in settings
    assert r'displayMath: [["\\[", "\\]"]]' in settings

    # Maths of docstrings is typeset like the pages' own: inline maths of
    # `Metrics`, the display of `sgld`'s update.
    api = _parse((site / "api" / "index.html").read_text())
    assert r"\(\|g\|_2 = \|\tfrac{\epsilon}{2} n\beta\, m\odot G\odot" \
           r"\nabla L\|_2\)" in api.maths
    assert any(m.startswith("\\[\nw \\leftarrow w - \\frac{\\epsilon}{2}")
               for m in api.maths)
    assert len(api.maths) >= 100


def test_render_problems_names_each_kind_of_leftover():
    clean = (
        '<script src="../javascripts/mathjax.js"></script>'
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/'
        'tex-mml-chtml.js"></script>'
        '<p>Step <span class="arithmatex">\\(\\sqrt{\\epsilon}\\)</span> of '
        '<code>so.sgld</code>, in <code>$HOME</code> and <code>\\frac</code>'
        '<br/></p><div class="arithmatex">\\[\na^2 &lt; b\n\\]</div>'
        '<pre><code>&gt;&gt;&gt; x = 1  # `x` costs $1, :math:`x`</code></pre>'
        '<script>let s = "$\\\\frac";</script>')
    assert render_problems(clean) == []

    def kinds(html_text):
        return {p.split(" '")[0] for p in render_problems(clean + html_text)}

    assert kinds("<p>see :func:<code>sgld</code></p>") == {"reST role"}
    assert kinds("<p>:param x: the input</p>") == {"reST field"}
    assert kinds("<p>is .. math:: \\frac{1}{2}</p>") == {
        "reST directive", "TeX"}
    assert kinds("<p>the ``x`` array</p>") == {"backtick"}
    assert kinds("<p>&gt;&gt;&gt; x = 1</p>") == {"doctest prompt"}
    assert kinds("<p>as $\\alpha$ says</p>") == {"dollar", "TeX"}
    assert kinds("<p>as $x$ says</p>") == {"dollar"}
    assert kinds("<p>as \\(x\\) says</p>") == {"TeX"}
    assert render_problems(clean + "<blockquote><blockquote><blockquote><p>"
                           "import jax\nx = 1</p></blockquote></blockquote>"
                           "</blockquote>") == [
        "doctest read as Markdown 'import jax' (a section 'Example:' that "
        "should be 'Examples:'?)"]
    assert kinds('<span class="arithmatex">$x$</span>') == {
        "maths element not in \\( \\) or \\[ \\]:"}
    no_settings = clean.replace("mathjax.js", "extra.js")
    assert render_problems(no_settings)[0].startswith(
        "maths without the MathJax settings")


MINI_MODULE = '''
def rest(x):
    """Like :func:`markdown`, with :math:`x^2`.

    .. math:: y = \\\\frac{x}{2}
    """


def markdown(x):
    r"""Returns $\\sqrt{x}$ of `x`.

    $$
    y = \\frac{x}{2}
    $$

    Examples:
        >>> markdown(4)
        2.0
    """
'''


@needs_mkdocs
def test_the_docs_configuration_renders_markdown_and_shows_rest(tmp_path):
    """A two-page site with the project's configuration: a Markdown
    docstring comes out as typeset maths, a reST one is caught."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (tmp_path / "mini_docs_module.py").write_text(MINI_MODULE)
    docs = tmp_path / "docs"
    (docs / "javascripts").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "javascripts" / "mathjax.js",
                docs / "javascripts")
    (docs / "index.md").write_text("# Mini\n\n::: mini_docs_module.markdown\n")
    (docs / "rest.md").write_text("# Rest\n\n::: mini_docs_module.rest\n")
    config.update(docs_dir=str(docs), nav=["index.md", "rest.md"])
    config.pop("hooks")
    config.pop("exclude_docs", None)
    handler = next(p["mkdocstrings"] for p in config["plugins"]
                   if isinstance(p, dict) and "mkdocstrings" in p)
    handler["handlers"]["python"]["paths"] = [str(tmp_path)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))

    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    problems = _site_problems(tmp_path / "site")
    assert list(problems) == ["rest/index.html"]
    found = " ".join(problems["rest/index.html"])
    for leftover in ("':func:'", "':math:'", "'.. math::'", "'\\\\frac'"):
        assert leftover in found
    page = _parse((tmp_path / "site" / "index.html").read_text())
    assert "\\(\\sqrt{x}\\)" in page.maths
    assert "\\[\ny = \\frac{x}{2}\n\\]" in page.maths
    assert page.quoted == []


# Pages and examples that speak for the current library (the benchmarks page
# may record measurements of code that has since changed).
CURRENT = ("README.md", "docs/index.md", "docs/samplers.md", "docs/metrics.md",
           "docs/api.md")
SAMPLERS = ("sgld", "rmsprop_sgld", "sghmc", "sgnht")


def _current_files():
    return ([ROOT / f for f in CURRENT]
            + sorted((ROOT / "examples").glob("*.py")))


def _python_blocks(path):
    if path.suffix == ".py":
        return [path.read_text()]
    return re.findall(r"^```python\n(.*?)^```", path.read_text(),
                      flags=re.M | re.S)


def test_hook_catches_an_entry_of_a_removed_name(tmp_path):
    for page in (ROOT / "docs").glob("*.md"):
        (tmp_path / page.name).write_text(page.read_text())
    with open(tmp_path / "api.md", "a") as f:
        f.write("\n::: sgld_optax.compiler_options\n")
    problems = _hook().undocumented(tmp_path)
    assert problems == ["'::: sgld_optax.compiler_options' in docs/ is not a "
                        "public name of sgld_optax or sgld_optax.torch_interop"]


def test_names_the_docs_use_exist():
    """Every `so.X` / `sgld_optax.X` the current pages and examples name is in
    the library (removed names, such as a compiler-options helper, are not)."""
    import sgld_optax
    from sgld_optax import torch_interop

    seen, missing = set(), []
    for path in _current_files():
        for m in re.finditer(r"\b(?:so|sgld_optax)\.(\w+)(?:\.(\w+))?",
                             path.read_text()):
            name, attr = m.groups()
            seen.add(name)
            if name == "torch_interop":
                if attr and not hasattr(torch_interop, attr):
                    missing.append(f"{path.name}: {m.group(0)}")
            elif not hasattr(sgld_optax, name):
                missing.append(f"{path.name}: {m.group(0)}")
    assert missing == []
    assert set(SAMPLERS) <= seen


def test_every_sampler_call_in_docs_and_examples_passes_a_key():
    calls = []
    for path in _current_files():
        for block in _python_blocks(path):
            for node in ast.walk(ast.parse(block)):
                if (isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "so"
                        and node.func.attr in SAMPLERS):
                    has_key = any(k.arg == "key" for k in node.keywords)
                    calls.append((path.name, node.lineno, has_key))
    assert len(calls) >= 10
    assert [c for c in calls if not c[2]] == []


def test_samplers_page_examples_run_and_their_numbers_hold():
    """Runs the page's examples in order and checks what their comments
    print against closed forms (quadratic losses, Gaussian posteriors)."""
    ns = {}
    blocks = _python_blocks(ROOT / "docs" / "samplers.md")
    assert len(blocks) == 6
    for block in blocks:
        exec(compile(block, "docs/samplers.md", "exec"), ns)
    nbeta, spectrum = ns["nbeta"], np.asarray(ns["spectrum"])
    stiff, flat = slice(0, 128), slice(-64, None)

    # SGLD on a quadratic of curvature k has variance 1 / (k (1 - lr k / 4)).
    k = nbeta * spectrum[stiff]
    np.testing.assert_allclose(np.mean(ns["sgld_ratio"][stiff]),
                               np.mean(1 / (1 - 1e-3 * k / 4)), rtol=0.03)
    assert np.mean(ns["sgld_ratio"][flat]) < 0.9   # not mixed yet
    # SGHMC at the same step size samples the flat directions too.
    np.testing.assert_allclose(np.mean(ns["sghmc_ratio"][stiff]), 1, rtol=0.03)
    np.testing.assert_allclose(np.mean(ns["sghmc_ratio"][flat]), 1, rtol=0.05)

    # Two scales: the stiff half has SGLD's bias at lr k = 0.5; RMSprop-SGLD
    # samples the flat half, SGLD does not.
    np.testing.assert_allclose(np.mean(ns["sgld_two"][:128]), 1 / (1 - 0.5 / 4),
                               rtol=0.03)
    assert np.mean(ns["sgld_two"][128:]) < 0.2
    assert 0.9 < np.mean(ns["rmsprop_two"][128:]) < 1.2

    # Gradient noise of variance B per step heats SGHMC to 1 + B / (alpha lr);
    # SGNHT's thermostat settles where zeta (1 - zeta / 2) = a + B / lr and
    # samples at temperature 1 - zeta / 2.
    lr, alpha = 1e-3, 0.02
    b_over_lr = lr * (nbeta * 0.09) ** 2 / 4
    np.testing.assert_allclose(np.mean(ns["sghmc_noisy"][stiff]),
                               1 + b_over_lr / alpha, rtol=0.04)
    zeta = 1 - np.sqrt(1 - 2 * (alpha + b_over_lr))
    np.testing.assert_allclose(float(ns["state"].thermostat), zeta, rtol=0.05)
    np.testing.assert_allclose(np.mean(ns["sgnht_noisy"][stiff]), 1 - zeta / 2,
                               rtol=0.03)

    # With a prior N(1, 1/50) the posterior mean is 50 / (nbeta h + 50).
    error = np.abs(np.asarray(ns["prior_draws"]).mean(axis=0)
                   - 50 / (nbeta * spectrum + 50))
    assert error.mean() < 0.015 and error.max() < 0.06

    # Masked elements never leave w0 = 0; the box holds the rest within 0.05
    # and binds.
    masked = np.abs(np.asarray(ns["masked_draws"]))
    assert np.all(masked[:, 128:] == 0)
    np.testing.assert_allclose(masked.max(), 0.05, rtol=1e-6)
