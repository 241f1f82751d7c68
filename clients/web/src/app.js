/**
 * Parley's web chat: signs in with a gateway URL and a token, shows the conversation list
 * with unread counts, and one conversation at a time with history, sending, read markers,
 * typing and presence. All protocol work (retries, reconnect, resume, dedupe) is the
 * client library's; this file only renders. User text is only ever set as textContent.
 */
import { Client, ParleyError } from "@parley/client";

const $ = (id) => document.getElementById(id);
const TYPING_REFRESH_MS = 3_000;
const PAGE = 30;

let client;
let me;
/** The user's conversations by id: the `conversations` entries, kept current by events. */
const conversations = new Map();
/** The conversation on screen: its id, the seqs shown, the oldest one, its members. */
let open;
/** Who is typing in the open conversation: user -> the timer that clears them. */
const typists = new Map();
const presence = new Map();
let lastTypingSent = 0;

function setStatus(state) {
  const text = { connecting: "connecting…", resuming: "catching up…", live: `signed in as ${me ?? "…"}`, reconnecting: "reconnecting…", closed: "signed out" }[state] ?? state;
  $("status").textContent = text;
  $("status").dataset.state = state;
}

async function signIn(url, token) {
  client = new Client({ url, token });
  client.on("state", setStatus);
  client.on("event", onEvent);
  client.on("typing", onTyping);
  client.on("presence", (status) => {
    presence.set(status.user, status);
    renderPresence();
  });
  client.on("error", (error) => console.warn("parley:", error.message));
  const welcome = await client.connect();
  me = welcome.user;
  setStatus("live");
  $("signin").hidden = true;
  $("dev-signin").hidden = true;
  $("chat").hidden = false;
  const page = await client.conversations({ limit: 100 });
  for (const entry of page.conversations) conversations.set(entry.conversation, entry);
  renderList();
}

// ---- The conversation list. ----

function label(entry) {
  if (entry.title) return entry.title;
  if (entry.peer) return entry.peer;
  return entry.kind === "direct" ? "direct conversation" : "group";
}

function renderList() {
  const list = $("conversations");
  const entries = [...conversations.values()].sort((a, b) => b.last_seq - a.last_seq);
  list.replaceChildren(
    ...entries.map((entry) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.setAttribute("aria-current", String(open?.id === entry.conversation));
      button.append(label(entry));
      if (entry.unread > 0) {
        const badge = document.createElement("span");
        badge.className = "unread";
        badge.textContent = String(entry.unread);
        badge.setAttribute("aria-label", `${entry.unread} unread`);
        button.append(badge);
      }
      if (entry.last_message) {
        const preview = document.createElement("span");
        preview.className = "preview";
        preview.textContent = `${entry.last_message.sender}: ${entry.last_message.body}`;
        button.append(preview);
      }
      button.addEventListener("click", () => openConversation(entry.conversation));
      item.append(button);
      return item;
    }),
  );
}

// ---- One conversation. ----

async function openConversation(id) {
  clearTypists();
  open = { id, shown: new Map(), oldest: undefined, members: [] };
  $("conversation").hidden = false;
  $("messages").replaceChildren();
  $("presence").textContent = "";
  const entry = conversations.get(id);
  const details = await client.members(id).catch(() => undefined);
  if (details && open?.id === id) {
    open.members = details.members.map((m) => m.user).filter((user) => user !== me);
    if (entry && details.kind === "direct") entry.peer = open.members[0];
    const others = open.members;
    if (others.length > 0) client.watchPresence(others.slice(0, 100)).then(({ users }) => users.forEach((s) => presence.set(s.user, s)) || renderPresence(), () => {});
  }
  $("conversation-title").textContent = entry ? label(entry) : "conversation";
  renderList();
  await loadOlder();
  $("compose-body").focus();
}

async function loadOlder() {
  if (!open) return;
  const id = open.id;
  const page = await client.history(id, open.oldest === undefined ? { limit: PAGE } : { before: open.oldest, limit: PAGE });
  if (open?.id !== id) return;
  for (const message of page.messages) {
    showMessage({ seq: message.seq, sender: message.sender, body: message.body, clientId: message.client_id }, "top");
  }
  $("older").hidden = !page.has_more;
  markReadUpTo(Math.max(0, ...open.shown.keys()));
}

/** Shows a message once, at the bottom (live) or the top (older pages). */
function showMessage({ seq, sender, body, clientId }, where) {
  if (open.shown.has(seq)) return;
  const pending = clientId === undefined ? undefined : $("messages").querySelector(`[data-client-id="${CSS.escape(clientId)}"]`);
  const item = pending ?? document.createElement("li");
  item.dataset.seq = String(seq);
  item.dataset.pending = "false";
  if (!pending) {
    const who = document.createElement("span");
    who.className = "sender";
    who.textContent = sender;
    item.append(who, document.createTextNode(body));
    if (where === "top") $("messages").prepend(item);
    else $("messages").append(item);
  }
  open.shown.set(seq, item);
  open.oldest = Math.min(open.oldest ?? seq, seq);
  if (where !== "top") item.scrollIntoView({ block: "end" });
}

function markReadUpTo(seq) {
  const entry = conversations.get(open?.id);
  if (!entry || seq === 0 || seq <= (entry.read_seq ?? 0)) return;
  entry.read_seq = seq;
  entry.unread = 0;
  client.markRead(entry.conversation, seq).catch(() => {});
  renderList();
}

