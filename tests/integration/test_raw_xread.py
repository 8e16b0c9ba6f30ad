"""The shard readers' hand-packed XREAD against a real Redis, in both protocol versions: the
same answer as redis-py's own ``xread``, and the errors a reader reconnects on."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from node.redisio import RawXread


# A reader's connection goes to one server (the shard's master on a cluster): tested on one.
@pytest.mark.standalone_only
@pytest.mark.parametrize("protocol", [2, 3])
async def test_raw_xread_answers_as_redis_py_does(redis_server, protocol):
    client = aioredis.Redis.from_url(redis_server.url, single_connection_client=True, protocol=protocol)
    try:
        await client.ping()  # opens the single connection
        await client.xadd("a", {"f": "1", "g": "x y"})
        await client.xadd("b", {"f": "2"})
        first = await client.xadd("b", {"f": "3"})
        streams = {"a": "0-0", "b": "0-0", "empty": "0-0"}
        raw = RawXread()
        got = await RawXread.call(client, raw.pack(streams, 10, 100))
        expected = await client.xread(streams, count=10)
        # redis-py's RESP3 shape wraps each stream's entries in one more list.
        as_pairs = ([(k, v[0]) for k, v in expected.items()] if isinstance(expected, dict) else expected)
        assert got == [(k, [(sid, dict(f)) for sid, f in entries]) for k, entries in as_pairs]
        assert [k for k, _ in got] == [b"a", b"b"]
        # COUNT is honoured, and a block that times out answers None.
        got = await RawXread.call(client, raw.pack({"b": "0-0"}, 1, 100))
        assert got is not None and len(got[0][1]) == 1
        assert await RawXread.call(client, raw.pack({"b": first.decode()}, 10, 50)) is None
        # An error reply is raised (the reader then reconnects), not returned.
        await client.set("plain", "v")
        with pytest.raises(rexc.ResponseError):
            await RawXread.call(client, raw.pack({"plain": "0-0"}, 10, 50))
    finally:
        await client.aclose()
