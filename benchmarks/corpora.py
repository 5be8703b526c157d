"""Three real text corpora for the V4.1 sizing study (docs/v41_sizing.md), all from Debian
packages, so anyone with apt can rebuild them byte for byte at the same package versions.

    python -m benchmarks.corpora                      # fetch, extract, convert, split, count
    python -m benchmarks.corpora --tokenizer ~/.cache/tierstore/deepseek_v3-3.7.2/tokenizer.json

- ``code``: Python source: the standard library (libpython3.11-minimal, -stdlib, -testsuite)
  and four large pure-Python libraries (sympy, django, twisted, numpy, scipy); one document
  per ``.py`` file.
- ``prose``: English documentation: the Python 3.11 manual (its reStructuredText sources,
  ``_sources/*.rst.txt``), the Debian Administrator's Handbook (en-US, HTML -> text), the
  Debian Reference, Policy and Developer's Reference, the GNU coding standards, bash and
  autoconf manuals (info, one document per node), the Linux kernel's documentation
  (linux-doc-6.1: its reStructuredText sources, translations left out), the PostgreSQL 15
  manual (HTML -> text) and git's manual pages (AsciiDoc sources).
- ``nonenglish``: German, French, Spanish, Italian and Brazilian Portuguese: the translated
  manual pages (manpages-de, -fr, -es, -it, -pt-br and their -dev packages; roff -> text,
  one document per page), the Debian Administrator's Handbook (de-DE, fr-FR, es-ES, it-IT,
  pt-BR), the Debian Reference (de, fr, es, it, pt-br) and the New Maintainers' Guide (de,
  fr, es, it). German and French came first (6.8M tokens); the other three were added to
  pass 10M.

``apt-get download`` fetches the .deb files (no root, nothing installed) into
``--cache/debs``, ``dpkg -x`` unpacks them, and each document becomes one UTF-8 file under
``--cache/<corpus>/{train,test}/``. A corpus already built gets only the sources added
to ``CORPORA`` since (``build``). The split is by document and deterministic: a document
goes to test when the second hex digit of the SHA-1 of "package/path inside it" is
odd, so it does not depend on which other packages are present, and the file names
(more digits of that hash) make the sorted order a mix of all packages. The package versions
used are written to ``--cache/<corpus>/MANIFEST``. ``tierstore trace --text
CACHE/<corpus>/train --glob '*.txt'`` reads a split.

The last line is JSON: per corpus and split, documents, bytes and (with ``--tokenizer``)
DeepSeek tokens.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .common import json_line

DEFAULT_CACHE = Path.home() / ".cache" / "tierstore" / "corpora"


@dataclass(frozen=True)
class Source:
    """A package and which of its files become documents, converted how."""

    package: str
    pattern: str  # a regex matched against the path inside the package
    kind: str  # python | rst | html | man | info | reftext (a Debian Reference .txt.gz)


CORPORA: dict[str, list[Source]] = {
    "code": [Source(p, r"\.py$", "python") for p in (
        "libpython3.11-minimal", "libpython3.11-stdlib", "libpython3.11-testsuite",
        "python3-sympy", "python3-django", "python3-twisted", "python3-numpy", "python3-scipy")],
    "prose": [
        Source("python3.11-doc", r"/_sources/.*\.rst\.txt$", "rst"),
        Source("debian-handbook", r"/en-US/.*\.html$", "html"),
        Source("debian-reference-en", r"debian-reference\.en\.txt\.gz$", "reftext"),
        Source("debian-policy", r"/policy/.*\.html$", "html"),
        Source("developers-reference", r"\.html$", "html"),
        Source("gnu-standards", r"/info/.*\.info.*\.gz$", "info"),
        Source("bash-doc", r"/info/.*\.info.*\.gz$", "info"),
        Source("autoconf-doc", r"/info/.*\.info.*\.gz$", "info"),
        Source("linux-doc-6.1", r"/html/_sources/(?!translations/).*\.txt$", "rst"),
        Source("postgresql-doc-15", r"/html/.*\.html$", "html"),
        Source("git-doc", r"/git-doc/[^/]*\.txt$", "rst"),
    ],
    "nonenglish": [
        *[Source(p, r"/man/(de|fr)/.*\.gz$", "man")
          for p in ("manpages-de", "manpages-de-dev", "manpages-fr", "manpages-fr-dev")],
        Source("debian-handbook", r"/(de-DE|fr-FR)/.*\.html$", "html"),
        Source("debian-reference-de", r"debian-reference\.de\.txt\.gz$", "reftext"),
        Source("debian-reference-fr", r"debian-reference\.fr\.txt\.gz$", "reftext"),
        Source("maint-guide-de", r"\.html$", "html"),
        Source("maint-guide-fr", r"\.html$", "html"),
        # Spanish, Italian and Brazilian Portuguese, added later (German and French alone are 6.8M tokens, not 10M)
        *[Source(p, r"/man/(es|it)/.*\.gz$", "man")
          for p in ("manpages-es", "manpages-es-dev", "manpages-it", "manpages-it-dev")],
        Source("debian-handbook", r"/(es-ES|it-IT)/.*\.html$", "html"),
        Source("debian-reference-es", r"debian-reference\.es\.txt\.gz$", "reftext"),
        Source("debian-reference-it", r"debian-reference\.it\.txt\.gz$", "reftext"),
        Source("maint-guide-es", r"\.html$", "html"),
        Source("maint-guide-it", r"\.html$", "html"),
        *[Source(p, r"/man/pt_BR/.*\.gz$", "man") for p in ("manpages-pt-br", "manpages-pt-br-dev")],
        Source("debian-handbook", r"/pt-BR/.*\.html$", "html"),
        Source("debian-reference-pt-br", r"debian-reference\.pt-br\.txt\.gz$", "reftext"),
    ],
}


# ---------------------------------------------------------------------------- converters
class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: script/style/head dropped, block tags end lines."""

    SKIP = {"script", "style", "head", "title"}
    BLOCK = {"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table",
             "section", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(raw: str) -> str:
    p = _HTMLText()
    p.feed(raw)
    p.close()
    text = "".join(p.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_ROFF_ESC = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((aq|cq)"), "'"), (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((em|en|mi|hy)"), "-"), (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(.."), ""), (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"), (re.compile(r"\\[&|^%:c]"), ""), (re.compile(r"\\e"), "\x00"),
    (re.compile(r"\\ "), " "), (re.compile(r"\\(.)"), r"\1"),
]


def roff_to_text(raw: str) -> str:
    """A man page's text without groff: comments and requests dropped, macro arguments kept
    (.SH NAME -> NAME, .B word -> word), escapes resolved to their characters or removed."""
    out = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.'](\S+)\s*(.*)", line)
            if not m:
                continue
            req, arg = m.groups()
            if req in {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "TP", "IP", "UR",
                       "MT", "OP", "Nm", "Nd", "Sh", "Ss", "Fl", "Ar", "Pa", "Xr", "Em", "Dq", "Ql"}:
                line = arg.replace('"', "")
            else:
                continue
        for pat, rep in _ROFF_ESC:
            line = pat.sub(rep, line)
        out.append(line.replace("\x00", "\\"))  # \e: a backslash, kept out of the rules after it
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def documents(src: Source, root: Path) -> Iterator[tuple[str, str]]:
    """(source path inside the package, text) of every document of ``src`` under ``root``."""
    pat = re.compile(src.pattern)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = f.relative_to(root).as_posix()
        if not pat.search("/" + rel):
            continue
        raw = _read(f)
        if src.kind in ("python", "rst"):
            yield rel, raw
        elif src.kind == "html":
            yield rel, html_to_text(raw)
        elif src.kind == "man":
            yield rel, roff_to_text(raw)
        elif src.kind == "info":  # one document per node
            for i, node in enumerate(raw.split("\x1f")):
                if len(node.strip()) > 200:
                    yield f"{rel}#{i}", node
        elif src.kind == "reftext":  # sections headed "N.N. Title" on a line of their own
            for i, sec in enumerate(re.split(r"\n(?=\d+\.\d+(?:\.\d+)*\.\s+\S)", raw)):
                if sec.strip():
                    yield f"{rel}#{i}", sec
        else:
            raise ValueError(f"unknown kind {src.kind!r}")


# ---------------------------------------------------------------------------- fetch + build
def fetch(package: str, cache: Path) -> tuple[Path, str]:
    """The unpacked package (``apt-get download`` + ``dpkg -x``, once) and its version."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True, stdout=subprocess.DEVNULL)
        found = sorted(debs.glob(f"{package}_*.deb"))
    deb = found[-1]
    version = deb.name.split("_")[1].replace("%3a", ":")
    root = cache / "unpacked" / deb.stem
    if not root.is_dir():
        tmp = root.with_name(root.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(root)
    return root, version


def split_and_name(key: str) -> tuple[str, str]:
    """The split and file name of the document with source ``key``: both from its SHA-1, so
    the split does not depend on the other documents, and the files' sorted order (the
    order `tierstore trace` reads them) mixes the packages: any prefix is a sample of all."""
    h = hashlib.sha1(key.encode()).hexdigest()
    return ("test" if int(h[1], 16) & 1 else "train"), h[2:18]


def _add_source(src: Source, cache: Path, out: Path) -> str:
    """Write the documents of ``src`` under ``out/{train,test}``; its MANIFEST line."""
    root, version = fetch(src.package, cache)
    count = 0
    for rel, text in documents(src, root):
        if not text.strip():
            continue
        s, fname = split_and_name(f"{src.package}/{rel}")
        (out / s / f"{fname}.txt").write_text(text, encoding="utf-8")
        count += 1
    return f"{src.package} {version} {src.kind} {src.pattern} {count} documents"


def _source_of(line: str) -> tuple[str, str, str]:
    """(package, kind, pattern) of a MANIFEST line (patterns hold no spaces)."""
    package, _version, kind, pattern = line.split(" ")[:4]
    return package, kind, pattern


def build(name: str, cache: Path) -> Path:
    """Write ``cache/<name>/{train,test}/*.txt`` (once; delete the folder to rebuild).

    A corpus already built gets only the sources added to ``CORPORA`` since (its MANIFEST
    lists what it holds): a document's file name and split come from its own source path,
    so adding a source to a built corpus gives the same files as building it afresh, and the
    documents already there are left as they are. A source removed from ``CORPORA`` stays in
    a built corpus until the folder is deleted."""
    out = cache / name
    if (out / "MANIFEST").is_file():
        lines = (out / "MANIFEST").read_text().splitlines()
        have = {_source_of(line) for line in lines}
        missing = [src for src in CORPORA[name] if (src.package, src.kind, src.pattern) not in have]
        for src in missing:  # one line per source, written as soon as its documents are
            lines.append(_add_source(src, cache, out))
            (out / "MANIFEST.tmp").write_text("\n".join(lines) + "\n")
            (out / "MANIFEST.tmp").rename(out / "MANIFEST")
        return out
    tmp = out.with_name(name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    for s in ("train", "test"):
        (tmp / s).mkdir(parents=True)
    manifest = [_add_source(src, cache, tmp) for src in CORPORA[name]]
    (tmp / "MANIFEST").write_text("\n".join(manifest) + "\n")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    tmp.rename(out)
    return out


def count_tokens(files: list[Path], tokenizer: str) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    total = 0
    for i in range(0, len(files), 256):
        texts = [f.read_text(encoding="utf-8") for f in files[i:i + 256]]
        total += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="where .debs, unpacked trees and corpora go")
    ap.add_argument("--corpora", default=",".join(CORPORA), help="comma-separated: " + ", ".join(CORPORA))
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json: also count its tokens per split")
    args = ap.parse_args(argv)
    cache = Path(args.cache).expanduser()
    result = {}
    for name in args.corpora.split(","):
        out = build(name, cache)
        result[name] = {}
        for s in ("train", "test"):
            files = sorted((out / s).glob("*.txt"))
            e = {"documents": len(files), "bytes": sum(f.stat().st_size for f in files)}
            if args.tokenizer:
                e["tokens"] = count_tokens(files, args.tokenizer)
            result[name][s] = e
            print(f"{name} {s}: {e}", file=sys.stderr, flush=True)
    json_line({"corpora": result, "cache": str(cache)})


if __name__ == "__main__":
    main()
