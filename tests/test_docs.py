"""The docs build, render (no reST, maths typeset) and document every public name."""

import ast
import html.parser
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

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
           "docs/api.md", "docs/llc.md", "docs/trust.md",
           "docs/torch_interop.md", "docs/language_models.md")
SAMPLERS = ("sgld", "rmsprop_sgld", "sghmc", "sgnht")


def _current_files():
    return ([ROOT / f for f in CURRENT]
            + sorted((ROOT / "examples").glob("*.py")))


def _python_blocks(path):
    """A file's Python: a script whole, or a page's ```python blocks in
    order, those indented in a list item included (dedented)."""
    if path.suffix == ".py":
        return [path.read_text()]
    return [textwrap.dedent(block) for _, block in re.findall(
        r"^( *)```python\n(.*?)^\1```", path.read_text(), flags=re.M | re.S)]


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


# --- The other pages' examples run. ---------------------------------------
#
# Each test runs one page's ```python blocks in order in one namespace, as a
# reader would paste them, after a setup for the names the page takes as
# given: what its prose says they are (a loss, its params, the data, a torch
# model), small enough that the page runs in seconds. Where a block elides
# code (`...`) or names a place on disk to be chosen ("/path/to/cache"), the
# test replaces that text in the blocks' source by the literal replacements
# listed with it (as it would a size too slow to run here; none is); each
# must still occur in the page, so that none stops applying unnoticed. Every
# block runs: none is skipped.


def _page_blocks(name, edits=()):
    """The ```python blocks of `docs/<name>`, with each `(old, new)` of
    `edits` replaced throughout."""
    blocks = _python_blocks(ROOT / "docs" / name)
    for old, new in edits:
        assert any(old in b for b in blocks), f"docs/{name} has no {old!r}"
        blocks = [b.replace(old, new) for b in blocks]
    return blocks


def _run(block, ns, page):
    """Runs `block` in `ns`; the value of a final expression statement is
    kept as `ns["_"]`, as an interactive session keeps it."""
    tree = ast.parse(block)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, page, "exec"), ns)
    ns["_"] = None if last is None else eval(compile(last, page, "eval"), ns)


