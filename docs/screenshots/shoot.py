"""Full-page PNG of a local HTML file, taken by the system's headless Chromium (playwright drives it;
no browser download: `pip install playwright`, then point it at /usr/bin/chromium).

Usage: shoot.py HTML PNG [WIDTH] [--wait-plotly]
--wait-plotly waits until every plotly figure of the page has drawn its SVG, then 1.5 s more.
"""
import sys

from playwright.sync_api import sync_playwright

html, png = sys.argv[1], sys.argv[2]
width = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 1280
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": width, "height": 800}, device_scale_factor=1)
    page.goto("file://" + html, wait_until="load")
    if "--wait-plotly" in sys.argv:
        page.wait_for_function("""() => { const f = document.querySelectorAll('.plotly-graph-div');
            return f.length > 0 && [...f].every(d => d.querySelector('.main-svg')); }""", timeout=30000)
        page.wait_for_timeout(1500)
        print("figures:", page.evaluate("document.querySelectorAll('.plotly-graph-div').length"))
    page.screenshot(path=png, full_page=True)
    print("page height:", page.evaluate("document.documentElement.scrollHeight"))
    browser.close()
