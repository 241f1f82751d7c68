/**
 * The web chat in a real browser: Debian's Chromium driven by playwright-core (no browser
 * download), served by a real `parley up` (`gateway.web_dir`) with its development sign-in.
 * Two browser contexts are alice and bob; they chat; bob's network drops, alice writes
 * while he is away, and when bob is back his page shows what he missed, in order, once.
 * Screenshots go to test-artifacts/.
 */
import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { eventually, startParley, startProxy } from "../../js/test/support/parley.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.resolve(here, "../dist");
const artifacts = path.resolve(here, "../test-artifacts");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

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
