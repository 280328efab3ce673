"""Stacks tmux captures (ANSI, from `tmux capture-pane -p -e`) into one HTML page, each converted by aha
(apt `aha`), trailing blank lines dropped, under a caption, for shoot.py to turn into a PNG.

Usage: bars_html.py OUT.html "CAPTION=FILE.ansi" ...   (the last "=" of an argument splits it)
"""
import html
import subprocess
import sys

parts = []
for arg in sys.argv[2:]:
    caption, path = arg.rsplit("=", 1)
    text = open(path, encoding="utf-8").read().rstrip("\n ") + "\n"
    body = subprocess.run(["aha", "--no-header", "--black"], input=text, capture_output=True, text=True,
                          check=True).stdout
    parts.append(f'<div class="cap">{html.escape(caption)}</div><pre class="pane">{body}</pre>')
page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>watcher-agent progress bars</title><style>"
        "body{margin:0;padding:12px 16px;background:#1e1e1e;}"
        ".cap{color:#9ab;font:13px 'DejaVu Sans',sans-serif;margin:10px 0 4px;}"
        ".pane{background:black;color:#e8e8e8;font-family:'DejaVu Sans Mono',monospace;font-size:13px;"
        "line-height:1.25;margin:0;padding:6px 8px;width:160ch;white-space:pre;}"
        "</style></head><body>" + "".join(parts) + "</body></html>")
open(sys.argv[1], "w", encoding="utf-8").write(page)
