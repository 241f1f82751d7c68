//! Test support: a whole platform on real servers, and a WebSocket client that reads like
//! the protocol.
//!
//! Every test gets its own nats-server (or cluster of them), redis-server, SQLite file and
//! roles, on free loopback ports, all gone when the [`Platform`] drops.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use parley_events::protocol::{is_packed, unpack_frames};
use parley_events::subjects::{INTAKE_PARTITIONS, INTAKE_STREAM, Shards, handler_consumer};
use parley_events::{ConversationId, EventEnvelope, RecordedEvent, UserId};
use parley_localstack::{
    NatsCluster, NatsClusterOptions, NatsOptions, NatsServer, RedisOptions, RedisServer,
};
use parley_projections::{ConversationStore, PresenceStore, UserPresence};
use parley_services::admin::Readiness;
use parley_services::config::{Config, Secret};
use parley_services::node::{self, Listeners, Roles};
use parley_services::{auth, unix_millis};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
const WAIT: Duration = Duration::from_secs(10);
/// Longest the roles may take to answer a first command after they start.
const STARTUP: Duration = Duration::from_secs(30);
/// Longest one [`eventually`] probe may take before it is abandoned and tried again.
const PROBE_LIMIT: Duration = Duration::from_secs(3);

/// A role running in this process, stoppable on its own.
pub struct Running {
    /// Where the role serves `/healthz`, `/readyz` and `/metrics`.
    admin: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), node::NodeError>>,
    /// Why the role stopped by itself, if it did.
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl Running {
    async fn start(config: Arc<Config>, roles: Roles, gateway: Option<TcpListener>) -> Running {
        let shutdown = CancellationToken::new();
        let failure = Arc::new(std::sync::Mutex::new(None));
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let run = node::run(
            config,
            roles,
            Listeners {
                gateway,
                admin: Some(admin_listener),
            },
            shutdown.clone(),
        );
        let record = Arc::clone(&failure);
        let task = tokio::spawn(async move {
            let result = run.await;
            if let Err(e) = &result {
                *record.lock().unwrap() = Some(e.to_string());
            }
            result
        });
        Running {
            admin,
            shutdown,
            task,
            failure,
        }
    }

    /// Where the role serves `/healthz`, `/readyz` and `/metrics`.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("role stops in time");
        result
            .expect("role task does not panic")
            .expect("role stops cleanly");
    }

    /// Stop the role as a crash would: no clean-up, its NATS connection dropped.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The platform's roles on real servers. `N` is its NATS: one [`NatsServer`], or a
/// [`NatsCluster`] from [`Platform::start_on_cluster`].
pub struct Platform<N = NatsServer> {
    pub nats: N,
    pub redis: RedisServer,
    pub config: Arc<Config>,
    pub gateways: Vec<SocketAddr>,
    dir: tempfile::TempDir,
    handler: Option<Running>,
    projector: Option<Running>,
    others: Vec<Running>,
    /// Handlers started by [`add_handler`](Self::add_handler), beside `handler`.
    added_handlers: usize,
}

impl Platform {
    /// NATS, Redis, one handler, one projector and `gateways` gateways.
    pub async fn start(gateways: usize) -> Platform {
        Self::start_with(gateways, |_| {}).await
    }

    pub async fn start_with(gateways: usize, adjust: impl FnOnce(&mut Config)) -> Platform {
        Self::start_on(
            NatsOptions::default(),
            RedisOptions::default(),
            gateways,
            adjust,
        )
        .await
    }

    /// [`start_with`](Self::start_with) on servers started with these options.
    pub async fn start_on(
        nats: NatsOptions,
        redis: RedisOptions,
        gateways: usize,
        adjust: impl FnOnce(&mut Config),
    ) -> Platform {
        let nats = NatsServer::start(nats).expect("nats-server starts");
        let url = nats.url();
        Platform::launch(nats, url, redis, gateways, adjust).await
    }

