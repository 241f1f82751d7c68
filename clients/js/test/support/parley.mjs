/**
 * A real `parley up` for the integration tests: started in a fresh temporary directory
 * (its own log, store and dev secret) on free loopback ports, and killed after. The binary
 * is $PARLEY_BIN, by default the workspace's debug build, which CI builds before this runs.
 */
import { execFile, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../../..");
export const PARLEY_BIN = path.resolve(process.env.PARLEY_BIN || path.join(repo, "target/debug/parley"));
// nats-server and redis-server: $PARLEY_HOME/bin, else the repository's .parley/bin.
const PARLEY_HOME = process.env.PARLEY_HOME || path.join(repo, ".parley");

/** Starts `parley up` with `settings` (PARLEY_<SECTION>__<KEY> variables) on top of the
 * test defaults; resolves once its banner names the gateway's address. */
export async function startParley(settings = {}) {
  const dir = await mkdtemp(path.join(tmpdir(), "parley-js-"));
  // parley refuses PARLEY_* variables that are not configuration keys (PARLEY_BIN is one).
  const inherited = Object.entries(process.env).filter(([name]) => !name.startsWith("PARLEY_"));
  const env = {
    ...Object.fromEntries(inherited),
    PARLEY_HOME,
    PARLEY_GATEWAY__LISTEN: "127.0.0.1:0",
    PARLEY_ADMIN__LISTEN: "127.0.0.1:0",
    // The dev store is fsynced on every write by default; the tests do not need the durability.
    PARLEY_LOCAL__FSYNC_ALWAYS: "false",
    // The streams here send hundreds of messages a second from one user, far past a chat
    // user's default limit (20/s): a limited send is retried later, out of its order.
    PARLEY_GATEWAY__RATE_LIMITS__USER_PER_SEC: "1000000",
    PARLEY_GATEWAY__RATE_LIMITS__USER_BURST: "1000000",
    ...settings,
  };
  const child = spawn(PARLEY_BIN, ["up"], { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  const url = await new Promise((resolve, reject) => {
    const onData = (chunk) => {
      output += chunk;
      const match = /WebSocket\s+(ws:\/\/127\.0\.0\.1:\d+\/ws)/.exec(output);
      if (match) resolve(match[1]);
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`parley up exited with ${code}:\n${output}`)));
  }).catch(async (error) => {
    child.kill("SIGTERM");
    await rm(dir, { recursive: true, force: true });
    throw error;
  });
  const run = promisify(execFile);
  return {
    url,
    dir,
    /** A development token for `user`, signed with this instance's dev secret. */
    async token(user, ttlSecs = 3600) {
      const { stdout } = await run(PARLEY_BIN, ["token", user, "--ttl-secs", String(ttlSecs)], { cwd: dir, env });
      return stdout.trim();
    },
    output: () => output,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((resolve) => child.once("exit", resolve));
        child.kill("SIGTERM");
        await exited;
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A TCP proxy in front of the gateway whose connections the test can cut without a close
 * frame, the way a network drop looks to both ends.
 */
export async function startProxy(target) {
  const { hostname, port } = new URL(target.replace(/^ws/, "http"));
  const pairs = new Set();
  let paused = false;
  const server = net.createServer((client) => {
    if (paused) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    const pair = [client, upstream];
    pairs.add(pair);
    client.pipe(upstream);
    upstream.pipe(client);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    /** Cuts every connection through the proxy (both ends see a reset, no close frame). */
    cut() {
      const count = pairs.size;
      for (const [client, upstream] of pairs) {
        client.resetAndDestroy();
        upstream.resetAndDestroy();
      }
      pairs.clear();
      return count;
    },
    /** While paused, new connections are reset as soon as they are accepted. */
    pause() {
      paused = true;
    },
    resume() {
      paused = false;
    },
    connections: () => pairs.size,
    close: () => new Promise((resolve) => { for (const [c, u] of pairs) { c.destroy(); u.destroy(); } server.close(resolve); }),
  };
}

/** Polls `condition` until it holds, failing after `timeoutMs` with `message`. */
export async function eventually(condition, message, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting: ${message}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
