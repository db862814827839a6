"""The client-facing HTTP/1.1 server (the default, `server = lean`).

`headers` is the header policy over raw header lines, `upstream` the keep-alive pool
with raw heads, `server` the asyncio protocol on aiohttp's C request parser.
docs/lean-server.md has the design and what differs from the aiohttp server.
"""
