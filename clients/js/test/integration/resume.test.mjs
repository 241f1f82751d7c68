/**
 * Catching up in several rounds: with the gateway's resume bound set to 16 events, a
 * receiver that was away while 100 messages were sent gets them through a chain of
 * `resume` frames (each answered `more` until the last), once each and in order.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { Client } from "../../dist/index.js";
import { eventually, startParley, startProxy } from "../support/parley.mjs";

let parley;
const clients = [];

before(async () => {
  parley = await startParley({ PARLEY_GATEWAY__RESUME_MAX_EVENTS: "16" });
});

after(async () => {
  clients.forEach((c) => c.close());
  await parley?.stop();
});

function connectAs(user, url) {
  const client = new Client({ url, WebSocket, getToken: () => parley.token(user), backoff: { baseMs: 20, capMs: 200 } });
  clients.push(client);
  return client;
}

test("a receiver away for 100 messages catches up through `more` rounds, each message once, in order", { timeout: 60_000 }, async () => {
  const proxy = await startProxy(parley.url);
  const alice = connectAs("alice", parley.url);
  const erin = connectAs("erin", proxy.url);
  await alice.connect();
  await erin.connect();
  const { conversation } = await alice.createDirect("erin");
  const atErin = [];
  erin.on("event", (e) => e.conversation === conversation && e.type === "message.posted" && atErin.push(e.data.body));
  let more = 0;
  erin.on("resumed", (resumed) => (more += resumed.conversations.filter((c) => c.state === "more").length));
  await alice.send(conversation, "before");
  await eventually(() => atErin.length === 1, "erin receives the first message live");

  proxy.pause();
  assert.equal(proxy.cut(), 1);
  await eventually(() => erin.state === "reconnecting", "erin notices the cut");
  const expected = Array.from({ length: 100 }, (_, i) => `away ${i}`);
  for (const body of expected) await alice.send(conversation, body);
  proxy.resume();

  await eventually(() => atErin.length === 101 && erin.state === "live", "erin catches up", 30_000);
  assert.deepEqual(atErin, ["before", ...expected]);
  assert.ok(more >= 5, `100 events at 16 per resume took several rounds (${more} answered more)`);
  await alice.send(conversation, "after");
  await eventually(() => atErin.at(-1) === "after", "erin is live again");
  assert.equal(atErin.length, 102);
  await proxy.close();
});
