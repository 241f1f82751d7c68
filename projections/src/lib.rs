//! Parley's read models: state derived from the event log, safe to delete and rebuild.
//!
//! Layout:
//! - [`store`]: the [`ConversationStore`] trait every conversation store implements
//!   (embedded SQLite here; ScyllaDB beside it), and the read types it returns.
//! - [`sqlite`]: the embedded store, one file on one machine.
//! - [`cql`]: the production store, ScyllaDB (or another CQL server) through the `scylla`
//!   driver.
//! - [`presence`]: online/offline/last-seen records in Redis, with expiry.
//! - [`tls`]: TLS client settings from PEM files, for the CQL cluster, Redis and NATS.
//!
//! Invariants: applying an event is idempotent and order-insensitive (a row only changes
//! when the incoming event is newer than what it holds), and a store's position in the log
//! never runs ahead of its rows: SQLite commits both in one transaction, the CQL store writes
//! the position only after every row of the batch is acknowledged. This crate
//! does not know NATS: the projector role in `parley-services` feeds it decoded events.

mod columns;
pub mod cql;
pub mod presence;
pub mod sqlite;
pub mod store;
pub mod tls;

pub use cql::{Consistency, CqlOptions, CqlStore};
pub use presence::{PresenceClient, PresenceError, PresenceStore, Recorded, UserPresence};
pub use sqlite::SqliteStore;
pub use store::{
    ConversationDetails, ConversationStore, ConversationView, EventsPage, HistoryPage, InboxEntry,
    MembersPage, StoreError, StoreErrorKind,
};
pub use tls::{ClientCert, TlsClient, TlsError};
