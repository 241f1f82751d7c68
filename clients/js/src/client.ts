/**
 * The Parley client: one WebSocket to a gateway (protocol version 2), requests matched to
 * their answers by client id, and a connection that heals itself.
 *
 * - Requests are queued while offline and sent (again) on every new socket with the same
 *   id, so a `send` is applied once however many times it travels (the server is
 *   idempotent by id), and retryable errors and unanswered attempts are retried the same way.
 * - A lost socket is replaced after an exponential backoff with full jitter and a cap;
 *   the new socket `resume`s from the cursor of the last `resumed` plus the newest `seq`
 *   of every conversation that had events since, and events already delivered are dropped
 *   by `seq`: the application sees every event once, in each conversation's order.
 */

import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { ClientClosedError, ParleyError } from "./errors.js";
import { Emitter, type Item } from "./emitter.js";
import {
  PROTOCOL_VERSION,
  type Ack,
  type ConversationId,
  type ConversationsPage,
  type ErrorFrame,
  type EventFrame,
  type HistoryPage,
  type MembersPage,
  type MembershipChanged,
  type MessageDeleted,
  type MessageEdited,
  type MessagePosted,
  type Pong,
  type PresenceAnswer,
  type ReactionChanged,
  type RecordedEvent,
  type ResumeStatus,
  type Resumed,
  type Role,
  type ServerFrame,
  type Typing,
  type UserId,
  type UserStatus,
  type Welcome,
} from "./protocol.js";

/** What the client needs of a WebSocket: the browser's interface, which `ws` also has. */
export interface SocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type SocketConstructor = new (url: string) => SocketLike;

export type ConnectionState = "idle" | "connecting" | "resuming" | "live" | "reconnecting" | "closed";

export interface ClientOptions {
  /** The gateway's WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`. */
  url: string;
  /** A token to connect with. When it is refused or expires, `getToken` is asked. */
  token?: string;
  /** Fetches a fresh token (from your backend): before the first connection when there
   * is no `token`, and after the server refused or ended a session for its token. */
  getToken?: () => string | Promise<string>;
  /** The WebSocket constructor; defaults to the global one (browsers, Node 22+). In
   * Node 20, pass `WebSocket` from the `ws` package. */
  WebSocket?: SocketConstructor;
  /** Reconnect and retry delays. */
  backoff?: BackoffOptions;
  /** Time without an answer after which a request is sent again with its id (default
   * 20 s, above the server's 10 s command timeout). */
  requestTimeoutMs?: number;
  /** Interval of application pings; a socket silent for two intervals is dropped and
   * replaced (default 20 s; 0 disables). Browsers cannot see WebSocket pings. */
  heartbeatMs?: number;
  /** Where a previous session stood (from {@link Client.resumeState}), to catch up on
   * what happened while the application was not running. */
  resumeState?: ResumeState;
  /** Prefix of generated request ids (default: random per client). */
  idPrefix?: string;
  /** The source of jitter, uniform in [0, 1) (default Math.random). */
  random?: () => number;
}

/** Where the client stands in the user's conversations: enough to resume later. */
export interface ResumeState {
  cursor?: string;
  conversations: Record<ConversationId, number>;
}

/** The notifications, by kind. */
export interface ClientEvents {
  /** An event of one of the user's conversations: each once, in its conversation's order. */
  event: RecordedEvent;
  /** The same events by type, typed, each right after its `event` notification: */
  /** a message was posted (`message.posted`); */
  message: MessagePosted;
  /** its author replaced a message's body (`message.edited`); */
  edited: MessageEdited;
  /** a message was deleted (`message.deleted`): show it as a tombstone; */
  deleted: MessageDeleted;
  /** an emoji was added to or removed from a message (`reaction.added`, `reaction.removed`); */
  reaction: ReactionChanged;
  /** a group's members, roles, title or mutes changed: the event and its system entry. */
  membership: MembershipChanged;
  /** Another member started or stopped typing. */
  typing: Typing;
  /** A watched user's status: from a `watchPresence` answer or a change. */
  presence: UserStatus;
  /** A resume finished (with its unread counts). */
  resumed: Resumed;
  /** A conversation's log no longer holds the point asked for: older events are gone. */
  truncated: ResumeStatus;
  /** The connection's state changed. */
  state: ConnectionState;
  /** Something went wrong that the client recovers from (or, when `state` is `closed`
   * right after, does not). */
  error: Error;
  /** Every frame from the server, as it arrived (for frames this library does not know). */
  frame: ServerFrame;
}