    /// [`start_with`](Self::start_with) on a nats-server the test started and filled first
    /// (an old log loaded before any role runs).
    pub async fn start_on_server(
        nats: NatsServer,
        gateways: usize,
        adjust: impl FnOnce(&mut Config),
    ) -> Platform {
        let url = nats.url();
        Platform::launch(nats, url, RedisOptions::default(), gateways, adjust).await
    }
}

impl Platform<NatsCluster> {
    /// [`start_with`](Platform::start_with) on a NATS cluster: the log and the intake are
    /// replicated on every node, and the roles know every node's URL.
    pub async fn start_on_cluster(
        nats: NatsClusterOptions,
        gateways: usize,
        adjust: impl FnOnce(&mut Config),
    ) -> Platform<NatsCluster> {
        let replicas = nats.nodes;
        let cluster = NatsCluster::start(nats).expect("the nats cluster starts");
        let url = cluster.url_list();
        Platform::launch(cluster, url, RedisOptions::default(), gateways, |config| {
            config.log.replicas = replicas;
            config.intake.replicas = replicas;
            adjust(config);
        })
        .await
    }
}

impl<N> Platform<N> {
    /// Redis and the roles, on `nats` (reached at `nats_url`).
    async fn launch(
        nats: N,
        nats_url: String,
        redis: RedisOptions,
        gateways: usize,
        adjust: impl FnOnce(&mut Config),
    ) -> Platform<N> {
        // Role logs (warnings and up, or RUST_LOG) show under a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .try_init();
        let redis = RedisServer::start(redis).expect("redis-server starts");
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.nats.url = Some(Secret::new(nats_url));
        config.redis.url = Some(Secret::new(redis.url()));
        config.auth.secret = Some(Secret::new(SECRET));
        config.log.shards = 16;
        config.handler.lanes = 4;
        config.projector.store.path = dir.path().join("conversations.db");
        config.gateway.command_timeout_secs = 5;
        // Tests send far faster than people do (hundreds of requests by one user in a
        // moment); rate_limits.rs sets the limits it tests. The per-address limits spare
        // loopback by default.
        config.gateway.rate_limits.user_per_sec = 1_000_000;
        config.gateway.rate_limits.user_burst = 1_000_000;
        adjust(&mut config);
        config.validate().expect("test configuration is valid");
        let config = Arc::new(config);

        let handler = Running::start(Arc::clone(&config), Roles::HANDLER, None).await;
        let projector = Running::start(Arc::clone(&config), Roles::PROJECTOR, None).await;
        let mut others = Vec::new();
        let mut addresses = Vec::new();
        for _ in 0..gateways {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addresses.push(listener.local_addr().unwrap());
            others.push(Running::start(Arc::clone(&config), Roles::GATEWAY, Some(listener)).await);
        }
        let platform = Platform {
            nats,
            redis,
            config,
            gateways: addresses,
            dir,
            handler: Some(handler),
            projector: Some(projector),
            others,
            added_handlers: 0,
        };
        platform.wait_until_ready().await;
        platform
    }

    /// Wait until every gateway accepts sockets and the handler answers commands: a probe
    /// user asks for a direct conversation with itself, which only a handler refuses.
    async fn wait_until_ready(&self) {
        for index in 0..self.gateways.len() {
            let mut probe = eventually(|| async {
                self.assert_roles_running().await;
                self.try_connect(index, "probe").await.ok()
            })
            .await;
            probe.next_of(&["welcome"]).await;
            probe
                .send(json!({"type": "create_direct", "id": "ready", "peer": "probe"}))
                .await;
            // A handler still starting (on a cluster, streams still electing leaders) answers
            // late: `timeout` first, then the outcome on the same socket.
            let reply = loop {
                let reply = probe
                    .reply_to_within("ready", STARTUP)
                    .await
                    .expect("the handler answers the probe");
                if reply["code"] != "timeout" {
                    break reply;
                }
            };
            assert_eq!(reply["code"], "invalid_request", "{reply}");
        }
    }

