/**
 * The client's state machine against a scripted socket: what it writes on (re)connect, what
 * it delivers, when it retries and with which id, and when it asks for a new token. Timers
 * are mocked, so backoff delays are checked to the millisecond without waiting for them.
 */
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";
import { Client, ClientClosedError, ParleyError } from "../../dist/index.js";
import { FakeSocket } from "../support/fake-socket.mjs";

const A = "8d40bb8e-73f3-563f-9872-f4c5c385a21e";
const B = "51aa0c7e-1111-4a4a-9b9b-000000000002";

/** Lets the client's promise chains (token fetch, request settling) run. */
const flush = () => new Promise((resolve) => setImmediate(resolve));

beforeEach(() => {
  FakeSocket.reset();
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
});
afterEach(() => mock.timers.reset());

function client(options = {}) {
  return new Client({
    url: "ws://gateway.test/ws",
    token: "t1",
    WebSocket: FakeSocket,
    idPrefix: "p",
    heartbeatMs: 0,
    random: () => 0.5,
    backoff: { baseMs: 100, capMs: 1_000 },
    ...options,
  });
}

/** Connects `c` through a first socket that welcomes it and resumes with `cursor`. */
async function live(c, cursor = "c1-0") {
  const connected = c.connect();
  await flush();
  const socket = FakeSocket.last();
  socket.welcome();
  socket.resumed(cursor);
  await connected;
  return socket;
}

/** Drops `socket` and runs the reconnect timer: the next socket, welcomed. */
async function reconnect(socket, delayMs = 50) {
  socket.drop();
  mock.timers.tick(delayMs);
  await flush();
  const next = FakeSocket.last();
  assert.notEqual(next, socket, "a new socket after the backoff delay");
  next.welcome();
  return next;
}

test("connects with protocol 2 and the token, and resumes from now on a first connection", async () => {
  const c = client();
  const states = [];
  c.on("state", (state) => states.push(state));
  const socket = await live(c);
  const url = new URL(socket.url);
  assert.equal(url.searchParams.get("protocol"), "2");
  assert.equal(url.searchParams.get("pack"), "1");
  assert.equal(url.searchParams.get("access_token"), "t1");
  assert.deepEqual(socket.frames("resume"), [{ type: "resume", id: "p-1", conversations: {} }]);
  assert.deepEqual(states, ["connecting", "resuming", "live"]);
  assert.equal(c.state, "live");
  c.close();
});

test("the resume after a reconnect names the cursor and the conversations with events since", async () => {
  const c = client();
  const first = await live(c, "c1-0");
  first.event(A, 5, 4);
  first.event(B, 6, 0);
  // A second resumed-worth of progress: a fresh cursor covers A and B ...
  let second = await reconnect(first);
  assert.deepEqual(second.frames("resume")[0].conversations, { [A]: 5, [B]: 6 });
  assert.equal(second.frames("resume")[0].cursor, "c1-0");
  second.resumed("c1-7");
  // ... so only what arrives after it is named next time.
  second.event(B, 9, 6);
  const third = await reconnect(second);
  const [resume] = third.frames("resume");
  assert.deepEqual(resume, { type: "resume", id: resume.id, cursor: "c1-7", conversations: { [B]: 9 } });
  assert.notEqual(resume.id, second.frames("resume")[0].id, "every resume has a fresh id");
  c.close();
});

test("without a cursor yet, a resume names every conversation it has events of", async () => {
  const c = client();
  const connected = c.connect();
  await flush();
  const first = FakeSocket.last();
  first.welcome();
  // The connection drops in the middle of the first resume, before any `resumed`.
  first.event(A, 3, 0);
  first.event(B, 4, 0);
  const second = await reconnect(first);
  assert.deepEqual(second.frames("resume"), [{ type: "resume", id: "p-2", conversations: { [A]: 3, [B]: 4 } }]);
  second.resumed("c1-4");
  await connected;
  c.close();
});