export type ClientEvent<K extends keyof ClientEvents = keyof ClientEvents> = Item<ClientEvents, K>;

export interface RequestOptions {
  /** The request's id; by default a fresh one. Reusing an id means "the same request". */
  id?: string;
  /** Gives up on the request (it may still take effect on the server). */
  signal?: AbortSignal;
}

export interface SendOptions extends RequestOptions {
  /** The `seq` of an earlier message of the conversation this one replies to. */
  replyTo?: number;
}

/** The typed notification each event type also makes (membership changes: by `system`). */
const TYPED_EVENTS: Record<string, "message" | "edited" | "deleted" | "reaction"> = {
  "message.posted": "message",
  "message.edited": "edited",
  "message.deleted": "deleted",
  "reaction.added": "reaction",
  "reaction.removed": "reaction",
};

interface Pending {
  frame: { type: string; id: string } & Record<string, unknown>;
  resolve: (frame: ServerFrame) => void;
  reject: (error: Error) => void;
  attempts: number;
  /** Written to the current socket and not answered yet (or waiting to be resent). */
  written: boolean;
  timer?: ReturnType<typeof setTimeout>;
}

/** Close reasons after which the same token is useless (docs/protocol.md, close codes). */
const TOKEN_CLOSES = new Set(["token expired", "token revoked"]);

export class Client {
  private readonly options: ClientOptions;
  private readonly emitter = new Emitter<ClientEvents>();
  private readonly pending = new Map<string, Pending>();
  /** The newest `seq` delivered per conversation: what dedupe compares with. */
  private readonly seqs = new Map<ConversationId, number>();
  /** Conversations with events delivered since `cursor` was issued, or still `more`. */
  private readonly sinceCursor = new Set<ConversationId>();
  private readonly watched = new Set<UserId>();
  private cursor: string | undefined;
  private token: string | undefined;
  private needToken: boolean;
  private socket: SocketLike | undefined;
  /** Increments with every socket, so callbacks of a replaced socket are ignored. */
  private generation = 0;
  private attempt = 0;
  private idCounter = 0;
  private readonly idPrefix: string;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private lastHeard = 0;
  private resumeId: string | undefined;
  private resumedOnSocket = false;
  private currentState: ConnectionState = "idle";
  private welcomeFrame: Welcome | undefined;
  /** After a `rate_limited`: requests are written one at a time, oldest first, until none
   * is left, so a later request never overtakes one waiting to be sent again. */
  private limited = false;
  /** While it runs, nothing is written: the server's `retry_after_ms` has not passed. */
  private holdTimer: ReturnType<typeof setTimeout> | undefined;
  private holdUntil = 0;
  private firstLive: { resolve: (w: Welcome) => void; reject: (e: Error) => void } | undefined;

  constructor(options: ClientOptions) {
    this.options = options;
    this.token = options.token;
    this.needToken = options.token === undefined;
    this.idPrefix = options.idPrefix ?? randomPrefix();
    if (options.resumeState) {
      this.cursor = options.resumeState.cursor;
      for (const [conversation, seq] of Object.entries(options.resumeState.conversations)) {
        this.seqs.set(conversation, seq);
        this.sinceCursor.add(conversation);
      }
    }
  }

  /** The connection's state. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** The current socket's `welcome` (user, limits), once one arrived. */
  get welcome(): Welcome | undefined {
    return this.welcomeFrame;
  }

  /** Connects, and resolves once the first resume is done and events arrive live. */
  connect(): Promise<Welcome> {
    if (this.currentState === "closed") return Promise.reject(new ClientClosedError());
    const live = new Promise<Welcome>((resolve, reject) => {
      this.firstLive = { resolve, reject };
    });
    if (this.currentState === "idle") void this.open();
    return live;
  }

