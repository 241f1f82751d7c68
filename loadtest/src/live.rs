//! What every connection task records while the run goes on, and the once-a-second
//! timeline cut from it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::latency::{Latency, Summary};

/// Histograms of one timeline interval, or of the whole measured time.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub ack: Latency,
    pub delivery: Latency,
}

impl Window {
    pub fn merge(&mut self, other: &Window) {
        self.ack.merge(&other.ack);
        self.delivery.merge(&other.delivery);
    }
}

/// Shared by all connection tasks; counters are totals since the start.
#[derive(Debug)]
pub struct Live {
    /// Time zero of the run: scheduled times and message stamps are microseconds since it.
    pub origin: Instant,
    /// Sends scheduled before this (the warm-up) are left out of the measured histograms.
    measure_from_us: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub send_errors: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: AtomicU64,
    /// Conversations member devices received their first event of (the one that made them
    /// members): the set-up waits for all of them.
    pub joined_seen: AtomicU64,
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Sockets opened again after one was lost.
    pub reconnects: AtomicU64,
    /// Sends that went out on a socket that died before answering them: they never will be.
    pub abandoned: AtomicU64,
    /// Devices between losing a socket and having resumed on a new one.
    pub down: AtomicU64,
    /// `resume` frames sent, rounds that followed a `more`, and events a resume delivered
    /// (also counted in `delivered`).
    pub resume_frames: AtomicU64,
    pub more_rounds: AtomicU64,
    pub resumed_events: AtomicU64,
    /// Sockets the run told their devices to drop, with a close frame or without.
    pub drops_clean: AtomicU64,
    pub drops_abrupt: AtomicU64,
    /// Set when senders must stop early (a failed ramp step, Ctrl-C).
    pub stop_sending: AtomicBool,
    interval: Mutex<Window>,
    measured: Mutex<Window>,
    connect: Mutex<Latency>,
    errors_by_code: Mutex<BTreeMap<String, u64>>,
}

impl Live {
    pub fn new(origin: Instant) -> Live {
        Live {
            origin,
            measure_from_us: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            joined_seen: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            down: AtomicU64::new(0),
            resume_frames: AtomicU64::new(0),
            more_rounds: AtomicU64::new(0),
            resumed_events: AtomicU64::new(0),
            drops_clean: AtomicU64::new(0),
            drops_abrupt: AtomicU64::new(0),
            stop_sending: AtomicBool::new(false),
            interval: Mutex::new(Window::default()),
            measured: Mutex::new(Window::default()),
            connect: Mutex::new(Latency::default()),
            errors_by_code: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn micros_since_origin(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_micros()).unwrap_or(u64::MAX)
    }

    pub fn now_us(&self) -> u64 {
        self.micros_since_origin(Instant::now())
    }

    pub fn at(&self, micros: u64) -> Instant {
        self.origin + Duration::from_micros(micros)
    }

    pub fn measure_from(&self, micros: u64) {
        self.measure_from_us.store(micros, Ordering::Relaxed);
    }

    pub fn sending_stopped(&self) -> bool {
        self.stop_sending.load(Ordering::Relaxed)
    }

    pub fn record_connect(&self, micros: u64) {
        self.connect.lock().unwrap().record_micros(micros);
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_ack(&self, scheduled_us: u64) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        let latency = self.now_us().saturating_sub(scheduled_us);
        self.interval.lock().unwrap().ack.record_micros(latency);
        if scheduled_us >= self.measure_from_us.load(Ordering::Relaxed) {
            self.measured.lock().unwrap().ack.record_micros(latency);
        }
    }

    pub fn record_delivery(&self, scheduled_us: u64) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let latency = self.now_us().saturating_sub(scheduled_us);
        self.interval
            .lock()
            .unwrap()
            .delivery
            .record_micros(latency);
        if scheduled_us >= self.measure_from_us.load(Ordering::Relaxed) {
            self.measured
                .lock()
                .unwrap()
                .delivery
                .record_micros(latency);
        }
    }

    pub fn record_error(&self, code: impl Into<String>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .errors_by_code
            .lock()
            .unwrap()
            .entry(code.into())
            .or_default() += 1;
    }

    /// The interval's histograms, leaving fresh ones behind.
    pub fn take_interval(&self) -> Window {
        std::mem::take(&mut *self.interval.lock().unwrap())
    }

    pub fn measured(&self) -> Window {
        self.measured.lock().unwrap().clone()
    }

    pub fn connect_latency(&self) -> Latency {
        self.connect.lock().unwrap().clone()
    }

    pub fn errors_by_code(&self) -> BTreeMap<String, u64> {
        self.errors_by_code.lock().unwrap().clone()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
}

impl Counters {
    pub fn since(self, earlier: Counters) -> Counters {
        Counters {
            sent: self.sent - earlier.sent,
            acked: self.acked - earlier.acked,
            delivered: self.delivered - earlier.delivered,
            errors: self.errors - earlier.errors,
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// End of the interval, seconds since the run's origin.
    pub t_secs: f64,
    /// Counts within the interval (per second, the interval being one).
    pub counts: Counters,
    pub ack: Summary,
    pub delivery: Summary,
    /// Per platform process: (name, RSS bytes, CPU percent of one core).
    pub processes: Vec<ProcessSample>,
    /// The log and the projector's consumer at the end of the interval; `None` when they
    /// could not be read (no NATS address, no consumer yet).
    #[serde(default)]
    pub projection: Option<ProjectionSample>,
}

/// Where the log ended and where the projector's consumer had acknowledged up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectionSample {
    pub log_end: u64,
    pub acknowledged: u64,
}

impl ProjectionSample {
    /// Events in the log the projection has not acknowledged: how far the conversation
    /// store trails the log, within a batch.
    pub fn lag(&self) -> u64 {
        self.log_end.saturating_sub(self.acknowledged)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSample {
    pub name: String,
    pub rss_bytes: u64,
    /// Over the interval since the previous sample.
    pub cpu_percent: f32,
    /// CPU time the process has used since it started, milliseconds: differences of it give
    /// time-weighted means, whatever the spacing of the samples.
    #[serde(default)]
    pub cpu_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_sends_reach_the_timeline_but_not_the_measured_histograms() {
        let live = Live::new(Instant::now() - Duration::from_secs(10));
        live.measure_from(5_000_000);
        live.record_delivery(1_000_000);
        live.record_delivery(6_000_000);
        live.record_ack(6_000_000);
        let interval = live.take_interval();
        assert_eq!(interval.delivery.count(), 2);
        assert_eq!(live.measured().delivery.count(), 1);
        assert_eq!(live.measured().ack.count(), 1);
        // Taken: the next interval starts empty, the measured window keeps growing.
        assert_eq!(live.take_interval().delivery.count(), 0);
        assert_eq!(live.counters().delivered, 2);
    }

    #[test]
    fn errors_are_counted_by_code() {
        let live = Live::new(Instant::now());
        live.record_error("frame:timeout");
        live.record_error("frame:timeout");
        live.record_error("close:1008");
        let codes = live.errors_by_code();
        assert_eq!(codes["frame:timeout"], 2);
        assert_eq!(codes["close:1008"], 1);
        assert_eq!(live.counters().errors, 3);
    }
}