test("a saved resume state is where a new client starts", async () => {
  const saved = { cursor: "c1-30", conversations: { [A]: 57 } };
  const c = client({ resumeState: saved });
  const socket = await live(c, "c1-3e");
  assert.deepEqual(socket.frames("resume")[0], { type: "resume", id: "p-1", ...saved });
  socket.event(A, 57, 56); // already had it
  socket.event(A, 60, 57);
  assert.deepEqual(c.resumeState(), { cursor: "c1-3e", conversations: { [A]: 60 } });
  c.close();
});

test("a conversation left `more` is resumed again from its seq, and the client is live only after", async () => {
  const c = client();
  const connected = c.connect();
  await flush();
  const socket = FakeSocket.last();
  socket.welcome();
  socket.event(A, 10, 9);
  socket.resumed("c1-a", [{ conversation: A, state: "more", seq: 10 }]);
  assert.equal(c.state, "resuming");
  const again = socket.frames("resume").at(-1);
  assert.deepEqual(again, { type: "resume", id: again.id, conversations: { [A]: 10 } });
  socket.event(A, 11, 10);
  socket.resumed("c1-b");
  await connected;
  assert.equal(c.state, "live");
  // The cursor is the first resume's; A, not caught up by it, stays named.
  assert.deepEqual(c.resumeState(), { cursor: "c1-a", conversations: { [A]: 11 } });
  c.close();
});

test("`truncated` and `not_member` conversations are reported and forgotten", async () => {
  const c = client({ resumeState: { cursor: "c1-1", conversations: { [A]: 5, [B]: 7 } } });
  const truncated = [];
  c.on("truncated", (status) => truncated.push(status));
  const connected = c.connect();
  await flush();
  const socket = FakeSocket.last();
  socket.welcome();
  socket.resumed("c1-2", [
    { conversation: A, state: "truncated", seq: 40, first_seq: 30 },
    { conversation: B, state: "not_member", seq: 0 },
  ]);
  await connected;
  assert.deepEqual(truncated, [{ conversation: A, state: "truncated", seq: 40, first_seq: 30 }]);
  socket.event(B, 8, 7);
  assert.deepEqual(c.resumeState().conversations, { [B]: 8 }, "B's old seq is gone; its new event counts");
  c.close();
});

test("events are delivered once each, in order, to callbacks and iterators alike", async () => {
  const c = client();
  const seen = [];
  c.on("event", (event) => seen.push(event.seq));
  const iterator = c.iterate();
  const first = await live(c);
  first.event(A, 1, 0);
  first.event(A, 2, 1);
  first.event(A, 2, 1); // a duplicate on the same socket
  first.event(B, 3, 0);
  const second = await reconnect(first);
  // The resume replays what the client already had (resuming from the cursor alone does).
  second.event(A, 1, 0);
  second.event(A, 2, 1);
  second.event(A, 4, 2);
  second.event(B, 3, 0);
  second.event(B, 5, 3);
  second.resumed("c1-5");
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  c.close();
  const iterated = [];
  for await (const { kind, value } of iterator) {
    assert.equal(kind, "event");
    iterated.push(value.seq);
  }
  assert.deepEqual(iterated, [1, 2, 3, 4, 5], "the iterator drains what it queued, then ends on close");
});

test("requests made offline go out after the resume frame, and resolve with their answer", async () => {
  const c = client();
  const connected = c.connect();
  const sent = c.send(A, "hello");
  await flush();
  const socket = FakeSocket.last();
  assert.deepEqual(socket.frames(), [], "nothing is written before welcome");
  socket.welcome();
  assert.deepEqual(socket.frames().map((f) => f.type), ["resume", "send"]);
  const [send] = socket.frames("send");
  assert.deepEqual(send, { type: "send", id: "p-1", conversation: A, body: "hello" });
  socket.push({ type: "ack", id: send.id, conversation: A, seq: 2, event: "e-2" });
  assert.deepEqual(await sent, { type: "ack", id: "p-1", conversation: A, seq: 2, event: "e-2" });
  socket.resumed("c1-0");
  await connected;
  c.close();
});