  /** Closes the socket for good: pending requests are rejected, iterators end. */
  close(): void {
    if (this.currentState === "closed") return;
    this.setState("closed");
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.holdTimer);
    this.stopSocket(1000, "client closed");
    const error = new ClientClosedError();
    for (const pending of this.pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(error);
    }
    this.pending.clear();
    this.firstLive?.reject(error);
    this.firstLive = undefined;
    this.emitter.end();
  }

  on<K extends keyof ClientEvents>(kind: K, listener: (value: ClientEvents[K]) => void): () => void {
    return this.emitter.on(kind, listener);
  }

  off<K extends keyof ClientEvents>(kind: K, listener: (value: ClientEvents[K]) => void): void {
    this.emitter.off(kind, listener);
  }

  /** The notifications of `kinds` (default: events only) as an async iterator. */
  iterate<K extends keyof ClientEvents = "event">(
    ...kinds: K[]
  ): AsyncIterableIterator<ClientEvent<K>> {
    return this.emitter.iterate(kinds.length > 0 ? kinds : (["event"] as K[]));
  }

  /** Where the client stands; store it to resume a later session from here. */
  resumeState(): ResumeState {
    const conversations: Record<ConversationId, number> = {};
    const named = this.cursor === undefined ? this.seqs.keys() : this.sinceCursor.values();
    for (const conversation of named) {
      const seq = this.seqs.get(conversation);
      if (seq !== undefined) conversations[conversation] = seq;
    }
    return this.cursor === undefined ? { conversations } : { cursor: this.cursor, conversations };
  }

  // ---- Requests: each frame type is one small method over `request`. ----

  /** Posts a message. Pass `id` to match the ack and the event with your own records. */
  send(conversation: ConversationId, body: string, options: SendOptions = {}): Promise<Ack> {
    return this.request("send", { conversation, body, reply_to: options.replyTo }, options);
  }

  /** Replaces the body of the user's own message `message` (its `seq`). */
  edit(conversation: ConversationId, message: number, body: string, options?: RequestOptions): Promise<Ack> {
    return this.request("edit", { conversation, message, body }, options);
  }

  /** Deletes message `message` (its `seq`): the user's own, or any as a group's owner or admin. */
  deleteMessage(conversation: ConversationId, message: number, options?: RequestOptions): Promise<Ack> {
    return this.request("delete", { conversation, message }, options);
  }

  /** Adds `emoji` to message `message` (its `seq`); adding one the user holds is a no-op. */
  react(conversation: ConversationId, message: number, emoji: string, options?: RequestOptions): Promise<Ack> {
    return this.request("react", { conversation, message, emoji }, options);
  }

  /** Removes the user's `emoji` from message `message` (its `seq`). */
  unreact(conversation: ConversationId, message: number, emoji: string, options?: RequestOptions): Promise<Ack> {
    return this.request("unreact", { conversation, message, emoji }, options);
  }

  /** Adds `users` to a group as plain members (use a fresh id for every batch). */
  addMembers(conversation: ConversationId, users: UserId[], options?: RequestOptions): Promise<Ack> {
    return this.request("add_members", { conversation, users }, options);
  }

  /** Removes `users` from a group (use a fresh id for every batch). */
  removeMembers(conversation: ConversationId, users: UserId[], options?: RequestOptions): Promise<Ack> {
    return this.request("remove_members", { conversation, users }, options);
  }

  /** The user leaves a group. */
  leave(conversation: ConversationId, options?: RequestOptions): Promise<Ack> {
    return this.request("leave", { conversation }, options);
  }

  /** Gives a member of a group the role `role` (owners only). */
  setRole(conversation: ConversationId, user: UserId, role: Role, options?: RequestOptions): Promise<Ack> {
    return this.request("set_role", { conversation, user, role }, options);
  }

  /** Sets a group's title; `null` clears it. */
  rename(conversation: ConversationId, title: string | null, options?: RequestOptions): Promise<Ack> {
    return this.request("rename", { conversation, title }, options);
  }

  /** Keeps `user` from posting in a group for `seconds` (1 s to a year). */
  mute(conversation: ConversationId, user: UserId, seconds: number, options?: RequestOptions): Promise<Ack> {
    return this.request("mute", { conversation, user, seconds }, options);
  }

  /** Lifts `user`'s mute before it ends. */
  unmute(conversation: ConversationId, user: UserId, options?: RequestOptions): Promise<Ack> {
    return this.request("unmute", { conversation, user }, options);
  }

  /** Opens (or finds) the direct conversation with `peer`. */
  createDirect(peer: UserId, options?: RequestOptions): Promise<Ack> {
    return this.request("create_direct", { peer }, options);
  }

  /** Creates a group owned by the user, with `members` besides the user. */
  createGroup(members: UserId[], title?: string, options?: RequestOptions): Promise<Ack> {
    return this.request("create_group", title === undefined ? { members } : { title, members }, options);
  }

  /** A page of messages: newest first, or oldest first with `after`. */
  history(
    conversation: ConversationId,
    page: { before?: number; after?: number; limit?: number } = {},
    options?: RequestOptions,
  ): Promise<HistoryPage> {
    return this.request("history", { conversation, ...page }, options);
  }

  /** A page of the user's conversations, most recently active first. */
  conversations(page: { before?: number; limit?: number } = {}, options?: RequestOptions): Promise<ConversationsPage> {
    return this.request("conversations", page, options);
  }

  /** A conversation's details and a page of its members. */
  members(
    conversation: ConversationId,
    page: { after?: UserId; limit?: number } = {},
    options?: RequestOptions,
  ): Promise<MembersPage> {
    return this.request("members", { conversation, ...page }, options);
  }

  /** Moves the user's read marker in `conversation` up to `seq`. */
  markRead(conversation: ConversationId, seq: number, options?: RequestOptions): Promise<Ack> {
    return this.request("mark_read", { conversation, seq }, options);
  }

  /** Application-level ping. */
  ping(options?: RequestOptions): Promise<Pong> {
    return this.request("ping", {}, options);
  }

  /** The status of `users` (at most 100), and their changes from now on as `presence`
   * notifications, again after every reconnect. */
  async watchPresence(users: UserId[], options?: RequestOptions): Promise<PresenceAnswer> {
    users.forEach((user) => this.watched.add(user));
    const answer = await this.request<PresenceAnswer>("presence", { users }, options);
    answer.not_visible?.forEach((user) => this.watched.delete(user));
    return answer;
  }

  /** Stops the presence changes of `users`. */
  unwatchPresence(users: UserId[]): void {
    users.forEach((user) => this.watched.delete(user));
    this.notify("presence_unsubscribe", { users });
  }

  /** Tells the other members the user started or stopped typing (dropped while offline:
   * typing is ephemeral). Send `started` again every few seconds while typing goes on. */
  typing(conversation: ConversationId, state: "started" | "stopped"): void {
    this.notify("typing", { conversation, state });
  }

  /**
   * Sends a request frame of `type` and resolves with the answer carrying its id (rejects
   * with {@link ParleyError} on a final `error`). Queued while offline; sent again with the
   * same id after a reconnect, a retryable error, or `requestTimeoutMs` without an answer.
   * A frame the protocol gains is one method calling this.
   */
  request<T extends ServerFrame = ServerFrame>(
    type: string,
    fields: Record<string, unknown>,
    options: RequestOptions = {},
  ): Promise<T> {
    if (this.currentState === "closed") return Promise.reject(new ClientClosedError());
    const id = options.id ?? this.nextId();
    if (this.pending.has(id)) return Promise.reject(new Error(`request id ${id} is already in flight`));
    return new Promise<T>((resolve, reject) => {
      const entry: Pending = {
        frame: { type, id, ...withoutUndefined(fields) },
        resolve: resolve as (frame: ServerFrame) => void,
        reject,
        attempts: 0,
        written: false,
      };
      const signal = options.signal;
      if (signal) {
        if (signal.aborted) return reject(signal.reason);
        signal.addEventListener("abort", () => this.settle(id)?.reject(signal.reason), { once: true });
      }
      this.pending.set(id, entry);
      this.pump();
    });
  }

  /** Sends a frame that is never answered (except by an `error`), if a socket is up. */
  notify(type: string, fields: Record<string, unknown>): void {
    if (this.socket && this.welcomeFrame && this.currentState !== "closed") {
      this.transmit({ type, ...withoutUndefined(fields) });
    }
  }

  // ---- The connection. ----

  private async open(): Promise<void> {
    this.setState(this.attempt === 0 && this.generation === 0 ? "connecting" : "reconnecting");
    const generation = ++this.generation;
    let token: string;
    try {
      token = await this.currentToken();
    } catch (error) {
      this.emitter.emit("error", asError(error));
      if (generation === this.generation && this.currentState !== "closed") this.scheduleReconnect();
      return;
    }
    if (generation !== this.generation || this.currentState === "closed") return;
    const Socket = this.options.WebSocket ?? (globalThis as { WebSocket?: SocketConstructor }).WebSocket;
    if (!Socket) {
      this.fail(new Error("no WebSocket: pass the `WebSocket` option (in Node 20, from the `ws` package)"));
      return;
    }
    const separator = this.options.url.includes("?") ? "&" : "?";
    // pack=1: pushes ready together come as one message (an array), cheaper at high fan-out.
    const url = `${this.options.url}${separator}protocol=${PROTOCOL_VERSION}&pack=1&access_token=${encodeURIComponent(token)}`;
    let socket: SocketLike;
    try {
      socket = new Socket(url);
    } catch (error) {
      this.fail(asError(error));
      return;
    }
    this.socket = socket;
    this.welcomeFrame = undefined;
    this.resumedOnSocket = false;
    let refused: string | undefined;
    socket.onmessage = (event) => {
      if (generation === this.generation) this.receive(String(event.data));
    };
    socket.onerror = (event) => {
      // `ws` reports a refused upgrade as "Unexpected server response: 401".
      refused = String((event as { message?: unknown })?.message ?? "");
    };
    socket.onclose = (event) => {
      if (generation !== this.generation) return;
      this.lost(event.code, event.reason, refused);
    };
  }

  private async currentToken(): Promise<string> {
    if ((this.needToken || this.token === undefined) && this.options.getToken) {
      this.token = await this.options.getToken();
      this.needToken = false;
    }
    if (this.token === undefined) throw new Error("no token: pass `token` or `getToken`");
    return this.token;
  }

  /** The socket ended: refuse or reconnect. */
  private lost(code: number, reason: string, refused: string | undefined): void {
    const welcomed = this.welcomeFrame !== undefined;
    this.detach();
    const unauthorized = refused !== undefined && /\b401\b/.test(refused);
    // Browsers report a refused upgrade as a bare error event (an empty message here): the
    // token may be the reason, so the next attempt asks for a fresh one.
    if ((code === 1008 && TOKEN_CLOSES.has(reason)) || unauthorized || (!welcomed && refused === "")) {
      if (!this.options.getToken && (unauthorized || TOKEN_CLOSES.has(reason))) {
        this.fail(new ParleyError("token_refused", `the token was refused (${refused || reason}) and there is no getToken`));
        return;
      }
      this.needToken = true;
    }
    this.emitter.emit("error", new Error(`connection lost (${code}${reason ? ` ${reason}` : ""}${refused ? `; ${refused}` : ""})`));
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    this.setState("reconnecting");
    const delay = backoffDelay(this.attempt++, this.options.backoff, this.options.random);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => void this.open(), delay);
  }

  /** Forgets the current socket: its callbacks are ignored from now on, requests written
   * to it will be written again to the next. */
  private detach(): void {
    clearInterval(this.heartbeat);
    this.heartbeat = undefined;
    this.generation++;
    const socket = this.socket;
    this.socket = undefined;
    this.welcomeFrame = undefined;
    this.resumeId = undefined;
    if (socket) {
      socket.onmessage = socket.onclose = socket.onopen = null;
      // Not null: `ws` reports closing a socket that is still connecting as an error
      // event, which Node throws as uncaught when nobody listens.
      socket.onerror = () => {};
    }
    for (const entry of this.pending.values()) {
      clearTimeout(entry.timer);
      entry.timer = undefined;
      entry.written = false;
    }
  }

  private stopSocket(code: number, reason: string): void {
    const socket = this.socket;
    this.detach();
    try {
      socket?.close(code, reason);
    } catch {
      // Closing a socket that never opened throws in some implementations; it is gone anyway.
    }
  }

  /** Drops a socket that stopped answering and replaces it. */
  private drop(reason: string): void {
    // A close handshake cannot complete on a dead connection: `ws` can let go at once.
    (this.socket as { terminate?: () => void } | undefined)?.terminate?.();
    this.stopSocket(4000, reason);
    this.emitter.emit("error", new Error(`connection dropped: ${reason}`));
    this.scheduleReconnect();
  }

  private fail(error: Error): void {
    this.emitter.emit("error", error);
    const firstLive = this.firstLive;
    this.firstLive = undefined;
    this.close();
    firstLive?.reject(error);
  }

  private setState(state: ConnectionState): void {
    if (this.currentState === state || this.currentState === "closed") return;
    this.currentState = state;
    this.emitter.emit("state", state);
  }

  // ---- Frames. ----

  private receive(text: string): void {
    let frames: ServerFrame | ServerFrame[];
    try {
      frames = JSON.parse(text) as ServerFrame | ServerFrame[];
    } catch {
      this.emitter.emit("error", new Error("a frame from the server is not JSON"));
      return;
    }
    this.lastHeard = Date.now();
    // A packed message holds several pushed frames, in order.
    for (const frame of Array.isArray(frames) ? frames : [frames]) this.take(frame);
  }

  private take(frame: ServerFrame): void {
    this.emitter.emit("frame", frame);
    switch (frame.type) {
      case "welcome":
        return this.welcomed(frame as Welcome);
      case "event":
        return this.deliver(frame as EventFrame);
      case "resumed":
        if (frame.id === this.resumeId) return this.resumed(frame as Resumed);
        return;
      case "typing":
        return this.emitter.emit("typing", frame as Typing);
      case "presence_changed": {
        const { type: _type, ...status } = frame as UserStatus & { type: string };
        return this.emitter.emit("presence", status);
      }
    }
    const id = (frame as { id?: string }).id;
    if (frame.type === "error" && id !== undefined && id === this.resumeId) {
      return this.resumeFailed(frame as ErrorFrame);
    }
    const entry = id === undefined ? undefined : this.pending.get(id);
    if (!entry) {
      if (frame.type === "error") {
        const error = frame as ErrorFrame;
        this.emitter.emit("error", new ParleyError(error.code, error.message, error.retryable));
      }
      return;
    }
    if (frame.type === "error") {
      const error = frame as ErrorFrame;
      if (error.code === "rate_limited") {
        this.holdBack(entry, error.retry_after_ms);
      } else if (error.retryable) {
        this.retryLater(entry);
      } else {
        this.settle(entry.frame.id)?.reject(new ParleyError(error.code, error.message, false));
      }
      return;
    }
    this.settle(entry.frame.id)?.resolve(frame);
  }

  private welcomed(welcome: Welcome): void {
    if (welcome.protocol !== PROTOCOL_VERSION) {
      this.fail(new Error(`the gateway speaks protocol ${welcome.protocol}, not ${PROTOCOL_VERSION}`));
      return;
    }
    this.welcomeFrame = welcome;
    this.setState("resuming");
    const heartbeatMs = this.options.heartbeatMs ?? 20_000;
    if (heartbeatMs > 0) {
      this.heartbeat = setInterval(() => {
        if (Date.now() - this.lastHeard > 2 * heartbeatMs) this.drop("no frame for two heartbeats");
        else this.transmit({ type: "ping" });
      }, heartbeatMs);
    }
    this.sendResume(this.resumeFrame(welcome.limits.max_frame_bytes));
    this.pump();
  }

  /** The first `resume` of a socket: the cursor, and the newest `seq` of every
   * conversation with events since it (all known ones when there is no cursor). */
  private resumeFrame(maxBytes: number): Record<string, unknown> {
    const state = this.resumeState();
    const frame: Record<string, unknown> = { type: "resume", id: this.nextId(), ...state };
    // A conversation left out resumes from the cursor: events seen since come again and
    // are dropped by seq, so trimming loses nothing while there is a cursor.
    const entries = Object.entries(state.conversations);
    while (entries.length > 0 && JSON.stringify(frame).length > maxBytes - 64) {
      if (state.cursor === undefined) {
        this.emitter.emit("error", new Error("resume: too many conversations for one frame without a cursor"));
      }
      entries.splice(Math.floor(entries.length / 2));
      frame.conversations = Object.fromEntries(entries);
    }
    return frame;
  }

  private sendResume(frame: Record<string, unknown>): void {
    this.resumeId = frame.id as string;
    this.transmit(frame);
  }

  private resumed(frame: Resumed): void {
    const more: Record<ConversationId, number> = {};
    if (!this.resumedOnSocket) {
      // The cursor stands for everything sent up to here; only later events (and the
      // conversations not caught up) need naming next time.
      this.cursor = frame.cursor;
      this.sinceCursor.clear();
    }
    for (const status of frame.conversations) {
      if (status.state === "more") {
        more[status.conversation] = Math.max(status.seq, this.seqs.get(status.conversation) ?? 0);
        this.sinceCursor.add(status.conversation);
      } else if (status.state === "truncated") {
        this.emitter.emit("truncated", status);
      } else if (status.state === "not_member") {
        this.seqs.delete(status.conversation);
        this.sinceCursor.delete(status.conversation);
      }
    }
    this.resumedOnSocket = true;
    this.emitter.emit("resumed", frame);
    if (Object.keys(more).length > 0) {
      this.sendResume({ type: "resume", id: this.nextId(), conversations: more });
      return;
    }
    this.resumeId = undefined;
    if (this.currentState !== "live") this.becameLive();
  }

  private becameLive(): void {
    this.attempt = 0;
    this.setState("live");
    if (this.watched.size > 0) this.rewatch();
    const firstLive = this.firstLive;
    this.firstLive = undefined;
    if (firstLive && this.welcomeFrame) firstLive.resolve(this.welcomeFrame);
  }

  /** Presence watches end with their socket: ask again, and report the answers. */
  private rewatch(): void {
    const users = [...this.watched];
    for (let i = 0; i < users.length; i += 100) {
      this.request<PresenceAnswer>("presence", { users: users.slice(i, i + 100) }).then(
        (answer) => answer.users.forEach((status) => this.emitter.emit("presence", status)),
        (error) => this.emitter.emit("error", asError(error)),
      );
    }
  }

  private resumeFailed(error: ErrorFrame): void {
    if (error.code === "bad_frame" && this.cursor !== undefined) {
      // An unreadable cursor: resume every known conversation by seq instead.
      this.cursor = undefined;
      this.emitter.emit("error", new ParleyError(error.code, `resume refused the cursor: ${error.message}`));
      this.sendResume(this.resumeFrame(this.welcomeFrame?.limits.max_frame_bytes ?? 25_600));
    } else if (error.retryable) {
      const delay = error.retry_after_ms ?? backoffDelay(this.attempt++, this.options.backoff, this.options.random);
      const generation = this.generation;
      setTimeout(() => {
        if (generation === this.generation) this.sendResume(this.resumeFrame(this.welcomeFrame!.limits.max_frame_bytes));
      }, delay);
    } else {
      this.fail(new ParleyError(error.code, `resume refused: ${error.message}`));
    }
  }

  /** Delivers an event unless it was already: the one place dedupe happens. */
  private deliver({ event, system }: EventFrame): void {
    if (event.seq <= (this.seqs.get(event.conversation) ?? 0)) return;
    this.seqs.set(event.conversation, event.seq);
    this.sinceCursor.add(event.conversation);
    this.emitter.emit("event", event);
    const typed = TYPED_EVENTS[event.type];
    if (typed) this.emitter.emit(typed, event as never);
    else if (system) this.emitter.emit("membership", { event, system });
  }

  // ---- Writing. ----

  /** Writes the requests not yet on the current socket, in the order they were made: all
   * of them, or while `limited`, the oldest once no other is awaiting its answer. */
  private pump(): void {
    if (!this.socket || !this.welcomeFrame || this.holdTimer !== undefined) return;
    if (!this.limited) {
      for (const entry of this.pending.values()) if (!entry.written) this.write(entry);
      return;
    }
    let oldest: Pending | undefined;
    for (const entry of this.pending.values()) {
      if (entry.written) return;
      oldest ??= entry;
    }
    if (oldest) this.write(oldest);
  }

  /**
   * `entry` was refused `rate_limited`: nothing is written until the server's hint has
   * passed, then the requests go one at a time, oldest first. Requests written before the
   * refusal arrived have already been decided by the server; every one refused with it is
   * sent again in its place in the order, and nothing made later goes before it.
   */
  private holdBack(entry: Pending, retryAfterMs: number | undefined): void {
    clearTimeout(entry.timer);
    entry.written = false;
    this.limited = true;
    const wait = retryAfterMs ?? backoffDelay(entry.attempts - 1, this.options.backoff, this.options.random);
    const until = Date.now() + wait;
    if (this.holdTimer !== undefined && until <= this.holdUntil) return;
    clearTimeout(this.holdTimer);
    this.holdUntil = until;
    this.holdTimer = setTimeout(() => {
      this.holdTimer = undefined;
      this.pump();
    }, wait);
  }

  private write(entry: Pending): void {
    if (!this.socket || !this.welcomeFrame) return;
    clearTimeout(entry.timer);
    entry.written = true;
    entry.attempts++;
    this.transmit(entry.frame);
    const generation = this.generation;
    entry.timer = setTimeout(() => {
      if (generation === this.generation && this.pending.get(entry.frame.id) === entry) this.write(entry);
    }, this.options.requestTimeoutMs ?? 20_000);
  }

  private retryLater(entry: Pending): void {
    clearTimeout(entry.timer);
    const generation = this.generation;
    entry.timer = setTimeout(() => {
      if (generation === this.generation && this.pending.get(entry.frame.id) === entry) this.write(entry);
    }, backoffDelay(entry.attempts - 1, this.options.backoff, this.options.random));
  }

  private transmit(frame: Record<string, unknown>): void {
    const text = JSON.stringify(frame);
    const limit = this.welcomeFrame?.limits.max_frame_bytes;
    if (limit !== undefined && utf8Length(text) > limit) {
      // The server would close the socket (1009), and the retry would close the next one.
      const id = frame.id as string | undefined;
      const entry = id === undefined ? undefined : this.settle(id);
      const error = new ParleyError("frame_too_large", `a ${String(frame.type)} frame of ${utf8Length(text)} bytes exceeds max_frame_bytes ${limit}`);
      if (entry) entry.reject(error);
      else this.emitter.emit("error", error);
      return;
    }
    try {
      this.socket?.send(text);
    } catch (error) {
      // The socket is closing; its close callback reconnects and the request goes again.
      this.emitter.emit("error", asError(error));
    }
  }

  /** Removes request `id` from the pending ones, and returns it to resolve or reject. */
  private settle(id: string): Pending | undefined {
    const entry = this.pending.get(id);
    if (!entry) return undefined;
    clearTimeout(entry.timer);
    this.pending.delete(id);
    if (this.limited) {
      // Answered: the next request may go, and once none is left, all go at once again.
      if (this.pending.size === 0) this.limited = false;
      else this.pump();
    }
    return entry;
  }

  private nextId(): string {
    return `${this.idPrefix}-${(++this.idCounter).toString(36)}`;
  }
}

function withoutUndefined(fields: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

function randomPrefix(): string {
  const bytes = new Uint8Array(9);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function utf8Length(text: string): number {
  return new TextEncoder().encode(text).length;
}

function asError(value: unknown): Error {
  return value instanceof Error ? value : new Error(String(value));
}
