//! The correctness ledger: every acknowledged message is in the log exactly once and reached
//! every member connection exactly once, in the conversation's order; every send without an
//! acknowledgement is classified by the log; every delivery is explained by a send and by
//! the log.
//!
//! Each connection (a device) logs the events it received, in arrival order, split into
//! *sessions* (one per WebSocket it opened: a device whose socket dies reconnects, resumes
//! and starts a new one). Resume makes its sessions one stream: every event of its
//! conversations exactly once, live or by resume, with an unbroken `prev` chain across
//! reconnects. Each send is known by its [`SendKey`], which rides in the client id of the
//! `message.posted` event, so deliveries and log entries name the send they carry. The
//! check runs once, after the drain, connection by connection, so it holds one connection's
//! seen sets at a time.

use std::collections::{HashMap, HashSet};

use parley_events::{Event, event};
use serde::{Deserialize, Serialize};

use crate::client::RequestId;

/// Index of a conversation in the run's plan.
pub type ConvIndex = u32;

/// Which send a message is: the harness's send slot and the send's number within it. Unique
/// within a run (a slot belongs to one connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SendKey {
    pub slot: u32,
    pub n: u32,
}

/// What an event carries, as far as the ledger cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Created,
    /// An event that made users members after the creation (an addition the harness made).
    Joined,
    /// A message the harness sent.
    Message(SendKey),
    /// An event the harness did not cause: a message whose client id is not one of the
    /// harness's, a read marker, a membership change or a change to a message (the harness
    /// makes none).
    Foreign,
}

impl Content {
    pub fn of(event: &Event) -> Content {
        let client_id = match event {
            Event::MessagePosted(posted) => Some(posted.client_id.as_str()),
            _ => None,
        };
        Content::classify(event.type_name(), client_id)
    }

    /// By the event's type name and, for a message, its client id: what a receiver that
    /// parses no more of the event than that can tell.
    pub fn classify(type_name: &str, client_id: Option<&str>) -> Content {
        match type_name {
            event::CONVERSATION_CREATED => Content::Created,
            event::MEMBER_ADDED => Content::Joined,
            event::MESSAGE_POSTED => match client_id.and_then(RequestId::parse) {
                Some(RequestId::Send { key, .. }) => Content::Message(key),
                _ => Content::Foreign,
            },
            _ => Content::Foreign,
        }
    }
}

/// One event as a connection received it, or as the log holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// `None`: a conversation this run did not create.
    pub conversation: Option<ConvIndex>,
    pub seq: u64,
    /// The sequence of the conversation's previous event, as the event states it.
    pub prev: u64,
    pub content: Content,
    /// Delivered by a resume rather than live (always `false` for the log's own events).
    pub resumed: bool,
}

/// What became of a send, as its connection saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Acked {
        seq: u64,
    },
    /// An `error` frame, by code (`timeout`, `unavailable`, ...).
    Error(String),
    /// Nothing before the drain ended (or the socket it went out on died).
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRecord {
    pub key: SendKey,
    pub conversation: ConvIndex,
    pub answer: Answer,
}

/// One connection's deliveries.
#[derive(Debug, Clone, Default)]
pub struct ConnRecord {
    /// Per socket it opened, the events received on it in arrival order, by its resume and
    /// then live. More than one when the device reconnected after losing its socket.
    pub sessions: Vec<Vec<Observed>>,
    /// Gave up (never connected, or could not reconnect): left out of the delivery check.
    pub closed: bool,
}

/// The run's events, read back from the log after the run.
#[derive(Debug, Clone, Default)]
pub struct LogRead {
    /// Events of the run's conversations, in log order.
    pub events: Vec<Observed>,
    /// Commands still in the intake when the log was read: while there are any, a send not
    /// in the log may yet be appended, so it cannot be called never applied.
    pub intake_pending: u64,
}

/// A member connection of a conversation, from the event that made its user a member (its
/// creation, or an addition); 0 when that event is not known (the creation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub conn: usize,
    pub seq: u64,
}

