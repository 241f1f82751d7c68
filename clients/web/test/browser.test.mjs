/**
 * The web chat in a real browser: Debian's Chromium driven by playwright-core (no browser
 * download), served by a real `parley up` (`gateway.web_dir`) with its development sign-in.
 * Two browser contexts are alice and bob; they chat; bob's network drops, alice writes
 * while he is away, and when bob is back his page shows what he missed, in order, once.
 * Then erin and frank: frank scrolls up through more than a page of history and sees the
 * older messages in order, with what was on screen kept in place; erin edits a message and
 * frank reacts to it, each seeing the other's change live; erin creates a group with frank
 * and adds gina, which frank's page shows. Screenshots go to test-artifacts/.
 */
import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { Client } from "@parley/client";
import { eventually, startParley, startProxy } from "../../js/test/support/parley.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.resolve(here, "../dist");
const artifacts = path.resolve(here, "../test-artifacts");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Node 20 has no global WebSocket: the client library's tests' `ws` serves here too.
const WebSocket = createRequire(path.resolve(here, "../../js/package.json"))("ws");

/** A loopback port free now: the gateway's, fixed before it starts so that bob's proxy
 * and the allowed origins can name it. */
async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

let gateway;
let parley;
let bobsNetwork;
let browser;

before(async () => {
  await mkdir(artifacts, { recursive: true });
  const port = await freePort();
  gateway = `http://127.0.0.1:${port}`;
  // Bob reaches the gateway, page and socket alike, through a proxy the test can cut.
  bobsNetwork = await startProxy(`ws://127.0.0.1:${port}/ws`);
  const bobsOrigin = bobsNetwork.url.replace(/^ws/, "http").replace(/\/ws$/, "");
  parley = await startParley({
    PARLEY_GATEWAY__LISTEN: `127.0.0.1:${port}`,
    PARLEY_GATEWAY__WEB_DIR: dist,
    PARLEY_GATEWAY__ALLOWED_ORIGINS: JSON.stringify([gateway, bobsOrigin]),
  });
  bobsNetwork.origin = bobsOrigin;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    // Root in CI containers has no user namespace for the sandbox; the page is our own.
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
  });
});

after(async () => {
  await browser?.close();
  await bobsNetwork?.close();
  await parley?.stop();
});

/** `user` signed in on the page served at `origin`, by the development sign-in. */
async function signedIn(user, origin) {
  const context = await browser.newContext();
  const tab = await context.newPage();
  const problems = [];
  tab.on("pageerror", (error) => problems.push(error.message));
  await tab.goto(`${origin}/`);
  await tab.getByLabel("User name").fill(user);
  await tab.getByRole("button", { name: "Sign in as this user" }).click();
  await tab.getByRole("status").filter({ hasText: `signed in as ${user}` }).waitFor();
  return { tab, problems };
}

const messagesOf = (tab) => tab.locator("#messages li").evaluateAll((items) => items.map((li) => li.textContent));

test("two users chat; one drops off the network and, back, sees what was missed in order, once", async () => {
  const alice = await signedIn("alice", gateway);
  const bob = await signedIn("bob", bobsNetwork.origin);

  await alice.tab.getByLabel("Chat with user").fill("bob");
  await alice.tab.getByRole("button", { name: "Open" }).click();
  await alice.tab.getByRole("textbox", { name: "Message" }).fill("hello bob");
  await alice.tab.getByRole("textbox", { name: "Message" }).press("Enter");

  await bob.tab.locator("#conversations button", { hasText: "alice" }).click();
  await eventually(async () => (await messagesOf(bob.tab)).some((text) => text.includes("hello bob")), "bob sees alice's message");
  await bob.tab.getByRole("textbox", { name: "Message" }).fill("hi alice");
  await bob.tab.getByRole("textbox", { name: "Message" }).press("Enter");
  await eventually(async () => (await messagesOf(alice.tab)).some((text) => text.includes("hi alice")), "alice sees bob's reply");
  await alice.tab.screenshot({ path: path.join(artifacts, "1-alice-chatting.png") });

  // Bob's network goes: his socket is cut without a close frame and new ones are refused.
  bobsNetwork.pause();
  assert.ok(bobsNetwork.cut() >= 1, "bob had a socket to cut");
  await bob.tab.locator('#status[data-state="reconnecting"]').waitFor();
  await bob.tab.screenshot({ path: path.join(artifacts, "2-bob-reconnecting.png") });
  const missed = ["while you were away 1", "while you were away 2", "while you were away 3"];
  for (const body of missed) {
    await alice.tab.getByRole("textbox", { name: "Message" }).fill(body);
    await alice.tab.getByRole("textbox", { name: "Message" }).press("Enter");
  }
  await eventually(async () => (await messagesOf(alice.tab)).filter((text) => text.includes("while you were away")).length === 3, "alice's messages shown");

  bobsNetwork.resume();
  await bob.tab.getByRole("status").filter({ hasText: "signed in as bob" }).waitFor({ timeout: 30_000 });
  const seen = await eventually(async () => {
    const texts = await messagesOf(bob.tab);
    const away = texts.filter((text) => text.includes("while you were away"));
    return away.length >= 3 && texts;
  }, "bob sees what he missed");
  const order = (text) => seen.findIndex((shown) => shown.includes(text));
  assert.deepEqual(seen.filter((text) => text.includes("while you were away")).length, 3, `each once: ${JSON.stringify(seen)}`);
  assert.ok(order("hello bob") < order("hi alice"), JSON.stringify(seen));
  assert.ok(order("hi alice") < order(missed[0]) && order(missed[0]) < order(missed[1]) && order(missed[1]) < order(missed[2]), JSON.stringify(seen));
  await bob.tab.screenshot({ path: path.join(artifacts, "3-bob-caught-up.png") });

  assert.deepEqual(alice.problems, []);
  assert.deepEqual(bob.problems, []);
});

