/**
 * Parley's web chat: signs in with a gateway URL and a token, shows the conversation list
 * with unread counts, and one conversation at a time: history that pages in as you scroll
 * up, sending, editing your messages, reactions, groups and their members, read markers,
 * typing and presence. All protocol work (retries, reconnect, resume, dedupe, rate limits)
 * is the client library's; this file only renders. User text is only ever set as
 * textContent.
 */
import { Client, ParleyError } from "@parley/client";

const $ = (id) => document.getElementById(id);
const TYPING_REFRESH_MS = 3_000;
const PAGE = 30;
/** The emoji offered on every message (others that members added are shown too). */
const EMOJI = ["👍", "🎉", "❤️"];
/** Within this many pixels of the top, the next older page is loaded. */
const NEAR_TOP_PX = 48;
/** How many direct conversations of the list are named by asking for their members. */
const PEERS_ASKED = 20;

let client;
let me;
/** The user's conversations by id: the `conversations` entries, kept current by events. */
const conversations = new Map();
/**
 * The conversation on screen: its id, its messages by seq ({ seq, sender, body, edited,
 * deleted, system, reactions: Map<emoji, { count, mine }>, item }), the oldest seq shown,
 * whether older pages remain (and the one loading), and its other members.
 */
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
  client.on("membership", onMembership);
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
  // A direct conversation is named after the other member, whom the list does not name:
  // ask for the most recent ones' members (a request each, so not for all of them).
  const unnamed = page.conversations.filter((entry) => entry.kind === "direct").slice(0, PEERS_ASKED);
  await Promise.all(
    unnamed.map((entry) =>
      client.members(entry.conversation, { limit: 2 }).then((details) => {
        entry.peer = details.members.map((m) => m.user).find((user) => user !== me);
      }, () => {}),
    ),
  );
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
        const { sender, body, system } = entry.last_message;
        preview.textContent = system ? system.text : `${sender}: ${body}`;
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
  open = { id, messages: new Map(), oldest: undefined, hasMore: true, loading: undefined, members: [] };
  $("conversation").hidden = false;
  $("messages").replaceChildren();
  $("presence").textContent = "";
  const entry = conversations.get(id);
  $("conversation-title").textContent = entry ? label(entry) : "conversation";
  $("add-member").hidden = true;
  renderList();
  await Promise.all([loadMembers(id), loadOlder()]);
  // A first page shorter than the view leaves nothing to scroll: fill the view.
  const view = $("messages");
  while (open?.id === id && open.hasMore && view.scrollHeight <= view.clientHeight && (await loadOlder()));
  view.scrollTop = view.scrollHeight;
  $("compose-body").focus();
}

async function loadMembers(id) {
  const details = await client.members(id).catch(() => undefined);
  if (!details || open?.id !== id) return;
  const entry = conversations.get(id);
  open.members = details.members.map((m) => m.user).filter((user) => user !== me);
  // Owners and admins may add members (docs/protocol.md, roles and permissions).
  $("add-member").hidden = details.kind !== "group" || !["owner", "admin"].includes(details.role);
  if (entry) {
    if (details.kind === "direct") entry.peer = open.members[0];
    else entry.title = details.title;
    $("conversation-title").textContent = label(entry);
  }
  if (open.members.length > 0) {
    client.watchPresence(open.members.slice(0, 100)).then(
      ({ users }) => users.forEach((s) => presence.set(s.user, s)) || renderPresence(),
      () => {},
    );
  }
}

/** Loads the page before the oldest message shown, keeping what is on screen in place;
 * while one is loading, that one is the answer (scrolling and the button both ask).
 * Resolves with whether a page was shown. */
function loadOlder() {
  if (!open?.hasMore) return Promise.resolve(false);
  const current = open;
  current.loading ??= loadPage(current).finally(() => (current.loading = undefined));
  return current.loading;
}

