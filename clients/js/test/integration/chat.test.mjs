/**
 * The client against a real `parley up` (started per file, on free ports in a temporary
 * directory): two users chat; three members of a group edit, react, reply, delete and change
 * the membership, and each hears it through the typed notifications; and a receiver whose
 * connection is cut again and again under a steady stream sees every message exactly once,
 * in order.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { Client } from "../../dist/index.js";
import { eventually, startParley, startProxy } from "../support/parley.mjs";

let parley;
const clients = [];

before(async () => {
  parley = await startParley();
});

after(async () => {
  clients.forEach((c) => c.close());
  await parley?.stop();
});

function connectAs(user, url = parley.url) {
  const client = new Client({
    url,
    WebSocket,
    getToken: () => parley.token(user),
    backoff: { baseMs: 20, capMs: 300 },
  });
  clients.push(client);
  return client;
}

/** The bodies of the messages `client` delivers in `conversation`, in delivery order. */
function bodies(client, conversation) {
  const seen = [];
  client.on("event", (event) => {
    if (event.conversation === conversation && event.type === "message.posted") seen.push(event.data.body);
  });
  return seen;
}

test("two users chat: a direct conversation, messages both ways, history, the list and read markers", { timeout: 60_000 }, async () => {
  const alice = connectAs("alice");
  const bob = connectAs("bob");
  const bobEvents = [];
  bob.on("event", (event) => bobEvents.push(event));
  assert.equal((await alice.connect()).user, "alice");
  assert.equal((await bob.connect()).user, "bob");

  const dm = await alice.createDirect("bob");
  const conversation = dm.conversation;
  const atBob = bodies(bob, conversation);
  const atAlice = bodies(alice, conversation);
  for (const body of ["hi bob", "are you there?"]) await alice.send(conversation, body);
  const reply = await bob.send(conversation, "hi alice", { id: "bob-reply-1" });
  assert.equal(reply.id, "bob-reply-1");

  await eventually(() => atBob.length === 3 && atAlice.length === 3, "both see the three messages");
  assert.deepEqual(atBob, ["hi bob", "are you there?", "hi alice"]);
  assert.deepEqual(atAlice, atBob, "the same order for everyone");
  assert.equal(bobEvents[0].type, "conversation.created", "bob learns of the conversation live");

  // A send repeated with its id is the same message: same ack, nothing appended.
  const again = await bob.send(conversation, "hi alice", { id: "bob-reply-1" });
  assert.deepEqual(again, reply);

  // History and the list read the conversation store, which trails the log by a moment.
  const page = await eventually(async () => {
    const history = await bob.history(conversation, { limit: 10 });
    return history.messages.length === 3 && history;
  }, "history holds the three messages");
  assert.deepEqual(page.messages.map((m) => m.body), ["hi alice", "are you there?", "hi bob"]);
  const forwards = await bob.history(conversation, { after: 0, limit: 2 });
  assert.deepEqual(forwards.messages.map((m) => m.body), ["hi bob", "are you there?"]);
  assert.equal(forwards.has_more, true);

  const listed = await eventually(async () => {
    const list = await bob.conversations();
    const entry = list.conversations.find((c) => c.conversation === conversation);
    return entry?.unread === 2 && entry;
  }, "bob's list shows alice's two messages unread");
  assert.equal(listed.kind, "direct");

  const members = await alice.members(conversation);
  assert.deepEqual(members.members.map((m) => m.user), ["alice", "bob"]);

  const read = await bob.markRead(conversation, reply.seq);
  await eventually(
    () => bobEvents.some((e) => e.type === "conversation.read" && e.seq === read.seq),
    "bob's own conversation.read reaches him",
  );

  const presence = await alice.watchPresence(["bob"]);
  assert.deepEqual(presence.users.map((u) => [u.user, u.online]), [["bob", true]]);

  // A final refusal rejects with the server's code.
  await assert.rejects(alice.send(conversation, "   "), (error) => error.code === "empty_message");
});

