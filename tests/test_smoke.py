import signal
import socket

from tests.conftest import CLIENT_ID
from tests.support.proxy_process import ProxyProcess


async def test_counts_arrive_at_hub(hub, upstream, http, start_proxy, hub_args):
    proxy = await start_proxy(upstream.url, *hub_args)
    for i in range(5):
        async with http.get(f"{proxy.url}/items/{i}?consumer=c1&name=Acme") as r:
            assert r.status == 200
            assert "X-Apitally-Consumer" not in r.headers
            await r.read()
    assert await proxy.stop(signal.SIGTERM) == 0
    assert hub.request_counts() == {("c1", "GET", "/items/{id}", 200): 5}
    assert hub.calls[0].client_id == CLIENT_ID


async def test_a_port_taken_before_the_proxy_binds_it_is_picked_again(upstream, tmp_path):
    """The harness picks free ports, then the proxy binds them; something else may take
    one in between (another test's outgoing connection). That is retried with new ports,
    never reported as the proxy's failure."""
    proxy = ProxyProcess(upstream.url, tmp_path / "state")
    taken = proxy.admin_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))  # bound, not listening: as a client socket is
        try:
            await proxy.start()
            assert proxy.admin_port != taken
            assert "address already in use" in proxy.log()  # the first try did fail
        finally:
            await proxy.stop()