async function loadPage(current) {
  const view = $("messages");
  view.setAttribute("aria-busy", "true");
  try {
    const page = await client.history(current.id, current.oldest === undefined ? { limit: PAGE } : { before: current.oldest, limit: PAGE });
    if (open !== current) return false;
    // Prepending grows the list above the view: keep the distance to the bottom.
    const fromBottom = view.scrollHeight - view.scrollTop;
    for (const message of page.messages) {
      showMessage(
        {
          seq: message.seq,
          sender: message.sender,
          body: message.body,
          clientId: message.client_id,
          edited: message.edited,
          deleted: message.deleted,
          system: message.system,
          reactions: new Map((message.reactions ?? []).map((r) => [r.emoji, { count: r.count, mine: r.users.includes(me) }])),
        },
        "top",
      );
    }
    current.hasMore = page.has_more;
    view.scrollTop = view.scrollHeight - fromBottom;
    $("older").hidden = !page.has_more;
    markReadUpTo(Math.max(0, ...current.messages.keys()));
    return true;
  } catch (error) {
    setStatus(`could not load history: ${error.message}`);
    return false;
  } finally {
    view.setAttribute("aria-busy", "false");
  }
}

/** Shows a message once, at the bottom (live) or the top (older pages); a pending send
 * with the same client id becomes this message. */
function showMessage(message, where) {
  if (open.messages.has(message.seq)) return;
  const view = $("messages");
  const pending = message.clientId === undefined ? undefined : view.querySelector(`[data-client-id="${CSS.escape(message.clientId)}"]`);
  const atBottom = view.scrollHeight - view.scrollTop - view.clientHeight < 24;
  const state = { reactions: new Map(), ...message, item: pending ?? document.createElement("li") };
  open.messages.set(state.seq, state);
  open.oldest = Math.min(open.oldest ?? state.seq, state.seq);
  renderMessage(state);
  if (!pending) {
    if (where === "top") view.prepend(state.item);
    else view.append(state.item);
  }
  if (where !== "top" && (atBottom || state.sender === me)) view.scrollTop = view.scrollHeight;
}

function renderMessage(state) {
  const { item } = state;
  item.dataset.seq = String(state.seq);
  item.dataset.pending = "false";
  item.className = state.system ? "system" : state.deleted ? "deleted" : "";
  if (state.system) {
    item.replaceChildren(state.system.text);
    return;
  }
  const who = document.createElement("span");
  who.className = "sender";
  who.textContent = state.sender;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = state.deleted ? "message deleted" : state.body;
  item.replaceChildren(who, body);
  if (state.deleted) return;
  if (state.edited) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.textContent = " (edited)";
    item.append(edited);
  }
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.setAttribute("role", "group");
  actions.setAttribute("aria-label", `Reactions to ${state.sender}'s message`);
  const shown = [...EMOJI, ...[...state.reactions.keys()].filter((emoji) => !EMOJI.includes(emoji))];
  for (const emoji of shown) {
    const { count = 0, mine = false } = state.reactions.get(emoji) ?? {};
    const button = document.createElement("button");
    button.type = "button";
    button.className = "reaction";
    button.textContent = count > 0 ? `${emoji} ${count}` : emoji;
    button.setAttribute("aria-pressed", String(mine));
    button.setAttribute("aria-label", `${emoji} ${count}`);
    button.title = mine ? `remove your ${emoji}` : `react with ${emoji}`;
    button.addEventListener("click", () => {
      const request = mine ? client.unreact(open.id, state.seq, emoji) : client.react(open.id, state.seq, emoji);
      request.catch((error) => setStatus(`could not react: ${error.message}`));
    });
    actions.append(button);
  }
  if (state.sender === me) {
    const edit = document.createElement("button");
    edit.type = "button";
    edit.textContent = "Edit";
    edit.setAttribute("aria-label", `Edit your message “${state.body.slice(0, 40)}”`);
    edit.addEventListener("click", () => startEdit(state));
    actions.append(edit);
  }
  item.append(actions);
}

