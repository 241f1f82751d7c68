/**
 * A scripted WebSocket for the unit tests: the test plays the server, reading what the
 * client wrote and answering, opening and closing by hand.
 */
export class FakeSocket {
  static all = [];

  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = undefined;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }

  static reset() {
    FakeSocket.all = [];
  }

  static last() {
    return FakeSocket.all.at(-1);
  }

  /** The frames the client wrote, parsed. */
  frames(type) {
    const frames = this.sent.map((text) => JSON.parse(text));
    return type === undefined ? frames : frames.filter((frame) => frame.type === type);
  }

  send(text) {
    if (this.closed) throw new Error("send on a closed socket");
    this.sent.push(text);
  }

  close(code, reason) {
    this.closed = { code, reason };
  }

  /** The access token the client connected with. */
  token() {
    return new URL(this.url).searchParams.get("access_token");
  }

  // ---- The server's side. ----

  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  welcome(user = "alice", limits = {}) {
    this.push({
      type: "welcome",
      protocol: 2,
      user,
      connection: "gw-test-1",
      limits: { max_frame_bytes: 25600, max_message_bytes: 4096, max_history_page: 100, ...limits },
    });
  }

  /** Answers the client's newest `resume` with `resumed`. */
  resumed(cursor, conversations = [], unread = []) {
    const resume = this.frames("resume").at(-1);
    this.push({ type: "resumed", id: resume.id, cursor, conversations, unread });
  }

  event(conversation, seq, prev, data = { client_id: `m${seq}`, body: `message ${seq}` }) {
    this.typedEvent(conversation, seq, prev, "message.posted", data);
  }

  /** An event of `type` by bob; `system` for a membership change. */
  typedEvent(conversation, seq, prev, type, data, system) {
    const event = { seq, id: `e-${seq}`, conversation, prev, command: `c-${seq}`, actor: "bob", at: seq, type, v: 1, data };
    this.push(system === undefined ? { type: "event", event } : { type: "event", event, system });
  }

  /** The connection ends: an optional error event, then the close event. */
  drop(code = 1006, reason = "", errorMessage) {
    if (errorMessage !== undefined) this.onerror?.({ message: errorMessage });
    this.onclose?.({ code, reason });
  }
}
