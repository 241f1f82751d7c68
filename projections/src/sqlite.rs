//! The embedded conversation store: one SQLite file (WAL mode) on the machine running
//! `parley up` or a single projector.
//!
//! One writer connection applies batches in a transaction that also records the position;
//! a few reader connections serve gateways concurrently. Every call runs on tokio's blocking
//! pool so SQLite never stalls the async runtime.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use parley_events::{
    ConversationId, Event, EventEnvelope, EventId, Member, MessageDeleted, RecordedEvent, Role,
    UserId,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::sync::Mutex;

use crate::columns::{
    Changes, carried_body, corrupt, event_at, events_page, history_message, i64_of, kind_str,
    members_page, parse_kind, parse_member, parse_role, parse_user, reaction_counts, system_json,
    u64_of, unavailable, with_body,
};
use crate::store::{
    ConversationDetails, ConversationStore, ConversationView, EventsPage, HistoryPage, InboxEntry,
    MembersPage, StoreError, StoreErrorKind, UNREAD_CAP,
};

/// Schema version this build writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 3;
const READERS: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    kind TEXT,                       -- NULL until conversation.created is applied
    title TEXT,
    title_seq INTEGER NOT NULL DEFAULT 0, -- the event that last set the title
    created_seq INTEGER,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_activity_at INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    conversation TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    seq INTEGER NOT NULL,            -- the event that last set this row
    present INTEGER NOT NULL DEFAULT 1, -- 0: removed or left (kept so an older add loses)
    PRIMARY KEY (conversation, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_user ON members (user_id, conversation);
CREATE TABLE IF NOT EXISTS messages (
    conversation TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    client_id TEXT NOT NULL,         -- '' on system entries
    body TEXT NOT NULL,              -- as posted; '' once deleted
    at INTEGER NOT NULL,
    system TEXT,                     -- a membership change's SystemEntry (JSON); NULL on messages
    reply_to INTEGER,                -- schema 3
    PRIMARY KEY (conversation, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_edits (
    conversation TEXT NOT NULL,
    message INTEGER NOT NULL,
    seq INTEGER NOT NULL,            -- the edit's own sequence: the newest is the body shown
    body TEXT NOT NULL,              -- '' once the message is deleted
    PRIMARY KEY (conversation, message, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_deletions (
    conversation TEXT NOT NULL,
    message INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (conversation, message)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reactions (
    conversation TEXT NOT NULL,
    message INTEGER NOT NULL,
    emoji TEXT NOT NULL,
    user_id TEXT NOT NULL,
    seq INTEGER NOT NULL,            -- the newest reaction.added or .removed applied
    present INTEGER NOT NULL,        -- whether that newest one is an add
    PRIMARY KEY (conversation, message, emoji, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    conversation TEXT NOT NULL,
    seq INTEGER NOT NULL,
    envelope BLOB NOT NULL,          -- the event as appended to the log (EventEnvelope::to_bytes)
    PRIMARY KEY (conversation, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_markers (
    conversation TEXT NOT NULL,
    user_id TEXT NOT NULL,
    seq INTEGER NOT NULL,            -- read up to here; only ever raised
    PRIMARY KEY (conversation, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS position (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<[Mutex<Connection>]>,
    next_reader: AtomicUsize,
}

impl SqliteStore {
    /// Open (creating if needed) the store at `path` and bring its schema up to date.
    /// Refuses a file whose schema is newer than this build. Several processes may open the
    /// same file at once (a projector and gateways on one machine): set-up that finds the
    /// file locked by another's set-up waits for it, up to [`OPEN_TIMEOUT`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let started = std::time::Instant::now();
        let writer = loop {
            match open_writer(path) {
                Err(SetupError::Sqlite(e)) if is_busy(&e) && started.elapsed() < OPEN_TIMEOUT => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(SetupError::Sqlite(e)) => {
                    return Err(unavailable(format!("cannot open {}: {e}", path.display())));
                }
                Err(SetupError::Store(e)) => return Err(e),
                Ok(writer) => break writer,
            }
        };
        let readers = (0..READERS)
            .map(|_| {
                let reader = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(unavailable)?;
                reader.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
                Ok(Mutex::new(reader))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            readers: readers.into(),
            next_reader: AtomicUsize::new(0),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || {
            let mut conn = writer
                .lock()
                .map_err(|_| unavailable("writer lock poisoned"))?;
            work(&mut conn)
        })
        .await
        .map_err(unavailable)?
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len();
        tokio::task::spawn_blocking(move || {
            let conn = readers[index]
                .lock()
                .map_err(|_| unavailable("reader lock poisoned"))?;
            work(&conn)
        })
        .await
        .map_err(unavailable)?
    }
}

/// How long opening waits for another process's set-up of the same file.
pub const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

enum SetupError {
    Sqlite(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for SetupError {
    fn from(e: rusqlite::Error) -> Self {
        SetupError::Sqlite(e)
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn open_writer(path: &Path) -> Result<Connection, SetupError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL lets readers run beside the writer; NORMAL sync can lose the newest transactions
    // on power loss, which is harmless here: the position is in the same transaction, so the
    // projector re-applies whatever was lost from the log.
    let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    migrate(&conn)?;
    Ok(conn)
}

/// Columns version 3 added to tables of earlier versions: (table, column, declaration).
const ADDED_IN_3: [(&str, &str, &str); 4] = [
    ("conversations", "title_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("members", "present", "INTEGER NOT NULL DEFAULT 1"),
    ("messages", "system", "TEXT"),
    ("messages", "reply_to", "INTEGER"),
];

/// Add the columns of [`ADDED_IN_3`] that `conn`'s tables lack.
fn add_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, declaration) in ADDED_IN_3 {
        let present: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |row| row.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))?;
        }
    }
    Ok(())
}

/// Create the schema, or check an existing one; writes only when something is missing.
fn migrate(conn: &Connection) -> Result<(), SetupError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(SetupError::Store(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "store schema version {version} is newer than this build understands ({SCHEMA_VERSION}); upgrade parley or rebuild the store"
            ),
        )));
    }
    if version < SCHEMA_VERSION {
        // In one transaction, so a crash cannot leave some columns added and the version
        // behind.
        let tx = conn.unchecked_transaction()?;
        conn.execute_batch(SCHEMA)?;
        if version > 0 {
            add_columns(conn)?;
            // Rows of tables this version added are missing for events applied before:
            // forgetting the position makes the projector replay the log into them.
            conn.execute("DELETE FROM position", [])?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
    }
    Ok(())
}

fn apply_one(tx: &rusqlite::Transaction<'_>, recorded: &RecordedEvent) -> rusqlite::Result<()> {
    let envelope = &recorded.envelope;
    let conversation = envelope.conversation.to_string();
    let seq = i64_of(recorded.seq);
    let at = i64_of(envelope.at);
    // Every event moves the conversation's activity forward, never back.
    tx.prepare_cached(
        "INSERT INTO conversations (id, last_seq, last_activity_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET last_seq = excluded.last_seq,
             last_activity_at = excluded.last_activity_at
         WHERE excluded.last_seq > conversations.last_seq",
    )?
    .execute(params![conversation, seq, at])?;
    // A body whose message is already deleted (events may arrive in any order) is stored
    // as a tombstone's: empty.
    let carried = carried_body(&envelope.event, recorded.seq);
    let deleted = match carried {
        Some((message, _)) => is_deleted(tx, &conversation, i64_of(message))?,
        None => false,
    };
    let stored = if deleted {
        with_body(envelope, "")
    } else {
        envelope.clone()
    };
    tx.prepare_cached(
        "INSERT INTO events (conversation, seq, envelope) VALUES (?1, ?2, ?3)
         ON CONFLICT (conversation, seq) DO NOTHING",
    )?
    .execute(params![conversation, seq, stored.to_bytes()])?;
    match &envelope.event {
        Event::ConversationCreated(created) => {
            tx.prepare_cached(
                "UPDATE conversations SET kind = ?2, created_seq = ?4,
                     title = CASE WHEN title_seq < ?4 THEN ?3 ELSE title END,
                     title_seq = max(title_seq, ?4)
                 WHERE id = ?1",
            )?
            .execute(params![
                conversation,
                kind_str(created.kind),
                created.title,
                seq
            ])?;
            set_members(tx, &conversation, &created.members, seq)?;
        }
        Event::ConversationRead(read) => {
            tx.prepare_cached(
                "INSERT INTO read_markers (conversation, user_id, seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation, user_id) DO UPDATE SET seq = excluded.seq
                 WHERE excluded.seq > read_markers.seq",
            )?
            .execute(params![
                conversation,
                envelope.actor.as_str(),
                i64_of(read.seq)
            ])?;
        }
        Event::MessagePosted(posted) => {
            tx.prepare_cached(
                "INSERT INTO messages (conversation, seq, id, sender, client_id, body, at, reply_to)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (conversation, seq) DO NOTHING",
            )?
            .execute(params![
                conversation,
                seq,
                envelope.id.to_string(),
                envelope.actor.as_str(),
                posted.client_id.as_str(),
                if deleted { "" } else { posted.body.as_str() },
                at,
                posted.reply_to.map(i64_of)
            ])?;
        }
        Event::MessageEdited(edited) => {
            tx.prepare_cached(
                "INSERT INTO message_edits (conversation, message, seq, body)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                conversation,
                i64_of(edited.message),
                seq,
                if deleted { "" } else { edited.body.as_str() }
            ])?;
        }
        Event::MessageDeleted(deletion) => delete_message(tx, &conversation, deletion, seq)?,
        Event::ReactionAdded(reaction) | Event::ReactionRemoved(reaction) => {
            // Per user and emoji only the newest add or remove counts, whatever order they
            // arrive in: an add applied after its removal does not bring it back.
            tx.prepare_cached(
                "INSERT INTO reactions (conversation, message, emoji, user_id, seq, present)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (conversation, message, emoji, user_id) DO UPDATE
                     SET seq = excluded.seq, present = excluded.present
                 WHERE excluded.seq > reactions.seq",
            )?
            .execute(params![
                conversation,
                i64_of(reaction.message),
                reaction.emoji,
                envelope.actor.as_str(),
                seq,
                matches!(envelope.event, Event::ReactionAdded(_))
            ])?;
        }
        Event::MembersAdded(added) => set_members(tx, &conversation, &added.members, seq)?,
        Event::MembersRemoved(removed) => {
            for user in &removed.users {
                set_gone(tx, &conversation, user, seq)?;
            }
        }
        Event::MemberLeft(_) => set_gone(tx, &conversation, &envelope.actor, seq)?,
        Event::MemberRoleChanged(changed) => {
            let member = Member {
                user: changed.user.clone(),
                role: changed.role,
            };
            set_members(tx, &conversation, &[member], seq)?;
        }
        Event::ConversationRenamed(renamed) => {
            tx.prepare_cached(
                "UPDATE conversations SET title = ?2, title_seq = ?3
                 WHERE id = ?1 AND title_seq < ?3",
            )?
            .execute(params![conversation, renamed.title, seq])?;
        }
        // Mutes concern the write model only.
        Event::MemberMuted(_) | Event::MemberUnmuted(_) => {}
    }
    if let Some(system) = system_json(recorded) {
        tx.prepare_cached(
            "INSERT INTO messages (conversation, seq, id, sender, client_id, body, at, system)
             VALUES (?1, ?2, ?3, ?4, '', '', ?5, ?6)
             ON CONFLICT (conversation, seq) DO NOTHING",
        )?
        .execute(params![
            conversation,
            seq,
            envelope.id.to_string(),
            envelope.actor.as_str(),
            at,
            system
        ])?;
    }
    Ok(())
}

/// Members (with their roles) as of event `seq`, unless a newer event set them already.
fn set_members(
    tx: &rusqlite::Transaction<'_>,
    conversation: &str,
    members: &[Member],
    seq: i64,
) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO members (conversation, user_id, role, seq, present) VALUES (?1, ?2, ?3, ?4, 1)
         ON CONFLICT (conversation, user_id) DO UPDATE SET role = excluded.role,
             seq = excluded.seq, present = 1
         WHERE excluded.seq > members.seq",
    )?;
    for member in members {
        upsert.execute(params![
            conversation,
            member.user.as_str(),
            member.role.as_str(),
            seq
        ])?;
    }
    Ok(())
}

/// `user` is no longer a member as of event `seq`. The row stays, marked, so an older
/// event applied later (a replay in another order) cannot bring the member back.
fn set_gone(
    tx: &rusqlite::Transaction<'_>,
    conversation: &str,
    user: &UserId,
    seq: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO members (conversation, user_id, role, seq, present)
         VALUES (?1, ?2, 'member', ?3, 0)
         ON CONFLICT (conversation, user_id) DO UPDATE SET seq = excluded.seq, present = 0
         WHERE excluded.seq > members.seq",
    )?
    .execute(params![conversation, user.as_str(), seq])?;
    Ok(())
}

fn is_deleted(
    tx: &rusqlite::Transaction<'_>,
    conversation: &str,
    message: i64,
) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM message_deletions WHERE conversation = ?1 AND message = ?2")?
        .exists(params![conversation, message])
}

/// Record the deletion and take the message's body out of every row holding it: the
/// message, its edits, and the stored events that posted and edited it.
fn delete_message(
    tx: &rusqlite::Transaction<'_>,
    conversation: &str,
    deletion: &MessageDeleted,
    seq: i64,
) -> rusqlite::Result<()> {
    let message = i64_of(deletion.message);
    tx.prepare_cached(
        "INSERT INTO message_deletions (conversation, message, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT DO NOTHING",
    )?
    .execute(params![conversation, message, seq])?;
    tx.prepare_cached("UPDATE messages SET body = '' WHERE conversation = ?1 AND seq = ?2")?
        .execute(params![conversation, message])?;
    tx.prepare_cached(
        "UPDATE message_edits SET body = '' WHERE conversation = ?1 AND message = ?2",
    )?
    .execute(params![conversation, message])?;
    let carriers: Vec<(i64, Vec<u8>)> = tx
        .prepare_cached(
            "SELECT seq, envelope FROM events WHERE conversation = ?1
             AND (seq = ?2 OR seq IN (SELECT seq FROM message_edits
                                      WHERE conversation = ?1 AND message = ?2))",
        )?
        .query_map(params![conversation, message], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut scrub =
        tx.prepare_cached("UPDATE events SET envelope = ?3 WHERE conversation = ?1 AND seq = ?2")?;
    for (carrier, bytes) in carriers {
        // Stored by this store, so readable; one that is not has no body to take out.
        if let Ok(envelope) = EventEnvelope::from_bytes(&bytes) {
            scrub.execute(params![
                conversation,
                carrier,
                with_body(&envelope, "").to_bytes()
            ])?;
        }
    }
    Ok(())
}

/// What a history row reads: the message, its newest edit's body, whether it is edited or
/// deleted, and what it replies to. `{where}` picks and orders the page (conversation,
/// sequence bound, row limit).
const HISTORY_SELECT: &str = "SELECT m.seq, m.id, m.sender, m.client_id,
        COALESCE((SELECT e.body FROM message_edits e
                  WHERE e.conversation = m.conversation AND e.message = m.seq
                  ORDER BY e.seq DESC LIMIT 1), m.body),
        m.at,
        m.system,
        EXISTS (SELECT 1 FROM message_edits e
                WHERE e.conversation = m.conversation AND e.message = m.seq),
        EXISTS (SELECT 1 FROM message_deletions d
                WHERE d.conversation = m.conversation AND d.message = m.seq),
        m.reply_to
    FROM messages m";

/// A page of history read with `filter` (conversation, sequence bound, row limit), one row
/// beyond `limit` to know whether more follow.
fn history_page(
    conn: &Connection,
    filter: &str,
    id: ConversationId,
    bound: i64,
    limit: u32,
) -> Result<HistoryPage, StoreError> {
    let rows = conn
        .prepare_cached(&format!("{HISTORY_SELECT} {filter}"))
        .and_then(|mut stmt| {
            stmt.query_map(
                params![id.to_string(), bound, i64::from(limit) + 1],
                |row| {
                    Ok((
                        (
                            row.get::<_, i64>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, String>(2)?,
                            row.get::<_, String>(3)?,
                            row.get::<_, String>(4)?,
                            row.get::<_, i64>(5)?,
                            row.get::<_, Option<String>>(6)?,
                        ),
                        Changes {
                            edited: row.get(7)?,
                            deleted: row.get(8)?,
                            reply_to: row.get(9)?,
                        },
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(unavailable)?;
    let has_more = rows.len() > limit as usize;
    let mut messages = rows
        .into_iter()
        .take(limit as usize)
        .map(
            |((seq, event_id, sender, client_id, body, at, system), changes)| {
                let id = event_id.parse::<EventId>().map_err(corrupt)?;
                history_message((seq, id, sender, client_id, body, at, system), changes)
            },
        )
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut reactions = conn
        .prepare_cached(
            "SELECT emoji, user_id FROM reactions
             WHERE conversation = ?1 AND message = ?2 AND present",
        )
        .map_err(unavailable)?;
    for message in messages.iter_mut().filter(|m| !m.deleted) {
        let pairs = reactions
            .query_map(params![id.to_string(), i64_of(message.seq)], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(unavailable)?;
        message.reactions = reaction_counts(pairs)?;
    }
    Ok(HistoryPage { messages, has_more })
}

#[async_trait]
impl ConversationStore for SqliteStore {
    async fn apply(&self, events: &[RecordedEvent]) -> Result<(), StoreError> {
        let Some(position) = events.iter().map(|e| e.seq).max() else {
            return Ok(());
        };
        let events = events.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            for event in &events {
                apply_one(&tx, event).map_err(unavailable)?;
            }
            tx.prepare_cached(
                "INSERT INTO position (name, seq) VALUES ('conversations', ?1)
                 ON CONFLICT (name) DO UPDATE SET seq = max(seq, excluded.seq)",
            )
            .and_then(|mut stmt| stmt.execute(params![i64_of(position)]))
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn position(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT seq FROM position WHERE name = 'conversations'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|seq| seq.map(u64_of).unwrap_or(0))
            .map_err(unavailable)
        })
        .await
    }

    async fn conversation(
        &self,
        id: ConversationId,
    ) -> Result<Option<ConversationView>, StoreError> {
        self.read(move |conn| {
            let row = conn
                .prepare_cached(
                    "SELECT kind, title, last_seq FROM conversations
                     WHERE id = ?1 AND kind IS NOT NULL",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![id.to_string()], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, Option<String>>(1)?,
                            row.get::<_, i64>(2)?,
                        ))
                    })
                    .optional()
                })
                .map_err(unavailable)?;
            row.map(|(kind, title, last_seq)| {
                Ok(ConversationView {
                    id,
                    kind: parse_kind(&kind)?,
                    title,
                    last_seq: u64_of(last_seq),
                })
            })
            .transpose()
        })
        .await
    }

    async fn members(&self, id: ConversationId) -> Result<Vec<Member>, StoreError> {
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT user_id, role FROM members WHERE conversation = ?1 AND present = 1
                     ORDER BY user_id",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![id.to_string()], |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            rows.into_iter()
                .map(|(user, role)| parse_member(user, &role))
                .collect()
        })
        .await
    }

    async fn details(&self, id: ConversationId) -> Result<Option<ConversationDetails>, StoreError> {
        self.read(move |conn| {
            let row = conn
                .prepare_cached(
                    "SELECT c.kind, c.title, c.last_seq, e.envelope,
                         (SELECT count(*) FROM members m WHERE m.conversation = c.id AND m.present = 1)
                     FROM conversations c
                     LEFT JOIN events e ON e.conversation = c.id AND e.seq = c.created_seq
                     WHERE c.id = ?1 AND c.kind IS NOT NULL",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![id.to_string()], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, Option<String>>(1)?,
                            row.get::<_, i64>(2)?,
                            row.get::<_, Option<Vec<u8>>>(3)?,
                            row.get::<_, i64>(4)?,
                        ))
                    })
                    .optional()
                })
                .map_err(unavailable)?;
            row.map(|(kind, title, last_seq, created, members)| {
                let created = created.ok_or_else(|| corrupt("the creation event is missing"))?;
                Ok(ConversationDetails {
                    view: ConversationView {
                        id,
                        kind: parse_kind(&kind)?,
                        title,
                        last_seq: u64_of(last_seq),
                    },
                    created_at: event_at(&created)?,
                    member_count: u64_of(members),
                })
            })
            .transpose()
        })
        .await
    }

    async fn members_page(
        &self,
        id: ConversationId,
        after: Option<&UserId>,
        limit: u32,
    ) -> Result<MembersPage, StoreError> {
        // User ids are never empty, so "" is below every one of them.
        let after = after.map_or_else(String::new, |u| u.as_str().to_owned());
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT user_id, role FROM members
                     WHERE conversation = ?1 AND user_id > ?2 AND present = 1
                     ORDER BY user_id LIMIT ?3",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(
                        params![id.to_string(), after, i64::from(limit) + 1],
                        |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            members_page(rows, limit)
        })
        .await
    }

    async fn role_of(&self, id: ConversationId, user: &UserId) -> Result<Option<Role>, StoreError> {
        let user = user.as_str().to_owned();
        self.read(move |conn| {
            let role = conn
                .prepare_cached(
                    "SELECT role FROM members
                     WHERE conversation = ?1 AND user_id = ?2 AND present = 1",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![id.to_string(), user], |row| row.get::<_, String>(0))
                        .optional()
                })
                .map_err(unavailable)?;
            role.as_deref().map(parse_role).transpose()
        })
        .await
    }

    async fn co_members(&self, user: &UserId, among: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        if among.is_empty() {
            return Ok(Vec::new());
        }
        let mut values: Vec<String> = vec![user.as_str().to_owned()];
        values.extend(among.iter().map(|other| other.as_str().to_owned()));
        self.read(move |conn| {
            let candidates: Vec<String> = (2..=values.len()).map(|n| format!("?{n}")).collect();
            let candidates = candidates.join(", ");
            // Probes the requester's memberships for each candidate's conversations through
            // the primary key: one statement, whatever the number of candidates.
            let sql = format!(
                "SELECT DISTINCT theirs.user_id FROM members theirs
                 WHERE theirs.user_id IN ({candidates}) AND theirs.present = 1
                   AND EXISTS (SELECT 1 FROM members mine
                               WHERE mine.conversation = theirs.conversation AND mine.user_id = ?1
                                 AND mine.present = 1)"
            );
            let rows = conn
                .prepare(&sql)
                .and_then(|mut stmt| {
                    stmt.query_map(rusqlite::params_from_iter(&values), |row| {
                        row.get::<_, String>(0)
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            rows.into_iter().map(parse_user).collect()
        })
        .await
    }

    async fn inbox(
        &self,
        user: &UserId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let user = user.as_str().to_owned();
        let before = before.map(i64_of).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT c.id, c.kind, c.title, m.role, c.last_seq, c.last_activity_at
                     FROM members m JOIN conversations c ON c.id = m.conversation
                     WHERE m.user_id = ?1 AND m.present = 1 AND c.kind IS NOT NULL
                       AND c.last_seq < ?2
                     ORDER BY c.last_seq DESC LIMIT ?3",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![user, before, limit], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, Option<String>>(2)?,
                            row.get::<_, String>(3)?,
                            row.get::<_, i64>(4)?,
                            row.get::<_, i64>(5)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            rows.into_iter()
                .map(|(id, kind, title, role, last_seq, last_activity_at)| {
                    Ok(InboxEntry {
                        conversation: id.parse().map_err(corrupt)?,
                        kind: parse_kind(&kind)?,
                        title,
                        role: parse_role(&role)?,
                        last_seq: u64_of(last_seq),
                        last_activity_at: u64_of(last_activity_at),
                        read_seq: 0,
                        unread: 0,
                        last_message: None,
                    })
                })
                .collect()
        })
        .await
    }

    async fn history(
        &self,
        id: ConversationId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let before = before.map(i64_of).unwrap_or(i64::MAX);
        self.read(move |conn| {
            history_page(
                conn,
                "WHERE m.conversation = ?1 AND m.seq < ?2 ORDER BY m.seq DESC LIMIT ?3",
                id,
                before,
                limit,
            )
        })
        .await
    }

    async fn history_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let after = i64_of(after);
        self.read(move |conn| {
            history_page(
                conn,
                "WHERE m.conversation = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3",
                id,
                after,
                limit,
            )
        })
        .await
    }

    async fn events_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<EventsPage, StoreError> {
        let after = i64_of(after);
        self.read(move |conn| {
            // One row more than asked tells whether a newer page exists.
            let rows = conn
                .prepare_cached(
                    "SELECT seq, envelope FROM events
                     WHERE conversation = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(
                        params![id.to_string(), after, i64::from(limit) + 1],
                        |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)),
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            events_page(rows, limit)
        })
        .await
    }

    async fn read_marker(&self, id: ConversationId, user: &UserId) -> Result<u64, StoreError> {
        let user = user.as_str().to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT seq FROM read_markers WHERE conversation = ?1 AND user_id = ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![id.to_string(), user], |row| row.get::<_, i64>(0))
                    .optional()
            })
            .map(|seq| seq.map_or(0, u64_of))
            .map_err(unavailable)
        })
        .await
    }

    async fn unread(
        &self,
        id: ConversationId,
        user: &UserId,
        after: u64,
    ) -> Result<u32, StoreError> {
        let user = user.as_str().to_owned();
        let after = i64_of(after);
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT count(*) FROM (SELECT sender, system FROM messages
                     WHERE conversation = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3)
                 WHERE sender != ?4 AND system IS NULL",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![id.to_string(), after, UNREAD_CAP, user], |row| {
                    row.get::<_, u32>(0)
                })
            })
            .map_err(unavailable)
        })
        .await
    }

    async fn conversations_page(
        &self,
        after: Option<ConversationId>,
        limit: u32,
    ) -> Result<Vec<ConversationId>, StoreError> {
        self.read(move |conn| {
            let ids = conn
                .prepare_cached("SELECT id FROM conversations WHERE id > ?1 ORDER BY id LIMIT ?2")
                .and_then(|mut stmt| {
                    stmt.query_map(
                        params![after.map(|id| id.to_string()).unwrap_or_default(), limit],
                        |row| row.get::<_, String>(0),
                    )?
                    .collect::<rusqlite::Result<Vec<String>>>()
                })
                .map_err(unavailable)?;
            ids.iter()
                .map(|id| id.parse::<ConversationId>().map_err(corrupt))
                .collect()
        })
        .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }
}
