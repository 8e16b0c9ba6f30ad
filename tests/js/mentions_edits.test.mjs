// v1.1 pure helpers of chatcluster.js (mentions, receipts) and the store's handling of edit,
// delete, receipt and unread events (the client's _applyEvent, no network).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  ChatClient, mentionCandidates, mentionsUser, mentionParts, mentionQuery, mentionMatches, seenBy, MAX_MENTIONS,
} from "../../node/static/chatcluster.js";

test("mention candidates follow the node's rule", () => {
  assert.deepEqual(mentionCandidates("@bob hi @carol."), ["bob", "carol.", "carol"]);
  assert.deepEqual(mentionCandidates("x@bob and (@dan)"), []); // not after whitespace
  assert.deepEqual(mentionCandidates("hi\n@eve-"), ["eve-", "eve"]);
  assert.deepEqual(mentionCandidates("@alice @bob", "alice"), ["bob"]); // never oneself
  const many = Array.from({ length: MAX_MENTIONS + 5 }, (_, i) => `@u${i}`).join(" ");
  assert.equal(mentionCandidates(many).length, MAX_MENTIONS);
});

test("a message mentions a user unless it is theirs, a system message or deleted", () => {
  const m = { text: "ping @bob", from: { id: "alice" } };
  assert.equal(mentionsUser(m, "bob"), true);
  assert.equal(mentionsUser(m, "bo"), false);
  assert.equal(mentionsUser({ ...m, kind: "system" }, "bob"), false);
  assert.equal(mentionsUser({ ...m, from: { id: "bob" } }, "bob"), false);
  assert.equal(mentionsUser({ ...m, deleted: true, text: undefined }, "bob"), false);
});

test("mention parts give the text back and mark only the @ids", () => {
  const text = "hey @bob., mail me@x.org or <b>@carol</b>";
  const parts = mentionParts(text);
  assert.equal(parts.map((p) => p.text).join(""), text);
  assert.deepEqual(parts.filter((p) => p.mention).map((p) => [p.text, p.mention]), [["@bob", "bob"]]);
  assert.deepEqual(mentionParts(""), [{ text: "" }]);
  assert.deepEqual(mentionParts("@a @b").filter((p) => p.mention).map((p) => p.mention), ["a", "b"]);
});

test("the @word under the caret", () => {
  assert.deepEqual(mentionQuery("hi @bo"), { start: 3, query: "bo" });
  assert.deepEqual(mentionQuery("@"), { start: 0, query: "" });
  assert.equal(mentionQuery("mail a@b"), null);
  assert.equal(mentionQuery("hi @bob there"), null);
  assert.deepEqual(mentionQuery("hi @bob there", 7), { start: 3, query: "bob" });
});

test("autocomplete matches ids first, then names", () => {
  const users = [{ id: "zed", name: "Bob Z" }, { id: "bob", name: "Robert" }, { id: "abby", name: "Abby" }];
  assert.deepEqual(mentionMatches(users, "b").map((u) => u.id), ["bob", "zed", "abby"]);
  assert.deepEqual(mentionMatches(users, "").map((u) => u.id), ["abby", "bob", "zed"]);
  assert.deepEqual(mentionMatches(users, "q"), []);
  assert.equal(mentionMatches(users, "", 2).length, 2);
});

test("seen when the other member's marker reaches the message", () => {
  const room = { read_by: [{ id: "bob", read_id: "100-1" }] };
  assert.equal(seenBy(room, "100-1", "alice"), true);
  assert.equal(seenBy(room, "100-0", "alice"), true);
  assert.equal(seenBy(room, "100-2", "alice"), false);
  assert.equal(seenBy({ read_by: [{ id: "bob", read_id: "0-0" }] }, "1-0", "alice"), false);
  assert.equal(seenBy({}, "1-0", "alice"), false);
});

function client() {
  const c = new ChatClient({ user: "alice", tabs: false, storage: { getItem: () => null, setItem() {} } });
  c._applyEvent({ type: "welcome", user: { id: "alice", name: "Alice" }, personal: { epoch: "p", last_id: "0-0" },
    rooms: [{ id: "dm:alice:bob", kind: "direct", epoch: "e", last_id: "0-0", seq: 0, unread: 0, mentions: 0,
      role: "member", read_by: [{ id: "bob", read_id: "0-0" }] },
    { id: "r-1", kind: "open", epoch: "e1", last_id: "0-0", seq: 0, unread: 0, mentions: 0, role: "admin" }] });
  return c;
}

