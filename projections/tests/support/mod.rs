//! Events for the store tests: a small log of a direct conversation and a group.

use std::collections::HashMap;

use parley_events::{
    ClientMsgId, CommandId, ConversationCreated, ConversationId, ConversationKind,
    ConversationRead, Event, EventEnvelope, EventId, Member, MessagePosted, RecordedEvent, Role,
    UserId,
};

pub fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

pub fn direct() -> ConversationId {
    ConversationId::direct(&user("alice"), &user("bob"))
}

pub fn group() -> ConversationId {
    ConversationId::from_uuid(uuid::Uuid::from_u128(7))
}

fn envelope(
    conversation: ConversationId,
    actor: &str,
    n: u64,
    prev: u64,
    event: Event,
) -> EventEnvelope {
    let command =
        CommandId::from_client(&user(actor), &ClientMsgId::parse(format!("c{n}")).unwrap());
    EventEnvelope {
        id: EventId::derive(command, 0, 1_700_000_000_000 + n),
        conversation,
        prev,
        command,
        actor: user(actor),
        at: 1_700_000_000_000 + n,
        event,
    }
}

/// A log of a direct conversation and a group, with `messages` interleaved messages each.
pub fn log_with(messages: u32) -> Vec<RecordedEvent> {
    let created = |kind, title: Option<&str>, members: &[(&str, Role)]| {
        Event::ConversationCreated(ConversationCreated {
            kind,
            title: title.map(str::to_owned),
            members: members
                .iter()
                .map(|(u, role)| Member {
                    user: user(u),
                    role: *role,
                })
                .collect(),
        })
    };
    let posted = |n: u32, body: &str| {
        Event::MessagePosted(MessagePosted {
            client_id: ClientMsgId::parse(format!("m{n}")).unwrap(),
            body: body.into(),
            reply_to: None,
        })
    };
    let mut events = Vec::new();
    let mut last = HashMap::new();
    let mut push = |conversation: ConversationId, actor: &str, event: Event| {
        let seq = events.len() as u64 + 1;
        let prev = last.insert(conversation, seq).unwrap_or(0);
        events.push(envelope(conversation, actor, seq, prev, event).recorded(seq));
    };
    push(
        direct(),
        "alice",
        created(
            ConversationKind::Direct,
            None,
            &[("alice", Role::Member), ("bob", Role::Member)],
        ),
    );
    push(
        group(),
        "carol",
        created(
            ConversationKind::Group,
            Some("team"),
            &[("carol", Role::Owner), ("alice", Role::Member)],
        ),
    );
    for n in 0..messages {
        push(
            direct(),
            if n % 2 == 0 { "alice" } else { "bob" },
            posted(n, &format!("direct {n}")),
        );
        push(group(), "carol", posted(100_000 + n, &format!("group {n}")));
    }
    events
}

/// `events` followed by a `conversation.read` of `conversation` up to `marker` by `actor`.
#[allow(dead_code)] // Not every test binary that shares this module writes read markers.
pub fn then_read(
    events: &mut Vec<RecordedEvent>,
    conversation: ConversationId,
    actor: &str,
    marker: u64,
) {
    then(
        events,
        conversation,
        actor,
        Event::ConversationRead(ConversationRead { seq: marker }),
    );
}

/// `events` followed by `event` of `conversation` by `actor`; its sequence.
#[allow(dead_code)] // Not every test binary that shares this module appends other events.
pub fn then(
    events: &mut Vec<RecordedEvent>,
    conversation: ConversationId,
    actor: &str,
    event: Event,
) -> u64 {
    let seq = events.len() as u64 + 1;
    let prev = events
        .iter()
        .rev()
        .find(|e| e.envelope.conversation == conversation)
        .map_or(0, |e| e.seq);
    events.push(envelope(conversation, actor, seq, prev, event).recorded(seq));
    seq
}
