/**
 * Reconnect and retry delays: exponential backoff with full jitter and a cap (a delay drawn
 * uniformly from zero to the capped exponential), so that clients dropped together by one
 * server restart do not all come back in the same instant.
 */

export interface BackoffOptions {
  /** The ceiling of the first delay, in milliseconds (default 250). */
  baseMs?: number;
  /** No delay exceeds this, in milliseconds (default 30,000). */
  capMs?: number;
}

/** The ceiling of the delay before retry number `attempt` (0 for the first retry). */
export function backoffCeiling(attempt: number, options: BackoffOptions = {}): number {
  const base = options.baseMs ?? 250;
  const cap = options.capMs ?? 30_000;
  // 2 ** attempt overflows to Infinity for large attempts, which Math.min caps.
  return Math.min(cap, base * 2 ** Math.max(0, attempt));
}

/** A delay for retry number `attempt`, uniform in [0, ceiling) given `random` in [0, 1). */
export function backoffDelay(
  attempt: number,
  options: BackoffOptions = {},
  random: () => number = Math.random,
): number {
  return Math.floor(random() * backoffCeiling(attempt, options));
}
