//! A log written before `message.posted` v2 (the fixture holds the bytes such a build
//! appended, with their sequences) still decodes, into the current types.

use parley_events::{Event, EventEnvelope, RecordedEvent};

const OLD_LOG: &str = include_str!("fixtures/log-before-message-changes.jsonl");

#[test]
fn a_log_written_before_message_changes_decodes_as_the_current_version() {
    let events: Vec<RecordedEvent> = OLD_LOG
        .lines()
        .map(|line| RecordedEvent::from_bytes(line.as_bytes()).unwrap())
        .collect();
    assert_eq!(events.len(), 4);
    let posted: Vec<(&str, Option<u64>)> = events
        .iter()
        .filter_map(|e| match &e.envelope.event {
            Event::MessagePosted(posted) => Some((posted.body.as_str(), posted.reply_to)),
            _ => None,
        })
        .collect();
    assert_eq!(
        posted,
        [("hello from before replies", None), ("and back", None)]
    );
    for (line, event) in OLD_LOG.lines().zip(&events) {
        let stored: serde_json::Value = serde_json::from_str(line).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&event.envelope.to_bytes()).unwrap();
        // Written again, only the version moves: the data is the same.
        assert_eq!(written["data"], stored["data"]);
        let expected_version = if stored["type"] == "message.posted" {
            2
        } else {
            1
        };
        assert_eq!(written["v"], expected_version);
        assert_eq!(
            EventEnvelope::from_bytes(&event.envelope.to_bytes()).unwrap(),
            event.envelope
        );
    }
}
