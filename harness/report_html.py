"""One self-contained HTML page from a Markdown report and its figures: no network, no scripts.

Images are embedded as base64 PNG; Markdown headings, paragraphs and pipe tables become HTML; text is
escaped. It is deliberately small: the Markdown report stays the source of truth.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ddd; } h2 { margin-top: 1.6em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; } th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
td:first-child { width: 40%; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; margin: 0; }
.ok { color: #176317; font-weight: bold; } .bad { color: #a11; font-weight: bold; }
"""


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans kept as <code>."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _table(lines: list[str]) -> str:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    body = [row for row in rows[1:] if not all(re.fullmatch(r":?-{2,}:?", cell) for cell in row)]
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def markdown_to_html(markdown: str) -> str:
    """Headings, paragraphs, ``- `` lists and pipe tables (what our reports use); anything else is an escaped
    paragraph."""
    out, block = [], []

    def flush():
        if not block:
            return
        if block[0].lstrip().startswith("|"):
            out.append(_table(block))
        elif all(line.startswith("- ") for line in block):
            out.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in block) + "</ul>")
        else:
            out.append("<p>" + _inline(" ".join(block)) + "</p>")
        block.clear()

    for line in markdown.splitlines():
        heading = re.match(r"(#{1,4}) (.*)", line)
        if heading:
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif not line.strip():
            flush()
        else:
            if block and block[0].lstrip().startswith("|") != line.lstrip().startswith("|"):
                flush()
            block.append(line)
    flush()
    return "\n".join(out)


def figure(path: str | Path, caption: str) -> str:
    """An <img> with the PNG at ``path`` embedded as base64."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def samples_table(samples: list[dict], before: str, after: str) -> str:
    """Rows of {question, gold, before, before_correct, after, after_correct}: completions side by side."""
    def verdict(ok: bool) -> str:
        return '<span class="ok">right</span>' if ok else '<span class="bad">wrong</span>'

    head = (f"<tr><th>question (gold)</th><th>{html.escape(before)}</th><th>{html.escape(after)}</th></tr>")
    rows = "".join(
        f"<tr><td>{html.escape(s['question'])}<br><b>gold {html.escape(str(s['gold']))}</b></td>"
        f"<td>{verdict(s['before_correct'])}<pre>{html.escape(s['before'])}</pre></td>"
        f"<td>{verdict(s['after_correct'])}<pre>{html.escape(s['after'])}</pre></td></tr>"
        for s in samples
    )
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def render_page(title: str, sections: list[str], path: str | Path) -> Path:
    """Write the page: ``sections`` are HTML fragments (from the helpers above), in order."""
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
