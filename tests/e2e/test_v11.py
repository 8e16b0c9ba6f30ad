"""Protocol v1.1 in the browser: edits, deletes, roles and kicks, mentions, read receipts.

Real chromium pages on real nodes (two of them, users on different nodes), no mocks; waits are
Playwright waits on DOM or client-state conditions, never sleeps.
"""

from __future__ import annotations

import json
from typing import Any

from .conftest import open_chat, send, texts, wait_connected, wait_texts

NO_WEBSOCKET = "delete window.WebSocket; Object.defineProperty(window, 'WebSocket', {value: undefined});"
FAST_POLLS = {"CHAT_POLL_MIN_MS": 200, "CHAT_POLL_MAX_MS": 800, "CHAT_POLL_UNFOCUSED_MS": 400}


def message(page: Any, text: str) -> Any:
    return page.locator("#messages li.msg[data-id]", has_text=text)


def menu_action(page: Any, text: str, action: str) -> None:
    """Open the action menu of the message showing ``text`` and pick ``action``."""
    item = message(page, text)
    item.hover()
    item.locator(".msg-more").click()
    page.click(f"#msg-menu [data-action={action}]")


def confirm_dialog(page: Any) -> None:
    page.click("#dialog button[value=ok]")
    page.wait_for_function("!document.querySelector('#dialog').open")


def stored(page: Any, user: str) -> str:
    return str(page.evaluate(f"localStorage.getItem('chatcluster:v1:{user}') || ''"))


def create_room(page: Any, name: str, members: list[str]) -> str:
    return str(page.evaluate(f"chat.createRoom({json.dumps(name)}, 'open', {json.dumps(members)}).then(d => d.room.id)"))


def open_room(page: Any, room: str) -> None:
    page.click(f"#room-list [data-room='{room}'], #dm-list [data-room='{room}']")
    page.wait_for_function("r => window.chat && document.querySelector(`[data-room='${r}']`).classList.contains('active')",
                           arg=room)


def test_edit_and_delete_reach_other_nodes_live_by_websocket_and_polling_and_after_reloads(start_nodes: Any,
                                                                                        contexts: Any) -> None:
    n1, n2 = start_nodes(2, **FAST_POLLS)
    alice = open_chat(contexts(), n1, "alice", "Alice")
    bob_ctx = contexts()
    bob = open_chat(bob_ctx, n2, "bob", "Bob")
    bob_tab = open_chat(bob_ctx, n2, "bob", "Bob")  # a second tab: events relayed by the leading tab
    carol = open_chat(contexts(), n2, "carol", "Carol", init_script=NO_WEBSOCKET)
    assert carol.evaluate("chat.transport") == "poll"
    assert bob.evaluate("chat.isLeader") != bob_tab.evaluate("chat.isLeader")

    send(alice, "secret plan 42")
    wait_texts(alice, ["secret plan 42"])
    send(alice, "tpyo here")
    before = ["secret plan 42", "tpyo here"]
    for page in (alice, bob, bob_tab, carol):
        wait_texts(page, before)
    # Nobody else may edit or delete a member's message in general: no action menu for them.
    assert message(bob, "tpyo here").locator(".msg-more").count() == 0

    menu_action(alice, "tpyo here", "edit")
    alice.fill("#dialog textarea[name=text]", "typo here, fixed")
    confirm_dialog(alice)
    edited = ["secret plan 42", "typo here, fixed"]
    for page in (alice, bob, bob_tab, carol):
        wait_texts(page, edited)
        message(page, "typo here, fixed").locator(".edited").wait_for()

    menu_action(alice, "secret plan 42", "delete")
    confirm_dialog(alice)
    final = ["Message deleted", "typo here, fixed"]
    for page in (alice, bob, bob_tab, carol):
        wait_texts(page, final)
        assert page.locator("#messages li.msg.deleted").count() == 1
    # The deleted text is gone from every profile's stored state (leader-written, debounced).
    for page, user in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        page.wait_for_function(f"(s => s.includes('typo here, fixed') && !s.includes('secret plan'))"
                               f"(localStorage.getItem('chatcluster:v1:{user}') || '')")

    # A reload resumes from the stored state; a new profile on the other node reads history.
    bob_tab.close()
    bob.reload()
    wait_connected(bob)
    wait_texts(bob, final)
    message(bob, "typo here, fixed").locator(".edited").wait_for()
    fresh = open_chat(contexts(), n1, "bob", "Bob")
    wait_texts(fresh, final)
    message(fresh, "typo here, fixed").locator(".edited").wait_for()
    assert "secret plan" not in stored(fresh, "bob")

    # Edits made while a page is away arrive with the resume.
    bob.goto("about:blank")
    alice.evaluate("id => chat.edit('general', id, 'fixed twice')",
                   message(alice, "typo here, fixed").get_attribute("data-id"))
    wait_texts(alice, ["Message deleted", "fixed twice"])
    bob = open_chat(bob_ctx, n2, "bob", "Bob", page=bob)
    wait_texts(bob, ["Message deleted", "fixed twice"])
    wait_texts(carol, ["Message deleted", "fixed twice"])