async function sendMessage(body) {
  const id = `web-${crypto.randomUUID()}`;
  const item = document.createElement("li");
  item.dataset.pending = "true";
  item.dataset.clientId = id;
  const who = document.createElement("span");
  who.className = "sender";
  who.textContent = me;
  item.append(who, document.createTextNode(body));
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  client.typing(open.id, "stopped");
  lastTypingSent = 0;
  try {
    // Sent again with this id after reconnects and retryable errors: posted once.
    await client.send(open.id, body, { id });
  } catch (error) {
    item.dataset.pending = "failed";
    item.title = error instanceof ParleyError ? `not sent: ${error.code}` : String(error);
  }
}

// ---- Live notifications. ----

function onEvent(event) {
  let entry = conversations.get(event.conversation);
  if (event.type === "conversation.created") {
    entry ??= { conversation: event.conversation, kind: event.data.kind, title: event.data.title, last_seq: event.seq, unread: 0, read_seq: 0 };
    if (entry.kind === "direct") entry.peer = (event.data.members ?? []).map((m) => m.user).find((user) => user !== me);
    conversations.set(event.conversation, entry);
  } else if (!entry) {
    return;
  }
  entry.last_seq = Math.max(entry.last_seq ?? 0, event.seq);
  if (event.type === "message.posted") {
    entry.last_message = { seq: event.seq, sender: event.actor, body: event.data.body, at: event.at };
    const onScreen = open?.id === event.conversation && document.visibilityState === "visible";
    if (open?.id === event.conversation) {
      showMessage({ seq: event.seq, sender: event.actor, body: event.data.body, clientId: event.data.client_id }, "bottom");
      clearTypist(event.actor);
    }
    if (event.actor !== me && onScreen) markReadUpTo(event.seq);
    else if (event.actor !== me) entry.unread = (entry.unread ?? 0) + 1;
  } else if (event.type === "conversation.read" && event.actor === me) {
    entry.read_seq = Math.max(entry.read_seq ?? 0, event.data.seq);
    if (entry.read_seq >= (entry.last_message?.seq ?? 0)) entry.unread = 0;
  }
  renderList();
}

function onTyping(notice) {
  if (notice.conversation !== open?.id) return;
  clearTypist(notice.user);
  if (notice.state === "started") typists.set(notice.user, setTimeout(() => clearTypist(notice.user), notice.expires_in_ms));
  renderTyping();
}

function clearTypist(user) {
  clearTimeout(typists.get(user));
  if (typists.delete(user)) renderTyping();
}

function clearTypists() {
  typists.forEach((timer) => clearTimeout(timer));
  typists.clear();
  renderTyping();
}

function renderTyping() {
  const users = [...typists.keys()];
  $("typing").textContent = users.length === 0 ? "" : `${users.join(", ")} ${users.length === 1 ? "is" : "are"} typing…`;
}

function renderPresence() {
  if (!open) return;
  $("presence").textContent = open.members
    .map((user) => presence.get(user))
    .filter(Boolean)
    .map((s) => `${s.user}: ${s.online ? "online" : s.last_seen ? `last seen ${new Date(s.last_seen).toLocaleString()}` : "offline"}`)
    .join(" · ");
}

// ---- Wiring. ----

$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  signIn(String(form.get("url")), String(form.get("token"))).catch((error) => setStatus(`sign-in failed: ${error.message}`));
});

// Served by a gateway, the page's sockets go to the same host; opened as a file, to the
// address `parley up` listens on by default.
const ownGateway = location.protocol.startsWith("http")
  ? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`
  : "ws://127.0.0.1:8080/ws";
$("signin-url").value = ownGateway;

$("dev-signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = String(new FormData(event.target).get("user")).trim();
  try {
    const response = await fetch("dev/token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user }),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(answer.message ?? `this server signs no development tokens (HTTP ${response.status})`);
    await signIn(ownGateway, answer.token);
  } catch (error) {
    setStatus(`sign-in failed: ${error.message}`);
  }
});

$("new-direct").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("new-direct-peer");
  try {
    const ack = await client.createDirect(input.value.trim());
    conversations.get(ack.conversation) ?? conversations.set(ack.conversation, { conversation: ack.conversation, kind: "direct", peer: input.value.trim(), last_seq: ack.seq, unread: 0 });
    input.value = "";
    await openConversation(ack.conversation);
  } catch (error) {
    setStatus(`could not open: ${error.message}`);
  }
});

$("compose").addEventListener("submit", (event) => {
  event.preventDefault();
  const body = $("compose-body").value;
  if (!body.trim() || !open) return;
  $("compose-body").value = "";
  void sendMessage(body);
});

$("compose-body").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("compose").requestSubmit();
  }
});

$("compose-body").addEventListener("input", () => {
  if (!open || Date.now() - lastTypingSent < TYPING_REFRESH_MS) return;
  lastTypingSent = Date.now();
  client.typing(open.id, "started");
});

$("older").addEventListener("click", () => void loadOlder());

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && open) markReadUpTo(Math.max(0, ...open.shown.keys()));
});

// `#url=…&token=…` signs in directly (how the browser tests open the page).
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("token")) {
  $("signin-url").value = params.get("url") ?? $("signin-url").value;
  signIn($("signin-url").value, params.get("token")).catch((error) => setStatus(`sign-in failed: ${error.message}`));
}