const bodiesOf = (tab) => tab.locator("#messages li .body").evaluateAll((items) => items.map((body) => body.textContent));
/** The message of `tab` whose body is exactly `body`. */
const messageIn = (tab, body) => tab.locator("#messages li", { has: tab.locator(".body", { hasText: new RegExp(`^${body}$`) }) });

test("scrolling up pages in older history; edits and reactions go live both ways; a group gets a member", async () => {
  // More than a page (30) of history, posted by erin through the client library.
  const erinsClient = new Client({ url: parley.url.replace("http", "ws"), WebSocket, getToken: () => parley.token("erin") });
  await erinsClient.connect();
  const { conversation } = await erinsClient.createDirect("frank");
  const posted = Array.from({ length: 45 }, (_, i) => `old ${i}`);
  await Promise.all(posted.map((body) => erinsClient.send(conversation, body)));
  await eventually(async () => (await erinsClient.history(conversation, { limit: 1 })).messages[0]?.body === "old 44", "the store has the last one");
  erinsClient.close();

  const erin = await signedIn("erin", gateway);
  const frank = await signedIn("frank", gateway);
  await frank.tab.locator("#conversations button", { hasText: "erin" }).click();
  await eventually(async () => (await bodiesOf(frank.tab)).at(-1) === "old 44", "frank sees the newest page");
  const firstPage = await bodiesOf(frank.tab);
  assert.ok(firstPage.length < posted.length, `not all at once: ${firstPage.length}`);
  assert.deepEqual(firstPage, posted.slice(-firstPage.length), "the newest page, oldest at the top");

  // Scroll to the top: the older page loads above, and the message that was at the top
  // stays where it was on screen, at the top of the list's view.
  const view = frank.tab.locator("#messages");
  await view.evaluate((list) => (list.scrollTop = 0));
  await eventually(async () => (await bodiesOf(frank.tab)).length === posted.length, "frank's page loads the older messages");
  assert.deepEqual(await bodiesOf(frank.tab), posted, "every message once, in order");
  const viewTop = (await view.boundingBox()).y;
  const wasTop = (await messageIn(frank.tab, firstPage[0]).boundingBox()).y;
  assert.ok(Math.abs(wasTop - viewTop) < 40, `the message that was at the top stayed there (${wasTop} vs the view's ${viewTop})`);
  assert.ok(await view.evaluate((list) => list.scrollTop > 0), "the older page is above the view");
  await frank.tab.screenshot({ path: path.join(artifacts, "4-frank-scrolled-up.png") });

  // Erin edits her newest message from the keyboard; frank sees the new text live.
  await erin.tab.locator("#conversations button", { hasText: "frank" }).click();
  await messageIn(erin.tab, "old 44").getByRole("button", { name: /^Edit/ }).click();
  const editor = erin.tab.getByRole("textbox", { name: "Edit message" });
  await editor.fill("old 44, edited");
  await editor.press("Enter");
  const edited = messageIn(frank.tab, "old 44, edited");
  await edited.waitFor();
  assert.match(await edited.textContent(), /\(edited\)/);

  // Frank reacts; erin sees the count live, and frank's button shows it is his.
  await edited.getByRole("button", { name: /^👍/ }).click();
  await messageIn(erin.tab, "old 44, edited").getByRole("button", { name: "👍 1" }).waitFor();
  await edited.locator('button[aria-pressed="true"]', { hasText: "👍" }).waitFor();
  await erin.tab.screenshot({ path: path.join(artifacts, "5-erin-sees-the-reaction.png") });

  // Erin creates a group with frank and adds gina; frank's page lists it and shows the change.
  await erin.tab.getByLabel("Group name", { exact: true }).fill("launch");
  await erin.tab.getByLabel("Members, separated by commas", { exact: true }).fill("frank");
  await erin.tab.getByRole("button", { name: "Create group" }).click();
  await erin.tab.getByRole("heading", { name: "launch" }).waitFor();
  await frank.tab.locator("#conversations button", { hasText: "launch" }).click();
  await erin.tab.getByLabel("Add members, separated by commas").fill("gina");
  await erin.tab.getByRole("button", { name: "Add", exact: true }).click();
  await frank.tab.locator("#messages li.system", { hasText: "erin added gina" }).waitFor();
  await frank.tab.screenshot({ path: path.join(artifacts, "6-frank-sees-gina-added.png") });

  assert.deepEqual(erin.problems, []);
  assert.deepEqual(frank.problems, []);
});