test("a group: edits, reactions, a reply and a deletion, and membership changes reach every member, typed", { timeout: 60_000 }, async () => {
  const alice = connectAs("alice");
  const bob = connectAs("bob");
  const carol = connectAs("carol");
  await Promise.all([alice.connect(), bob.connect(), carol.connect()]);
  /** What `client` is told through the typed notifications, as short strings. */
  const told = (client) => {
    const seen = [];
    client.on("edited", (e) => seen.push(`edited ${e.data.message} ${e.data.body}`));
    client.on("reaction", (e) => seen.push(`${e.type} ${e.data.message} ${e.data.emoji} by ${e.actor}`));
    client.on("deleted", (e) => seen.push(`deleted ${e.data.message}`));
    client.on("membership", ({ system }) => seen.push(system.text));
    return seen;
  };
  const atBob = told(bob);
  const atCarol = told(carol);
  const group = await alice.createGroup(["bob"], "team");
  const { conversation } = group;

  const posted = await alice.send(conversation, "hi team");
  await alice.edit(conversation, posted.seq, "hi team, again");
  await bob.react(conversation, posted.seq, "👍");
  const reply = await bob.send(conversation, "hello", { replyTo: posted.seq });
  await assert.rejects(bob.edit(conversation, posted.seq, "mine now"), (error) => error.code === "forbidden");
  await alice.addMembers(conversation, ["carol"]);
  await alice.setRole(conversation, "bob", "admin");
  await alice.rename(conversation, "Launch");
  await carol.react(conversation, posted.seq, "🎉");
  await carol.unreact(conversation, posted.seq, "🎉");
  await bob.deleteMessage(conversation, reply.seq);

  const expected = [
    `edited ${posted.seq} hi team, again`,
    `reaction.added ${posted.seq} 👍 by bob`,
    "alice added carol",
    "alice made bob an admin",
    "alice renamed the group to “Launch”",
    `reaction.added ${posted.seq} 🎉 by carol`,
    `reaction.removed ${posted.seq} 🎉 by carol`,
    `deleted ${reply.seq}`,
  ];
  await eventually(() => atBob.length === expected.length, `bob is told all ${expected.length}: ${atBob}`);
  assert.deepEqual(atBob, expected);
  // Carol hears from her own addition on.
  await eventually(() => atCarol.length === 6, `carol is told the last 6: ${atCarol}`);
  assert.deepEqual(atCarol, expected.slice(2));

  // History shows each message as it stands now.
  const page = await eventually(async () => {
    const history = await carol.history(conversation);
    return history.messages.some((m) => m.deleted) && history;
  }, "history has the deletion");
  const bySeq = new Map(page.messages.map((m) => [m.seq, m]));
  assert.equal(bySeq.get(posted.seq).body, "hi team, again");
  assert.equal(bySeq.get(posted.seq).edited, true);
  assert.deepEqual(bySeq.get(posted.seq).reactions, [{ emoji: "👍", count: 1, users: ["bob"] }]);
  assert.equal(bySeq.get(reply.seq).deleted, true);
  assert.equal(bySeq.get(reply.seq).reply_to, posted.seq);
  assert.ok(page.messages.some((m) => m.system?.text === "alice added carol"), "membership changes are history entries");

  const members = await eventually(async () => {
    const members = await carol.members(conversation);
    return members.title === "Launch" && members;
  }, "the store has the new title");
  assert.deepEqual(members.members.map((m) => [m.user, m.role]), [["alice", "owner"], ["bob", "admin"], ["carol", "member"]]);
  await alice.removeMembers(conversation, ["carol"]);
  await carol.leave(conversation).then(
    () => assert.fail("a removed member cannot leave"),
    (error) => assert.equal(error.code, "not_member"),
  );
});