def test_owner_makes_an_admin_who_kicks_a_member_and_the_owner_deletes_any_message(start_nodes: Any,
                                                                                   contexts: Any) -> None:
    n1, n2 = start_nodes(2)
    carol = open_chat(contexts(), n1, "carol", "Carol")
    bob = open_chat(contexts(), n2, "bob", "Bob")
    dan = open_chat(contexts(), n2, "dan", "Dan")
    room = create_room(carol, "crew", ["bob", "dan"])
    for page in (carol, bob, dan):
        page.locator(f"#room-list [data-room='{room}']").wait_for()
        open_room(page, room)
    send(dan, "spam spam spam")
    for page in (carol, bob, dan):
        wait_texts(page, ["spam spam spam"])
    # A member may not delete another's message; the owner may.
    assert message(bob, "spam spam").locator(".msg-more").count() == 0
    menu_action(carol, "spam spam", "delete")
    confirm_dialog(carol)
    for page in (carol, bob, dan):
        wait_texts(page, ["Message deleted"])

    # The owner's member list shows roles and makes bob an admin.
    carol.click("#who-btn")
    carol.locator("#people-list li[data-user=carol] .role-owner").wait_for()
    carol.locator("#people-list li[data-user=bob] [data-action=role]", has_text="Make admin").click()
    bob.wait_for_function(f"chat.rooms.get('{room}').role === 'admin'")
    carol.locator("#people-list li[data-user=bob] .role-admin").wait_for()

    # The admin kicks dan (never the owner: no button for that), and dan sees the room go.
    bob.click("#who-btn")
    bob.locator("#people-list li[data-user=dan] [data-action=kick]").wait_for()
    assert bob.locator("#people-list li[data-user=carol] [data-action=kick]").count() == 0
    assert bob.locator("#people-list [data-action=role]").count() == 0
    bob.click("#people-list li[data-user=dan] [data-action=kick]")
    confirm_dialog(bob)
    dan.locator(f"[data-room='{room}']").wait_for(state="detached")
    dan.wait_for_function("document.querySelector('#room-list [data-room=general]').classList.contains('active')")
    dan.locator(".toast", has_text="You were removed from").wait_for()
    assert dan.evaluate(f"chat.join('{room}').then(() => 'joined', e => e.code)") == "forbidden"
    bob.locator("#people-list li[data-user=dan]").wait_for(state="detached")


def test_mentions_complete_highlight_and_count_for_the_mentioned_user(start_nodes: Any, contexts: Any) -> None:
    n1, n2 = start_nodes(2)
    alice = open_chat(contexts(), n1, "alice", "Alice")
    bob_ctx = contexts()
    bob = open_chat(bob_ctx, n2, "bob", "Bob")
    room = create_room(alice, "plans", ["bob"])
    bob.locator(f"#room-list [data-room='{room}']").wait_for()
    open_room(alice, room)

    # Typing "@b" offers bob (an online member); Tab takes him.
    alice.click("#input")
    alice.keyboard.type("@b")
    alice.locator("#mention-pop li[data-user=bob]").wait_for()
    alice.keyboard.press("Tab")
    assert alice.input_value("#input") == "@bob "
    assert alice.locator("#mention-pop").is_hidden()
    alice.keyboard.type("can you look? <b>not bold</b> <img src=x onerror=alert(1)>")
    alice.keyboard.press("Enter")
    text = "@bob can you look? <b>not bold</b> <img src=x onerror=alert(1)>"
    wait_texts(alice, [text])
    assert message(alice, "can you look").locator(".mention:not(.you)").inner_text() == "@bob"

    # Bob, in another room, gets a mention badge apart from the unread count; also after a reload.
    badge = bob.locator(f"#room-list [data-room='{room}'] .badge.mention")
    badge.wait_for()
    assert badge.inner_text() == "@1"
    bob.reload()
    wait_connected(bob)
    bob.locator(f"#room-list [data-room='{room}'] .badge.mention", has_text="@1").wait_for()
    open_room(bob, room)
    wait_texts(bob, [text])
    assert message(bob, "can you look").locator(".mention.you").inner_text() == "@bob"
    assert bob.locator("#messages img, #messages b").count() == 0  # user text is never HTML
    bob.locator(f"#room-list [data-room='{room}'] .badge.mention").wait_for(state="detached")
    assert texts(bob) == [text]


def test_seen_shows_in_a_direct_room_once_the_other_member_reads(start_nodes: Any, contexts: Any) -> None:
    n1, n2 = start_nodes(2)
    alice_ctx = contexts()
    alice = open_chat(alice_ctx, n1, "alice", "Alice")
    bob = open_chat(contexts(), n2, "bob", "Bob")
    dm = str(alice.evaluate("chat.dm('bob').then(d => d.room.id)"))
    alice.locator(f"#dm-list [data-room='{dm}']").wait_for()
    open_room(alice, dm)
    send(alice, "are you there?")
    wait_texts(alice, ["are you there?"])
    bob.locator(f"#dm-list [data-room='{dm}']").wait_for()
    bob.wait_for_function(f"(chat.messages('{dm}').length || chat.rooms.get('{dm}').unread) > 0")
    assert message(alice, "are you there?").locator(".seen").count() == 0  # bob has not read it

    open_room(bob, dm)  # reads it: alice gets a receipt
    wait_texts(bob, ["are you there?"])
    message(alice, "are you there?").locator(".seen").wait_for()

    # A reloaded page knows it from the room summary (read_by); a newer message is not seen yet.
    alice.reload()
    wait_connected(alice)
    message(alice, "are you there?").locator(".seen").wait_for()
    bob.goto("about:blank")
    send(alice, "hello?")
    wait_texts(alice, ["are you there?", "hello?"])
    alice.wait_for_function("!document.querySelector('#messages .seen')")
