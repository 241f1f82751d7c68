/**
 * The wire shapes of Parley's client protocol, version 2 (docs/protocol.md; the source of
 * truth is events/src/protocol.rs). Frames are JSON objects tagged by `type`; only the
 * frames this library interprets are spelled out, every other server frame still reaches
 * the application as a {@link ServerFrame}.
 */

/** The protocol version this library speaks (asked for with `?protocol=2`). */
export const PROTOCOL_VERSION = 2;

export type ConversationId = string;
export type UserId = string;
export type ConversationKind = "direct" | "group";
export type Role = "owner" | "admin" | "member" | (string & {});

export interface Limits {
  max_frame_bytes: number;
  max_message_bytes: number;
  max_history_page: number;
}

/** An event of the log, exactly as recorded (docs/events.md). */
export interface RecordedEvent {
  seq: number;
  id: string;
  conversation: ConversationId;
  prev: number;
  command: string;
  actor: UserId;
  at: number;
  type: string;
  v: number;
  data: Record<string, unknown>;
}

/** A recorded event whose `type` and `data` are known. */
export type Recorded<T extends string, D> = Omit<RecordedEvent, "type" | "data"> & { type: T; data: D };

export type MessagePosted = Recorded<"message.posted", { client_id: string; body: string; reply_to?: number }>;
/** `message` is the `seq` of the message changed. */
export type MessageEdited = Recorded<"message.edited", { message: number; body: string }>;
export type MessageDeleted = Recorded<"message.deleted", { message: number }>;
export type ReactionChanged = Recorded<"reaction.added" | "reaction.removed", { message: number; emoji: string }>;
/** A group's membership, roles, title or mutes changed (`member.added`, `member.removed`,
 * `member.left`, `member.role_changed`, `conversation.renamed`, `member.muted`,
 * `member.unmuted`): the event, and its system entry. */
export interface MembershipChanged {
  event: RecordedEvent;
  system: SystemEntry;
}

export interface EventFrame {
  type: "event";
  event: RecordedEvent;
  /** For a membership change: how it reads in the conversation. */
  system?: SystemEntry;
}

export interface Welcome {
  type: "welcome";
  protocol: number;
  user: UserId;
  connection: string;
  limits: Limits;
  /** Whether pushed frames ready together may come packed in one message (`pack=1`). */
  pack?: boolean;
}

export interface Ack {
  type: "ack";
  id: string;
  conversation: ConversationId;
  seq: number;
  event: string;
}

export interface ErrorFrame {
  type: "error";
  id?: string;
  code: string;
  message: string;
  retryable: boolean;
  /** On `rate_limited`: how long to wait before the same request can pass. */
  retry_after_ms?: number;
}

/** How a membership change reads in a conversation: the same for every client. */
export interface SystemEntry {
  event: string;
  users: UserId[];
  role: Role | null;
  title: string | null;
  until: number | null;
  /** The canonical English rendering, e.g. "alice added bob and carol". */
  text: string;
}

export interface ReactionCount {
  emoji: string;
  count: number;
  /** The first 20 holders by user id. */
  users: UserId[];
}

/** A message of a history page, as it stands now (or a membership change's entry, with
 * `system`, an empty body and no `client_id`). */
export interface HistoryMessage {
  seq: number;
  id: string;
  sender: UserId;
  client_id?: string;
  body: string;
  at: number;
  edited?: boolean;
  deleted?: boolean;
  reply_to?: number;
  reactions?: ReactionCount[];
  system?: SystemEntry;
}

export interface HistoryPage {
  type: "history";
  id: string;
  conversation: ConversationId;
  messages: HistoryMessage[];
  has_more: boolean;
}

export interface ConversationSummary {
  conversation: ConversationId;
  kind: ConversationKind;
  title?: string;
  role: Role;
  last_seq: number;
  last_activity_at: number;
  last_message?: { seq: number; sender: UserId; body: string; at: number };
  read_seq?: number;
  unread?: number;
}

export interface ConversationsPage {
  type: "conversations";
  id: string;
  conversations: ConversationSummary[];
  has_more: boolean;
}

export interface MembersPage {
  type: "members";
  id: string;
  conversation: ConversationId;
  kind: ConversationKind;
  title?: string;
  created_at: number;
  member_count: number;
  role: Role;
  members: { user: UserId; role: Role }[];
  has_more: boolean;
}

export interface UserStatus {
  user: UserId;
  online: boolean;
  last_seen?: number;
}

export interface PresenceAnswer {
  type: "presence";
  id: string;
  users: UserStatus[];
  not_visible?: UserId[];
}

export interface PresenceChanged extends UserStatus {
  type: "presence_changed";
}

export interface Typing {
  type: "typing";
  conversation: ConversationId;
  user: UserId;
  state: "started" | "stopped";
  expires_in_ms: number;
}

export interface UnreadCount {
  conversation: ConversationId;
  read_seq: number;
  unread: number;
}

export interface ResumeStatus {
  conversation: ConversationId;
  state: "live" | "more" | "truncated" | "not_member";
  seq: number;
  first_seq?: number;
}

export interface Resumed {
  type: "resumed";
  id: string;
  cursor: string;
  conversations: ResumeStatus[];
  unread: UnreadCount[];
}

export interface Pong {
  type: "pong";
  id?: string;
}

/** Any frame from the server: the known ones, or one added to the protocol since. */
export type ServerFrame =
  | Welcome
  | Ack
  | ErrorFrame
  | EventFrame
  | HistoryPage
  | ConversationsPage
  | MembersPage
  | PresenceAnswer
  | PresenceChanged
  | Typing
  | Resumed
  | Pong
  | { type: string; id?: string; [field: string]: unknown };

/** Close codes the server sends (events/src/protocol.rs, module `close`). */
export const Close = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  FELL_BEHIND: 1013,
} as const;
