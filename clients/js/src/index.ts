/** Parley's client library: see README.md for a complete example. */
export { Client } from "./client.js";
export type {
  ClientEvent,
  ClientEvents,
  ClientOptions,
  ConnectionState,
  RequestOptions,
  SendOptions,
  ResumeState,
  SocketConstructor,
  SocketLike,
} from "./client.js";
export { backoffCeiling, backoffDelay } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { ClientClosedError, ParleyError } from "./errors.js";
export * from "./protocol.js";
