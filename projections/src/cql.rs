//! The production conversation store: ScyllaDB (or any CQL server) through the `scylla`
//! driver. The data model and its reasons are in `docs/storage.md`.
//!
//! Every event-path write carries `USING TIMESTAMP <log sequence>`: a cell keeps the value
//! of the newest event that wrote it whatever order events arrive in, so duplicates,
//! reordering and replays converge without reading first, and without lightweight
//! transactions. The position is written after all of a batch's rows have been
//! acknowledged; a crash in between leaves the position behind the rows, and re-applying
//! from it rewrites the same cells with the same timestamps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use parley_events::{ConversationId, Event, EventId, Member, RecordedEvent, Role, UserId};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, PagerExecutionError, PrepareError,
    RequestAttemptError,
};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

pub use scylla::statement::Consistency;

use crate::columns::{
    Changes, carried_body, corrupt, event_at, events_page, history_message, i64_of, kind_str,
    members_page, parse_kind, parse_member, parse_role, reaction_counts, schema, system_json,
    u64_of, unavailable, with_body,
};
use crate::store::{
    ConversationDetails, ConversationStore, ConversationView, EventsPage, HistoryPage, InboxEntry,
    MembersPage, StoreError, StoreErrorKind, UNREAD_CAP,
};
use crate::tls::TlsClient;

/// Schema version this build writes, kept in the keyspace's `schema_version` table.
pub const SCHEMA_VERSION: i32 = 3;

/// Log sequences per history bucket. A `(conversation, bucket)` partition holds at most this
/// many messages (every sequence in its range would have to be one of the conversation's
/// messages), at most ~70 MB even if each is at the 4 KiB body limit: under the ~100 MB
/// where wide partitions start to hurt compaction and repair.
pub const DEFAULT_HISTORY_BUCKET_SEQS: u64 = 16_384;

/// Rows of one partition sent in one unlogged batch.
const BATCH_ROWS: usize = 64;
const POSITION_NAME: &str = "conversations";
/// The position's row, named after the schema that last needed the log replayed into it:
/// a keyspace upgraded from an older schema has no position under this name, so the
/// projector replays the log (schema 2 added the events table, schema 3 message changes and
/// events stored without their bodies). Deleting the old row instead would leave a tombstone
/// newer than every `USING TIMESTAMP <seq>` write that follows.
const POSITION_ROW: &str = "conversations.3";

/// Where and how to reach the CQL cluster.
#[derive(Clone)]
pub struct CqlOptions {
    /// `host:port` of some nodes; the driver discovers the rest.
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// The datacenter this process runs in: requests go to its replicas first, and
    /// `LOCAL_*` consistencies count there. `None`: no preference (single-DC clusters).
    pub local_datacenter: Option<String>,
    /// Replicas per datacenter, for `NetworkTopologyStrategy` when the keyspace is created.
    pub replication: BTreeMap<String, u32>,
    /// ScyllaDB only: whether the keyspace uses tablets; `None` leaves the cluster default.
    pub tablets: Option<bool>,
    pub consistency: Consistency,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `None`: plaintext connections.
    pub tls: Option<TlsClient>,
    pub request_timeout: Duration,
    /// Statements of one batch in flight at once.
    pub max_in_flight: usize,
    /// See [`DEFAULT_HISTORY_BUCKET_SEQS`]; fixed when the keyspace is first set up.
    pub history_bucket_seqs: u64,
}

/// Leaves the password out, so options can be logged.
impl std::fmt::Debug for CqlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlOptions")
            .field("contact_points", &self.contact_points)
            .field("keyspace", &self.keyspace)
            .field("local_datacenter", &self.local_datacenter)
            .field("consistency", &self.consistency)
            .field("username", &self.username)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl CqlOptions {
    /// Options for `keyspace` on `contact_points`, everything else at its default.
    pub fn new(contact_points: Vec<String>, keyspace: impl Into<String>) -> Self {
        CqlOptions {
            contact_points,
            keyspace: keyspace.into(),
            local_datacenter: None,
            replication: BTreeMap::from([("datacenter1".to_owned(), 1)]),
            tablets: None,
            consistency: Consistency::LocalQuorum,
            username: None,
            password: None,
            tls: None,
            request_timeout: Duration::from_secs(5),
            max_in_flight: 128,
            history_bucket_seqs: DEFAULT_HISTORY_BUCKET_SEQS,
        }
    }
}

/// Which CQL server answers: the DDL that differs between them is decided here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Scylla,
    Cassandra,
}

impl Dialect {
    /// `AND ...` options of `CREATE KEYSPACE` beyond replication.
    fn keyspace_options(self, tablets: Option<bool>) -> Result<String, StoreError> {
        match (self, tablets) {
            (_, None) => Ok(String::new()),
            (Dialect::Scylla, Some(enabled)) => {
                Ok(format!(" AND tablets = {{'enabled': {enabled}}}"))
            }
            (Dialect::Cassandra, Some(_)) => Err(schema(
                "projector.store.tablets is a ScyllaDB option; this cluster is Apache Cassandra",
            )),
        }
    }
}

/// Server answers that retrying cannot fix are schema problems (a table or column missing,
/// no permission); everything else (timeouts, unavailable replicas, broken connections)
/// may pass.
fn from_attempt(error: &RequestAttemptError) -> StoreErrorKind {
    match error {
        RequestAttemptError::DbError(
            DbError::Invalid | DbError::SyntaxError | DbError::Unauthorized | DbError::ConfigError,
            _,
        ) => StoreErrorKind::Schema,
        _ => StoreErrorKind::Unavailable,
    }
}

impl From<ExecutionError> for StoreError {
    fn from(e: ExecutionError) -> Self {
        let kind = match &e {
            ExecutionError::LastAttemptError(attempt) => from_attempt(attempt),
            ExecutionError::PrepareError(PrepareError::AllAttemptsFailed { first_attempt }) => {
                from_attempt(first_attempt)
            }
            _ => StoreErrorKind::Unavailable,
        };
        StoreError::new(kind, e.to_string())
    }
}

impl From<PrepareError> for StoreError {
    fn from(e: PrepareError) -> Self {
        let kind = match &e {
            PrepareError::AllAttemptsFailed { first_attempt } => from_attempt(first_attempt),
            _ => StoreErrorKind::Unavailable,
        };
        StoreError::new(kind, format!("preparing a statement: {e}"))
    }
}

impl From<PagerExecutionError> for StoreError {
    fn from(e: PagerExecutionError) -> Self {
        let kind = match &e {
            PagerExecutionError::PrepareError(p) => StoreError::from(p.clone()).kind,
            _ => StoreErrorKind::Unavailable,
        };
        StoreError::new(kind, e.to_string())
    }
}

