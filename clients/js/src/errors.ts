/** The errors the client rejects requests with. */

/** The server refused a request (`error` frame) or the connection (HTTP refusal). */
export class ParleyError extends Error {
  readonly code: string;
  readonly retryable: boolean;

  constructor(code: string, message: string, retryable = false) {
    super(`${code}: ${message}`);
    this.name = "ParleyError";
    this.code = code;
    this.retryable = retryable;
  }
}

/** The client was closed (by `close()`, or for good after an authentication refusal). */
export class ClientClosedError extends Error {
  constructor(message = "the client is closed") {
    super(message);
    this.name = "ClientClosedError";
  }
}