test("a retryable error is retried after the backoff delay with the same id; a final one rejects", async () => {
  const c = client();
  const socket = await live(c);
  const sent = c.send(A, "hello", { id: "mine-1" });
  socket.push({ type: "error", id: "mine-1", code: "unavailable", message: "nats down", retryable: true });
  // First retry: ceiling 100 ms, random 0.5: 50 ms.
  mock.timers.tick(49);
  assert.equal(socket.frames("send").length, 1);
  mock.timers.tick(1);
  const sends = socket.frames("send");
  assert.equal(sends.length, 2);
  assert.deepEqual(sends[1], sends[0], "the same frame, same id");
  socket.push({ type: "error", id: "mine-1", code: "timeout", message: "not known yet", retryable: true });
  mock.timers.tick(100); // second retry: ceiling 200 ms
  assert.equal(socket.frames("send").length, 3);
  socket.push({ type: "ack", id: "mine-1", conversation: A, seq: 7, event: "e-7" });
  assert.equal((await sent).seq, 7);

  const refused = c.send(A, " ");
  const [, , , empty] = socket.frames("send");
  socket.push({ type: "error", id: empty.id, code: "empty_message", message: "blank", retryable: false });
  await assert.rejects(refused, (error) => error instanceof ParleyError && error.code === "empty_message" && !error.retryable);
  c.close();
});

test("a request without an answer is sent again with its id, on the socket and after a reconnect", async () => {
  const c = client({ requestTimeoutMs: 5_000 });
  const first = await live(c);
  const sent = c.send(A, "hello");
  mock.timers.tick(5_000);
  assert.equal(first.frames("send").length, 2, "resent after requestTimeoutMs");
  const second = await reconnect(first);
  const [again] = second.frames("send");
  assert.deepEqual(again, first.frames("send")[0], "the same frame, same id, on the new socket");
  // A late ack for the same id on the old socket is ignored; the new socket's settles it.
  second.push({ type: "ack", id: again.id, conversation: A, seq: 3, event: "e-3" });
  assert.equal((await sent).seq, 3);
  c.close();
});

test("reconnect delays back off with jitter, up to the cap, and reset once live", async () => {
  const c = client({ random: () => 0.999 });
  let socket = await live(c);
  // Ceilings 100, 200, 400, 800, 1000 (cap), 1000: delays just below each.
  for (const ceiling of [100, 200, 400, 800, 1000, 1000]) {
    const before = FakeSocket.all.length;
    socket.drop();
    mock.timers.tick(Math.floor(ceiling * 0.999) - 1);
    await flush();
    assert.equal(FakeSocket.all.length, before, `no new socket before ${Math.floor(ceiling * 0.999)} ms`);
    mock.timers.tick(1);
    await flush();
    assert.equal(FakeSocket.all.length, before + 1, `a new socket at ${Math.floor(ceiling * 0.999)} ms`);
    socket = FakeSocket.last();
    assert.equal(c.state, "reconnecting");
  }
  socket.welcome();
  socket.resumed("c1-1");
  assert.equal(c.state, "live");
  socket.drop();
  mock.timers.tick(99);
  await flush();
  assert.notEqual(FakeSocket.last(), socket, "back to the first ceiling (100 ms) once live");
  c.close();
});

test("a session closed for its token fetches a fresh one before reconnecting", async () => {
  const tokens = ["t1", "t2", "t3"];
  const c = client({ token: undefined, getToken: async () => tokens.shift() });
  const first = await live(c);
  assert.equal(first.token(), "t1");
  first.drop(1008, "token expired");
  mock.timers.tick(50);
  await flush();
  const second = FakeSocket.last();
  assert.equal(second.token(), "t2");
  // A refused upgrade (ws reports the status in the error) also asks for a new one.
  second.drop(1006, "", "Unexpected server response: 401");
  mock.timers.tick(100);
  await flush();
  assert.equal(FakeSocket.last().token(), "t3");
  // An ordinary drop keeps the token.
  const third = FakeSocket.last();
  third.welcome();
  third.resumed("c1-1");
  third.drop(1006, "", "read ECONNRESET");
  mock.timers.tick(50);
  await flush();
  assert.equal(FakeSocket.last().token(), "t3");
  c.close();
});