impl From<NewSessionError> for StoreError {
    fn from(e: NewSessionError) -> Self {
        unavailable(format!("cannot connect to the CQL cluster: {e}"))
    }
}

/// Every statement, prepared once when the store opens.
struct Statements {
    activity: PreparedStatement,
    created: PreparedStatement,
    member: PreparedStatement,
    membership: PreparedStatement,
    message: PreparedStatement,
    edit_message: PreparedStatement,
    delete_message: PreparedStatement,
    mark_reacted: PreparedStatement,
    body: PreparedStatement,
    delete_bodies: PreparedStatement,
    bodies: PreparedStatement,
    react: PreparedStatement,
    unreact: PreparedStatement,
    clear_reactions: PreparedStatement,
    reactions: PreparedStatement,
    bucket: PreparedStatement,
    event: PreparedStatement,
    event_bucket: PreparedStatement,
    set_read: PreparedStatement,
    read_marker: PreparedStatement,
    senders_after: PreparedStatement,
    set_position: PreparedStatement,
    position: PreparedStatement,
    conversation: PreparedStatement,
    members: PreparedStatement,
    members_after: PreparedStatement,
    member_count: PreparedStatement,
    details: PreparedStatement,
    event_at: PreparedStatement,
    role_of: PreparedStatement,
    memberships: PreparedStatement,
    unmember: PreparedStatement,
    unmembership: PreparedStatement,
    rename: PreparedStatement,
    buckets: PreparedStatement,
    history: PreparedStatement,
    buckets_after: PreparedStatement,
    history_after: PreparedStatement,
    event_buckets: PreparedStatement,
    events: PreparedStatement,
    check: PreparedStatement,
    conversations_first: PreparedStatement,
    conversations_after: PreparedStatement,
}

pub struct CqlStore {
    session: Arc<Session>,
    statements: Statements,
    bucket_seqs: u64,
    max_in_flight: usize,
}

/// The keyspace name goes into DDL text, so only plain identifiers are accepted.
fn check_keyspace_name(name: &str) -> Result<(), StoreError> {
    let valid = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(schema(format!(
            "keyspace name {name:?} must be 1-48 letters, digits or underscores, starting with a letter"
        )))
    }
}

/// The tables of schema version 1, in creation order (`messages` with the column schema 3
/// added, see [`schema_v3`]).
fn schema_v1(ks: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.schema_version (name text PRIMARY KEY, version int, history_bucket_seqs bigint)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.conversations (id uuid PRIMARY KEY, kind text, title text, created_seq bigint, last_seq bigint, last_activity_at bigint)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.members (conversation uuid, user_id text, role text, PRIMARY KEY (conversation, user_id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.conversations_by_user (user_id text, conversation uuid, role text, PRIMARY KEY (user_id, conversation))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.messages (conversation uuid, bucket bigint, seq bigint, id uuid, sender text, client_id text, body text, at bigint, system text, reply_to bigint, edited boolean, deleted boolean, reacted boolean, PRIMARY KEY ((conversation, bucket), seq)) WITH CLUSTERING ORDER BY (seq DESC)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.message_buckets (conversation uuid, bucket bigint, PRIMARY KEY (conversation, bucket)) WITH CLUSTERING ORDER BY (bucket DESC)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.projection_position (name text PRIMARY KEY, seq bigint)"
        ),
    ]
}

/// Schema version 2: every event as recorded, for resuming clients, bucketed like history;
/// read markers.
fn schema_v2(ks: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.events (conversation uuid, bucket bigint, seq bigint, envelope blob, PRIMARY KEY ((conversation, bucket), seq))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.event_buckets (conversation uuid, bucket bigint, PRIMARY KEY (conversation, bucket))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.read_markers (conversation uuid, user_id text, seq bigint, PRIMARY KEY (conversation, user_id))"
        ),
    ]
}

/// Schema version 3: membership changes and message changes.
///
/// History rows of membership changes carry their system entry (JSON). A message row
/// gains what it replies to and whether it was edited, deleted or reacted to (an edit or
/// deletion writes the row's body, at its own sequence, so the newest wins). Bodies also
/// go into `bodies`, one partition per message holding the post's and every edit's, which
/// a deletion removes with one partition tombstone at its sequence: that also covers
/// bodies that arrive after it. Stored events carry no body any more (it is read from
/// `bodies`), so the events stored before, bodies included, are truncated and replayed.
/// Reactions are one partition per message, bounded by its conversation's members times
/// the emoji one user may hold.
///
/// A new keyspace has the new `messages` columns from its `CREATE TABLE` already (above):
/// processes setting up a keyspace at once may each create a table, the last definition
/// winning, so a column must not depend on an `ALTER` one of them made in between. The
/// `ALTER`s add them to a keyspace of an earlier version.
fn schema_v3(ks: &str) -> Vec<String> {
    let add =
        |column: &str, cql_type: &str| format!("ALTER TABLE {ks}.messages ADD {column} {cql_type}");
    vec![
        add("system", "text"),
        add("reply_to", "bigint"),
        add("edited", "boolean"),
        add("deleted", "boolean"),
        add("reacted", "boolean"),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.bodies (conversation uuid, message bigint, seq bigint, body text, PRIMARY KEY ((conversation, message), seq))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.reactions (conversation uuid, message bigint, emoji text, user_id text, PRIMARY KEY ((conversation, message), emoji, user_id))"
        ),
        format!("TRUNCATE {ks}.events"),
    ]
}

/// Migrations by version: entry `n` brings a keyspace from version `n` to `n + 1`.
fn migrations(ks: &str) -> Vec<Vec<String>> {
    vec![schema_v1(ks), schema_v2(ks), schema_v3(ks)]
}

type ConversationRow = (Option<String>, Option<String>, Option<i64>, Option<i64>);
/// A history row. Every cell but the sequence may be missing: an edit, deletion or reaction
/// applied before its message writes a row of its cells alone, which reads skip.
type MessageRow = (
    i64,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<bool>,
    Option<bool>,
    Option<bool>,
);

/// Reading rows of one conversation across its buckets: the bucket index query
/// (conversation, first bucket) returns buckets in the order to read them, the row query
/// (conversation, bucket, sequence bound, limit) a bucket's rows beyond the bound, in the
/// same order.
struct BucketWalk<'a> {
    index: &'a PreparedStatement,
    rows: &'a PreparedStatement,
}

