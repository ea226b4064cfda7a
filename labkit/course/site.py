"""The course as a static website: one HTML page per executed notebook and a contents page, built with nbconvert.

`make site` renders each notebook's stored outputs when their stamps match its code (labkit.course.outputs: a stored
run is the cache of that run) and executes the others first (missing or stale outputs; `--all`: every one);
`python -m labkit.course.site --stored` renders what is stored as it is, in seconds.
Open site/index.html in a browser, or publish the folder on any static host (GitHub Pages, S3, ...).
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import sys
import time
from pathlib import Path

from labkit.course.outputs import clean, execute, notebooks_dir, read_notebook, rendered, source_text, stale_cells, write_notebook

NAV_STYLE = ("nav.labkit{display:flex;justify-content:space-between;margin:.5rem auto;padding:.5rem 1rem;"
             "font-family:system-ui,sans-serif;border-bottom:1px solid #ddd}nav.labkit a{text-decoration:none}")
STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.5}"
         "li ul{font-size:.9em;color:#555}")


def headings(nb: dict) -> list[tuple[int, str]]:
    """(level, text) of every markdown heading in a notebook, in order."""
    found = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            found += [(len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{1,3})\s+(.+)$", source_text(cell), re.M)]
    return found


def title(nb: dict, fallback: str) -> str:
    """A notebook's title: its first top-level heading."""
    return next((text for level, text in headings(nb) if level == 1), fallback)


def nav_bar(pages: list[tuple[str, str]], k: int) -> str:
    """Previous / contents / next links for page k."""
    prev = f'<a href="{pages[k - 1][0]}">&larr; {html.escape(pages[k - 1][1])}</a>' if k > 0 else "<span></span>"
    nxt = f'<a href="{pages[k + 1][0]}">{html.escape(pages[k + 1][1])} &rarr;</a>' if k + 1 < len(pages) else "<span></span>"
    return f'<nav class="labkit">{prev}<a href="index.html">Contents</a>{nxt}</nav>'


def render_page(path: Path) -> str:
    """A notebook as a standalone HTML page (JupyterLab's look, images embedded)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab", embed_images=True).from_filename(str(path))
    return body


def contents_page(entries: list[tuple[str, str, list[tuple[int, str]]]]) -> str:
    """index.html: every notebook with its sections."""
    items = []
    for href, name, sections in entries:
        subs = "".join(f"<li>{html.escape(t)}</li>" for level, t in sections if level == 2)
        items.append(f'<li><a href="{href}">{html.escape(name)}</a><ul>{subs}</ul></li>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>labkit: fine-tuning LLMs</title>"
            f"<style>{STYLE}</style></head><body><h1>labkit: fine-tuning LLMs, hands on</h1>"
            f"<p>Every page is a notebook of the course with the outputs of a run on a laptop CPU. "
            f"Run them yourself: <code>make lab</code>.</p><ol>{''.join(items)}</ol></body></html>")


def needs_run(path: Path) -> bool:
    """Whether a notebook's stored outputs cannot stand for a run of its current code (none, or stale)."""
    nb = read_notebook(path)
    return not rendered(nb) or bool(stale_cells(nb))


def build(out: str | Path = "site", execute_first: bool = True, execute_all: bool = False) -> list[Path]:
    """Build the site into `out`; the pages written.

    execute_first: run each notebook whose stored outputs are missing or older than its code (a stored run whose
    stamps match the code is that run's cache); execute_all: run every notebook; neither: render what is stored.
    """
    out = Path(out)
    sources = sorted(notebooks_dir().glob("[0-9]*.ipynb"))
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "_executed").mkdir(parents=True)
    notebooks = []
    for path in sources:
        if execute_all or (execute_first and needs_run(path)):
            started = time.perf_counter()
            print(f"{path.name}: executing ...", file=sys.stderr, flush=True)
            executed = staging / "_executed" / path.name
            write_notebook(executed, clean(execute(path)))
            print(f"{path.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            notebooks.append(executed)
        else:
            notebooks.append(path)
    pages = [(p.with_suffix(".html").name, title(read_notebook(p), p.stem)) for p in notebooks]
    for k, path in enumerate(notebooks):
        page = render_page(path)
        page = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav_bar(pages, k), page, count=1)
        page = page.replace("</body>", nav_bar(pages, k) + "</body>", 1)
        page = page.replace("</head>", f"<style>{NAV_STYLE}</style></head>", 1)
        (staging / pages[k][0]).write_text(page, encoding="utf-8")
    entries = [(href, name, headings(read_notebook(p))) for (href, name), p in zip(pages, notebooks)]
    (staging / "index.html").write_text(contents_page(entries), encoding="utf-8")
    shutil.rmtree(staging / "_executed")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # all or nothing: a failed build leaves the previous site as it was
    return [out / href for href, _ in pages]


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.course.site [--out DIR] [--stored]`: build the course website."""
    parser = argparse.ArgumentParser(prog="python -m labkit.course.site", description=main.__doc__)
    parser.add_argument("--out", default="site", help="folder to write (replaced as a whole)")
    parser.add_argument("--stored", action="store_true", help="render the stored outputs, even stale ones; run nothing")
    parser.add_argument("--all", action="store_true", help="execute every notebook, even those with fresh outputs")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    pages = build(args.out, execute_first=not args.stored, execute_all=args.all)
    print(f"site: {len(pages)} notebook pages and index.html in {args.out}/ ({time.perf_counter() - started:.0f} s); "
          f"open {Path(args.out).resolve() / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
