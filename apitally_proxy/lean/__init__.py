"""A lean client-facing HTTP/1.1 server for the proxy (issue 12): a prototype, not wired in.

`headers` is the header policy over raw header lines, `upstream` the keep-alive pool
with raw heads, `server` the asyncio protocol on aiohttp's C request parser.
docs/lean-server.md has the design, the measurements and the integration plan.
"""
