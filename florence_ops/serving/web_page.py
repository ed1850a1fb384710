"""The page at `/`: upload a page image, ask a question, see the answer beside the image.

Plain HTML and script (`templates/page.html.j2`), no external resources: the browser reads the file as a data: URL
and posts the same OpenAI request any client sends, so the page exercises the real API (and its errors).
"""

from florence_ops.templating import render

PAGE_TEMPLATE = "page.html.j2"
PAGE_HTML = render(PAGE_TEMPLATE)
