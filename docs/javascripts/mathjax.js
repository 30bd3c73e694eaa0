// MathJax settings for the maths that pymdownx.arithmatex (generic mode)
// marks up: \( ... \) inline and \[ ... \] display, inside elements of class
// "arithmatex". Nothing else on a page is searched for maths, so a dollar
// sign or a backslash in prose or code is left alone.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Typeset again whenever Material for MkDocs swaps in a page.
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
