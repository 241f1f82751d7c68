//! NATS names: streams, subjects and the conversation-to-shard mapping.
//!
//! Stream subjects are bounded: the event log uses one subject per shard
//! (`parley.log.<shard>`), never one per conversation, so the stream's subject index stays the
//! same size with ten conversations or ten million. Per-conversation names appear only on
//! core NATS subjects for live delivery, which are never stored.

use crate::ids::{ConversationId, UserId};

/// Work-queue stream of commands from gateways to handlers, one subject per intake
/// partition (`parley.intake.<partition>`).
pub const INTAKE_STREAM: &str = "PARLEY_INTAKE";
pub const INTAKE_SUBJECT_PREFIX: &str = "parley.intake";
pub const INTAKE_SUBJECTS: &str = "parley.intake.*";
/// How many parts the intake is split into, each a contiguous range of log shards with a
/// durable consumer of its own. Handler instances share the partitions out between them,
/// so no more than this many instances have work; fixed, so that gateways and handlers of
/// any configuration agree on where a command goes.
pub const INTAKE_PARTITIONS: u32 = 16;
/// Priority group of the intake partitions' consumers: an instance pulls the partitions it
/// owns at the first priority and every other one at the next, as a standby.
pub const HANDLER_PRIORITY_GROUP: &str = "handlers";
/// Key-value bucket in which handler instances announce themselves, so that each can work
/// out which intake partitions it owns.
pub const HANDLERS_BUCKET: &str = "PARLEY_HANDLERS";

/// The event log.
pub const LOG_STREAM: &str = "PARLEY_LOG";
pub const LOG_SUBJECT_PREFIX: &str = "parley.log";
pub const LOG_SUBJECTS: &str = "parley.log.*";
/// Stream metadata key recording the shard count the log was created with.
pub const LOG_SHARDS_METADATA: &str = "parley.shards";
/// Durable consumer of the conversation projection.
pub const PROJECTOR_CONSUMER: &str = "projector-conversations";
/// The projector consumer's one priority group: the server pins the instance it delivers to,
/// and every other instance pulling it stands by.
pub const PROJECTOR_PRIORITY_GROUP: &str = "projectors";
/// Durable consumer of the push-notification projection.
pub const PUSH_CONSUMER: &str = "push-notifications";
/// Stream of push notifications the webhook kept refusing, kept for inspection and redrive.
pub const PUSH_DLQ_STREAM: &str = "PARLEY_PUSH_DLQ";
pub const PUSH_DLQ_SUBJECT: &str = "parley.push.dlq";

/// Object store bucket holding the handlers' latest write-model snapshot.
pub const HANDLER_SNAPSHOT_BUCKET: &str = "PARLEY_HANDLER_SNAPSHOTS";

/// Key-value bucket of token revocations, watched by every gateway; entries expire on
/// their own once no token they cover can still be valid.
pub const REVOCATIONS_BUCKET: &str = "PARLEY_REVOCATIONS";

/// Core subject carrying live membership events (conversation created, members added) to
/// every gateway.
pub const LIVE_MEMBERSHIP_SUBJECT: &str = "parley.live.membership";
/// Core subject on which gateways publish presence updates for the presence projector.
pub const PRESENCE_SUBJECT: &str = "parley.presence";
/// Queue group the presence projector instances share.
pub const PRESENCE_QUEUE: &str = "presence";
/// Request subject on which the presence projectors answer the status of some users.
pub const PRESENCE_QUERY_SUBJECT: &str = "parley.query.presence";
/// Request subject on which handlers answer what became of a command.
pub const OUTCOME_QUERY_SUBJECT: &str = "parley.query.outcome";
pub const HANDLER_QUEUE: &str = "handlers";
/// Subject nobody subscribes to. A request on it comes back "no responders" from the
/// server, a round trip showing that the server has read everything the connection sent
/// before it: a gateway's new subscriptions, before it tells a socket it is live in them.
pub const BARRIER_SUBJECT: &str = "parley.barrier";

/// The intake subject of one partition.
pub fn intake_subject(partition: u32) -> String {
    format!("{INTAKE_SUBJECT_PREFIX}.{partition}")
}

/// The durable consumer of one intake partition.
pub fn handler_consumer(partition: u32) -> String {
    format!("handlers-{partition}")
}

/// The log subject of one shard.
pub fn log_subject(shard: u32) -> String {
    format!("{LOG_SUBJECT_PREFIX}.{shard}")
}

/// Subject of the live copy of a conversation's events, published after each append.
pub fn live_subject(conversation: ConversationId) -> String {
    format!("parley.live.conv.{conversation}")
}

/// Subject on which the presence projector announces that `user` came online or went
/// offline. A user id may hold characters that mean something in a subject (`.`, `*`,
/// `>`); such an id is spelled as `~` and its bytes in hex, and `~` is never kept as it
/// is, so two users never share a subject.
pub fn presence_user_subject(user: &UserId) -> String {
    let id = user.as_str();
    if id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        format!("parley.presence.user.{id}")
    } else {
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("parley.presence.user.~{hex}")
    }
}

