"""A client behind a slow network link (a throttling TCP proxy in the test, a few KB/s from the
node to the client). Either it keeps up and gets every message in order over the slow link, or
the node cuts it off (4002: its outbound buffer overflowed) and after reconnecting with its
cursor it gets exactly the gap."""

from __future__ import annotations

import asyncio

from node.protocol import stream_id_tuple

from .common import Sender, ThrottledProxy, Tracker, expected_ids, metric

SLOW_METRIC = "chatcluster_slow_consumer_disconnects_total"


async def test_slow_link_that_keeps_up_gets_everything_in_order(parallel_nodes, clients):
    (a,) = await parallel_nodes.start(1)
    async with ThrottledProxy("127.0.0.1", int(a.proc.info["ws_port"]), rate=8 * 1024) as link:
        slow = Tracker(await clients(link.ws_url, user="mobile", reconnect=False))
        sender = await clients(a.ws_url, user="sender")
        loop = asyncio.get_running_loop()
        started = loop.time()
        # 60 messages of ~300 bytes: ~18 KB, over two seconds at 8 KB/s.
        chat = Sender(sender, "m", size=200).start()
        await chat.until(60)
        await chat.stop()
        ids = expected_ids(chat)
        await slow.exact(ids, within=15)
        took = loop.time() - started
        assert link.bytes_down >= 60 * 250
        assert took >= 0.7 * link.bytes_down / link.rate, took  # it really was a slow link
        assert slow.client.close_codes == [] and len(slow.welcomes) == 1
        assert await metric(a.http_url, SLOW_METRIC) == 0
        slow.stop()


async def test_slow_link_cut_off_gets_exactly_the_gap_after_reconnecting(parallel_nodes, clients):
    """Far more traffic than a 4 KB/s link carries: the node cuts the client off (4002), or the
    client's keepalive gives up first. It reconnects with its cursor (the next URL of its list:
    the link got better) and gets exactly the gap: replayed (`recovered: true`), or, when the
    gap is beyond what the node replays into one connection's buffer, reported
    (`recovered: false`) and loaded with `history` -- never silently lost, never twice."""
    (a,) = await parallel_nodes.start(1, CHAT_OUTBOUND_BUFFER_BYTES=16 * 1024)
    async with ThrottledProxy("127.0.0.1", int(a.proc.info["ws_port"]), rate=4 * 1024) as link:
        mobile = await clients([link.ws_url, a.ws_url], user="mobile", ping_interval=0.5, ping_timeout=1.5)
        slow = Tracker(mobile)
        sender = await clients(a.ws_url, user="sender")
        chat = Sender(sender, "big", size=1000, interval=0.002).start()
        await slow.until(lambda t: len(t.welcomes) >= 2, "reconnect", within=20)
        await chat.more(20)  # and some after the reconnect
        await chat.stop()
        ids = expected_ids(chat)
        await slow.until(lambda t: t.messages and t.messages[-1]["id"] == ids[-1], "the last message")
        cut = slow.welcome_at[1]
        before = [m["id"] for m in slow.messages[:cut]]
        after = [m["id"] for m in slow.messages[cut:]]
        assert before and before == ids[:len(before)], "the slow link delivered in order"
        welcome = slow.welcomes[1]
        cut_off = await metric(a.http_url, SLOW_METRIC)
        if welcome["recovered"] == {"general": True}:
            gap: list[str] = []
        else:
            assert welcome["recovered"] == {"general": False}
            last_id = welcome["rooms"][0]["last_id"]
            gap, cursor = [], before[-1]
            while cursor != last_id:  # the gap: after the last message seen, up to last_id
                # pages that fit the small buffer this test gives the node
                page = await mobile.history("general", after=cursor, limit=10)
                for m in page["messages"]:
                    if stream_id_tuple(m["id"]) <= stream_id_tuple(last_id):
                        gap.append(m["id"])
                cursor = gap[-1] if gap else cursor
                if not page["more"] or stream_id_tuple(page["messages"][-1]["id"]) >= stream_id_tuple(last_id):
                    break
            assert cursor == last_id
        assert before + gap + after == ids, (len(before), len(gap), len(after), len(ids))
        # How it went, for the report: cut by the node (4002) or given up by the keepalive.
        assert mobile.close_codes[:1] in ([4002], [1006]), mobile.close_codes
        assert cut_off >= 1 or mobile.close_codes[:1] == [1006]
        assert link.connections == 1
        slow.stop()