test("a refused token without getToken closes the client and rejects connect", async () => {
  const c = client();
  const connected = c.connect();
  const pending = c.send(A, "hi");
  await flush();
  FakeSocket.last().drop(1006, "", "Unexpected server response: 401");
  await assert.rejects(connected, (error) => error instanceof ParleyError && error.code === "token_refused");
  await assert.rejects(pending, ClientClosedError);
  assert.equal(c.state, "closed");
});

test("a silent socket is dropped after two heartbeats and replaced", async () => {
  const c = client({ heartbeatMs: 1_000 });
  const socket = await live(c);
  mock.timers.tick(1_000);
  assert.deepEqual(socket.frames("ping"), [{ type: "ping" }]);
  socket.push({ type: "pong" });
  mock.timers.tick(2_000);
  assert.equal(socket.closed, undefined, "heard from within two intervals");
  mock.timers.tick(1_000);
  assert.equal(socket.closed?.code, 4000, "dropped after two silent intervals");
  mock.timers.tick(50);
  await flush();
  assert.notEqual(FakeSocket.last(), socket);
  c.close();
});

test("typing and presence notifications; watched users are asked about again after a reconnect", async () => {
  const c = client();
  const typing = [];
  const presence = [];
  c.on("typing", (t) => typing.push(t.user));
  c.on("presence", (p) => presence.push(`${p.user}:${p.online}`));
  const first = await live(c);
  c.typing(A, "started");
  assert.deepEqual(first.frames("typing"), [{ type: "typing", conversation: A, state: "started" }]);
  const watching = c.watchPresence(["bob", "mallory"]);
  const [ask] = first.frames("presence");
  first.push({ type: "presence", id: ask.id, users: [{ user: "bob", online: true }], not_visible: ["mallory"] });
  assert.deepEqual((await watching).users, [{ user: "bob", online: true }]);
  first.push({ type: "typing", conversation: A, user: "bob", state: "started", expires_in_ms: 6000 });
  first.push({ type: "presence_changed", user: "bob", online: false, last_seen: 9 });
  const second = await reconnect(first);
  second.resumed("c1-1");
  const [again] = second.frames("presence");
  assert.deepEqual(again.users, ["bob"], "only the visible watched user");
  second.push({ type: "presence", id: again.id, users: [{ user: "bob", online: true }] });
  await flush();
  assert.deepEqual(typing, ["bob"]);
  assert.deepEqual(presence, ["bob:false", "bob:true"]);
  c.close();
});

test("a frame over max_frame_bytes is refused locally instead of getting the socket closed", async () => {
  const c = client();
  const connected = c.connect();
  await flush();
  const socket = FakeSocket.last();
  socket.welcome("alice", { max_frame_bytes: 200 });
  socket.resumed("c1-0");
  await connected;
  await assert.rejects(c.send(A, "x".repeat(300)), (error) => error.code === "frame_too_large");
  assert.deepEqual(socket.frames("send"), []);
  c.close();
});