/// What the run knows, gathered after the drain.
#[derive(Debug, Default)]
pub struct LedgerInput {
    /// Per conversation, the connections of its members, each with the sequence of the
    /// event that made its user a member: it receives that event and everything after.
    pub members: Vec<Vec<Joined>>,
    pub connections: Vec<ConnRecord>,
    /// Every send of the run.
    pub sends: Vec<SendRecord>,
    /// `None` when the log could not be read (an external platform without `--nats-url`).
    pub log: Option<LogRead>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerReport {
    pub acknowledged_messages: u64,
    /// Events each member connection should have received (acknowledged, or in the log),
    /// summed over connections.
    pub expected_deliveries: u64,
    /// An acknowledged message, or an event in the log, that a connection never received,
    /// live or by resume.
    pub lost: u64,
    pub duplicated: u64,
    /// A delivery of an older sequence after a newer one of the same conversation.
    pub out_of_order: u64,
    /// A delivery whose `prev` names an event this connection never got before it.
    pub gaps: u64,
    /// A delivery whose `prev` is older than the newest event this connection already had:
    /// two events claim the same predecessor.
    pub forks: u64,
    /// A delivery of an event of a conversation this run did not create.
    pub unknown_conversation: u64,
    /// A delivery no send, acknowledgement or log entry explains: a message the harness did
    /// not send, one acknowledged under another sequence (a second append), or one the log
    /// does not hold.
    pub unexplained: u64,
    /// Whether the log was read; the fields below are zero when it was not.
    pub log_checked: bool,
    /// Acknowledged sends the log does not hold at the acknowledged sequence.
    pub acked_not_in_log: u64,
    /// Sends the log holds more than once.
    pub appended_twice: u64,
    /// Log events whose `prev` is not the conversation's previous event in the log.
    pub log_chain_breaks: u64,
    /// Sends with no `ack` (an `error`, or nothing).
    pub unacknowledged: u64,
    /// ... of which the log holds: timed out (or cut off) but appended.
    pub unacknowledged_in_log: u64,
    /// ... of which the log does not hold, with the intake empty: never applied.
    pub unacknowledged_never_applied: u64,
    /// ... that could not be classified (no log, or commands still queued in the intake).
    pub unacknowledged_unclassified: u64,
    /// Connections left out of the delivery check because they gave up.
    pub excluded_connections: u64,
    /// Connections that lost their socket and reconnected (and resumed): checked like the
    /// others, across their sockets.
    pub reconnected_connections: u64,
    /// The first few problems, for finding them in logs.
    pub examples: Vec<String>,
}

const MAX_EXAMPLES: usize = 20;

impl LedgerReport {
    /// Nothing acknowledged went missing or twice, every delivery is in order and
    /// explained, and every send without an ack is accounted for.
    pub fn clean(&self) -> bool {
        [
            self.lost,
            self.duplicated,
            self.out_of_order,
            self.gaps,
            self.forks,
            self.unknown_conversation,
            self.unexplained,
            self.acked_not_in_log,
            self.appended_twice,
            self.log_chain_breaks,
            self.unacknowledged_unclassified,
        ]
        .iter()
        .all(|&n| n == 0)
    }

    fn note(&mut self, example: impl FnOnce() -> String) {
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example());
        }
    }
}

/// The log, indexed for the checks.
struct LogIndex {
    /// Per conversation, the sequences of its events.
    by_conversation: Vec<Vec<u64>>,
    /// Every event by sequence.
    by_seq: HashMap<u64, Observed>,
    /// Per send, the sequences it was appended at.
    by_key: HashMap<SendKey, Vec<u64>>,
}

