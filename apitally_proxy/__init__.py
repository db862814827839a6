"""apitally-proxy: a sidecar reverse proxy that meters API traffic for Apitally."""

__version__ = "0.1.0"