test("edits and deletes change the held message, move the cursor, and keep no deleted text", () => {
  const c = client();
  const room = "r-1";
  c._applyEvent({ type: "message", room, id: "10-0", seq: 1, ts: 10, from: { id: "bob", name: "Bob" }, text: "secret @alice", cmid: "c1" });
  c._applyEvent({ type: "message", room, id: "11-0", seq: 2, ts: 11, from: { id: "alice", name: "Alice" }, text: "tpyo" });
  assert.equal(c.rooms.get(room).mentions, 1);
  assert.equal(c.rooms.get(room).unread, 1);
  assert.equal(c._applyEvent({ type: "edit", room, id: "11-0", text: "typo", edited_at: 12, by: { id: "alice" }, entry_id: "12-0" }), true);
  assert.equal(c.messages(room)[1].text, "typo");
  assert.equal(c.messages(room)[1].edited_at, 12);
  assert.equal(c.cursors[room].id, "12-0");
  // The same entry again (a relay, a replay) is not applied twice; an older one is ignored.
  assert.equal(c._applyEvent({ type: "edit", room, id: "11-0", text: "old", edited_at: 9, entry_id: "12-0" }), false);
  assert.equal(c.messages(room)[1].text, "typo");
  c._applyEvent({ type: "delete", room, id: "10-0", by: { id: "alice", name: "Alice" }, entry_id: "13-0" });
  const tomb = c.messages(room)[0];
  assert.equal(tomb.deleted, true);
  assert.equal(tomb.text, undefined);
  assert.equal(tomb.cmid, undefined);
  assert.equal(c.cursors[room].id, "13-0");
  assert.ok(!JSON.stringify(c._snapshot()).includes("secret"));
  // An edit of a deleted message does not bring text back; a new message after the entries is taken.
  c._applyEvent({ type: "edit", room, id: "10-0", text: "back", edited_at: 14, entry_id: "14-0" });
  assert.equal(c.messages(room)[0].text, undefined);
  assert.equal(c._applyEvent({ type: "message", room, id: "15-0", seq: 3, ts: 15, from: { id: "bob" }, text: "next" }), true);
  assert.equal(c.canDelete({ ...c.messages(room)[2], room }), true); // admin
  assert.equal(c.canEdit({ ...c.messages(room)[2], room }), false); // not the author
  assert.equal(c.canEdit({ ...c.messages(room)[1], room }), true);
});

test("receipts keep the newest marker per member; unread events carry mentions", () => {
  const c = client();
  const room = "dm:alice:bob";
  c._applyEvent({ type: "message", room, id: "5-0", seq: 1, ts: 5, from: { id: "alice" }, text: "hi" });
  assert.equal(seenBy(c.rooms.get(room), "5-0", "alice"), false);
  c._applyEvent({ type: "receipt", room, user: { id: "bob", name: "Bob" }, read_id: "5-0" });
  assert.equal(seenBy(c.rooms.get(room), "5-0", "alice"), true);
  c._applyEvent({ type: "receipt", room, user: { id: "bob" }, read_id: "4-0" }); // late, older
  assert.equal(c.rooms.get(room).read_by.length, 1);
  assert.equal(seenBy(c.rooms.get(room), "5-0", "alice"), true);
  assert.equal(c._applyEvent({ type: "receipt", room, user: { id: "alice" }, read_id: "9-0" }), false);
  c._applyEvent({ type: "unread", room: "r-1", unread: 4, read_id: "1-0", mentions: 2, pid: "1-1" });
  assert.equal(c.rooms.get("r-1").mentions, 2);
  assert.equal(c.mentionTotal(), 2);
  // A role change carries only {id, role}: merged, the cursor stays.
  c._applyEvent({ type: "room", change: "updated", room: { id: "r-1", role: "member" }, pid: "1-2" });
  assert.equal(c.roleIn("r-1"), "member");
  assert.equal(c.cursors["r-1"].epoch, "e1");
});

test("a change to a message not held yet folds into the history page that brings it", () => {
  const c = client();
  const room = "r-1";
  c._applyEvent({ type: "edit", room, id: "3-0", text: "new", edited_at: 7, entry_id: "7-0" });
  c._applyEvent({ type: "delete", room, id: "4-0", by: { id: "bob" }, entry_id: "8-0" });
  c._mergeHistory(room, [
    { id: "3-0", seq: 1, ts: 3, from: { id: "bob" }, text: "old" },
    { id: "4-0", seq: 2, ts: 4, from: { id: "bob" }, text: "gone" },
    { id: "5-0", seq: 3, ts: 5, from: { id: "bob" }, text: "kept" },
  ]);
  assert.deepEqual(c.messages(room).map((m) => [m.text, !!m.deleted, m.edited_at]),
    [["new", false, 7], [undefined, true, undefined], ["kept", false, undefined]]);
  assert.ok(!JSON.stringify(c._snapshot()).includes("gone"));
});

test("an invitation replayed after the welcome keeps the welcome's counts", () => {
  const c = client();
  c._applyEvent({ type: "room", change: "added", room: { id: "r-1", kind: "open", epoch: "e1", last_id: "0-0", seq: 0, unread: 0, mentions: 0, name: "R" }, pid: "2-1" });
  c.rooms.get("r-1").unread = 3; // as a welcome would have it
  c._applyEvent({ type: "room", change: "added", room: { id: "r-1", kind: "open", epoch: "e1", last_id: "0-0", unread: 0, mentions: 0 }, pid: "2-2" });
  assert.equal(c.rooms.get("r-1").unread, 3);
  assert.equal(c.rooms.get("r-1").name, "R");
});