impl LogIndex {
    fn build(log: &LogRead, conversations: usize, report: &mut LedgerReport) -> LogIndex {
        let mut index = LogIndex {
            by_conversation: vec![Vec::new(); conversations],
            by_seq: HashMap::new(),
            by_key: HashMap::new(),
        };
        for event in &log.events {
            let Some(conv) = event.conversation else {
                continue;
            };
            let chain = &mut index.by_conversation[conv as usize];
            let previous = chain.last().copied().unwrap_or(0);
            let first_is_creation = !chain.is_empty() || event.content == Content::Created;
            if event.prev != previous || !first_is_creation {
                report.log_chain_breaks += 1;
                report.note(|| {
                    format!(
                        "log: conversation {conv} seq {} has prev {}, but its previous event is {previous}",
                        event.seq, event.prev
                    )
                });
            }
            chain.push(event.seq);
            index.by_seq.insert(event.seq, *event);
            if let Content::Message(key) = event.content {
                index.by_key.entry(key).or_default().push(event.seq);
            }
        }
        index
    }
}

pub fn check(input: &LedgerInput) -> LedgerReport {
    let mut report = LedgerReport::default();
    let conversations = input.members.len();
    let log = input
        .log
        .as_ref()
        .map(|log| (log, LogIndex::build(log, conversations, &mut report)));
    report.log_checked = log.is_some();

    // What each send became, and what every acknowledgement promises.
    let mut acked_seqs: Vec<Vec<u64>> = vec![Vec::new(); conversations];
    let mut acked_by_key: HashMap<SendKey, u64> = HashMap::new();
    let mut sent: HashSet<SendKey> = HashSet::new();
    for send in &input.sends {
        sent.insert(send.key);
        let in_log = log
            .as_ref()
            .map(|(_, index)| index.by_key.get(&send.key).map_or(&[][..], Vec::as_slice));
        if let Some(seqs) = in_log
            && seqs.len() > 1
        {
            report.appended_twice += 1;
            report.note(|| format!("log: send {:?} appended at {seqs:?}", send.key));
        }
        match &send.answer {
            Answer::Acked { seq } => {
                report.acknowledged_messages += 1;
                acked_seqs[send.conversation as usize].push(*seq);
                acked_by_key.insert(send.key, *seq);
                if let Some(seqs) = in_log
                    && !seqs.contains(seq)
                {
                    report.acked_not_in_log += 1;
                    report.note(|| {
                        format!(
                            "log: send {:?} acknowledged as seq {seq}, the log has it at {seqs:?}",
                            send.key
                        )
                    });
                }
            }
            Answer::Error(_) | Answer::None => {
                report.unacknowledged += 1;
                match (in_log, &log) {
                    (Some(seqs), _) if !seqs.is_empty() => report.unacknowledged_in_log += 1,
                    (Some(_), Some((read, _))) if read.intake_pending == 0 => {
                        report.unacknowledged_never_applied += 1;
                    }
                    _ => report.unacknowledged_unclassified += 1,
                }
            }
        }
    }
    if report.unacknowledged_unclassified > 0 {
        let why = match &log {
            None => "the log was not read".to_owned(),
            Some((read, _)) => format!(
                "{} commands were still in the intake when the log was read",
                read.intake_pending
            ),
        };
        let n = report.unacknowledged_unclassified;
        report.note(|| format!("{n} unacknowledged sends not classified: {why}"));
    }
    // What each conversation's members must receive: every acknowledged message, and
    // whatever else the log holds.
    let expected: Vec<Vec<u64>> = acked_seqs
        .into_iter()
        .enumerate()
        .map(|(conv, mut seqs)| {
            if let Some((_, index)) = &log {
                seqs.extend(&index.by_conversation[conv]);
            }
            seqs.sort_unstable();
            seqs.dedup();
            seqs
        })
        .collect();

    let mut conversations_of: Vec<HashMap<ConvIndex, u64>> =
        vec![HashMap::new(); input.connections.len()];
    for (conv, members) in input.members.iter().enumerate() {
        for member in members {
            conversations_of[member.conn].insert(conv as ConvIndex, member.seq);
        }
    }

    for (conn, record) in input.connections.iter().enumerate() {
        if record.closed {
            report.excluded_connections += 1;
            continue;
        }
        if record.sessions.len() > 1 {
            report.reconnected_connections += 1;
        }
        // A device resumes where it stood on its last socket, so its sockets' deliveries
        // form one stream per conversation, from the creation on.
        let mut seen: HashMap<ConvIndex, (u64, HashSet<u64>)> = HashMap::new();
        for d in record.sessions.iter().flatten() {
            let Some(conv) = d.conversation else {
                report.unknown_conversation += 1;
                report.note(|| {
                    format!(
                        "connection {conn}: seq {} of a conversation this run did not create",
                        d.seq
                    )
                });
                continue;
            };
            check_explained(conn, conv, d, &sent, &acked_by_key, &log, &mut report);
            let path = if d.resumed { "by resume" } else { "live" };
            let (newest, set) = seen.entry(conv).or_insert((0, HashSet::new()));
            // A member added later starts at the event that added it, whatever its `prev`.
            let joined = conversations_of[conn].get(&conv).copied().unwrap_or(0);
            if set.is_empty() && d.seq == joined {
                *newest = d.prev;
            }
            let n = *newest;
            if !set.insert(d.seq) {
                report.duplicated += 1;
                report
                    .note(|| format!("connection {conn}: seq {} delivered again ({path})", d.seq));
                continue;
            }
            if d.seq < n {
                report.out_of_order += 1;
                report.note(|| format!("connection {conn}: seq {} after {n} ({path})", d.seq));
                continue;
            }
            if d.prev > n {
                report.gaps += 1;
                report.note(|| {
                    format!(
                        "connection {conn}: seq {} ({path}) has prev {} but the last one seen was {n}",
                        d.seq, d.prev
                    )
                });
            } else if d.prev < n {
                report.forks += 1;
                report.note(|| {
                    format!(
                        "connection {conn}: seq {} ({path}) has prev {}, older than {n} already seen (a fork)",
                        d.seq, d.prev
                    )
                });
            }
            *newest = d.seq;
        }
        // Everything of its conversations, whether its sockets stayed up or not: the run
        // brings every device back and resumes it before the check.
        for (&conv, &joined) in &conversations_of[conn] {
            let got = seen.get(&conv).map(|(_, set)| set);
            for seq in expected[conv as usize].iter().filter(|&&seq| seq >= joined) {
                report.expected_deliveries += 1;
                if !got.is_some_and(|set| set.contains(seq)) {
                    report.lost += 1;
                    report.note(|| format!("connection {conn}: seq {seq} never arrived"));
                }
            }
        }
    }
    report
}

