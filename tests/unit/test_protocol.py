import pytest

from node import protocol
from node.errors import BadRequest, TooLarge


def test_parse_valid_send():
    frame = protocol.parse_frame('{"type":"send","room":"general","text":"hi","ref":3}')
    assert frame["room"] == "general" and protocol.ref_of(frame) == 3


@pytest.mark.parametrize("raw, message", [
    ("not json", "malformed JSON"),
    ("[1,2]", "JSON object"),
    ('{"room":"general"}', "missing field: type"),
    ('{"type":"dance"}', "unknown type"),
    ('{"type":"send","room":"general"}', "missing field: text"),
    ('{"type":"send","room":5,"text":"x"}', "field room must be of type str"),
    ('{"type":"history","room":"general","limit":true}', "field limit must be of type int"),
    ('{"type":"ping","ref":{"a":1}}', "ref must be"),
    ('{"type":"ping","x":[[[[[[[[[[1]]]]]]]]]]}', "nested too deeply"),
])
def test_parse_rejects(raw, message):
    with pytest.raises(BadRequest) as info:
        protocol.parse_frame(raw)
    assert message in info.value.message


def test_text_limits():
    assert protocol.check_text("a" * 10, 10)
    with pytest.raises(TooLarge):
        protocol.check_text("a" * 11, 10)
    with pytest.raises(BadRequest):
        protocol.check_text("   ", 10)


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_ws_text_frame_lengths(n):
    from websockets.frames import Frame
    from websockets.streams import StreamReader

    payload = b"x" * n
    data = protocol.ws_text_frame(payload)
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as stop:
        frame = stop.value
    assert frame.data == payload and frame.opcode.name == "TEXT" and frame.fin


def test_room_ids():
    for good in ["general", "dm:alice:bob", "r-abc123def0"]:
        assert protocol.check_room_id(good) == good
    for bad in ["", "General", "dm:alice", "r-", "../etc", "room with space"]:
        with pytest.raises(BadRequest):
            protocol.check_room_id(bad)


@pytest.mark.parametrize("kind, extra", [("history", {"room": "general"}), ("who", {"room": "general"})])
def test_optional_null_means_absent(kind, extra):
    """``"limit": null`` is the default limit, not a type error deep in a handler."""
    frame = protocol.parse_frame(protocol.orjson.dumps({"type": kind, **extra, "limit": None}))
    assert "limit" not in frame
    with pytest.raises(BadRequest, match="missing field: room"):
        protocol.parse_frame(b'{"type": "who", "room": null}')