impl CqlStore {
    /// Connect, create the keyspace if it does not exist, bring its schema up to date and
    /// prepare every statement. Refuses, before writing anything, a keyspace that holds
    /// tables that are not Parley's, a schema newer than this build, or a different
    /// history bucket size.
    pub async fn open(options: &CqlOptions) -> Result<Self, StoreError> {
        let ks = options.keyspace.as_str();
        check_keyspace_name(ks)?;
        if options.contact_points.is_empty() {
            return Err(unavailable("no contact points configured"));
        }
        if options.history_bucket_seqs == 0 || options.max_in_flight == 0 {
            return Err(schema(
                "history_bucket_seqs and max_in_flight must be at least 1",
            ));
        }
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &options.local_datacenter {
            policy = policy
                .prefer_datacenter(dc.clone())
                .permit_dc_failover(false);
        }
        let profile = ExecutionProfile::builder()
            .consistency(options.consistency)
            .load_balancing_policy(policy.build())
            // Retries only statements marked idempotent, which all of Parley's are.
            .retry_policy(Arc::new(DefaultRetryPolicy::new()))
            .request_timeout(Some(options.request_timeout))
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&options.contact_points)
            .connection_timeout(options.request_timeout)
            .default_execution_profile_handle(profile.into_handle());
        if let Some(user) = &options.username {
            builder = builder.user(user, options.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &options.tls {
            builder = builder.tls_context(Some(Arc::new(tls.client_config()?)));
        }
        let session = builder.build().await?;
        let dialect = detect_dialect(&session).await?;
        migrate(&session, options, dialect).await?;
        let statements = prepare_all(&session, ks).await?;
        Ok(CqlStore {
            session: Arc::new(session),
            statements,
            bucket_seqs: options.history_bucket_seqs,
            max_in_flight: options.max_in_flight,
        })
    }

    fn bucket_of(&self, seq: u64) -> i64 {
        i64_of(seq / self.bucket_seqs)
    }

    /// Up to `wanted` rows of conversation `id` beyond sequence `bound`, from bucket `first`
    /// on, reading each bucket the index lists until enough are in hand. Both reads page
    /// through the driver, so short pages (ScyllaDB may return them) change nothing.
    async fn walk<R>(
        &self,
        walk: BucketWalk<'_>,
        id: Uuid,
        first: i64,
        bound: i64,
        wanted: usize,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let mut rows = Vec::with_capacity(wanted);
        let mut buckets = self
            .session
            .execute_iter(walk.index.clone(), (id, first))
            .await?
            .rows_stream::<(i64,)>()
            .map_err(corrupt)?;
        while rows.len() < wanted {
            let Some(bucket) = buckets.next().await else {
                break;
            };
            let (bucket,) = bucket.map_err(unavailable)?;
            let left = i32::try_from(wanted - rows.len()).unwrap_or(i32::MAX);
            let mut page = self
                .session
                .execute_iter(walk.rows.clone(), (id, bucket, bound, left))
                .await?
                .rows_stream::<R>()
                .map_err(corrupt)?;
            while let Some(row) = page.next().await {
                rows.push(row.map_err(unavailable)?);
            }
        }
        Ok(rows)
    }

    fn write(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow + Send + 'static,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let (session, statement) = (Arc::clone(&self.session), statement.clone());
        async move {
            session.execute_unpaged(&statement, values).await?;
            Ok(())
        }
        .boxed()
    }

    /// Rows of one partition as unlogged batches of at most [`BATCH_ROWS`]: one round trip
    /// and one mutation per batch, with no batch log because nothing spans partitions.
    fn partition_batches<V: SerializeRow + Send + Sync + 'static>(
        &self,
        statement: &PreparedStatement,
        rows: Vec<V>,
    ) -> Vec<BoxFuture<'static, Result<(), StoreError>>> {
        let mut writes = Vec::new();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<V> = rows.by_ref().take(BATCH_ROWS).collect();
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in &chunk {
                batch.append_statement(statement.clone());
            }
            batch.set_is_idempotent(true);
            let session = Arc::clone(&self.session);
            writes.push(
                async move {
                    session.batch(&batch, chunk).await?;
                    Ok(())
                }
                .boxed(),
            );
        }
        writes
    }

    /// Every row write a batch of events needs; the position is not among them.
    fn row_writes(
        &self,
        events: &[RecordedEvent],
    ) -> Vec<BoxFuture<'static, Result<(), StoreError>>> {
        let s = &self.statements;
        let mut writes = Vec::new();
        // A conversation's activity cells only keep the newest event's values, so only
        // the newest event of each conversation in the batch needs to write them.
        let mut newest: HashMap<ConversationId, &RecordedEvent> = HashMap::new();
        let mut messages: HashMap<(ConversationId, i64), Vec<_>> = HashMap::new();
        let mut recorded_events: HashMap<(ConversationId, i64), Vec<_>> = HashMap::new();
        for recorded in events {
            let envelope = &recorded.envelope;
            let conversation = envelope.conversation;
            let id = *conversation.as_uuid();
            let seq = i64_of(recorded.seq);
            let bucket = self.bucket_of(recorded.seq);
            // A body is stored in `bodies` only, where a deletion can reach it.
            let stored = match carried_body(&envelope.event, recorded.seq) {
                Some((message, body)) => {
                    writes.push(
                        self.write(&s.body, (id, i64_of(message), seq, body.to_owned(), seq)),
                    );
                    with_body(envelope, "")
                }
                None => envelope.clone(),
            };
            recorded_events
                .entry((conversation, bucket))
                .or_default()
                .push((id, bucket, seq, stored.to_bytes(), seq));
            newest
                .entry(conversation)
                .and_modify(|e| {
                    if recorded.seq > e.seq {
                        *e = recorded;
                    }
                })
                .or_insert(recorded);
            match &envelope.event {
                Event::ConversationCreated(created) => {
                    writes.push(self.write(
                        &s.created,
                        (seq, kind_str(created.kind), created.title.clone(), seq, id),
                    ));
                    writes.extend(self.member_writes(id, &created.members, seq));
                }
                Event::ConversationRead(read) => {
                    let marker = i64_of(read.seq);
                    writes.push(self.write(
                        &s.set_read,
                        (id, envelope.actor.as_str().to_owned(), marker, marker),
                    ));
                }
                Event::MessagePosted(posted) => {
                    messages.entry((conversation, bucket)).or_default().push((
                        id,
                        bucket,
                        seq,
                        *envelope.id.as_uuid(),
                        envelope.actor.as_str().to_owned(),
                        posted.client_id.as_str().to_owned(),
                        posted.body.clone(),
                        i64_of(envelope.at),
                        None,
                        posted.reply_to.map(i64_of),
                        seq,
                    ));
                }
                Event::MembersAdded(added) => {
                    writes.extend(self.member_writes(id, &added.members, seq));
                }
                Event::MembersRemoved(removed) => {
                    let gone: Vec<_> = removed
                        .users
                        .iter()
                        .map(|user| (seq, id, user.as_str().to_owned()))
                        .collect();
                    writes.extend(self.partition_batches(&s.unmember, gone));
                    for user in &removed.users {
                        writes
                            .push(self.write(&s.unmembership, (seq, user.as_str().to_owned(), id)));
                    }
                }
                Event::MemberLeft(_) => {
                    let actor = envelope.actor.as_str().to_owned();
                    writes.push(self.write(&s.unmember, (seq, id, actor.clone())));
                    writes.push(self.write(&s.unmembership, (seq, actor, id)));
                }
                Event::MemberRoleChanged(changed) => {
                    let member = Member {
                        user: changed.user.clone(),
                        role: changed.role,
                    };
                    writes.extend(self.member_writes(id, &[member], seq));
                }
                Event::ConversationRenamed(renamed) => {
                    writes.push(self.write(&s.rename, (seq, renamed.title.clone(), id)));
                }
                // Mutes concern the write model only.
                Event::MemberMuted(_) | Event::MemberUnmuted(_) => {}
                Event::MessageEdited(edited) => {
                    let (message, at) = (i64_of(edited.message), self.bucket_of(edited.message));
                    writes.push(
                        self.write(&s.edit_message, (seq, edited.body.clone(), id, at, message)),
                    );
                }
                Event::MessageDeleted(deleted) => {
                    let (message, at) = (i64_of(deleted.message), self.bucket_of(deleted.message));
                    // Every body and reaction of the message comes from an event before its
                    // deletion (the handler refuses them after), so tombstones at the
                    // deletion's sequence cover them all, even those applied after it.
                    writes.push(self.write(&s.delete_message, (seq, id, at, message)));
                    writes.push(self.write(&s.delete_bodies, (seq, id, message)));
                    writes.push(self.write(&s.clear_reactions, (seq, id, message)));
                }
                Event::ReactionAdded(reaction) => {
                    let message = i64_of(reaction.message);
                    let at = self.bucket_of(reaction.message);
                    writes.push(self.write(
                        &s.react,
                        (
                            id,
                            message,
                            reaction.emoji.clone(),
                            envelope.actor.as_str().to_owned(),
                            seq,
                        ),
                    ));
                    writes.push(self.write(&s.mark_reacted, (seq, id, at, message)));
                }
                Event::ReactionRemoved(reaction) => {
                    // Timestamped like the add: whichever of the two is newer wins, in any
                    // order of arrival.
                    writes.push(self.write(
                        &s.unreact,
                        (
                            seq,
                            id,
                            i64_of(reaction.message),
                            reaction.emoji.clone(),
                            envelope.actor.as_str().to_owned(),
                        ),
                    ));
                }
            }
            if let Some(system) = system_json(recorded) {
                messages.entry((conversation, bucket)).or_default().push((
                    id,
                    bucket,
                    seq,
                    *envelope.id.as_uuid(),
                    envelope.actor.as_str().to_owned(),
                    String::new(),
                    String::new(),
                    i64_of(envelope.at),
                    Some(system),
                    None,
                    seq,
                ));
            }
        }
        for recorded in newest.values() {
            let seq = i64_of(recorded.seq);
            writes.push(self.write(
                &s.activity,
                (
                    seq,
                    seq,
                    i64_of(recorded.envelope.at),
                    *recorded.envelope.conversation.as_uuid(),
                ),
            ));
        }
        for ((conversation, bucket), rows) in messages {
            // The bucket index row is timestamped by the bucket's newest message of this
            // batch; any timestamp works, it has no cells to compare.
            let newest = rows.iter().map(|r| r.2).max().unwrap_or(0);
            writes.push(self.write(&s.bucket, (*conversation.as_uuid(), bucket, newest)));
            writes.extend(self.partition_batches(&s.message, rows));
        }
        for ((conversation, bucket), rows) in recorded_events {
            let newest = rows.iter().map(|r| r.2).max().unwrap_or(0);
            writes.push(self.write(&s.event_bucket, (*conversation.as_uuid(), bucket, newest)));
            writes.extend(self.partition_batches(&s.event, rows));
        }
        writes
    }

    /// The rows of `members` as of event `seq`: the conversation's members partition in
    /// batches, and each user's own partition of their conversations.
    fn member_writes(
        &self,
        id: Uuid,
        members: &[Member],
        seq: i64,
    ) -> Vec<BoxFuture<'static, Result<(), StoreError>>> {
        let s = &self.statements;
        let rows: Vec<_> = members
            .iter()
            .map(|m| (id, m.user.as_str().to_owned(), m.role.as_str(), seq))
            .collect();
        let mut writes = self.partition_batches(&s.member, rows);
        for member in members {
            writes.push(self.write(
                &s.membership,
                (
                    member.user.as_str().to_owned(),
                    id,
                    member.role.as_str(),
                    seq,
                ),
            ));
        }
        writes
    }

    /// A page of history from rows read one beyond `limit`, to know whether more follow,
    /// with the reactions of the messages that have any (one partition read each).
    async fn history_page(
        &self,
        id: ConversationId,
        rows: Vec<MessageRow>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let has_more = rows.len() > limit as usize;
        let read = history_messages(rows.into_iter().take(limit as usize).collect())?;
        let messages = futures::stream::iter(read)
            .map(|(mut message, reacted)| async move {
                if reacted {
                    let pairs: Vec<(String, String)> = self
                        .all_rows(
                            &self.statements.reactions,
                            (*id.as_uuid(), i64_of(message.seq)),
                        )
                        .await?;
                    message.reactions = reaction_counts(pairs)?;
                }
                Ok::<_, StoreError>(message)
            })
            .buffered(self.max_in_flight)
            .try_collect()
            .await?;
        Ok(HistoryPage { messages, has_more })
    }

    /// Put back the bodies stored events carry, from `bodies`: a deleted message's are gone
    /// from there, so its events keep the empty body they were stored with.
    async fn fill_bodies(
        &self,
        id: ConversationId,
        events: &mut [RecordedEvent],
    ) -> Result<(), StoreError> {
        let mut messages: Vec<u64> = events
            .iter()
            .filter_map(|e| carried_body(&e.envelope.event, e.seq).map(|(message, _)| message))
            .collect();
        messages.sort_unstable();
        messages.dedup();
        let bodies: HashMap<i64, String> = futures::stream::iter(messages)
            .map(|message| async move {
                self.all_rows::<(i64, String)>(
                    &self.statements.bodies,
                    (*id.as_uuid(), i64_of(message)),
                )
                .await
            })
            .buffer_unordered(self.max_in_flight)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .flatten()
            .collect();
        for event in events {
            if let Some(body) = bodies.get(&i64_of(event.seq)) {
                event.envelope = with_body(&event.envelope, body);
            }
        }
        Ok(())
    }

    /// Every row `statement` returns for `values`, read page by page.
    async fn all_rows<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        self.session
            .execute_iter(statement.clone(), values)
            .await?
            .rows_stream::<R>()
            .map_err(corrupt)?
            .map_err(unavailable)
            .try_collect()
            .await
    }

    async fn memberships(&self, user: &UserId) -> Result<Vec<(Uuid, String)>, StoreError> {
        self.all_rows(&self.statements.memberships, (user.as_str(),))
            .await
    }

    async fn conversation_row(&self, id: Uuid) -> Result<Option<ConversationRow>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.conversation, (id,))
            .await?
            .into_rows_result()
            .map_err(corrupt)?;
        result.maybe_first_row::<ConversationRow>().map_err(corrupt)
    }
}

