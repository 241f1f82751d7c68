//! The correctness ledger: every acknowledged message reached every member connection
//! exactly once, in the conversation's order.
//!
//! Each connection logs the events it received, in arrival order; each acknowledgement
//! names the message's conversation and sequence. The check runs once, after the drain,
//! connection by connection, so it holds one connection's seen set at a time.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Index of a conversation in the run's plan.
pub type ConvIndex = u32;

/// One `event` frame as a connection received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub conversation: ConvIndex,
    pub seq: u64,
    /// The sequence of the conversation's previous event, as the event states it.
    pub prev: u64,
}

/// What the run knows, gathered after the drain.
#[derive(Debug, Default)]
pub struct LedgerInput {
    /// Per conversation, the connections of its members.
    pub members: Vec<Vec<usize>>,
    /// Per connection, the events it received in arrival order.
    pub deliveries: Vec<Vec<Delivery>>,
    /// Connections that closed during the run: they cannot be expected to receive
    /// everything, and their closes are reported as errors instead.
    pub closed: Vec<bool>,
    /// Per conversation, the sequences of acknowledged messages (repeats allowed).
    pub acked: Vec<Vec<u64>>,
    /// Sends without an `ack` when the drain ended (errors included).
    pub unacknowledged: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerReport {
    pub acknowledged_messages: u64,
    /// Acknowledged messages times the member connections that should have received them.
    pub expected_deliveries: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// A delivery of an older sequence after a newer one of the same conversation.
    pub out_of_order: u64,
    /// A delivery whose `prev` names an event this connection never got before it.
    pub gaps: u64,
    pub unacknowledged: u64,
    /// Connections left out of the check because they closed during the run.
    pub excluded_connections: u64,
    /// The first few problems, for finding them in logs.
    pub examples: Vec<String>,
}

const MAX_EXAMPLES: usize = 20;

impl LedgerReport {
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.gaps == 0
            && self.unacknowledged == 0
    }

    fn note(&mut self, example: impl FnOnce() -> String) {
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example());
        }
    }
}

pub fn check(input: &LedgerInput) -> LedgerReport {
    let mut report = LedgerReport {
        unacknowledged: input.unacknowledged,
        ..LedgerReport::default()
    };
    let acked: Vec<Vec<u64>> = input
        .acked
        .iter()
        .map(|seqs| {
            let mut seqs = seqs.clone();
            seqs.sort_unstable();
            seqs.dedup();
            seqs
        })
        .collect();
    report.acknowledged_messages = acked.iter().map(|s| s.len() as u64).sum();

    let mut conversations_of: Vec<Vec<ConvIndex>> = vec![Vec::new(); input.deliveries.len()];
    for (conv, members) in input.members.iter().enumerate() {
        for &conn in members {
            conversations_of[conn].push(conv as ConvIndex);
        }
    }

    for (conn, deliveries) in input.deliveries.iter().enumerate() {
        if input.closed.get(conn).copied().unwrap_or(false) {
            report.excluded_connections += 1;
            continue;
        }
        let mut seen: HashMap<ConvIndex, (u64, HashSet<u64>)> = HashMap::new();
        for d in deliveries {
            let (newest, set) = seen.entry(d.conversation).or_default();
            if !set.insert(d.seq) {
                report.duplicated += 1;
                report.note(|| format!("connection {conn}: seq {} delivered again", d.seq));
                continue;
            }
            if d.seq < *newest {
                report.out_of_order += 1;
                report.note(|| format!("connection {conn}: seq {} after {newest}", d.seq));
            } else {
                if *newest > 0 && d.prev > *newest {
                    report.gaps += 1;
                    report.note(|| {
                        format!(
                            "connection {conn}: seq {} has prev {} but the last one seen was {newest}",
                            d.seq, d.prev
                        )
                    });
                }
                *newest = d.seq;
            }
        }
        for &conv in &conversations_of[conn] {
            let expected = &acked[conv as usize];
            report.expected_deliveries += expected.len() as u64;
            let got = seen.get(&conv).map(|(_, set)| set);
            for seq in expected {
                if !got.is_some_and(|set| set.contains(seq)) {
                    report.lost += 1;
                    report.note(|| {
                        format!("connection {conn}: acknowledged seq {seq} never arrived")
                    });
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(conversation: ConvIndex, seq: u64, prev: u64) -> Delivery {
        Delivery {
            conversation,
            seq,
            prev,
        }
    }

    /// Conversation 0 has members 0 and 1; its events are created (1), then messages at
    /// 3, 7 and 9 (other conversations share the log in between).
    fn input(second: Vec<Delivery>) -> LedgerInput {
        let full = vec![d(0, 1, 0), d(0, 3, 1), d(0, 7, 3), d(0, 9, 7)];
        LedgerInput {
            members: vec![vec![0, 1]],
            deliveries: vec![full, second],
            closed: vec![false, false],
            acked: vec![vec![3, 7, 9, 7]],
            unacknowledged: 0,
        }
    }

    #[test]
    fn a_complete_run_is_clean() {
        let report = check(&input(vec![d(0, 1, 0), d(0, 3, 1), d(0, 7, 3), d(0, 9, 7)]));
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.acknowledged_messages, 3);
        assert_eq!(report.expected_deliveries, 6);
    }

    #[test]
    fn lost_duplicated_and_reordered_deliveries_are_flagged() {
        // Seq 3 never arrives, 9 arrives before 7, and 9 arrives twice.
        let report = check(&input(vec![d(0, 1, 0), d(0, 9, 7), d(0, 7, 3), d(0, 9, 7)]));
        assert!(!report.clean());
        assert_eq!(report.lost, 1, "{report:?}");
        assert_eq!(report.duplicated, 1, "{report:?}");
        assert_eq!(report.out_of_order, 1, "{report:?}");
        // 9 names 7 as its predecessor, which had not arrived.
        assert_eq!(report.gaps, 1, "{report:?}");
        assert_eq!(report.examples.len(), 4);
    }

    #[test]
    fn unacknowledged_sends_fail_the_run() {
        let mut run = input(vec![d(0, 1, 0), d(0, 3, 1), d(0, 7, 3), d(0, 9, 7)]);
        run.unacknowledged = 2;
        let report = check(&run);
        assert_eq!(report.unacknowledged, 2);
        assert!(!report.clean());
    }

    #[test]
    fn a_connection_that_closed_is_left_out_not_counted_as_lost() {
        let mut run = input(vec![d(0, 1, 0)]);
        run.closed[1] = true;
        let report = check(&run);
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.excluded_connections, 1);
        assert_eq!(report.expected_deliveries, 3);
    }

    #[test]
    fn events_of_other_conversations_do_not_interfere() {
        let mut run = input(vec![
            d(0, 1, 0),
            d(1, 2, 0),
            d(0, 3, 1),
            d(0, 7, 3),
            d(0, 9, 7),
        ]);
        run.members.push(vec![1]);
        run.acked.push(vec![]);
        assert!(check(&run).clean());
    }
}
