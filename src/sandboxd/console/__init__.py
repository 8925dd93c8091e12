"""The web console at ``/console/``: static files only (a page, its script and the vendored
xterm.js). The page asks for an API key and then uses the same REST API and envd PTY API as the
SDKs, through the same listener, so it has no privileges of its own and needs no session."""