/// The messages of history rows, with whether each may have reactions; rows of a message
/// whose post is not applied yet are left out.
fn history_messages(
    rows: Vec<MessageRow>,
) -> Result<Vec<(parley_events::protocol::HistoryMessage, bool)>, StoreError> {
    rows.into_iter()
        .filter_map(|row| {
            let (
                seq,
                Some(id),
                Some(sender),
                Some(client_id),
                body,
                Some(at),
                system,
                reply_to,
                edited,
                deleted,
                reacted,
            ) = row
            else {
                return None;
            };
            let changes = Changes {
                edited: edited.unwrap_or(false),
                deleted: deleted.unwrap_or(false),
                reply_to,
            };
            let message = history_message(
                (
                    seq,
                    EventId::from_uuid(id),
                    sender,
                    client_id,
                    body.unwrap_or_default(),
                    at,
                    system,
                ),
                changes,
            );
            Some(message.map(|m| (m, reacted.unwrap_or(false) && !changes.deleted)))
        })
        .collect()
}

async fn detect_dialect(session: &Session) -> Result<Dialect, StoreError> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = 'system' AND table_name = 'scylla_local'",
            (),
        )
        .await?
        .into_rows_result()
        .map_err(corrupt)?;
    Ok(if rows.rows_num() > 0 {
        Dialect::Scylla
    } else {
        Dialect::Cassandra
    })
}