/// A delivered event must be one the run explains: a send of this run, acknowledged (if at
/// all) at this sequence, and held by the log at this sequence.
fn check_explained(
    conn: usize,
    conv: ConvIndex,
    d: &Observed,
    sent: &HashSet<SendKey>,
    acked: &HashMap<SendKey, u64>,
    log: &Option<(&LogRead, LogIndex)>,
    report: &mut LedgerReport,
) {
    let why = match d.content {
        Content::Foreign => Some("a message the harness did not send".to_owned()),
        Content::Message(key) if !sent.contains(&key) => Some(format!("unknown send {key:?}")),
        Content::Message(key) => match acked.get(&key) {
            Some(&seq) if seq != d.seq => Some(format!("send {key:?} was acknowledged as {seq}")),
            _ => None,
        },
        Content::Created | Content::Joined => None,
    };
    let why = why.or_else(|| {
        let (_, index) = log.as_ref()?;
        match index.by_seq.get(&d.seq) {
            Some(e) if e.conversation == Some(conv) && e.content == d.content => None,
            _ => Some("the log does not hold it".to_owned()),
        }
    });
    if let Some(why) = why {
        report.unexplained += 1;
        report.note(|| format!("connection {conn}: seq {} unexplained: {why}", d.seq));
    }
}

