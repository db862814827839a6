"""A runnable demo: a sample API behind the real proxy, metered in local mode.

`python -m apitally_proxy.demo` starts both, sends traffic through the proxy and
prints what was metered; `python -m apitally_proxy.demo.sample_app` runs the
sample API on its own (the docker-compose `app` service does this).
"""