/// Check the keyspace before changing anything, then create what is missing.
async fn migrate(
    session: &Session,
    options: &CqlOptions,
    dialect: Dialect,
) -> Result<(), StoreError> {
    let ks = options.keyspace.as_str();
    let keyspace_exists = session
        .query_unpaged(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (ks,),
        )
        .await?
        .into_rows_result()
        .map_err(corrupt)?
        .rows_num()
        > 0;
    let tables: Vec<String> = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (ks,),
        )
        .await?
        .into_rows_result()
        .map_err(corrupt)?
        .rows::<(String,)>()
        .map_err(corrupt)?
        .map(|row| row.map(|(name,)| name).map_err(corrupt))
        .collect::<Result<_, _>>()?;
    let mut version = 0;
    if tables.iter().any(|t| t == "schema_version") {
        let row = session
            .query_unpaged(
                format!(
                    "SELECT version, history_bucket_seqs FROM {ks}.schema_version WHERE name = ?"
                ),
                (POSITION_NAME,),
            )
            .await?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<i32>, Option<i64>)>()
            .map_err(corrupt)?;
        if let Some((found, buckets)) = row {
            version = found.unwrap_or(0);
            if version > SCHEMA_VERSION {
                return Err(schema(format!(
                    "keyspace {ks} has schema version {version}, newer than this build understands ({SCHEMA_VERSION}); upgrade parley or point it at another keyspace"
                )));
            }
            let configured = i64_of(options.history_bucket_seqs);
            if buckets.is_some_and(|b| b != configured) {
                return Err(schema(format!(
                    "keyspace {ks} stores history in buckets of {} log sequences, this store is configured with {configured}; the bucket size cannot change once history is written",
                    buckets.unwrap_or_default()
                )));
            }
        }
    } else if !tables.is_empty() {
        let mut shown = tables.clone();
        shown.truncate(5);
        return Err(schema(format!(
            "keyspace {ks} holds tables that are not Parley's ({}); point projector.store.keyspace at Parley's keyspace or a new one",
            shown.join(", ")
        )));
    }
    if !keyspace_exists {
        if options.replication.is_empty() {
            return Err(schema(format!(
                "keyspace {ks} does not exist and projector.store.replication is empty, so it cannot be created"
            )));
        }
        let replication: Vec<String> = options
            .replication
            .iter()
            .map(|(dc, n)| format!("'{}': {n}", dc.replace('\'', "''")))
            .collect();
        let ddl = format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', {}}}{}",
            replication.join(", "),
            dialect.keyspace_options(options.tablets)?
        );
        session.query_unpaged(ddl, ()).await?;
    }
    let current = usize::try_from(version).unwrap_or(0);
    for statements in migrations(ks).into_iter().skip(current) {
        for ddl in statements {
            match added_column(&ddl, ks) {
                Some((table, column)) => add_column(session, ks, table, column, &ddl).await?,
                None => {
                    session.query_unpaged(ddl, ()).await?;
                }
            }
        }
    }
    if current < migrations(ks).len() {
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_version (name, version, history_bucket_seqs) VALUES (?, ?, ?)"
                ),
                (
                    POSITION_NAME,
                    SCHEMA_VERSION,
                    i64_of(options.history_bucket_seqs),
                ),
            )
            .await?;
        tracing::info!(
            keyspace = ks,
            version = SCHEMA_VERSION,
            "conversation store schema set up"
        );
    }
    Ok(())
}

/// The table and column an `ALTER TABLE <ks>.<table> ADD <column> <type>` of
/// [`migrations`] adds.
fn added_column<'a>(ddl: &'a str, ks: &str) -> Option<(&'a str, &'a str)> {
    let rest = ddl
        .strip_prefix("ALTER TABLE ")?
        .strip_prefix(ks)?
        .strip_prefix('.')?;
    let mut words = rest.split_whitespace();
    let table = words.next()?;
    (words.next()? == "ADD").then_some(())?;
    Some((table, words.next()?))
}