/** Replaces the message's body with a form to edit it: Enter saves, Escape cancels. */
function startEdit(state) {
  const conversation = open.id;
  const form = document.createElement("form");
  form.className = "edit";
  const label = document.createElement("label");
  const input = document.createElement("input");
  const inputId = `edit-${state.seq}`;
  label.htmlFor = inputId;
  label.textContent = "Edit message";
  input.id = inputId;
  input.value = state.body;
  input.required = true;
  const save = document.createElement("button");
  save.type = "submit";
  save.textContent = "Save";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  form.append(label, input, save, cancel);
  const done = () => {
    renderMessage(state);
    state.item.querySelector("button:last-child")?.focus();
  };
  cancel.addEventListener("click", done);
  input.addEventListener("keydown", (event) => event.key === "Escape" && done());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = input.value;
    if (!body.trim() || body === state.body) return done();
    // Shown at once; the `message.edited` event confirms it for everyone.
    state.body = body;
    state.edited = true;
    done();
    client.edit(conversation, state.seq, body).catch((error) => setStatus(`could not edit: ${error.message}`));
  });
  state.item.replaceChildren(form);
  input.focus();
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
  $("messages").scrollTop = $("messages").scrollHeight;
  client.typing(open.id, "stopped");
  lastTypingSent = 0;
  try {
    // Sent again with this id after reconnects, retryable errors and rate limits: posted once.
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
    return; // a group the user was just added to: `onMembership` lists it
  }
  entry.last_seq = Math.max(entry.last_seq ?? 0, event.seq);
  const here = open?.id === event.conversation ? open : undefined;
  const target = here?.messages.get(event.data.message);
  switch (event.type) {
    case "message.posted": {
      entry.last_message = { seq: event.seq, sender: event.actor, body: event.data.body, at: event.at };
      const onScreen = here && document.visibilityState === "visible";
      if (here) {
        showMessage({ seq: event.seq, sender: event.actor, body: event.data.body, clientId: event.data.client_id }, "bottom");
        clearTypist(event.actor);
      }
      if (event.actor !== me && onScreen) markReadUpTo(event.seq);
      else if (event.actor !== me) entry.unread = (entry.unread ?? 0) + 1;
      break;
    }
    case "message.edited":
      if (entry.last_message?.seq === event.data.message) entry.last_message.body = event.data.body;
      if (target) Object.assign(target, { body: event.data.body, edited: true });
      break;
    case "message.deleted":
      if (entry.last_message?.seq === event.data.message) entry.last_message.body = "message deleted";
      if (target) Object.assign(target, { body: "", deleted: true, reactions: new Map() });
      break;
    case "reaction.added":
    case "reaction.removed":
      if (target) {
        const added = event.type === "reaction.added";
        const { count = 0, mine = false } = target.reactions.get(event.data.emoji) ?? {};
        const now = { count: Math.max(0, count + (added ? 1 : -1)), mine: event.actor === me ? added : mine };
        if (now.count === 0) target.reactions.delete(event.data.emoji);
        else target.reactions.set(event.data.emoji, now);
      }
      break;
    case "conversation.read":
      if (event.actor === me) {
        entry.read_seq = Math.max(entry.read_seq ?? 0, event.data.seq);
        if (entry.read_seq >= (entry.last_message?.seq ?? 0)) entry.unread = 0;
      }
      break;
  }
  // Keep an edit form open under a change of the same message: it renders on its own close.
  if (target && !target.item.querySelector("form")) renderMessage(target);
  renderList();
}

