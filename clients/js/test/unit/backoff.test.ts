import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { backoffCeiling, backoffDelay, retryAfterDelay } from '../../src/backoff.js';

const options = { minDelayMs: 100, maxDelayMs: 5000 };

describe('backoff', () => {
  it('doubles the ceiling per attempt up to the maximum', () => {
    assert.deepEqual(
      [0, 1, 2, 3, 4, 5, 6, 100, 5000].map((a) => backoffCeiling(a, options)),
      [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000],
    );
  });

  it('uses full jitter: anywhere from 0 to the ceiling', () => {
    assert.equal(backoffDelay(3, options, () => 0), 0);
    assert.equal(backoffDelay(3, options, () => 0.5), 400);
    assert.equal(backoffDelay(3, options, () => 0.999999), 799);
    for (let i = 0; i < 1000; i++) {
      const d = backoffDelay(2, options);
      assert.ok(d >= 0 && d < 400, `delay ${d}`);
    }
  });

  it('spreads the delays (not all at the ceiling)', () => {
    const delays = Array.from({ length: 200 }, () => backoffDelay(4, options));
    assert.ok(Math.min(...delays) < 400 && Math.max(...delays) > 1200, 'delays cover the window');
  });

  it('waits at least retry_after_ms, plus up to half again', () => {
    assert.equal(retryAfterDelay(1000, () => 0), 1000);
    assert.equal(retryAfterDelay(1000, () => 0.999999), 1499);
  });
});