async fn column_exists(
    session: &Session,
    ks: &str,
    table: &str,
    column: &str,
) -> Result<bool, StoreError> {
    Ok(session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (ks, table, column),
        )
        .await?
        .into_rows_result()
        .map_err(corrupt)?
        .rows_num()
        > 0)
}

/// How long a process waits for a column another process added to become usable.
const COLUMN_SETTLE: Duration = Duration::from_secs(10);
const COLUMN_SETTLE_POLL: Duration = Duration::from_millis(50);

/// Run an `ALTER TABLE ... ADD` of [`migrations`], which CQL cannot make conditional: a
/// migration cut short after adding the column finds it there, and of two processes
/// migrating at once (a projector and gateways starting together) the second is refused as
/// adding it again. Either way the column is there but, seen from the second, not
/// necessarily usable yet (Cassandra lists it in `system_schema` before statements may name
/// it): wait until a statement naming it prepares.
async fn add_column(
    session: &Session,
    ks: &str,
    table: &str,
    column: &str,
    ddl: &str,
) -> Result<(), StoreError> {
    if !column_exists(session, ks, table, column).await?
        && let Err(e) = session.query_unpaged(ddl, ()).await
        && !column_exists(session, ks, table, column).await?
    {
        return Err(e.into());
    }
    let probe = format!("SELECT {column} FROM {ks}.{table} LIMIT 1");
    let started = std::time::Instant::now();
    loop {
        match session.prepare(probe.as_str()).await {
            Ok(_) => return Ok(()),
            Err(_) if started.elapsed() < COLUMN_SETTLE => {
                tokio::time::sleep(COLUMN_SETTLE_POLL).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn prepare_all(session: &Session, ks: &str) -> Result<Statements, StoreError> {
    let prepare = |cql: String| async move {
        let mut statement = session.prepare(cql).await?;
        // Every statement here is idempotent: writes carry explicit timestamps, reads have
        // no effect. The driver retries only statements marked so.
        statement.set_is_idempotent(true);
        Ok::<_, StoreError>(statement)
    };
    Ok(Statements {
        activity: prepare(format!(
            "UPDATE {ks}.conversations USING TIMESTAMP ? SET last_seq = ?, last_activity_at = ? WHERE id = ?"
        ))
        .await?,
        created: prepare(format!(
            "UPDATE {ks}.conversations USING TIMESTAMP ? SET kind = ?, title = ?, created_seq = ? WHERE id = ?"
        ))
        .await?,
        member: prepare(format!(
            "INSERT INTO {ks}.members (conversation, user_id, role) VALUES (?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        membership: prepare(format!(
            "INSERT INTO {ks}.conversations_by_user (user_id, conversation, role) VALUES (?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        message: prepare(format!(
            "INSERT INTO {ks}.messages (conversation, bucket, seq, id, sender, client_id, body, at, system, reply_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        edit_message: prepare(format!(
            "UPDATE {ks}.messages USING TIMESTAMP ? SET body = ?, edited = true WHERE conversation = ? AND bucket = ? AND seq = ?"
        ))
        .await?,
        delete_message: prepare(format!(
            "UPDATE {ks}.messages USING TIMESTAMP ? SET body = '', deleted = true WHERE conversation = ? AND bucket = ? AND seq = ?"
        ))
        .await?,
        mark_reacted: prepare(format!(
            "UPDATE {ks}.messages USING TIMESTAMP ? SET reacted = true WHERE conversation = ? AND bucket = ? AND seq = ?"
        ))
        .await?,
        body: prepare(format!(
            "INSERT INTO {ks}.bodies (conversation, message, seq, body) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        delete_bodies: prepare(format!(
            "DELETE FROM {ks}.bodies USING TIMESTAMP ? WHERE conversation = ? AND message = ?"
        ))
        .await?,
        bodies: prepare(format!(
            "SELECT seq, body FROM {ks}.bodies WHERE conversation = ? AND message = ?"
        ))
        .await?,
        react: prepare(format!(
            "INSERT INTO {ks}.reactions (conversation, message, emoji, user_id) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        unreact: prepare(format!(
            "DELETE FROM {ks}.reactions USING TIMESTAMP ? WHERE conversation = ? AND message = ? AND emoji = ? AND user_id = ?"
        ))
        .await?,
        clear_reactions: prepare(format!(
            "DELETE FROM {ks}.reactions USING TIMESTAMP ? WHERE conversation = ? AND message = ?"
        ))
        .await?,
        reactions: prepare(format!(
            "SELECT emoji, user_id FROM {ks}.reactions WHERE conversation = ? AND message = ?"
        ))
        .await?,
        bucket: prepare(format!(
            "INSERT INTO {ks}.message_buckets (conversation, bucket) VALUES (?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        event: prepare(format!(
            "INSERT INTO {ks}.events (conversation, bucket, seq, envelope) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        // Timestamped by the marker itself, not the event's sequence: the cell keeps the
        // highest marker whatever order the events arrive in.
        set_read: prepare(format!(
            "INSERT INTO {ks}.read_markers (conversation, user_id, seq) VALUES (?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        read_marker: prepare(format!(
            "SELECT seq FROM {ks}.read_markers WHERE conversation = ? AND user_id = ?"
        ))
        .await?,
        senders_after: prepare(format!(
            "SELECT seq, sender, system FROM {ks}.messages WHERE conversation = ? AND bucket = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
        ))
        .await?,
        event_bucket: prepare(format!(
            "INSERT INTO {ks}.event_buckets (conversation, bucket) VALUES (?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        set_position: prepare(format!(
            "INSERT INTO {ks}.projection_position (name, seq) VALUES (?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        position: prepare(format!(
            "SELECT seq FROM {ks}.projection_position WHERE name = ?"
        ))
        .await?,
        conversation: prepare(format!(
            "SELECT kind, title, last_seq, last_activity_at FROM {ks}.conversations WHERE id = ?"
        ))
        .await?,
        members: prepare(format!(
            "SELECT user_id, role FROM {ks}.members WHERE conversation = ?"
        ))
        .await?,
        members_after: prepare(format!(
            "SELECT user_id, role FROM {ks}.members WHERE conversation = ? AND user_id > ? LIMIT ?"
        ))
        .await?,
        member_count: prepare(format!(
            "SELECT COUNT(*) FROM {ks}.members WHERE conversation = ?"
        ))
        .await?,
        details: prepare(format!(
            "SELECT kind, title, last_seq, created_seq FROM {ks}.conversations WHERE id = ?"
        ))
        .await?,
        event_at: prepare(format!(
            "SELECT envelope FROM {ks}.events WHERE conversation = ? AND bucket = ? AND seq = ?"
        ))
        .await?,
        role_of: prepare(format!(
            "SELECT role FROM {ks}.members WHERE conversation = ? AND user_id = ?"
        ))
        .await?,
        memberships: prepare(format!(
            "SELECT conversation, role FROM {ks}.conversations_by_user WHERE user_id = ?"
        ))
        .await?,
        // A removal is a tombstone timestamped by its event: an add or role change with an
        // older sequence, applied later, stays shadowed; a later add wins.
        unmember: prepare(format!(
            "DELETE FROM {ks}.members USING TIMESTAMP ? WHERE conversation = ? AND user_id = ?"
        ))
        .await?,
        unmembership: prepare(format!(
            "DELETE FROM {ks}.conversations_by_user USING TIMESTAMP ? WHERE user_id = ? AND conversation = ?"
        ))
        .await?,
        rename: prepare(format!(
            "UPDATE {ks}.conversations USING TIMESTAMP ? SET title = ? WHERE id = ?"
        ))
        .await?,
        buckets: prepare(format!(
            "SELECT bucket FROM {ks}.message_buckets WHERE conversation = ? AND bucket <= ?"
        ))
        .await?,
        history: prepare(format!(
            "SELECT seq, id, sender, client_id, body, at, system, reply_to, edited, deleted, reacted FROM {ks}.messages WHERE conversation = ? AND bucket = ? AND seq < ? LIMIT ?"
        ))
        .await?,
        buckets_after: prepare(format!(
            "SELECT bucket FROM {ks}.message_buckets WHERE conversation = ? AND bucket >= ? ORDER BY bucket ASC"
        ))
        .await?,
        history_after: prepare(format!(
            "SELECT seq, id, sender, client_id, body, at, system, reply_to, edited, deleted, reacted FROM {ks}.messages WHERE conversation = ? AND bucket = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
        ))
        .await?,
        event_buckets: prepare(format!(
            "SELECT bucket FROM {ks}.event_buckets WHERE conversation = ? AND bucket >= ?"
        ))
        .await?,
        events: prepare(format!(
            "SELECT seq, envelope FROM {ks}.events WHERE conversation = ? AND bucket = ? AND seq > ? LIMIT ?"
        ))
        .await?,
        check: prepare(format!(
            "SELECT version FROM {ks}.schema_version WHERE name = ?"
        ))
        .await?,
        conversations_first: prepare(format!("SELECT id FROM {ks}.conversations LIMIT ?")).await?,
        // Token order: a full scan pages through the ring, not through ids.
        conversations_after: prepare(format!(
            "SELECT id FROM {ks}.conversations WHERE token(id) > token(?) LIMIT ?"
        ))
        .await?,
    })
}

#[async_trait]
impl ConversationStore for CqlStore {
    #[tracing::instrument(name = "cql_apply", skip_all, fields(events = events.len()))]
    async fn apply(&self, events: &[RecordedEvent]) -> Result<(), StoreError> {
        let Some(position) = events.iter().map(|e| e.seq).max() else {
            return Ok(());
        };
        futures::stream::iter(self.row_writes(events))
            .buffer_unordered(self.max_in_flight)
            .try_collect::<()>()
            .await?;
        // Only after every row is acknowledged: the position never runs ahead of the data.
        let position = i64_of(position);
        self.session
            .execute_unpaged(
                &self.statements.set_position,
                (POSITION_ROW, position, position),
            )
            .await?;
        Ok(())
    }

    async fn position(&self) -> Result<u64, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.position, (POSITION_ROW,))
            .await?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(corrupt)?;
        Ok(row.and_then(|(seq,)| seq).map(u64_of).unwrap_or(0))
    }

    async fn conversation(
        &self,
        id: ConversationId,
    ) -> Result<Option<ConversationView>, StoreError> {
        let Some((Some(kind), title, last_seq, _)) = self.conversation_row(*id.as_uuid()).await?
        else {
            return Ok(None);
        };
        Ok(Some(ConversationView {
            id,
            kind: parse_kind(&kind)?,
            title,
            last_seq: last_seq.map(u64_of).unwrap_or(0),
        }))
    }

    async fn members(&self, id: ConversationId) -> Result<Vec<Member>, StoreError> {
        let rows: Vec<(String, String)> = self
            .all_rows(&self.statements.members, (*id.as_uuid(),))
            .await?;
        rows.into_iter()
            .map(|(user, role)| parse_member(user, &role))
            .collect()
    }

    /// Three single-partition reads: the conversation, its creation event, its member count.
    async fn details(&self, id: ConversationId) -> Result<Option<ConversationDetails>, StoreError> {
        let uuid = *id.as_uuid();
        let row = self
            .session
            .execute_unpaged(&self.statements.details, (uuid,))
            .await?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<String>, Option<String>, Option<i64>, Option<i64>)>()
            .map_err(corrupt)?;
        let Some((Some(kind), title, last_seq, Some(created_seq))) = row else {
            return Ok(None);
        };
        let created = self
            .session
            .execute_unpaged(
                &self.statements.event_at,
                (uuid, self.bucket_of(u64_of(created_seq)), created_seq),
            )
            .await?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Vec<u8>,)>()
            .map_err(corrupt)?
            .ok_or_else(|| corrupt("the creation event is missing"))?;
        let (members,) = self
            .session
            .execute_unpaged(&self.statements.member_count, (uuid,))
            .await?
            .into_rows_result()
            .map_err(corrupt)?
            .first_row::<(i64,)>()
            .map_err(corrupt)?;
        Ok(Some(ConversationDetails {
            view: ConversationView {
                id,
                kind: parse_kind(&kind)?,
                title,
                last_seq: last_seq.map(u64_of).unwrap_or(0),
            },
            created_at: event_at(&created.0)?,
            member_count: u64_of(members),
        }))
    }

    async fn members_page(
        &self,
        id: ConversationId,
        after: Option<&UserId>,
        limit: u32,
    ) -> Result<MembersPage, StoreError> {
        let after = after.map_or("", |u| u.as_str()).to_owned();
        let wanted = i32::try_from(u64::from(limit) + 1).unwrap_or(i32::MAX);
        let rows: Vec<(String, String)> = self
            .all_rows(
                &self.statements.members_after,
                (*id.as_uuid(), after, wanted),
            )
            .await?;
        members_page(rows, limit)
    }

    async fn role_of(&self, id: ConversationId, user: &UserId) -> Result<Option<Role>, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.role_of, (*id.as_uuid(), user.as_str()))
            .await?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(String,)>()
            .map_err(corrupt)?;
        row.map(|(role,)| parse_role(&role)).transpose()
    }

    /// Two partitions per candidate at most: the requester's memberships once, then each
    /// candidate's (CQL has no join).
    async fn co_members(&self, user: &UserId, among: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        if among.is_empty() {
            return Ok(Vec::new());
        }
        let mine: std::collections::HashSet<Uuid> = self
            .memberships(user)
            .await?
            .into_iter()
            .map(|(conversation, _)| conversation)
            .collect();
        let mut shared = Vec::new();
        for other in among {
            let theirs = self.memberships(other).await?;
            if theirs
                .iter()
                .any(|(conversation, _)| mine.contains(conversation))
            {
                shared.push(other.clone());
            }
        }
        Ok(shared)
    }

    /// Computed at read time from the user's memberships and each conversation's newest
    /// sequence: a materialized inbox would cost one write per member per message.
    async fn inbox(
        &self,
        user: &UserId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let before = before.unwrap_or(u64::MAX);
        let memberships = self.memberships(user).await?;
        let rows: Vec<_> = futures::stream::iter(memberships)
            .map(|(id, role)| async move {
                Ok::<_, StoreError>((id, role, self.conversation_row(id).await?))
            })
            .buffer_unordered(self.max_in_flight)
            .try_collect()
            .await?;
        let mut entries = Vec::new();
        for (id, role, row) in rows {
            let Some((Some(kind), title, last_seq, last_activity_at)) = row else {
                continue;
            };
            let last_seq = last_seq.map(u64_of).unwrap_or(0);
            if last_seq >= before {
                continue;
            }
            entries.push(InboxEntry {
                conversation: ConversationId::from_uuid(id),
                kind: parse_kind(&kind)?,
                title,
                role: parse_role(&role)?,
                last_seq,
                last_activity_at: last_activity_at.map(u64_of).unwrap_or(0),
                read_seq: 0,
                unread: 0,
                last_message: None,
            });
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_seq));
        entries.truncate(limit as usize);
        Ok(entries)
    }

    /// Walks the conversation's non-empty buckets newest first, reading each until the page
    /// (plus one row, to know whether more exist) is full.
    async fn history(
        &self,
        id: ConversationId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let before = before.unwrap_or(u64::MAX);
        let rows: Vec<MessageRow> = if before == 0 {
            Vec::new()
        } else {
            let walk = BucketWalk {
                index: &self.statements.buckets,
                rows: &self.statements.history,
            };
            let first = self.bucket_of(before - 1);
            self.walk(
                walk,
                *id.as_uuid(),
                first,
                i64_of(before),
                limit as usize + 1,
            )
            .await?
        };
        self.history_page(id, rows, limit).await
    }

    /// Walks the conversation's non-empty buckets oldest first, from the one holding
    /// `after + 1`.
    async fn history_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let walk = BucketWalk {
            index: &self.statements.buckets_after,
            rows: &self.statements.history_after,
        };
        let first = self.bucket_of(after.saturating_add(1));
        let rows = self
            .walk(
                walk,
                *id.as_uuid(),
                first,
                i64_of(after),
                limit as usize + 1,
            )
            .await?;
        self.history_page(id, rows, limit).await
    }

    /// Walks the conversation's event buckets oldest first, from the one holding `after + 1`.
    async fn events_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<EventsPage, StoreError> {
        let walk = BucketWalk {
            index: &self.statements.event_buckets,
            rows: &self.statements.events,
        };
        let first = self.bucket_of(after.saturating_add(1));
        let rows: Vec<(i64, Vec<u8>)> = self
            .walk(
                walk,
                *id.as_uuid(),
                first,
                i64_of(after),
                limit as usize + 1,
            )
            .await?;
        let mut page = events_page(rows, limit)?;
        self.fill_bodies(id, &mut page.events).await?;
        Ok(page)
    }

    async fn read_marker(&self, id: ConversationId, user: &UserId) -> Result<u64, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.read_marker, (*id.as_uuid(), user.as_str()))
            .await?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(corrupt)?;
        Ok(row.and_then(|(seq,)| seq).map_or(0, u64_of))
    }

    /// Walks the message buckets after the marker like forward history, reading senders
    /// only.
    async fn unread(
        &self,
        id: ConversationId,
        user: &UserId,
        after: u64,
    ) -> Result<u32, StoreError> {
        let walk = BucketWalk {
            index: &self.statements.buckets_after,
            rows: &self.statements.senders_after,
        };
        let first = self.bucket_of(after.saturating_add(1));
        let rows: Vec<(i64, Option<String>, Option<String>)> = self
            .walk(
                walk,
                *id.as_uuid(),
                first,
                i64_of(after),
                UNREAD_CAP as usize,
            )
            .await?;
        // A row without a sender is a change to a message not applied yet: not a message.
        let unread = rows
            .into_iter()
            .filter(|(_, sender, system)| {
                system.is_none() && sender.as_deref().is_some_and(|s| s != user.as_str())
            })
            .count();
        Ok(u32::try_from(unread).unwrap_or(UNREAD_CAP))
    }

    async fn conversations_page(
        &self,
        after: Option<ConversationId>,
        limit: u32,
    ) -> Result<Vec<ConversationId>, StoreError> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows: Vec<(Uuid,)> = match after {
            None => {
                self.all_rows(&self.statements.conversations_first, (limit,))
                    .await?
            }
            Some(after) => {
                self.all_rows(
                    &self.statements.conversations_after,
                    (*after.as_uuid(), limit),
                )
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(id,)| ConversationId::from_uuid(id))
            .collect())
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.statements.check, (POSITION_NAME,))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_added_column_is_one_the_migration_can_check_for() {
        let all: Vec<String> = migrations("ks").into_iter().flatten().collect();
        let added: Vec<(&str, &str)> = all
            .iter()
            .filter(|ddl| ddl.starts_with("ALTER"))
            .map(|ddl| added_column(ddl, "ks").expect("an ALTER the migration can check"))
            .collect();
        assert_eq!(
            added,
            [
                ("messages", "system"),
                ("messages", "reply_to"),
                ("messages", "edited"),
                ("messages", "deleted"),
                ("messages", "reacted")
            ]
        );
        assert!(
            all.iter()
                .filter(|ddl| !ddl.starts_with("ALTER"))
                .all(|ddl| added_column(ddl, "ks").is_none())
        );
    }
}