test("edits, deletions, reactions and membership changes are one request frame each, as documented", async () => {
  const c = client();
  const socket = await live(c);
  const calls = [
    c.send(A, "agreed", { id: "s", replyTo: 41 }),
    c.edit(A, 41, "hi bob, again", { id: "e" }),
    c.deleteMessage(A, 41, { id: "d" }),
    c.react(A, 41, "👍", { id: "r" }),
    c.unreact(A, 41, "👍", { id: "u" }),
    c.addMembers(A, ["bob", "carol"], { id: "a" }),
    c.removeMembers(A, ["bob"], { id: "rm" }),
    c.leave(A, { id: "l" }),
    c.setRole(A, "carol", "admin", { id: "sr" }),
    c.rename(A, "Launch", { id: "n" }),
    c.rename(A, null, { id: "n0" }),
    c.mute(A, "bob", 3600, { id: "m" }),
    c.unmute(A, "bob", { id: "um" }),
    c.createGroup(["bob"], "team", { id: "g" }),
  ];
  assert.deepEqual(socket.frames().slice(1), [
    { type: "send", id: "s", conversation: A, body: "agreed", reply_to: 41 },
    { type: "edit", id: "e", conversation: A, message: 41, body: "hi bob, again" },
    { type: "delete", id: "d", conversation: A, message: 41 },
    { type: "react", id: "r", conversation: A, message: 41, emoji: "👍" },
    { type: "unreact", id: "u", conversation: A, message: 41, emoji: "👍" },
    { type: "add_members", id: "a", conversation: A, users: ["bob", "carol"] },
    { type: "remove_members", id: "rm", conversation: A, users: ["bob"] },
    { type: "leave", id: "l", conversation: A },
    { type: "set_role", id: "sr", conversation: A, user: "carol", role: "admin" },
    { type: "rename", id: "n", conversation: A, title: "Launch" },
    { type: "rename", id: "n0", conversation: A, title: null },
    { type: "mute", id: "m", conversation: A, user: "bob", seconds: 3600 },
    { type: "unmute", id: "um", conversation: A, user: "bob" },
    { type: "create_group", id: "g", title: "team", members: ["bob"] },
  ]);
  for (const [i, frame] of socket.frames().slice(1).entries()) {
    socket.push({ type: "ack", id: frame.id, conversation: A, seq: 50 + i, event: `e-${50 + i}` });
  }
  assert.deepEqual((await Promise.all(calls)).map((ack) => ack.seq), calls.map((_, i) => 50 + i));
  c.close();
});

test("every event is also a typed notification by its type, right after it, once", async () => {
  const c = client();
  const seen = [];
  c.on("event", (event) => seen.push(`event ${event.seq}`));
  for (const kind of ["message", "edited", "deleted", "reaction"]) {
    c.on(kind, (event) => seen.push(`${kind} ${event.seq} ${JSON.stringify(event.data)}`));
  }
  c.on("membership", ({ event, system }) => seen.push(`membership ${event.seq} ${system.text}`));
  const socket = await live(c);
  const added = { event: "member.added", users: ["carol"], role: null, title: null, until: null, text: "bob added carol" };
  socket.typedEvent(A, 1, 0, "message.posted", { client_id: "m1", body: "hi" });
  socket.typedEvent(A, 2, 1, "message.edited", { message: 1, body: "hi!" });
  socket.typedEvent(A, 3, 2, "reaction.added", { message: 1, emoji: "🎉" });
  socket.typedEvent(A, 3, 2, "reaction.added", { message: 1, emoji: "🎉" }); // a duplicate
  socket.typedEvent(A, 4, 3, "reaction.removed", { message: 1, emoji: "🎉" });
  socket.typedEvent(A, 5, 4, "member.added", { members: [{ user: "carol", role: "member" }] }, added);
  socket.typedEvent(A, 6, 5, "message.deleted", { message: 1 });
  socket.typedEvent(A, 7, 6, "conversation.read", { seq: 6 });
  assert.deepEqual(seen, [
    "event 1", 'message 1 {"client_id":"m1","body":"hi"}',
    "event 2", 'edited 2 {"message":1,"body":"hi!"}',
    "event 3", 'reaction 3 {"message":1,"emoji":"🎉"}',
    "event 4", 'reaction 4 {"message":1,"emoji":"🎉"}',
    "event 5", "membership 5 bob added carol",
    "event 6", 'deleted 6 {"message":1}',
    "event 7",
  ]);
  c.close();
});

