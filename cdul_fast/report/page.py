"""One self-contained HTML page: every picture inlined as a data URI, no script, no font or file fetched, so the
page opens offline from anywhere it is copied to."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#cfd8dc;font-size:13px}main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}p.note{color:#666;font-size:13px;margin:6px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #e0e0e0;border-radius:6px;padding:8px 14px;
min-width:150px}.card b{display:block;font-size:20px}.card span{font-size:12px;color:#666}
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #eee;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#f5f5f5;position:sticky;top:0}
td.bar{min-width:120px;text-align:left}td.bar i{display:inline-block;height:9px;background:#1b9e77;
vertical-align:middle}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:196px;font-size:12px}
figure img{display:block;border:1px solid #ddd;max-width:192px}figcaption{padding:3px 0;word-wrap:break-word}
.tag{display:inline-block;border-radius:3px;padding:0 4px;margin:1px;background:#eceff1}
.tag.ok{background:#c8e6c9}.tag.bad{background:#ffcdd2}.tag.miss{background:#fff;border:1px dashed #c62828}
.row{display:flex;gap:8px;align-items:flex-start;margin-bottom:10px;flex-wrap:wrap}
.row figure{width:auto;max-width:196px}pre{background:#f5f5f5;padding:8px;font-size:12px;overflow:auto}
img.plot{max-width:100%;border:0}dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px;
margin:0}dt{color:#555}dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img_tag(data: bytes, mime: str, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} src="{data_uri(data, mime)}" alt="{esc(alt)}">'


def figure(img: str, caption: str) -> str:
    """``caption`` is HTML (callers escape their text)."""
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def tag(text: str, kind: str = "", title: str = "") -> str:
    t = f' title="{esc(title)}"' if title else ""
    return f'<span class="tag {kind}"{t}>{esc(text)}</span>'


def definition_list(items: Iterable[tuple[str, object]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def table(head: Sequence[str], rows: Iterable[Sequence[str]], table_id: str, foot: Sequence[str] | None = None) -> str:
    """A table of pre-rendered HTML cells (``head`` is plain text)."""
    out = [f'<table id="{esc(table_id)}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead>",
           "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" if not c.startswith("<td") else c for c in r) + "</tr>" for r in rows]
    out.append("</tbody>")
    if foot:
        out.append("<tfoot><tr>" + "".join(f"<th>{c}</th>" for c in foot) + "</tr></tfoot>")
    return "".join(out) + "</table>"


@dataclass
class Page:
    title: str
    subtitle: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (id, heading, body HTML)

    def add(self, section_id: str, heading: str, body: str) -> None:
        self.sections.append((section_id, heading, body))

    def render(self) -> str:
        body = "".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>{b}</section>' for i, h, b in self.sections)
        return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>"
                f"<header><h1>{esc(self.title)}</h1><p>{esc(self.subtitle)}</p></header><main>{body}</main>"
                "</body></html>\n")
