//! The presence probe: how long after a socket opens its co-members see it online, and
//! after it closes, offline. Runs during the scenario's sending, on sockets of its own
//! (protocol version 2, users of their own), so the scenario's load is the background.
//!
//! Per pair, on a schedule: a watcher connects, opens the direct conversation with its peer
//! (who is not connected) and asks for the peer's presence (offline); then the peer's socket
//! opens, on another gateway when there are several, and the time from the start of its
//! connect to the watcher's `presence_changed` online is recorded; then the peer closes,
//! and the time from its close frame to the watcher's `presence_changed` offline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_events::UserId;
use parley_services::auth;
use parley_services::config::Secret;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::latency::{Latency, Summary};
use crate::unix_secs;

/// Longest wait for any one frame of the probe; a push that has not come by then is missed.
const WAIT: Duration = Duration::from_secs(5);

/// `[presence]` in a scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceProbe {
    /// Watcher and peer pairs, each measured once.
    pub pairs: usize,
    /// Pairs started per second.
    pub per_sec: f64,
}

/// What the probe measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceFigures {
    pub pairs: usize,
    /// From the peer's connect starting to the watcher's `presence_changed` online.
    pub open_to_seen_online: Summary,
    /// From the peer's close frame to the watcher's `presence_changed` offline.
    pub close_to_seen_offline: Summary,
    /// Pairs whose watcher did not see the peer online (or offline) within 5 s.
    pub missed_online: u64,
    pub missed_offline: u64,
    /// Pairs that could not be set up, by what failed.
    pub failed: BTreeMap<String, u64>,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Default)]
struct Measured {
    online: Latency,
    offline: Latency,
    missed_online: u64,
    missed_offline: u64,
    failed: BTreeMap<String, u64>,
}

/// Run the probe against `gateways` (`ws://host:port/ws`); users are named after `tag`.
pub async fn run(
    probe: &PresenceProbe,
    gateways: &[String],
    secret: &Secret,
    tag: &str,
) -> PresenceFigures {
    let measured = Arc::new(Mutex::new(Measured::default()));
    let start = Instant::now();
    let mut pairs = Vec::with_capacity(probe.pairs);
    for i in 0..probe.pairs {
        let at = start + Duration::from_secs_f64(i as f64 / probe.per_sec);
        let watcher = UserId::parse(format!("pw{tag}-{i}")).expect("a valid user id");
        let peer = UserId::parse(format!("pp{tag}-{i}")).expect("a valid user id");
        let url = |user: &UserId, gateway: usize| {
            let token = auth::mint(secret, user, unix_secs(), 3600);
            format!(
                "{}?protocol=2&access_token={token}",
                gateways[gateway % gateways.len()]
            )
        };
        let (watcher_url, peer_url) = (url(&watcher, i), url(&peer, i + 1));
        let measured = Arc::clone(&measured);
        pairs.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let result = pair(&watcher_url, &peer_url, &peer).await;
            let mut m = measured.lock().unwrap();
            match result {
                Ok((online, offline)) => {
                    match online {
                        Some(d) => m.online.record_micros(d.as_micros() as u64),
                        None => m.missed_online += 1,
                    }
                    match offline {
                        Some(d) => m.offline.record_micros(d.as_micros() as u64),
                        None => m.missed_offline += 1,
                    }
                }
                Err(what) => *m.failed.entry(what.to_owned()).or_default() += 1,
            }
        }));
    }
    for pair in pairs {
        let _ = pair.await;
    }
    let m = measured.lock().unwrap();
    PresenceFigures {
        pairs: probe.pairs,
        open_to_seen_online: m.online.summary(),
        close_to_seen_offline: m.offline.summary(),
        missed_online: m.missed_online,
        missed_offline: m.missed_offline,
        failed: m.failed.clone(),
    }
}

/// One pair: the two latencies, `None` for a push that did not come.
async fn pair(
    watcher_url: &str,
    peer_url: &str,
    peer: &UserId,
) -> Result<(Option<Duration>, Option<Duration>), &'static str> {
    let mut watcher = connect(watcher_url).await?;
    // A version 2 socket is sent events only once it has resumed (here: from now).
    send(&mut watcher, json!({"type": "resume", "id": "r"})).await?;
    reply(&mut watcher, |f| f["id"] == "r" && f["type"] == "resumed")
        .await
        .map_err(|_| "no resumed")?;
    send(
        &mut watcher,
        json!({"type": "create_direct", "id": "dm", "peer": peer}),
    )
    .await?;
    // The peer may be watched once the conversation's creation has reached the watcher
    // (before or after the `ack`, which is not needed).
    reply(&mut watcher, |f| {
        f["event"]["type"] == "conversation.created"
    })
    .await
    .map_err(|_| "no conversation.created")?;
    send(
        &mut watcher,
        json!({"type": "presence", "id": "p", "users": [peer]}),
    )
    .await?;
    let answer = reply(&mut watcher, |f| f["id"] == "p")
        .await
        .map_err(|_| "no answer to presence")?;
    if answer["type"] != "presence" || answer["users"][0]["online"] != false {
        return Err("the first answer is not the peer offline");
    }
    let opened = Instant::now();
    let mut peer_socket = connect(peer_url).await?;
    let is_change =
        |online: bool| move |f: &Value| f["type"] == "presence_changed" && f["online"] == online;
    let online = reply(&mut watcher, is_change(true))
        .await
        .ok()
        .map(|_| opened.elapsed());
    let closed = Instant::now();
    let _ = peer_socket.close(None).await;
    let offline = reply(&mut watcher, is_change(false))
        .await
        .ok()
        .map(|_| closed.elapsed());
    let _ = watcher.close(None).await;
    Ok((online, offline))
}

async fn connect(url: &str) -> Result<Socket, &'static str> {
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .map_err(|_| "connect")?;
    reply(&mut socket, |f| f["type"] == "welcome")
        .await
        .map_err(|_| "no welcome")?;
    Ok(socket)
}

async fn send(socket: &mut Socket, frame: Value) -> Result<(), &'static str> {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .map_err(|_| "send")
}

/// Read until a frame `wanted`; other frames (events) are skipped.
async fn reply(
    socket: &mut Socket,
    wanted: impl Fn(&Value) -> bool,
) -> Result<Value, &'static str> {
    let read = async {
        while let Some(message) = socket.next().await {
            if let Ok(Message::Text(text)) = message
                && let Ok(frame) = serde_json::from_str::<Value>(&text)
                && wanted(&frame)
            {
                return Ok(frame);
            }
        }
        Err("socket closed")
    };
    tokio::time::timeout(WAIT, read)
        .await
        .map_err(|_| "timed out")?
}