test("a receiver cut off again and again under a steady stream sees every message once, in order", { timeout: 120_000 }, async () => {
  const senderProxy = await startProxy(parley.url);
  const receiverProxy = await startProxy(parley.url);
  const carolLog = [];
  let acked = 0;
  const alice = connectAs("alice", senderProxy.url);
  const carol = connectAs("carol", receiverProxy.url);
  let carolSockets = 0;
  carol.on("state", (state) => state === "resuming" && carolSockets++);
  // What happened to carol, by the number of sends acked, for the message of a failure.
  carol.on("state", (state) => carolLog.push(`${acked}: ${state}`));
  carol.on("error", (error) => carolLog.push(`${acked}: ${error.message}`));
  await alice.connect();
  await carol.connect();
  const { conversation } = await alice.createDirect("carol");
  const atCarol = bodies(carol, conversation);

  const total = 300;
  const window = 8;
  const expected = Array.from({ length: total }, (_, i) => `m${i}`);
  // A steady stream: `window` sends in flight, each new one as soon as one is acked. Each
  // task takes the next body and calls `send` in the same step, so the calls are made in
  // the order of `expected`, and the server applies a socket's sends in call order.
  let next = 0;
  const sendOne = async () => {
    while (next < total) {
      await alice.send(conversation, expected[next++]);
      acked++;
    }
  };
  // Meanwhile, cuts at points of the stream, each made while carol is connected (so each
  // costs her a socket): cut her; cut both; keep her out while messages pile up for her
  // resume, then let her back; cut her once more.
  const live = (...clients) => clients.every((c) => c.state === "live");
  const cutsMade = [];
  const chaos = async () => {
    const at = (count, ...who) => eventually(() => acked >= count && live(...who), `${count} acked`, 60_000);
    await at(40, carol);
    cutsMade.push(receiverProxy.cut());
    await at(90, carol, alice);
    cutsMade.push([receiverProxy.cut(), senderProxy.cut()]);
    await at(150, carol);
    receiverProxy.pause();
    cutsMade.push(receiverProxy.cut());
    await at(200);
    receiverProxy.resume();
    await at(250, carol);
    cutsMade.push(receiverProxy.cut());
  };
  await Promise.all([chaos(), ...Array.from({ length: window }, sendOne)]);
  await alice.send(conversation, "end");
  assert.deepEqual(cutsMade, [1, [1, 1], 1, 1], `each cut dropped the connections it meant to; carol: ${carolLog.join("; ")}`);

  await eventually(() => atCarol.at(-1) === "end", "carol receives the last message", 60_000);
  assert.deepEqual(atCarol, [...expected, "end"], "every message once, in the order it was sent");
  assert.equal(new Set(atCarol).size, total + 1);
  assert.equal(carolSockets, 5, "carol resumed on a new socket after each cut");

  // The log has each message once: history (paged newest first) agrees, once the
  // conversation store, which trails the log, has applied the last message.
  const history = async () => {
    const logged = [];
    let before;
    for (;;) {
      const page = await carol.history(conversation, before === undefined ? { limit: 100 } : { before, limit: 100 });
      logged.push(...page.messages.map((m) => m.body));
      if (!page.has_more) return logged.reverse();
      before = page.messages.at(-1).seq;
    }
  };
  const logged = await eventually(async () => {
    const logged = await history();
    return logged.at(-1) === "end" && logged;
  }, "history reaches the last message");
  await senderProxy.close();
  await receiverProxy.close();
  assert.deepEqual(logged, [...expected, "end"], "history holds each message once, in order");
});

test("a refused token and a session ended by its token's expiry both continue on a fresh token", { timeout: 60_000 }, async () => {
  // The first token is refused at the upgrade (401); then a token that expires within 2 s,
  // whose session the server ends (1008 token expired); then tokens good for an hour. Expiry
  // is in whole seconds from the second it was made, so a 1 s token could have only
  // milliseconds left, and its session end before `connect` returns.
  const tokens = ["not-a-jwt", await parley.token("dave", 2)];
  const asked = [];
  const dave = new Client({
    url: parley.url,
    WebSocket,
    backoff: { baseMs: 20, capMs: 300 },
    getToken: async () => {
      const token = tokens.shift() ?? (await parley.token("dave"));
      asked.push(token);
      return token;
    },
  });
  clients.push(dave);
  const closes = [];
  dave.on("error", (error) => closes.push(error.message));
  await dave.connect();
  assert.equal(asked.length, 2, "asked again after the 401");
  await eventually(() => asked.length === 3 && dave.state === "live", "a third token after the session expired");
  assert.ok(closes.some((m) => m.includes("401")), `the refusal was seen: ${closes}`);
  assert.ok(closes.some((m) => m.includes("1008 token expired")), `the expiry was seen: ${closes}`);
  const alice = connectAs("alice");
  await alice.connect();
  const { conversation } = await alice.createDirect("dave");
  const atDave = bodies(dave, conversation);
  await alice.send(conversation, "still there?");
  await eventually(() => atDave.length === 1, "dave receives on the fresh session");
});
