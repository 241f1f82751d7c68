/**
 * Typed callbacks, and the same notifications as an async iterator: one queue per
 * iterator, so a slow consumer never makes the client drop or reorder anything (the queue
 * grows instead; break out of the loop to unsubscribe).
 */

export type Listener<T> = (value: T) => void;

/** One notification as an async iterator yields it. */
export type Item<M, K extends keyof M = keyof M> = { [P in K]: { kind: P; value: M[P] } }[K];

export class Emitter<M> {
  private listeners = new Map<keyof M, Set<Listener<never>>>();
  private ended = false;
  private enders = new Set<() => void>();

  /** Calls `listener` for every `kind` notification; returns the function that stops it. */
  on<K extends keyof M>(kind: K, listener: Listener<M[K]>): () => void {
    let set = this.listeners.get(kind);
    if (!set) {
      set = new Set();
      this.listeners.set(kind, set);
    }
    set.add(listener as Listener<never>);
    return () => this.off(kind, listener);
  }

  off<K extends keyof M>(kind: K, listener: Listener<M[K]>): void {
    this.listeners.get(kind)?.delete(listener as Listener<never>);
  }

  emit<K extends keyof M>(kind: K, value: M[K]): void {
    for (const listener of [...(this.listeners.get(kind) ?? [])]) {
      try {
        (listener as Listener<M[K]>)(value);
      } catch (error) {
        // An application callback that throws must not break delivery to the others.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  /** The notifications of `kinds`, in the order they were emitted, until `end()`. */
  iterate<K extends keyof M>(kinds: K[]): AsyncIterableIterator<Item<M, K>> {
    const queue: Item<M, K>[] = [];
    let wake: ((result: IteratorResult<Item<M, K>>) => void) | undefined;
    let done = this.ended;
    const offs = kinds.map((kind) =>
      this.on(kind, (value) => {
        const item = { kind, value } as unknown as Item<M, K>;
        if (wake) {
          const resolve = wake;
          wake = undefined;
          resolve({ value: item, done: false });
        } else {
          queue.push(item);
        }
      }),
    );
    const finish = (): IteratorResult<Item<M, K>> => {
      done = true;
      offs.forEach((off) => off());
      this.enders.delete(end);
      return { value: undefined, done: true };
    };
    const end = () => {
      finish();
      if (wake) {
        const resolve = wake;
        wake = undefined;
        resolve({ value: undefined, done: true });
      }
    };
    this.enders.add(end);
    return {
      next: () => {
        const item = queue.shift();
        if (item !== undefined) return Promise.resolve({ value: item, done: false });
        if (done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => (wake = resolve));
      },
      return: () => Promise.resolve(finish()),
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  /** Ends every iterator (after what they queued) and refuses new ones. */
  end(): void {
    this.ended = true;
    for (const end of [...this.enders]) end();
  }
}