def _regression(n=2000, seed=0):
    """A linear regression of 4 inputs to 2 outputs, as on the LLC page:
    `(x, y, params, loss_fn)`, `params` its least-squares weights (a
    minimum, with learning coefficient $d/2 = 4$)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 2))
         + 0.5 * rng.normal(size=(n, 2))).astype(np.float32)
    params = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])

    def loss_fn(params, batch):
        xb, yb = batch
        return 0.5 * jnp.mean(jnp.sum((xb @ params - yb) ** 2, axis=-1))

    return x, y, params, loss_fn


def test_index_page_examples_run():
    import jax
    import jax.numpy as jnp

    page = "docs/index.md"
    blocks = _page_blocks("index.md")
    assert len(blocks) == 3

    # A first chain: weights `params` of a linear model of 4 inputs, and
    # `batches`, 20 minibatches of 16 rows stacked on the axis `lax.scan`
    # runs over.
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(20, 16, 4)).astype(np.float32)
    ys = xs @ np.float32([1.0, -1.0, 0.5, 2.0])
    params0 = {"w": jnp.zeros(4)}
    ns = {"params": params0, "batches": (xs, ys)}
    _run(blocks[0], ns, page)
    state, metrics = ns["state"], ns["metrics"]
    assert int(state.count) == 20
    assert metrics.scaled_grad.shape == (20,)
    np.testing.assert_array_equal(metrics.numel, 4)
    # The first step's gradient term: lr / 2 * nbeta * |grad L(w0)|.
    grad = jax.grad(ns["loss_fn"])(params0, (xs[0], ys[0]))["w"]
    np.testing.assert_allclose(
        metrics.scaled_grad[0],
        1e-4 / 2 * (64 / np.log(64)) * np.linalg.norm(grad), rtol=1e-5)

    # Many chains: one step of the 8 vmapped chains on one batch each.
    _run(blocks[1], ns, page)
    batch8 = jax.tree.map(lambda b: jnp.broadcast_to(b[0], (8, *b.shape[1:])),
                          (xs, ys))
    (params8, states8), metrics8 = ns["step8"](
        (ns["params8"], ns["states"]), batch8)
    w8 = np.asarray(params8["w"])
    assert w8.shape == (8, 4) and metrics8.noise.shape == (8,)
    # Each chain draws its own noise.
    assert len({tuple(w) for w in w8}) == 8

    _run(blocks[2], ns, page)
    assert jax.config.jax_default_matmul_precision == "highest"



def test_metrics_page_example_runs():
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import sgld_optax as so

    # The block elides the steps (`...`); one step of an optax loop stands
    # in for them.
    blocks = _page_blocks("metrics.md", edits=[
        ("\n...\n", "\nstate = tx.init(params)\n"
                    "updates, state = jax.jit(tx.update)(grads, state, params)\n")])
    assert len(blocks) == 1
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
              "b": jnp.zeros(16)}
    grads = jax.tree.map(lambda p: jnp.asarray(
        rng.normal(size=p.shape), jnp.float32), params)
    ns = {"jax": jax, "so": so, "params": params, "grads": grads}
    _run(blocks[0], ns, "docs/metrics.md")
    sk = ns["sk"]
    assert isinstance(sk, so.SketchBuffer)
    for field in ("scaled_grad", "unscaled_grad", "localization",
                  "weight_decay", "noise"):
        value = getattr(sk, field)
        assert value.shape == (1024,) and value.dtype == jnp.float32, field
    # The sketch of lr / 2 * nbeta * grad, leaves in flatten order; the
    # chain starts at w0, so the localization's pull is 0.
    flat, _ = ravel_pytree(grads)
    expected = so.CountSketch(flat.size, 1024, seed=0).sketch(
        1e-4 / 2 * 20.0 * flat)
    np.testing.assert_allclose(sk.scaled_grad, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(sk.localization, 0)


def test_trust_page_example_runs(capsys):
    import jax.numpy as jnp

    import sgld_optax as so

    blocks = _page_blocks("trust.md")
    assert len(blocks) == 1
    # A model at a minimum of its loss (the page's is an MLP): the LLC
    # page's regression, d = 8 parameters.
    x, y, params, loss_fn = _regression()
    ns = {"so": so, "jnp": jnp, "x": x, "y": y, "n": len(x),
          "params": params, "loss_fn": loss_fn}
    _run(blocks[0], ns, "docs/trust.md")
    result = ns["result"]
    assert capsys.readouterr().out == result.summary() + "\n"
    assert result.num_params == 8
    assert [c.name for c in result.checks] == [
        "non-finite loss", "blow-up", "LLC range", "R-hat", "bulk ESS",
        "tail ESS", "MALA acceptance"]
    assert result.trustworthy == all(c.passed for c in result.checks)
    assert result.mala_acceptance.shape == (4, 2000)
    assert np.all((result.mala_acceptance >= 0) & (result.mala_acceptance <= 1))
    np.testing.assert_allclose(result.mala_acceptance_mean,
                               result.mala_acceptance.mean(), rtol=1e-6)
    assert list(result.failures) == [""] * 4 and not result.diverged.any()
    for field in ("rhat", "ess_bulk", "ess_tail", "mcse"):
        assert np.isfinite(getattr(result, field)), field


def test_llc_page_examples_run(tmp_path, monkeypatch, capsys):
    az = pytest.importorskip("arviz")
    import jax
    import jax.numpy as jnp
    from flax import linen, nnx

    import sgld_optax as so

    monkeypatch.chdir(tmp_path)      # the examples write their plots here
    page = "docs/llc.md"
    blocks = _page_blocks("llc.md", edits=[
        ("/path/to/cache", str(tmp_path / "cache"))])
    assert len(blocks) == 6

    # One call: self-contained.
    ns = {}
    _run(blocks[0], ns, page)
    result = ns["result"]
    assert capsys.readouterr().out == result.summary() + "\n"
    truth = so.regular_learning_coefficient(8).value
    assert result.num_params == 8
    assert abs(result.llc_mean - truth) < 0.1 * truth
    assert (tmp_path / "llc.png").stat().st_size > 0
    assert ns["idata"].posterior["llc"].shape == (4, 2000)

    # The persistent compilation cache: the settings exist and take. They
    # apply to the whole process, so they are undone before anything
    # compiles again.
    options = ("jax_compilation_cache_dir",
               "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in options}
    ns["jax"] = jax                  # which the page does not import
    try:
        _run(blocks[1], ns, page)
        assert getattr(jax.config, options[0]) == str(tmp_path / "cache")
        assert getattr(jax.config, options[1]) == 0.5
    finally:
        for name, value in before.items():
            jax.config.update(name, value)

    # Samplers: `data` and `nbeta` are the regression's above.
    ns.update(data=(ns["x"], ns["y"]), nbeta=ns["n"] / np.log(ns["n"]))
    _run(blocks[2], ns, page)
    result = ns["result"]            # the run of so.sghmc
    assert result.num_params == 8 and not result.diverged.any()
    assert result.loss_trace.shape == (4, 200)

    # Flax: the block's two alternatives, each with a model of its kind
    # (a linear layer, 4 inputs to 2 outputs) and the squared error.
    regression = ns["loss_fn"], ns["params"]
    nnx_part, linen_part = blocks[3].split("\n\n")
    mse = lambda prediction, target: jnp.mean((prediction - target) ** 2)
    batch = (ns["x"][:64], ns["y"][:64])
    ns.update(nnx=nnx, mse=mse, model=nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    _run(nnx_part, ns, page)
    layer = ns["model"]
    np.testing.assert_allclose(
        ns["loss_fn"](ns["params"], batch),
        mse(batch[0] @ layer.kernel[...] + layer.bias[...], batch[1]),
        rtol=1e-6)
    ns.update(model=linen.Dense(2), key=jax.random.key(0))
    _run(linen_part, ns, page)
    kernel, bias = ns["params"]["kernel"], ns["params"]["bias"]
    assert kernel.shape == (4, 2)
    np.testing.assert_allclose(ns["loss_fn"](ns["params"], batch),
                               mse(batch[0] @ kernel + bias, batch[1]),
                               rtol=1e-6)
    ns["loss_fn"], ns["params"] = regression   # the regression's again

    # ArviZ: the summary's mean and R-hat are the result's.
    import matplotlib
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        # ArviZ 0.23's plot_trace calls what matplotlib 3.11 deprecates.
        warnings.filterwarnings(
            "ignore", "Passing a dict or None as alias_mapping",
            matplotlib.MatplotlibDeprecationWarning)
        _run(blocks[4], ns, page)
    plt.close("all")
    summary = az.summary(ns["idata"], var_names=["llc"], round_to="none")
    np.testing.assert_allclose(summary.loc["llc", "mean"], result.llc_mean,
                               rtol=1e-6)
    np.testing.assert_allclose(summary.loc["llc", "r_hat"], result.rhat,
                               rtol=1e-6)

    # A calibration sweep.
    _run(blocks[5], ns, page)
    cal = ns["cal"]
    assert capsys.readouterr().out == cal.table() + "\n"
    assert cal.llc_mean.shape == (8, 8, 2)    # devinterp's grid, 2 localizations
    assert (tmp_path / "calibration.png").stat().st_size > 0
    # The last line's value: a qualifying grid point, or None.
    assert ns["_"] == cal.recommended
    if cal.recommended is not None:
        lr, nbeta, localization = cal.recommended
        i, j, k = (list(cal.learning_rates).index(lr),
                   list(cal.nbetas).index(nbeta),
                   list(cal.localizations).index(localization))
        assert cal.qualifies[i, j, k]


def _tiny_gpt2():
    """`GPT2LM`, the Flax GPT-2 of the Language models page (its first
    block), and a tiny `transformers.GPT2LMHeadModel` with random weights of
    order one (nothing downloaded)."""
    import torch
    import transformers

    ns = {}
    _run(_page_blocks("language_models.md")[0], ns, "docs/language_models.md")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.2
                    + (1.0 if p.ndim == 1 and name.endswith("weight") else 0))
    return ns["GPT2LM"], model


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(module, state):
    import torch

    got = module.state_dict()
    assert list(got) == list(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name


def test_torch_interop_page_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("devinterp")
    import jax
    import jax.numpy as jnp
    import safetensors.numpy
    import torch
    from jax.flatten_util import ravel_pytree

    from sgld_optax import torch_interop

    monkeypatch.chdir(tmp_path)      # the examples read and write files here
    page = "docs/torch_interop.md"
    steps = (
        "for _ in range(num_steps_taken):\n"
        "    opt.zero_grad()\n"
        "    torch.nn.functional.mse_loss(model(inputs), targets).backward()\n"
        "    opt.step()\n"
        "taken = {n: opt.state[p]['square_avg'].clone()\n"
        "         for n, p in model.named_parameters()}\n")
    # The block on sampler state elides the PyTorch steps; these stand in,
    # and keep RMSprop's running mean as they leave it.
    blocks = _page_blocks("torch_interop.md", edits=[
        ("# ... some steps in PyTorch ...\n", steps)])
    assert len(blocks) == 6

    # Weights: `torch_model`, the PyTorch twin of the page's Flax MLP, whose
    # state dict is "model.pt".
    from test_torch_interop import TorchMLP

    torch.manual_seed(0)
    torch_model = TorchMLP()
    with torch.no_grad():
        torch_model.norm.weight.normal_(1.0, 0.2)
        torch_model.norm.bias.normal_(0.0, 0.2)
    torch.save(torch_model.state_dict(), "model.pt")
    original = _state(torch_model)
    ns = {"torch_model": torch_model}
    _run(blocks[0], ns, page)
    inputs = torch.randn(7, 5)
    with torch.no_grad():
        expected = torch_model(inputs).numpy()
    np.testing.assert_allclose(
        ns["MLP"]().apply({"params": ns["params"]}, inputs.numpy()), expected,
        rtol=1e-5, atol=1e-5)
    _assert_state_equal(torch_model, original)
    saved = safetensors.numpy.load_file("sampled.safetensors")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(saved[name], tensor.numpy())
    mlp_like = ns["like"]

    # GPT-2's rules: `gpt2`, a tiny GPT2LMHeadModel, and `like`, the
    # template of the Flax GPT-2 of the Language models page.
    GPT2LM, gpt2 = _tiny_gpt2()
    config = {k: getattr(gpt2.config, k) for k in (
        "vocab_size", "n_positions", "n_embd", "n_head", "n_layer",
        "layer_norm_epsilon")}
    like = jax.eval_shape(GPT2LM(config).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
    gpt2_state = _state(gpt2)
    ns.update(gpt2=gpt2, like=like)
    _run(blocks[1], ns, page)
    assert jax.tree.structure(ns["params"]) == jax.tree.structure(like)
    _assert_state_equal(gpt2, gpt2_state)

    # A rule in front of the ready set: a separate head, and c_attn split
    # into q, k and v.
    _run(blocks[2], ns, page)
    split = torch_interop.params_from_torch(
        gpt2.state_dict(), rules=ns["rules"])
    np.testing.assert_array_equal(split["lm_head"]["kernel"],
                                  gpt2_state["lm_head.weight"].numpy().T)
    c_attn = gpt2_state["transformer.h.1.attn.c_attn.weight"].numpy()
    d = config["n_embd"]
    for i, name in enumerate("qkv"):
        part = split["transformer"]["h_1"]["attn"][name]
        np.testing.assert_array_equal(part["kernel"],
                                      c_attn[:, d * i:d * (i + 1)])

    # A fused query-key-value nn.Linear with grouped-query attention: the
    # rule (the block's value) on a weight (512 + 128 + 128, 32).
    _run(blocks[3], ns, page)
    weight = np.random.default_rng(0).normal(size=(768, 32)).astype(np.float32)
    attn = torch_interop.params_from_torch(
        {"layers.0.attn.qkv_proj.weight": weight},
        rules=[ns["_"]])["layers_0"]["attn"]
    for name, rows, heads in (("query", slice(0, 512), 8),
                              ("key", slice(512, 640), 2),
                              ("value", slice(640, 768), 2)):
        np.testing.assert_array_equal(
            attn[name]["kernel"], weight[rows].T.reshape(32, heads, 64))

    # Sampler state: `model`, the MLP of the Weights section, its template
    # `like`, and the steps taken in PyTorch on a regression.
    ns.update(model=torch_model, like=mlp_like, torch=torch, num_steps_taken=3,
              inputs=inputs, targets=torch.randn(7, 3))
    _run(blocks[4], ns, page)
    opt, state, taken = ns["opt"], ns["state"], ns["taken"]
    assert int(state.count) == 3
    assert taken["fc1.weight"].abs().min() > 0
    np.testing.assert_array_equal(state.square_avg["fc1"]["kernel"],
                                  taken["fc1.weight"].numpy().T)
    np.testing.assert_array_equal(state.square_avg["norm"]["scale"],
                                  taken["norm.weight"].numpy())
    # Back in the optimizer, the running mean is what the steps left.
    for name, p in torch_model.named_parameters():
        assert torch.equal(opt.state[p]["square_avg"], taken[name]), name

    # Count sketches: the reordered tables give the Flax params the sketch
    # devinterp's tables give the torch parameters in their own order.
    _run(blocks[5], ns, page)
    flat, _ = ravel_pytree(ns["params"])
    vector = torch.cat([p.detach().flatten() for p in torch_model.parameters()])
    plain = torch_interop.devinterp_count_sketch(
        vector.numel(), 256, seed=0)
    np.testing.assert_allclose(ns["sketch"].sketch(flat),
                               plain.sketch(jnp.asarray(vector.numpy())),
                               rtol=1e-5, atol=1e-6)
    assert ns["tx"].init(ns["params"]).sketch.noise.shape == (256,)


def test_language_models_page_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    import datasets
    import jax
    import safetensors.numpy
    import safetensors.torch
    import torch
    from flax import linen

    import sgld_optax as so
    from sgld_optax import torch_interop

    monkeypatch.chdir(tmp_path)      # the examples read and write files here
    page = "docs/language_models.md"
    blocks = _page_blocks("language_models.md")
    assert len(blocks) == 8

    # The Flax model. The page names sgld_optax `so` without importing it.
    ns = {"so": so}
    _run(blocks[0], ns, page)

    # From PyTorch: "path/to/checkpoint" holds a tiny GPT-2 with random
    # weights, saved with `save_pretrained`.
    _, hf_model = _tiny_gpt2()
    hf_model.save_pretrained("path/to/checkpoint")
    original = _state(hf_model)
    _run(blocks[1], ns, page)        # it checks the logits itself
    assert ns["config"]["n_embd"] == 32
    gpt2 = {name: ns[name] for name in ("params", "like", "torch_model")}

    # A checkpoint saved from a GPT2Model, without the prefix and lm_head.
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in hf_model.transformer.state_dict().items()},
        "model.safetensors")
    _run(blocks[2], ns, page)
    jax.tree.map(np.testing.assert_array_equal, ns["params"], gpt2["params"])

    # Back to PyTorch.
    _run(blocks[3], ns, page)
    _assert_state_equal(ns["torch_model"], original)
    saved = safetensors.numpy.load_file("sampled.safetensors")
    assert set(saved) <= set(original) and "lm_head.weight" in saved
    for name, array in saved.items():
        np.testing.assert_array_equal(array, original[name].numpy())

    # Rules for another architecture: `torch_model` fuses query, key and
    # value into `transformer.blocks.N.attn.Wqkv`, and `like` is the template
    # of a Flax model with separate DenseGeneral projections of 8 heads.
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.Wqkv = torch.nn.Linear(16, 48)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.Module()
            self.transformer.blocks = torch.nn.ModuleList(
                torch.nn.Module() for _ in range(2))
            for block in self.transformer.blocks:
                block.attn = Attention()

    class Projections(linen.Module):
        @linen.compact
        def __call__(self, x):
            return [linen.DenseGeneral((8, 2), name=n)(x)
                    for n in ("query", "key", "value")]

    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    attn_like = Projections().init(jax.random.key(0), x)["params"]
    torch.manual_seed(0)
    decoder = Decoder()
    ns.update(torch_model=decoder, like={"transformer": {
        f"blocks_{i}": {"attn": attn_like} for i in range(2)}})
    _run(blocks[4], ns, page)
    for i, block in enumerate(decoder.transformer.blocks):
        with torch.no_grad():
            qkv = block.attn.Wqkv(torch.as_tensor(x)).numpy()
        got = Projections().apply(
            {"params": ns["params"]["transformer"][f"blocks_{i}"]["attn"]}, x)
        for part, expected in zip(got, np.split(qkv, 3, axis=-1)):
            np.testing.assert_allclose(part, expected.reshape(3, 8, 2),
                                       rtol=1e-5, atol=1e-6)
    ns.update(gpt2)                  # the GPT-2 again

    # Token data: "tokenized", a dataset of 16 sequences of 16 tokens, and
    # `ragged_lists`, 16 sequences of 10 to 16 tokens.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (16, 16))
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(
        "tokenized")
    lengths = rng.integers(10, 17, 16)
    ragged = [list(map(int, seq[:k])) for seq, k in zip(ids, lengths)]
    ns["ragged_lists"] = ragged
    _run(blocks[5], ns, page)
    np.testing.assert_array_equal(ns["dataset"]["input_ids"], ids)
    data = ns["data"]
    np.testing.assert_array_equal(data["attention_mask"].sum(axis=1), lengths)
    for seq, row, mask in zip(ragged, data["input_ids"], data["attention_mask"]):
        assert list(row[:len(seq)]) == seq and not row[len(seq):].any()
        assert mask[:len(seq)].all()

    # Estimating. The page's weights are trained; these are random, so the
    # chains find lower losses than at them, and the verdict says so.
    def untrained():
        return pytest.warns(RuntimeWarning,
                            match="params is not a local minimum")

    capsys.readouterr()
    with untrained():
        _run(blocks[6], ns, page)
    result = ns["result"]
    assert not next(c for c in result.checks if c.name == "LLC range").passed
    assert capsys.readouterr().out == result.summary() + "\n"
    assert result.loss_trace.shape == (4, 200)
    assert result.num_params == sum(
        p.size for p in jax.tree.leaves(ns["params"]))

    # The LLC over training: `paths` of two checkpoints, the weights above
    # and the same moved a little, saved as the page says, and their `steps`.
    moved = jax.tree.map(lambda p: p + 0.01, ns["params"])
    paths = []
    for step, params in ((0, ns["params"]), (100, moved)):
        paths.append(tmp_path / f"step_{step}.safetensors")
        torch_interop.save_torch_checkpoint(
            params, paths[-1], like=ns["torch_model"],
            rules=torch_interop.gpt2_rules())
    ns.update(paths=paths, steps=[0, 100])
    with untrained():
        _run(blocks[7], ns, page)
    series = ns["series"]
    assert len(series.results) == 2
    assert (tmp_path / "llc_over_training.png").stat().st_size > 0
    # Checkpoint 0's estimate is estimate_llc's there, with the same key.
    np.testing.assert_allclose(series.results[0].loss_trace, result.loss_trace,
                               rtol=1e-5)
