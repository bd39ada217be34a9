"""The operator's web dashboard: revenue, decisions, payers and settlement, on worker 0
beside the admin API, behind the same admin token (docs/operations.md, "The dashboard").

Served with aiohttp on `listen_dashboard` (127.0.0.1 by default, like the admin API),
never through the gateway. Pages are HTML drawn server-side, no script and no build
step; charts are inline SVG. What it shows comes from the ledger (receipt and credit
streams, batches, the recent-decisions stream) and the Prometheus registry; what it
changes goes through the ledger's `Payers` service, as the CLI and the admin API do.

  routes.py  the aiohttp app: routes, the login and CSRF guard (auth.py), the handlers
  data.py    what each page shows, read from the ledger's services and the metrics
  views.py   each page's HTML, from what data.py read
  html.py    the building blocks: escaping, tables, sections, SVG charts, the frame
"""
