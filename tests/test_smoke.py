import signal

from tests.conftest import CLIENT_ID


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