test("a rate-limited send is sent again after the server's hint, and no later send overtakes it", async () => {
  const c = client();
  const socket = await live(c);
  // The server's side: the log of the sends it applied, in order, and its answers.
  const applied = [];
  const accept = (frame) => {
    applied.push(frame.body);
    socket.push({ type: "ack", id: frame.id, conversation: A, seq: applied.length, event: `e-${applied.length}` });
  };
  const limit = (frame, retryAfterMs) =>
    socket.push({ type: "error", id: frame.id, code: "rate_limited", message: "too many requests", retryable: true, retry_after_ms: retryAfterMs });
  const written = () => socket.frames("send").map((frame) => frame.body);

  const acks = ["1", "2", "3"].map((body) => c.send(A, body));
  assert.deepEqual(written(), ["1", "2", "3"], "pipelined while nothing is limited");
  const [one, two, three] = socket.frames("send");
  limit(one, 300);
  limit(two, 300);
  limit(three, 300);
  acks.push(c.send(A, "4"));
  mock.timers.tick(299);
  assert.deepEqual(written(), ["1", "2", "3"], "nothing is written before the hint has passed, 4 included");
  mock.timers.tick(1);
  assert.deepEqual(written().slice(3), ["1"], "then the oldest alone");
  accept(socket.frames("send").at(-1));
  assert.deepEqual(written().slice(3), ["1", "2"], "the next once it is answered");
  limit(socket.frames("send").at(-1), 100);
  mock.timers.tick(99);
  assert.deepEqual(written().slice(3), ["1", "2"]);
  mock.timers.tick(1);
  for (const expected of ["2", "3", "4"]) {
    const frame = socket.frames("send").at(-1);
    assert.equal(frame.body, expected);
    accept(frame);
  }
  assert.deepEqual(applied, ["1", "2", "3", "4"], "applied in the order the application sent them");
  assert.deepEqual((await Promise.all(acks)).map((ack) => ack.seq), [1, 2, 3, 4]);
  assert.equal(new Set(socket.frames("send").slice(3).map((frame) => frame.id)).size, 4, "each sent again with its own id");

  // With nothing left waiting, sends are pipelined again.
  const later = [c.send(A, "5"), c.send(A, "6")];
  assert.deepEqual(written().slice(-2), ["5", "6"]);
  socket.frames("send").slice(-2).forEach(accept);
  await Promise.all(later);
  c.close();
});

test("a hold for rate limiting outlasts a reconnect; the new socket gets the oldest request first", async () => {
  const c = client();
  const first = await live(c);
  const acks = [c.send(A, "1"), c.send(A, "2")];
  const [one, two] = first.frames("send");
  first.push({ type: "error", id: one.id, code: "rate_limited", message: "limited", retryable: true, retry_after_ms: 500 });
  // The socket drops while the second awaits its answer.
  const second = await reconnect(first);
  second.resumed("c1-1");
  assert.deepEqual(second.frames("send"), [], "still held");
  mock.timers.tick(450);
  assert.deepEqual(second.frames("send"), [one], "the oldest alone, once the hint has passed");
  second.push({ type: "ack", id: one.id, conversation: A, seq: 1, event: "e-1" });
  assert.deepEqual(second.frames("send"), [one, two]);
  second.push({ type: "ack", id: two.id, conversation: A, seq: 2, event: "e-2" });
  assert.deepEqual((await Promise.all(acks)).map((ack) => ack.seq), [1, 2]);
  c.close();
});

test("a packed message's frames are taken in order, as if each had come alone", async () => {
  const c = client();
  const socket = await live(c);
  const seen = [];
  c.on("event", (event) => seen.push(`event ${event.seq}`));
  c.on("typing", (t) => seen.push(`typing ${t.user}`));
  const event = (seq, prev) => ({
    type: "event",
    event: { seq, id: `e-${seq}`, conversation: A, prev, command: `c-${seq}`, actor: "bob", at: seq,
             type: "message.posted", v: 1, data: { client_id: `m${seq}`, body: `message ${seq}` } },
  });
  const typing = { type: "typing", conversation: A, user: "bob", state: "started", expires_in_ms: 6000 };
  socket.onmessage({ data: JSON.stringify([event(7, 0), typing, event(8, 7)]) });
  socket.event(A, 9, 8);
  assert.deepEqual(seen, ["event 7", "typing bob", "event 8", "event 9"]);
  c.close();
});