/// Counts of a report's problems by name, for the table.
pub fn problems(report: &LedgerReport) -> Vec<(&'static str, u64)> {
    [
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("out of order", report.out_of_order),
        ("gaps", report.gaps),
        ("forks", report.forks),
        ("unknown conversation", report.unknown_conversation),
        ("unexplained", report.unexplained),
        ("acked not in log", report.acked_not_in_log),
        ("appended twice", report.appended_twice),
        ("log chain breaks", report.log_chain_breaks),
        ("unclassified", report.unacknowledged_unclassified),
    ]
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slot: u32, n: u32) -> SendKey {
        SendKey { slot, n }
    }

    fn created(conversation: ConvIndex, seq: u64) -> Observed {
        Observed {
            conversation: Some(conversation),
            seq,
            prev: 0,
            content: Content::Created,
            resumed: false,
        }
    }

    fn msg(conversation: ConvIndex, seq: u64, prev: u64, n: u32) -> Observed {
        Observed {
            conversation: Some(conversation),
            seq,
            prev,
            content: Content::Message(key(conversation, n)),
            resumed: false,
        }
    }

    fn acked(conversation: ConvIndex, n: u32, seq: u64) -> SendRecord {
        SendRecord {
            key: key(conversation, n),
            conversation,
            answer: Answer::Acked { seq },
        }
    }

    /// Conversation 0 (members 0 and 1): created at 1, then messages at 3, 7 and 9 (other
    /// conversations share the log in between).
    fn history() -> Vec<Observed> {
        vec![
            created(0, 1),
            msg(0, 3, 1, 0),
            msg(0, 7, 3, 1),
            msg(0, 9, 7, 2),
        ]
    }

    fn input(second: Vec<Observed>) -> LedgerInput {
        input_joined(history(), 0, second)
    }

    /// Conversation 0 with `log`'s events, all received by connection 0, a member from the
    /// creation; connection 1, a member from `second_joined`, received `second`.
    fn input_joined(log: Vec<Observed>, second_joined: u64, second: Vec<Observed>) -> LedgerInput {
        LedgerInput {
            members: vec![vec![
                Joined { conn: 0, seq: 0 },
                Joined {
                    conn: 1,
                    seq: second_joined,
                },
            ]],
            connections: vec![
                ConnRecord {
                    sessions: vec![log.clone()],
                    closed: false,
                },
                ConnRecord {
                    sessions: vec![second],
                    closed: false,
                },
            ],
            sends: vec![acked(0, 0, 3), acked(0, 1, 7), acked(0, 2, 9)],
            log: Some(LogRead {
                events: log,
                intake_pending: 0,
            }),
        }
    }

    #[test]
    fn a_complete_run_is_clean() {
        let report = check(&input(history()));
        assert!(report.clean(), "{report:?}");
        assert!(report.log_checked);
        assert_eq!(report.acknowledged_messages, 3);
        // The creation and three messages, to each of two connections.
        assert_eq!(report.expected_deliveries, 8);
    }

    #[test]
    fn lost_duplicated_and_reordered_deliveries_are_flagged() {
        // Seq 3 never arrives, 9 arrives before 7, and 9 arrives twice.
        let report = check(&input(vec![
            created(0, 1),
            msg(0, 9, 7, 2),
            msg(0, 7, 3, 1),
            msg(0, 9, 7, 2),
        ]));
        assert!(!report.clean());
        assert_eq!(report.lost, 1, "{report:?}");
        assert_eq!(report.duplicated, 1, "{report:?}");
        assert_eq!(report.out_of_order, 1, "{report:?}");
        // 9 names 7 as its predecessor, which had not arrived.
        assert_eq!(report.gaps, 1, "{report:?}");
        assert_eq!(report.forks, 0, "{report:?}");
        assert_eq!(report.examples.len(), 4);
    }

    #[test]
    fn a_fork_is_flagged() {
        // 7 and 8 both name 3 as their predecessor: two appends raced on one conversation.
        let mut run = input(vec![
            created(0, 1),
            msg(0, 3, 1, 0),
            msg(0, 7, 3, 1),
            msg(0, 8, 3, 3),
            msg(0, 9, 7, 2),
        ]);
        run.sends.push(acked(0, 3, 8));
        let report = check(&run);
        assert_eq!(report.forks, 2, "8 after 7, then 9 after 8: {report:?}");
        assert_eq!(report.gaps, 0, "{report:?}");
        assert!(!report.clean());
    }

    #[test]
    fn a_delivery_that_no_ack_explains_is_flagged() {
        // A server-side double append: send 1 acknowledged as 7 arrives again as 8. Each
        // sequence arrives once, so only the explanation catches it.
        let mut run = input(vec![
            created(0, 1),
            msg(0, 3, 1, 0),
            msg(0, 7, 3, 1),
            msg(0, 8, 7, 1),
            msg(0, 9, 8, 2),
        ]);
        run.log = None;
        let report = check(&run);
        assert_eq!(report.unexplained, 1, "{report:?}");
        assert_eq!(report.duplicated, 0, "{report:?}");
        assert!(!report.clean());
        // A message nobody in the run sent is unexplained too.
        let mut run = input(history());
        run.connections[1].sessions[0].push(Observed {
            content: Content::Foreign,
            ..msg(0, 11, 9, 0)
        });
        assert_eq!(check(&run).unexplained, 1);
    }

    #[test]
    fn events_of_unknown_conversations_are_flagged_not_dropped() {
        let mut second = history();
        second.insert(
            2,
            Observed {
                conversation: None,
                ..msg(5, 4, 0, 0)
            },
        );
        let report = check(&input(second));
        assert_eq!(report.unknown_conversation, 1, "{report:?}");
        assert!(!report.clean());
    }

    #[test]
    fn events_of_other_conversations_do_not_interfere() {
        let mut run = input(vec![
            created(0, 1),
            created(1, 2),
            msg(0, 3, 1, 0),
            msg(0, 7, 3, 1),
            msg(0, 9, 7, 2),
        ]);
        run.members.push(vec![Joined { conn: 1, seq: 0 }]);
        run.log.as_mut().unwrap().events.insert(1, created(1, 2));
        let report = check(&run);
        assert!(report.clean(), "{report:?}");
    }

    #[test]
    fn unacknowledged_sends_are_classified_by_the_log() {
        let mut run = input(history());
        // Send 2 timed out although it was appended; send 3 was never applied.
        run.sends[2].answer = Answer::Error("timeout".into());
        run.sends.push(SendRecord {
            key: key(0, 3),
            conversation: 0,
            answer: Answer::None,
        });
        let report = check(&run);
        assert_eq!(report.unacknowledged, 2);
        assert_eq!(report.unacknowledged_in_log, 1);
        assert_eq!(report.unacknowledged_never_applied, 1);
        // Neither is a loss: the client was never told the send succeeded.
        assert!(report.clean(), "{report:?}");

        // Commands still queued may yet be appended: not classified, the run fails.
        run.log.as_mut().unwrap().intake_pending = 4;
        let report = check(&run);
        assert_eq!(report.unacknowledged_unclassified, 1);
        assert!(!report.clean());
        // Without the log nothing can be classified.
        run.log = None;
        let report = check(&run);
        assert_eq!(report.unacknowledged_unclassified, 2);
        assert!(!report.log_checked);
    }

    #[test]
    fn the_log_must_hold_every_ack_once_in_an_unbroken_chain() {
        let mut run = input(history());
        // Send 2 is also appended at 11: a double append.
        run.log.as_mut().unwrap().events.push(msg(0, 11, 9, 2));
        let report = check(&run);
        assert_eq!(report.appended_twice, 1, "{report:?}");
        // Seq 11 is in the log and no connection got it.
        assert_eq!(report.lost, 2, "{report:?}");

        let mut run = input(history());
        // Seq 7 is not in the log, though acknowledged; 9's prev then points at a hole.
        run.log.as_mut().unwrap().events.remove(2);
        let report = check(&run);
        assert_eq!(report.acked_not_in_log, 1, "{report:?}");
        assert_eq!(report.log_chain_breaks, 1, "{report:?}");
        assert_eq!(report.unexplained, 2, "7 delivered to both: {report:?}");
        assert!(!report.clean());
    }

    #[test]
    fn a_connection_that_gave_up_is_left_out_not_counted_as_lost() {
        let mut run = input(vec![created(0, 1)]);
        run.connections[1].closed = true;
        let report = check(&run);
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.excluded_connections, 1);
        assert_eq!(report.expected_deliveries, 4);
    }

    fn resumed(o: Observed) -> Observed {
        Observed { resumed: true, ..o }
    }

    #[test]
    fn a_clean_reconnect_passes() {
        // Lost its socket after 3; the new socket's resume brought 7, then 9 came live.
        let mut run = input(vec![]);
        run.connections[1].sessions = vec![
            vec![created(0, 1), msg(0, 3, 1, 0)],
            vec![resumed(msg(0, 7, 3, 1)), msg(0, 9, 7, 2)],
        ];
        let report = check(&run);
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.reconnected_connections, 1);
        assert_eq!(report.expected_deliveries, 8);
        // A resume that needed `more` rounds, across two reconnects, is one stream too.
        run.connections[1].sessions = vec![
            vec![created(0, 1)],
            vec![resumed(msg(0, 3, 1, 0))],
            vec![resumed(msg(0, 7, 3, 1)), resumed(msg(0, 9, 7, 2))],
        ];
        assert!(check(&run).clean());
    }

    #[test]
    fn a_delivery_duplicated_across_live_and_resume_is_flagged() {
        // 7 arrived live just before the socket died; the resume sent it again.
        let mut run = input(vec![]);
        run.connections[1].sessions = vec![
            vec![created(0, 1), msg(0, 3, 1, 0), msg(0, 7, 3, 1)],
            vec![resumed(msg(0, 7, 3, 1)), msg(0, 9, 7, 2)],
        ];
        let report = check(&run);
        assert_eq!(report.duplicated, 1, "{report:?}");
        assert!(report.examples[0].contains("by resume"), "{report:?}");
        assert!(!report.clean());
    }

    #[test]
    fn a_delivery_the_resume_missed_is_lost_and_breaks_the_chain() {
        // The resume started after 7 although the device had only 3.
        let mut run = input(vec![]);
        run.connections[1].sessions = vec![
            vec![created(0, 1), msg(0, 3, 1, 0)],
            vec![resumed(msg(0, 9, 7, 2))],
        ];
        let report = check(&run);
        assert_eq!(report.lost, 1, "{report:?}");
        assert_eq!(report.gaps, 1, "{report:?}");
        assert!(!report.clean());
    }

    #[test]
    fn a_device_still_away_at_the_end_is_not_excused() {
        // Its last socket never opened (the run ended while it was reconnecting).
        let mut run = input(vec![]);
        run.connections[1].sessions = vec![vec![created(0, 1), msg(0, 3, 1, 0)], vec![]];
        let report = check(&run);
        assert_eq!(report.lost, 2, "7 and 9: {report:?}");
        assert!(!report.clean());
    }

    #[test]
    fn a_member_added_later_gets_everything_from_its_addition_on() {
        let joined = Observed {
            conversation: Some(0),
            seq: 5,
            prev: 3,
            content: Content::Joined,
            resumed: false,
        };
        let log = vec![
            created(0, 1),
            msg(0, 3, 1, 0),
            joined,
            msg(0, 7, 5, 1),
            msg(0, 9, 7, 2),
        ];
        let run = |second: Vec<Observed>| check(&input_joined(log.clone(), 5, second));
        let report = run(vec![joined, msg(0, 7, 5, 1), msg(0, 9, 7, 2)]);
        assert!(report.clean(), "{report:?}");
        // Five events to the first member, three to the one added at 5.
        assert_eq!(report.expected_deliveries, 8);

        let report = run(vec![joined, msg(0, 9, 7, 2)]);
        assert_eq!((report.lost, report.gaps), (1, 1), "{report:?}");
    }
}