    async fn assert_roles_running(&self) {
        for running in self
            .others
            .iter()
            .chain(&self.handler)
            .chain(&self.projector)
        {
            if running.task.is_finished() {
                running.shutdown.cancel();
                panic!(
                    "a role stopped during start-up: {:?}",
                    running.failure.lock().unwrap()
                );
            }
        }
    }

    pub async fn stop_handler(&mut self) {
        self.handler
            .take()
            .expect("handler is running")
            .stop()
            .await;
        if self.added_handlers > 0 {
            // The others stand by for its partitions.
            return;
        }
        // A stopping handler reads its pull requests out before it returns, but gives up
        // on a server that stops answering; one left behind would take the next command
        // and hold it for the ack wait, so the server is asked to agree that none is left.
        let js = self.jetstream().await;
        eventually(|| async {
            for partition in 0..INTAKE_PARTITIONS {
                let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                    .get_consumer_from_stream(handler_consumer(partition), INTAKE_STREAM)
                    .await
                    .ok()?;
                if consumer.info().await.ok()?.num_waiting != 0 {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    /// Wait until `count` handler instances have announced themselves, the count each
    /// works out its intake partitions from.
    pub async fn handlers_announced(&self, count: usize) {
        use futures::TryStreamExt;
        let js = self.jetstream().await;
        eventually(|| async {
            let bucket = js
                .get_key_value(parley_events::subjects::HANDLERS_BUCKET)
                .await
                .ok()?;
            let keys: Vec<String> = bucket.keys().await.ok()?.try_collect().await.ok()?;
            (keys.len() == count).then_some(())
        })
        .await;
    }

    /// The intake subject a gateway publishes commands to `conversation` on.
    pub fn intake_subject(&self, conversation: ConversationId) -> String {
        Shards::new(self.config.log.shards)
            .expect("the test configuration's shard count is valid")
            .intake_subject(conversation)
    }

    /// Start one more handler instance; it runs until the platform drops.
    pub async fn add_handler(&mut self) {
        self.added_handlers += 1;
        self.others
            .push(Running::start(Arc::clone(&self.config), Roles::HANDLER, None).await);
    }

    /// Start one more gateway, ready for sockets when this returns; it runs until the
    /// platform drops. Its index, for [`connect`](Self::connect) and [`url`](Self::url).
    pub async fn add_gateway(&mut self) -> usize {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.gateways.push(listener.local_addr().unwrap());
        self.others
            .push(Running::start(Arc::clone(&self.config), Roles::GATEWAY, Some(listener)).await);
        let index = self.gateways.len() - 1;
        eventually(|| async {
            self.assert_roles_running().await;
            self.try_connect(index, "probe").await.ok()
        })
        .await;
        index
    }

    /// Shut every role down at once, as a node's SIGTERM does; each must stop cleanly
    /// within [`WAIT`], whatever state NATS is in.
    pub async fn stop_roles(&mut self) {
        futures::future::join_all(self.take_roles().map(Running::stop)).await;
    }

    /// Every role running now, no longer the platform's.
    fn take_roles(&mut self) -> impl Iterator<Item = Running> + use<'_, N> {
        self.others
            .drain(..)
            .chain(self.handler.take())
            .chain(self.projector.take())
    }

    /// The admin address of every role running now: gateways, extra handlers, the handler,
    /// the projector.
    pub fn admin_addresses(&self) -> Vec<SocketAddr> {
        self.others
            .iter()
            .chain(&self.handler)
            .chain(&self.projector)
            .map(|running| running.admin)
            .collect()
    }

    pub async fn start_handler(&mut self) {
        assert!(self.handler.is_none(), "handler is already running");
        self.handler = Some(Running::start(Arc::clone(&self.config), Roles::HANDLER, None).await);
    }

    pub async fn stop_projector(&mut self) {
        self.projector
            .take()
            .expect("projector is running")
            .stop()
            .await;
    }

    pub async fn start_projector(&mut self) {
        assert!(self.projector.is_none(), "projector is already running");
        self.projector =
            Some(Running::start(Arc::clone(&self.config), Roles::PROJECTOR, None).await);
    }

    /// Another projector instance, writing to the SQLite file named `store` in the test's
    /// directory: its own (so a test can tell what each instance applied), or the platform's
    /// own, `conversations.db`.
    pub async fn spawn_projector(&self, store: &str) -> Running {
        Running::start(Arc::new(self.config_on(store)), Roles::PROJECTOR, None).await
    }

    /// The projector's store at `store`, a file [`Platform::spawn_projector`] was given.
    pub async fn store_named(&self, store: &str) -> Arc<dyn ConversationStore> {
        node::open_store(&self.config_on(store)).await.unwrap()
    }

    /// The platform's configuration with the SQLite file named `store` in the test's
    /// directory.
    fn config_on(&self, store: &str) -> Config {
        let mut config = Config::clone(&self.config);
        config.projector.store.path = self.dir.path().join(store);
        config
    }

    pub fn projector_admin(&self) -> SocketAddr {
        self.projector.as_ref().expect("projector is running").admin
    }

    /// The platform's projector, to be stopped or crashed by the test.
    pub fn take_projector(&mut self) -> Running {
        self.projector.take().expect("projector is running")
    }

    /// Wait until the store has applied everything in the log.
    pub async fn projected(&self) {
        let last = self.log().await.last().map_or(0, |e| e.seq);
        let store = self.store().await;
        eventually(|| async { (store.position().await.unwrap() >= last).then_some(()) }).await;
    }

    pub fn token(&self, user: &str) -> String {
        self.token_with(SECRET, user, unix_millis() / 1000, 3600)
    }

    pub fn token_with(&self, secret: &str, user: &str, now_secs: u64, ttl_secs: u64) -> String {
        auth::mint(
            &Secret::new(secret),
            &UserId::parse(user).unwrap(),
            now_secs,
            ttl_secs,
        )
    }

    pub fn url(&self, gateway: usize) -> String {
        format!("ws://{}/ws", self.gateways[gateway])
    }

    /// The upgrade request of `user` to `gateway`, speaking protocol version 1.
    fn request(&self, gateway: usize, user: &str) -> tungstenite::handshake::client::Request {
        self.request_speaking(gateway, user, 1)
    }

    fn request_speaking(
        &self,
        gateway: usize,
        user: &str,
        protocol: u32,
    ) -> tungstenite::handshake::client::Request {
        self.request_with_query(gateway, user, &format!("protocol={protocol}"))
    }

    /// An upgrade request for `user` with `query` (`protocol=2&pack=1`).
    pub fn request_with_query(
        &self,
        gateway: usize,
        user: &str,
        query: &str,
    ) -> tungstenite::handshake::client::Request {
        let url = format!("{}?{query}", self.url(gateway));
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", self.token(user)).parse().unwrap(),
        );
        request
    }

    pub async fn try_connect(
        &self,
        gateway: usize,
        user: &str,
    ) -> Result<Client, tungstenite::Error> {
        Client::open(self.request(gateway, user)).await
    }

    /// [`connect`](Self::connect) over a TCP socket whose receive buffer is about
    /// `receive_buffer` bytes, so that a client that stops reading soon stops the server's
    /// writes too.
    pub async fn connect_with_receive_buffer(
        &self,
        gateway: usize,
        user: &str,
        receive_buffer: u32,
    ) -> Client {
        self.connect_speaking_with_receive_buffer(gateway, user, 1, receive_buffer)
            .await
    }

    /// [`connect_with_receive_buffer`](Self::connect_with_receive_buffer) speaking
    /// `protocol`.
    pub async fn connect_speaking_with_receive_buffer(
        &self,
        gateway: usize,
        user: &str,
        protocol: u32,
        receive_buffer: u32,
    ) -> Client {
        self.connect_asking_with_receive_buffer(
            gateway,
            user,
            &format!("protocol={protocol}"),
            receive_buffer,
        )
        .await
    }

    /// [`connect_with_receive_buffer`](Self::connect_with_receive_buffer) with the upgrade's
    /// `query`.
    pub async fn connect_asking_with_receive_buffer(
        &self,
        gateway: usize,
        user: &str,
        query: &str,
        receive_buffer: u32,
    ) -> Client {
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        tcp.set_recv_buffer_size(receive_buffer).unwrap();
        let tcp = tcp.connect(self.gateways[gateway]).await.unwrap();
        let (socket, _) = tokio_tungstenite::client_async(
            self.request_with_query(gateway, user, query),
            tokio_tungstenite::MaybeTlsStream::Plain(tcp),
        )
        .await
        .expect("connects");
        let mut client = Client {
            socket,
            stash: Default::default(),
            unread: Default::default(),
            packed: Vec::new(),
        };
        assert_eq!(client.next_of(&["welcome"]).await["user"], user);
        client
    }

    /// Connect `user` to `gateway` and read the welcome.
    pub async fn connect(&self, gateway: usize, user: &str) -> Client {
        self.connect_speaking(gateway, user, 1).await
    }

    /// Connect `user` to `gateway` speaking protocol version 2 and resume from now, as a
    /// new device does: the socket is live when this returns.
    pub async fn connect_v2(&self, gateway: usize, user: &str) -> Client {
        let mut client = self.open_v2(gateway, user).await;
        client
            .send(json!({"type": "resume", "id": "connect"}))
            .await;
        let resumed = client.reply_to("connect").await;
        assert_eq!(resumed["type"], "resumed", "{resumed}");
        client
    }

    /// Connect `user` to `gateway` speaking protocol version 2 and read the welcome; the
    /// socket gets no events until it sends `resume`.
    pub async fn open_v2(&self, gateway: usize, user: &str) -> Client {
        self.connect_speaking(gateway, user, 2).await
    }

    async fn connect_speaking(&self, gateway: usize, user: &str, protocol: u32) -> Client {
        let mut client = Client::open(self.request_speaking(gateway, user, protocol))
            .await
            .expect("connects");
        let welcome = client.next_of(&["welcome"]).await;
        assert_eq!(welcome["user"], user);
        assert_eq!(welcome["protocol"], protocol);
        client
    }

    /// JetStream on the platform's NATS, connected as its roles are (TLS included).
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let nats = node::connect_nats(&self.config, &Readiness::default())
            .await
            .unwrap();
        async_nats::jetstream::new(nats.client)
    }

    /// Every event in the log, in order.
    pub async fn log(&self) -> Vec<RecordedEvent> {
        let js = self.jetstream().await;
        let mut stream = js
            .get_stream(parley_events::subjects::LOG_STREAM)
            .await
            .unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut events = Vec::new();
        for seq in 1..=last {
            let message = stream.direct_get(seq).await.unwrap();
            events.push(
                EventEnvelope::from_bytes(&message.payload)
                    .unwrap()
                    .recorded(seq),
            );
        }
        events
    }

    /// The `message.posted` events in the log, in order, as (sequence, body).
    pub async fn posted(&self) -> Vec<(u64, String)> {
        self.log()
            .await
            .into_iter()
            .filter_map(|e| match e.envelope.event {
                parley_events::Event::MessagePosted(posted) => Some((e.seq, posted.body)),
                _ => None,
            })
            .collect()
    }

    /// The bodies of the `message.posted` events in the log, in order.
    pub async fn posted_bodies(&self) -> Vec<String> {
        self.posted()
            .await
            .into_iter()
            .map(|(_, body)| body)
            .collect()
    }

    /// The configured conversation store, opened afresh (a test may have deleted it).
    pub async fn store(&self) -> Arc<dyn ConversationStore> {
        node::open_store(&self.config).await.unwrap()
    }

    pub async fn presence(&self, user: &str) -> UserPresence {
        let client =
            PresenceStore::client(&self.redis.url(), self.config.redis.tls.client().as_ref())
                .unwrap();
        let store = PresenceStore::connect(&client).await.unwrap();
        store
            .status(&UserId::parse(user).unwrap(), unix_millis())
            .await
            .unwrap()
    }

    /// Alice and Bob connected to the first gateway, with their direct conversation.
    pub async fn alice_and_bob(&self) -> (Client, Client, ConversationId) {
        let mut alice = self.connect(0, "alice").await;
        let mut bob = self.connect(0, "bob").await;
        let conversation = self.direct(&mut alice, &mut bob, "bob").await;
        (alice, bob, conversation)
    }

    /// A direct conversation between `a` and `b` (both connected), created by `a`; waits
    /// until `b` has seen it, so `b`'s gateway follows it.
    pub async fn direct(&self, a: &mut Client, b: &mut Client, b_name: &str) -> ConversationId {
        a.send(json!({"type": "create_direct", "id": "dm", "peer": b_name}))
            .await;
        let ack = a.reply_to("dm").await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let conversation: ConversationId = ack["conversation"].as_str().unwrap().parse().unwrap();
        let created = b.next_of(&["event"]).await;
        assert_eq!(created["event"]["type"], "conversation.created");
        let created = a.next_of(&["event"]).await;
        assert_eq!(created["event"]["type"], "conversation.created");
        conversation
    }
}

impl<N> Drop for Platform<N> {
    fn drop(&mut self) {
        for running in self.take_roles() {
            running.shutdown.cancel();
            running.task.abort();
        }
    }
}

/// A `send` of `body` by alice to `conversation` as a gateway would put it on the intake,
/// with its outcome going to `parley.outcome.test`: for tests that play a gateway.
pub fn alice_posts(
    conversation: ConversationId,
    client_id: &str,
    body: &str,
) -> parley_events::Command {
    parley_events::Command::new(
        UserId::parse("alice").unwrap(),
        parley_events::ClientMsgId::parse(client_id).unwrap(),
        unix_millis(),
        "parley.outcome.test".into(),
        parley_events::Action::PostMessage {
            conversation,
            body: body.into(),
            reply_to: None,
        },
    )
}

/// A plain HTTP GET, enough for the admin endpoints: (status, body).
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    http_request(address, "GET", path, &[], "").await
}

/// A plain HTTP/1.1 request with `headers` and `body`: (status, body).
pub async fn http_request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Run a projector node that is expected to refuse its configuration and stop by itself;
/// its result.
pub async fn run_refused_projector(config: Config) -> Result<(), node::NodeError> {
    let run = node::run(
        Arc::new(config),
        Roles::PROJECTOR,
        Listeners {
            gateway: None,
            admin: None,
        },
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("a refused node stops by itself at start")
}

/// `client` sends `frame` and gets its ack, failing on anything else.
pub async fn acked(client: &mut Client, frame: Value) -> Value {
    let id = frame["id"].as_str().unwrap().to_owned();
    client.send(frame.clone()).await;
    let reply = client.reply_to(&id).await;
    assert_eq!(reply["type"], "ack", "{frame}: {reply}");
    reply
}

/// [`acked`]: the sequence of the frame's event.
pub async fn acked_seq(client: &mut Client, frame: Value) -> u64 {
    acked(client, frame).await["seq"].as_u64().unwrap()
}

/// Poll `probe` until it yields something, failing the test after a deadline.
pub async fn eventually<T, F, Fut>(probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(WAIT, probe).await
}

/// [`eventually`] with its own deadline, for what waits on retries with long backoffs.
pub async fn eventually_within<T, F, Fut>(limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // A probe that hangs counts as "not yet" and is tried again: reading an object
        // while the handler replaces it, for one, can wait for chunks that are gone.
        let attempt = (tokio::time::Instant::now() + PROBE_LIMIT).min(deadline);
        if let Ok(Some(value)) = tokio::time::timeout_at(attempt, probe()).await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    socket: Socket,
    /// Frames read while looking for a reply, handed out by later reads in order.
    stash: std::collections::VecDeque<Value>,
    /// The rest of the packed message read last (`pack=1`), not read yet.
    unread: std::collections::VecDeque<Value>,
    /// The types of the frames in each packed message received.
    pub packed: Vec<Vec<String>>,
}

fn is_reply(frame: &Value, id: &str) -> bool {
    frame["id"] == id && frame["type"] != "event"
}

/// How a socket ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Client {
    pub async fn open(
        request: tungstenite::handshake::client::Request,
    ) -> Result<Client, tungstenite::Error> {
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client {
            socket,
            stash: Default::default(),
            unread: Default::default(),
            packed: Vec::new(),
        })
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_raw(Message::Text(frame.to_string().into())).await;
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("send succeeds");
    }

