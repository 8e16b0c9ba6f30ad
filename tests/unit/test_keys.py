from redis.crc import key_slot

from node.keys import Keys


def test_all_keys_of_a_room_share_one_slot():
    k = Keys(16)
    for room in ["general", "dm:alice:bob", "r-0123456789"]:
        slots = {key_slot(x.encode()) for x in [
            k.room_stream(room), k.room_meta(room), k.room_members(room), k.room_cmid(room, "u", "c"),
            k.room_typing_gate(room, "u"), k.room_invites(room), k.shard_ephemeral(k.room_shard(room))]}
        assert len(slots) == 1


def test_rooms_spread_over_shards_and_streams_of_a_shard_share_a_slot():
    k = Keys(16)
    shards = {k.room_shard(f"r-{i:010d}") for i in range(500)}
    assert shards == set(range(16))
    same = [f"r-{i:010d}" for i in range(500) if k.room_shard(f"r-{i:010d}") == 3]
    assert len({key_slot(k.room_stream(r).encode()) for r in same}) == 1


def test_stream_room_inverts_room_stream():
    k = Keys(16)
    assert k.stream_room(k.room_stream("dm:a:b")) == "dm:a:b"
    assert k.stream_room(k.room_meta("general")) is None


def test_user_keys_share_the_slot_of_their_online_index():
    k = Keys(16)
    for user in ["alice", "bob@example.com", "x"]:
        slots = {key_slot(x.encode()) for x in [
            k.user_rooms(user), k.user_reads(user), k.user_inbox(user), k.user_meta(user),
            k.user_sessions(user), k.online_index(k.user_shard(user))]}
        assert len(slots) == 1


def test_the_sweeper_builds_the_same_user_keys_as_keys():
    k = Keys(16)
    shard = k.user_shard("alice")
    assert k.user_key_prefix(shard) + "alice" + Keys.SESSIONS_SUFFIX == k.user_sessions("alice")
    assert k.user_key_prefix(shard) + "alice" + Keys.META_SUFFIX == k.user_meta("alice")