/// Prefix of every gateway's outcome subject.
pub const OUTCOME_SUBJECT_PREFIX: &str = "parley.outcome.";

/// Subject on which a gateway receives the outcomes of the commands it published.
pub fn outcome_subject(gateway: &str) -> String {
    format!("{OUTCOME_SUBJECT_PREFIX}{gateway}")
}

/// Header a gateway puts on the commands it publishes to say that it reads several outcomes
/// in one message (a JSON array); handlers send a gateway without it one outcome a message.
pub const OUTCOME_BATCHES_HEADER: &str = "Parley-Outcome-Batches";

/// 64-bit FNV-1a of `bytes`: the same on every build, platform and language, which is what
/// a mapping every process must agree on needs.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The number of shards the event log is split into. Fixed when the log stream is created;
/// appends are ordered (and checked for conflicts) per shard, which orders every
/// conversation in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shards(u32);

impl Shards {
    pub const MAX: u32 = 65_536;

    pub fn new(count: u32) -> Option<Self> {
        (1..=Self::MAX).contains(&count).then_some(Self(count))
    }

    pub fn count(self) -> u32 {
        self.0
    }

    /// The shard of a conversation: FNV-1a of its id's bytes, so the mapping is stable across
    /// builds, platforms and languages.
    pub fn of(self, conversation: ConversationId) -> u32 {
        (fnv1a(conversation.as_uuid().as_bytes().iter().copied()) % u64::from(self.0)) as u32
    }

    pub fn subject(self, conversation: ConversationId) -> String {
        log_subject(self.of(conversation))
    }

    /// The intake partition of a shard: partitions are contiguous ranges of shards, so the
    /// shards of one partition still spread over every lane of a handler (`shard % lanes`).
    pub fn intake_partition(self, shard: u32) -> u32 {
        (u64::from(shard) * u64::from(INTAKE_PARTITIONS) / u64::from(self.0)) as u32
    }

    /// The intake subject that commands to a conversation are published on.
    pub fn intake_subject(self, conversation: ConversationId) -> String {
        intake_subject(self.intake_partition(self.of(conversation)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXED_SHARD: u32 = 690;

    #[test]
    fn shard_mapping_is_stable_and_spread() {
        let shards = Shards::new(16).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..200 {
            let a = UserId::parse(format!("u{i}")).unwrap();
            let b = UserId::parse("hub").unwrap();
            let shard = shards.of(ConversationId::direct(&a, &b));
            assert!(shard < 16);
            seen.insert(shard);
        }
        assert_eq!(
            seen.len(),
            16,
            "200 conversations should touch every one of 16 shards"
        );
        // Part of the log format: this value must never change.
        let fixed = ConversationId::from_uuid(uuid::Uuid::from_u128(1));
        assert_eq!(Shards::new(1024).unwrap().of(fixed), FIXED_SHARD);
    }

    #[test]
    fn a_user_subject_is_one_plain_token() {
        let subject = |id: &str| presence_user_subject(&UserId::parse(id).unwrap());
        assert_eq!(subject("alice-1_b"), "parley.presence.user.alice-1_b");
        assert_eq!(subject("a.>"), "parley.presence.user.~612e3e");
        assert_eq!(subject("~612e3e"), "parley.presence.user.~7e363132653365");
    }

    #[test]
    fn intake_partitions_are_contiguous_ranges_of_shards() {
        for count in [1, 7, 16, 100, 1024, Shards::MAX] {
            let shards = Shards::new(count).unwrap();
            let partitions: Vec<u32> = (0..count).map(|s| shards.intake_partition(s)).collect();
            assert_eq!(partitions[0], 0, "{count} shards");
            assert!(
                partitions.windows(2).all(|w| w[0] <= w[1]),
                "{count} shards: a partition is one range"
            );
            let used: std::collections::BTreeSet<u32> = partitions.iter().copied().collect();
            assert_eq!(
                used.len() as u32,
                count.min(INTAKE_PARTITIONS),
                "{count} shards: as many partitions used as there can be"
            );
            assert!(used.iter().all(|p| *p < INTAKE_PARTITIONS));
        }
        let shards = Shards::new(1024).unwrap();
        assert_eq!(shards.intake_partition(63), 0);
        assert_eq!(shards.intake_partition(64), 1);
        assert_eq!(shards.intake_partition(1023), 15);
        let fixed = ConversationId::from_uuid(uuid::Uuid::from_u128(1));
        assert_eq!(shards.intake_subject(fixed), "parley.intake.10");
    }

    #[test]
    fn shard_count_is_bounded() {
        assert!(Shards::new(0).is_none());
        assert!(Shards::new(Shards::MAX + 1).is_none());
    }
}
