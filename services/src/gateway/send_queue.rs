//! One socket's queue of frames waiting for its writer.
//!
//! Bounded like a channel, but it holds no memory while empty: most of a gateway's sockets
//! are idle most of the time, and tokio's bounded channel allocates a block of 32 slots
//! (1.6 KiB here) with every channel, a fifth of an idle socket's memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit};

/// A frame waiting for its socket; an answer holds one of the socket's answer slots until
/// the writer takes it.
pub type Queued = (Utf8Bytes, Option<OwnedSemaphorePermit>);

/// A queue that held more than this many frames gives its memory back once drained, so a
/// burst (a resume, a busy conversation) does not stay allocated for the socket's life.
const KEPT_CAPACITY: usize = 16;

pub struct SendQueue {
    state: Mutex<State>,
    /// Wakes the writer; a wake with no writer waiting is kept for its next wait.
    ready: Notify,
    capacity: usize,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Queued>,
    /// The writer is gone: what is pushed now would never be sent.
    closed: bool,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds `capacity` frames: the socket reads too slowly.
    Full,
    /// The socket's writer is gone.
    Closed,
}

impl SendQueue {
    pub fn new(capacity: usize) -> (Arc<SendQueue>, QueueReader) {
        let queue = Arc::new(SendQueue {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            capacity,
        });
        (Arc::clone(&queue), QueueReader(queue))
    }

    pub fn try_push(&self, queued: Queued) -> Result<(), Refused> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(Refused::Closed);
            }
            if state.frames.len() >= self.capacity {
                return Err(Refused::Full);
            }
            state.frames.push_back(queued);
        }
        self.ready.notify_one();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("send queue lock is never poisoned")
    }
}

/// The writer's end of a [`SendQueue`]; dropping it closes the queue and frees what is
/// still in it.
pub struct QueueReader(Arc<SendQueue>);

impl QueueReader {
    /// The oldest frame, once there is one. Cancel-safe: a frame is taken only when this
    /// returns it.
    pub async fn recv(&mut self) -> Queued {
        loop {
            if let Some(queued) = self.try_recv() {
                return queued;
            }
            self.0.ready.notified().await;
        }
    }

    pub fn try_recv(&mut self) -> Option<Queued> {
        let mut state = self.0.lock();
        let queued = state.frames.pop_front();
        if state.frames.is_empty() && state.frames.capacity() > KEPT_CAPACITY {
            state.frames = VecDeque::new();
        }
        queued
    }
}

impl Drop for QueueReader {
    fn drop(&mut self) {
        let frames = {
            let mut state = self.0.lock();
            state.closed = true;
            std::mem::take(&mut state.frames)
        };
        // Answer slots go back outside the lock.
        drop(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Queued {
        (Utf8Bytes::from(text.to_owned()), None)
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_the_bound_refuses_the_one_past_it() {
        let (queue, mut reader) = SendQueue::new(3);
        for n in 0..3 {
            queue.try_push(frame(&n.to_string())).unwrap();
        }
        assert_eq!(queue.try_push(frame("past the bound")), Err(Refused::Full));
        for n in 0..3 {
            assert_eq!(reader.recv().await.0.as_str(), n.to_string());
        }
        assert!(reader.try_recv().is_none());
        queue.try_push(frame("room again")).unwrap();
        assert_eq!(reader.recv().await.0.as_str(), "room again");
    }

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_a_push() {
        let (queue, mut reader) = SendQueue::new(4);
        let mut waiting = std::pin::pin!(reader.recv());
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        queue.try_push(frame("woken")).unwrap();
        assert_eq!(waiting.await.0.as_str(), "woken");
    }

    #[tokio::test]
    async fn a_wait_given_up_loses_no_frame() {
        let (queue, mut reader) = SendQueue::new(4);
        {
            let mut waiting = std::pin::pin!(reader.recv());
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            queue.try_push(frame("kept")).unwrap();
            // Dropped after the wake, before taking the frame: as a writer's select! does
            // when its ping fires at the same time.
        }
        assert_eq!(reader.recv().await.0.as_str(), "kept");
    }

    #[test]
    fn an_empty_queue_holds_no_memory_and_a_drained_burst_gives_its_memory_back() {
        let (queue, mut reader) = SendQueue::new(1024);
        assert_eq!(queue.lock().frames.capacity(), 0);
        for n in 0..1000 {
            queue.try_push(frame(&n.to_string())).unwrap();
        }
        while reader.try_recv().is_some() {}
        assert_eq!(queue.lock().frames.capacity(), 0);
        // A queue that stays small keeps its few slots rather than reallocating them.
        queue.try_push(frame("one")).unwrap();
        reader.try_recv().unwrap();
        assert!(queue.lock().frames.capacity() > 0);
    }

    #[test]
    fn a_queue_whose_writer_is_gone_refuses_frames_and_frees_what_it_held() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let (queue, reader) = SendQueue::new(4);
        let slot = Arc::clone(&slots).try_acquire_owned().unwrap();
        queue
            .try_push((Utf8Bytes::from_static("answer"), Some(slot)))
            .unwrap();
        assert_eq!(slots.available_permits(), 0);
        drop(reader);
        assert_eq!(slots.available_permits(), 1);
        assert_eq!(queue.try_push(frame("too late")), Err(Refused::Closed));
    }
}
