/** Backoff: full jitter under an exponential ceiling with a cap. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { backoffCeiling, backoffDelay } from "../../dist/index.js";

test("the ceiling doubles from the base up to the cap, and stays there", () => {
  const options = { baseMs: 100, capMs: 5_000 };
  const ceilings = Array.from({ length: 12 }, (_, attempt) => backoffCeiling(attempt, options));
  assert.deepEqual(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000, 5000, 5000]);
  assert.equal(backoffCeiling(5_000, options), 5_000, "a huge attempt count overflows to the cap, not NaN");
});

test("a delay is uniform between zero and the ceiling (full jitter)", () => {
  const options = { baseMs: 100, capMs: 5_000 };
  for (let attempt = 0; attempt < 12; attempt++) {
    const ceiling = backoffCeiling(attempt, options);
    assert.equal(backoffDelay(attempt, options, () => 0), 0);
    assert.equal(backoffDelay(attempt, options, () => 0.5), Math.floor(ceiling / 2));
    assert.ok(backoffDelay(attempt, options, () => 0.999999) < ceiling);
  }
  // With the real source of randomness: within bounds, and spread out (not all equal).
  const delays = Array.from({ length: 200 }, () => backoffDelay(4, options));
  assert.ok(delays.every((delay) => delay >= 0 && delay < 1_600), "every delay within [0, 1600)");
  assert.ok(new Set(delays).size > 50, "jittered delays differ");
});

test("defaults: 250 ms base, 30 s cap", () => {
  assert.equal(backoffCeiling(0), 250);
  assert.equal(backoffCeiling(20), 30_000);
});