/** A group's membership, roles or title changed: list it, show its entry, follow it. */
function onMembership({ event, system }) {
  const id = event.conversation;
  let entry = conversations.get(id);
  const aboutMe = system.users.includes(me) || (event.type === "member.left" && event.actor === me);
  if (!entry && event.type === "member.added" && aboutMe) {
    entry = { conversation: id, kind: "group", role: "member", last_seq: event.seq, unread: 0, read_seq: 0 };
    conversations.set(id, entry);
    // The title is in the conversation's details, not in the event.
    client.members(id).then((details) => {
      entry.title = details.title;
      renderList();
    }, () => {});
  }
  if (!entry) return;
  entry.last_seq = Math.max(entry.last_seq ?? 0, event.seq);
  entry.last_message = { seq: event.seq, sender: event.actor, body: "", system, at: event.at };
  if (event.type === "conversation.renamed") entry.title = system.title ?? undefined;
  if ((event.type === "member.removed" || event.type === "member.left") && aboutMe) {
    conversations.delete(id);
    if (open?.id === id) {
      open = undefined;
      $("conversation").hidden = true;
    }
  } else if (open?.id === id) {
    showMessage({ seq: event.seq, sender: event.actor, body: "", system }, "bottom");
    $("conversation-title").textContent = label(entry);
    if (event.type === "member.added") open.members.push(...system.users.filter((user) => user !== me));
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

/** Runs a form's action with its input values; a failure is shown in the status line. */
function onSubmit(id, what, action) {
  $(id).addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      await action(new FormData(form));
      form.reset();
    } catch (error) {
      setStatus(`${what} failed: ${error.message}`);
    }
  });
}

/** "bob, carol dave" -> ["bob", "carol", "dave"] */
const users = (text) => String(text).split(/[\s,]+/).filter(Boolean);

onSubmit("signin", "sign-in", (form) => signIn(String(form.get("url")), String(form.get("token"))));

// Served by a gateway, the page's sockets go to the same host; opened as a file, to the
// address `parley up` listens on by default.
const ownGateway = location.protocol.startsWith("http")
  ? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`
  : "ws://127.0.0.1:8080/ws";
$("signin-url").value = ownGateway;

onSubmit("dev-signin", "sign-in", async (form) => {
  const response = await fetch("dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user: String(form.get("user")).trim() }),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.message ?? `this server signs no development tokens (HTTP ${response.status})`);
  await signIn(ownGateway, answer.token);
});

onSubmit("new-direct", "opening the conversation", async (form) => {
  const peer = String(form.get("peer")).trim();
  const ack = await client.createDirect(peer);
  if (!conversations.has(ack.conversation)) {
    conversations.set(ack.conversation, { conversation: ack.conversation, kind: "direct", peer, last_seq: ack.seq, unread: 0 });
  }
  await openConversation(ack.conversation);
});

onSubmit("new-group", "creating the group", async (form) => {
  const title = String(form.get("title")).trim() || undefined;
  const ack = await client.createGroup(users(form.get("members")), title);
  if (!conversations.has(ack.conversation)) {
    conversations.set(ack.conversation, { conversation: ack.conversation, kind: "group", title, role: "owner", last_seq: ack.seq, unread: 0 });
  }
  await openConversation(ack.conversation);
  // Its owner may add members, even before the store can tell (`members` trails the log).
  if (open?.id === ack.conversation) $("add-member").hidden = false;
});

onSubmit("add-member", "adding", (form) => client.addMembers(open.id, users(form.get("users"))));

onSubmit("compose", "sending", (form) => {
  const body = String(form.get("body"));
  if (body.trim() && open) void sendMessage(body);
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

// Scrolling up to the top loads older messages; the button does the same from the keyboard.
$("messages").addEventListener("scroll", () => {
  if ($("messages").scrollTop < NEAR_TOP_PX) void loadOlder();
});
$("older").addEventListener("click", () => void loadOlder());

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && open) markReadUpTo(Math.max(0, ...open.messages.keys()));
});

// `#url=…&token=…` signs in directly.
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("token")) {
  $("signin-url").value = params.get("url") ?? $("signin-url").value;
  signIn($("signin-url").value, params.get("token")).catch((error) => setStatus(`sign-in failed: ${error.message}`));
}