    /// The next text frame (queued ones first), or `None` when none comes within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Value> {
        match self.stash.pop_front() {
            Some(frame) => Some(frame),
            None => self.read_within(limit).await,
        }
    }

    /// Send `frames` back to back, written to the socket together (one write while they
    /// fit in the client's write buffer, 128 KiB).
    pub async fn send_pipelined(&mut self, frames: impl IntoIterator<Item = Value>) {
        for frame in frames {
            self.socket
                .feed(Message::Text(frame.to_string().into()))
                .await
                .expect("send succeeds");
        }
        self.socket.flush().await.expect("send succeeds");
    }

    /// The next text frame, as JSON.
    pub async fn next(&mut self) -> Value {
        if let Some(frame) = self.stash.pop_front() {
            return frame;
        }
        self.read().await
    }

    /// The reply (ack, error, history or pong) to request `id`; frames that arrive before
    /// it (events, in any order relative to the ack) stay queued for `next`.
    pub async fn reply_to(&mut self, id: &str) -> Value {
        self.reply_waiting(id, WAIT)
            .await
            .expect("a frame arrives in time")
    }

    /// [`reply_to`](Self::reply_to) for a reply that may take longer than usual (a cluster
    /// electing a leader): `None` if it has not come within `limit`.
    pub async fn reply_to_within(&mut self, id: &str, limit: Duration) -> Option<Value> {
        tokio::time::timeout(limit, self.reply_waiting(id, limit))
            .await
            .ok()
            .flatten()
    }

    /// The reply to `id`; `None` when no frame at all comes within `frame_limit`.
    async fn reply_waiting(&mut self, id: &str, frame_limit: Duration) -> Option<Value> {
        if let Some(at) = self.stash.iter().position(|f| is_reply(f, id)) {
            return self.stash.remove(at);
        }
        loop {
            let frame = self.read_within(frame_limit).await?;
            if is_reply(&frame, id) {
                return Some(frame);
            }
            self.stash.push_back(frame);
        }
    }

    async fn read(&mut self) -> Value {
        self.read_within(WAIT)
            .await
            .expect("a frame arrives in time")
    }

    /// The next text frame, or `None` when none comes within `limit`.
    async fn read_within(&mut self, limit: Duration) -> Option<Value> {
        match self.read_or_close(limit).await? {
            Ok(frame) => Some(frame),
            Err(closed) => panic!("socket closed: {closed:?}"),
        }
    }

    /// The next text frame (queued ones first), or how the server closed the socket.
    pub async fn next_or_close(&mut self) -> Result<Value, Closed> {
        match self.stash.pop_front() {
            Some(frame) => Ok(frame),
            None => self
                .read_or_close(WAIT)
                .await
                .expect("a frame arrives in time"),
        }
    }

    /// The next text frame or the server's close; `None` when neither comes within
    /// `limit`.
    async fn read_or_close(&mut self, limit: Duration) -> Option<Result<Value, Closed>> {
        if let Some(frame) = self.unread.pop_front() {
            return Some(Ok(frame));
        }
        loop {
            let next = tokio::time::timeout(limit, self.socket.next()).await.ok()?;
            match next {
                Some(Ok(Message::Text(text))) => {
                    let mut frames: std::collections::VecDeque<Value> = unpack_frames(&text)
                        .expect("server sends JSON")
                        .into_iter()
                        .map(|frame| serde_json::from_str(frame).expect("server sends JSON"))
                        .collect();
                    if is_packed(&text) {
                        let types = frames.iter().map(|f| f["type"].to_string()).collect();
                        self.packed.push(types);
                    }
                    let first = frames.pop_front().expect("a packed message is never empty");
                    self.unread = frames;
                    return Some(Ok(first));
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Some(Err(Closed {
                        code: u16::from(frame.code),
                        reason: frame.reason.to_string(),
                    }));
                }
                Some(Ok(Message::Close(None))) => {
                    return Some(Err(Closed {
                        code: u16::from(CloseCode::Status),
                        reason: String::new(),
                    }));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// The next frame whose type is one of `types`; others in between fail the test.
    pub async fn next_of(&mut self, types: &[&str]) -> Value {
        let frame = self.next().await;
        let frame_type = frame["type"].as_str().unwrap_or_default();
        assert!(
            types.contains(&frame_type),
            "expected one of {types:?}, got {frame}"
        );
        frame
    }

    /// No frame arrives within `within` (and none is queued).
    pub async fn expect_silence(&mut self, within: Duration) {
        assert!(self.stash.is_empty(), "unexpected frames: {:?}", self.stash);
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(within, self.socket.next()).await
        {
            panic!("unexpected frame: {text}");
        }
    }

    /// Read until the server closes the socket; its close code and reason.
    pub async fn closed(&mut self) -> Closed {
        loop {
            if let Err(closed) = self.read_or_close(WAIT).await.expect("closes in time") {
                return closed;
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
        while let Some(Ok(_)) = self.socket.next().await {}
    }
}

/// A direct conversation between `a` and `b` as a handler appends it: its creation, then
/// `messages` messages of about a chat line each, the two taking turns; for the figures'
/// logs.
pub fn direct_chat(a: &str, b: &str, messages: u64) -> (ConversationId, Vec<EventEnvelope>) {
    use parley_events::{
        ClientMsgId, CommandId, ConversationCreated, ConversationKind, Event, EventId, Member,
        MessagePosted, Role,
    };
    let user = |name: &str| UserId::parse(name).unwrap();
    let conversation = ConversationId::direct(&user(a), &user(b));
    let envelope = |n: u64, actor: &str, event: Event| {
        let command =
            CommandId::from_client(&user(actor), &ClientMsgId::parse(format!("c{n}")).unwrap());
        EventEnvelope {
            id: EventId::derive(command, 0, 1_700_000_000_000 + n),
            conversation,
            prev: n,
            command,
            actor: user(actor),
            at: 1_700_000_000_000 + n,
            event,
        }
    };
    let created = Event::ConversationCreated(ConversationCreated {
        kind: ConversationKind::Direct,
        title: None,
        members: [a, b]
            .iter()
            .map(|u| Member {
                user: user(u),
                role: Role::Member,
            })
            .collect(),
    });
    let mut all = vec![envelope(0, a, created)];
    all.extend((1..=messages).map(|n| {
        let posted = Event::MessagePosted(MessagePosted {
            client_id: ClientMsgId::parse(format!("m{n}")).unwrap(),
            body: format!("message number {n}, about as long as a short chat line"),
            reply_to: None,
        });
        envelope(n, if n % 2 == 0 { a } else { b }, posted)
    }));
    (conversation, all)
}

/// A configuration for the nats-server at `url` (16 shards), connected, with the log and the
/// intake set up: what the figures start from.
pub async fn topology_on(url: &str) -> (Config, node::Nats, parley_services::topology::Topology) {
    let mut config = Config::default();
    config.nats.url = Some(Secret::new(url));
    config.log.shards = 16;
    let nats =
        parley_services::node::connect_nats(&config, &parley_services::admin::Readiness::default())
            .await
            .unwrap();
    let topology =
        parley_services::topology::ensure(async_nats::jetstream::new(nats.client.clone()), &config)
            .await
            .unwrap();
    (config, nats, topology)
}
