/**
 * Send order under rate limiting, against a real `parley up` whose per-user limit is low (10
 * requests a second, bursts of 5): twenty sends made at once, most of them refused
 * `rate_limited` at first, are posted once each, in the order the application made them.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { Client } from "../../dist/index.js";
import { eventually, startParley } from "../support/parley.mjs";

let parley;
const clients = [];

before(async () => {
  parley = await startParley({
    PARLEY_GATEWAY__RATE_LIMITS__USER_PER_SEC: "10",
    PARLEY_GATEWAY__RATE_LIMITS__USER_BURST: "5",
  });
});

after(async () => {
  clients.forEach((c) => c.close());
  await parley?.stop();
});

function connectAs(user) {
  const client = new Client({ url: parley.url, WebSocket, getToken: () => parley.token(user), backoff: { baseMs: 20, capMs: 300 } });
  clients.push(client);
  return client;
}

test("sends refused `rate_limited` are sent again after the hint, and all are posted in the order made", { timeout: 60_000 }, async () => {
  const alice = connectAs("alice");
  const bob = connectAs("bob");
  await Promise.all([alice.connect(), bob.connect()]);
  const { conversation } = await alice.createDirect("bob");
  let limited = 0;
  alice.on("frame", (frame) => frame.type === "error" && frame.code === "rate_limited" && limited++);
  const closes = [];
  alice.on("error", (error) => closes.push(error.message));
  const atBob = [];
  bob.on("message", (event) => event.conversation === conversation && atBob.push(event.data.body));

  const bodies = Array.from({ length: 20 }, (_, i) => `m${i}`);
  const acks = await Promise.all(bodies.map((body) => alice.send(conversation, body)));
  assert.ok(limited >= 10, `most of the first burst was refused (${limited} refusals)`);
  assert.deepEqual(closes, [], "the socket was never closed for flooding");
  assert.deepEqual(acks.map((ack) => ack.seq), [...acks.map((ack) => ack.seq)].sort((a, b) => a - b), "acked in sequence order");
  await eventually(() => atBob.length === bodies.length, `bob receives all ${bodies.length}: ${atBob}`);
  assert.deepEqual(atBob, bodies, "posted once each, in the order the application sent them");
});
