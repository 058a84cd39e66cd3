"""`tune board`: a local web page to configure, launch and watch runs.

``runs`` holds the plain-Python part (scanning a runs folder, reading metrics incrementally,
building the config form, launching/stopping ``tune run`` child processes); ``server`` wraps it
in a Starlette app served by uvicorn (the optional ``board`` extra); ``static/`` is the page
(HTML/JS/CSS and the vendored uPlot chart library).
"""
