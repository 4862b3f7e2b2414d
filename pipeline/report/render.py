"""Render the report's blocks (see ``content``) as Markdown and as a self-contained HTML page.

Text is shown literally: Markdown syntax is escaped, HTML is escaped, and control characters (model
output can hold any byte) are written as escapes. Both renderers say the same thing.
"""

from __future__ import annotations

import base64
import html
import re


def _visible(s: str) -> str:
    """Control characters shown as escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)


def _md_inline(part) -> str:
    if isinstance(part, str):
        s = _visible(part)
        s = re.sub(r"([\\`*|<>])", r"\\\1", s)
        # _ only starts or ends emphasis next to a non-word character
        return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", s)
    kind, text = part
    text = _visible(text)
    if kind == "code":
        text = text.replace("|", "\\|")  # GitHub splits cells on | even inside code
        fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") or text != text.strip() else ""
        return f"{fence}{pad}{text}{pad}{fence}"
    return f"**{_md_inline(text)}**"


def _md_parts(parts) -> str:
    if isinstance(parts, str):
        parts = [parts]
    return "".join(_md_inline(p) for p in parts).replace("\n", "<br>")


def to_markdown(blocks: list) -> str:
    """GitHub-flavoured Markdown; images are linked by their path."""
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + _md_parts([b[2]]))
        elif kind == "p":
            out.append(_md_parts(b[1]))
        elif kind == "list":
            out.append("\n".join("- " + _md_parts(item) for item in b[1]))
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_parts([h]) for h in header) + " |",
                     "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(_md_parts(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{_md_parts([b[1]])}]({b[2]})")
    return "\n\n".join(out) + "\n"


def _html_parts(parts) -> str:
    if isinstance(parts, str):
        parts = [parts]
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(html.escape(_visible(p)))
        elif p[0] == "code":
            out.append(f"<code>{html.escape(_visible(p[1]))}</code>")
        else:
            out.append(f"<strong>{_html_parts([p[1]])}</strong>")
    return "".join(out).replace("\n", "<br>")


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
table { border-collapse: collapse; margin: 1em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #eff1f3; border-radius: 4px; padding: 1px 4px; font-size: 90%; white-space: pre-wrap;
       word-break: break-all; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def to_html(blocks: list, title: str, images: dict[str, bytes]) -> str:
    """A self-contained page: ``images`` (PNG bytes by the path an img block names) embedded as
    data URIs, no external resources."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_html_parts([b[2]])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_html_parts(b[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_html_parts(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_html_parts([h])}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{_html_parts(c)}</td>" for c in row) + "</tr>"
                           for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[b[2]]).decode("ascii")
            out.append(f'<img alt="{html.escape(b[1])}" src="data:image/png;base64,{data}">')
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
