"""Every report as Markdown and as one self-contained HTML page: `write_report(out, text)` writes `report.md` and
`report.html` beside it, the HTML with the report's figures inlined (base64 PNG), so one file can be mailed,
archived or opened offline. Markdown is rendered by Python-Markdown (tables extension); call it after the figures
are written.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import markdown

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;font-size:0.9em;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}"
    "th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
    "code{background:#f5f5f5;padding:0 3px}"
)


def write_report(out: Path, text: str) -> Path:
    """report.md and report.html (figures inlined) in `out`; returns report.md's path."""
    out = Path(out)
    (out / "report.md").write_text(text)
    body = markdown.markdown(text, extensions=["tables"])
    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)"', lambda m: _inlined(out, m), body)
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "vitzoo report")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>\n")  # fmt: skip
    (out / "report.html").write_text(page)
    return out / "report.md"


def _inlined(out: Path, match: re.Match) -> str:
    alt, source = match.group(1), match.group(2)
    path = out / source
    if source.startswith(("http:", "https:", "data:")) or not path.is_file():
        return match.group(0)
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
