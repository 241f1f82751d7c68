//! Rate limits: token buckets on every request, per user and per IP address, and on
//! upgrades, per IP address; a socket that keeps sending while limited is closed. And a
//! count of the connections each address holds open, capped.
//!
//! The buckets live in this gateway process only, so N gateways let a user or an address
//! through N times over at most. That is accepted: the limits are there to keep one client
//! from taking a gateway's (and behind it the handlers') capacity from the others, which a
//! per-process bucket does for that process; an exact global count would need a shared
//! store on every request's path. A limited request does nothing (it never reaches the
//! intake) and is answered `rate_limited` with how long to wait.
//!
//! Memory: a bucket that has refilled to its burst is the same as no bucket, so a sweep
//! every `sweep_secs` drops those; what stays is the users and addresses that sent within
//! the last refill time.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_events::protocol::{ClientFrame, ServerFrame};
use parley_events::{ClientMsgId, UserId};

use crate::config::RateLimitsConfig;
use crate::telemetry;

/// Which limit refused a request; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Ip,
    Upgrade,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Ip => "ip",
            Scope::Upgrade => "upgrade",
        }
    }
}

/// A refusal: which limit, and how long until the request would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub retry_after: Duration,
}

impl Limited {
    /// The wait in whole milliseconds, rounded up (never 0: that would invite a retry that
    /// fails again).
    pub fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.retry_after.as_micros().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The wait in whole seconds, rounded up, for an HTTP `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after_ms().div_ceil(1000)
    }
}

/// A bucket's rate and size.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    fn new(per_sec: u32, burst: u32) -> Rate {
        Rate {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
        }
    }

    /// How long until `tokens` (less than 1) grows to one token.
    fn wait_for_one(self, tokens: f64) -> Duration {
        Duration::from_secs_f64((1.0 - tokens) / self.per_sec)
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// The tokens at `now`: refilled since the last look, never above the burst.
    fn level(&self, rate: Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate.per_sec).min(rate.burst)
    }
}

/// The buckets of one scope, by key.
struct Buckets<K> {
    scope: Scope,
    rate: Rate,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(scope: Scope, rate: Rate) -> Self {
        Buckets {
            scope,
            rate,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `key`, or say how long until there is one.
    fn take(&self, key: &K, now: Instant) -> Result<(), Limited> {
        let mut map = self.map.lock().expect("bucket lock poisoned");
        take_from(&mut map, self.scope, self.rate, key, now)
    }

    /// Drop the buckets that are full again: their keys are as if never seen.
    fn sweep(&self, now: Instant) -> usize {
        let mut map = self.map.lock().expect("bucket lock poisoned");
        map.retain(|_, bucket| bucket.level(self.rate, now) < self.rate.burst);
        map.len()
    }
}

/// Take one token for `key` from `map`; a key not in it starts with a full bucket.
fn take_from<K: Hash + Eq + Clone>(
    map: &mut HashMap<K, Bucket>,
    scope: Scope,
    rate: Rate,
    key: &K,
    now: Instant,
) -> Result<(), Limited> {
    let level = map.get(key).map_or(rate.burst, |b| b.level(rate, now));
    if level < 1.0 {
        return Err(Limited {
            scope,
            retry_after: rate.wait_for_one(level),
        });
    }
    let taken = Bucket {
        tokens: level - 1.0,
        at: now,
    };
    // The key is cloned (a user id allocates) only for a bucket that is new.
    match map.get_mut(key) {
        Some(bucket) => *bucket = taken,
        None => {
            map.insert(key.clone(), taken);
        }
    }
    Ok(())
}

/// The key of an address's buckets: IPv4 addresses one by one, IPv6 by /64, the smallest
/// network one subscriber usually gets (counting each of its addresses apart would let one
/// client through 2^64 times). An IPv4-mapped IPv6 address is its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(u32),
    V6Prefix(u64),
}

impl AddressKey {
    fn of(ip: IpAddr) -> AddressKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => {
                AddressKey::V6Prefix(u64::try_from(u128::from(v6) >> 64).expect("64 bits"))
            }
        }
    }
}

/// Every bucket of one gateway.
pub struct RateLimits {
    config: RateLimitsConfig,
    users: Buckets<UserId>,
    addresses: Buckets<AddressKey>,
    upgrades: Buckets<AddressKey>,
}

impl RateLimits {
    pub fn new(config: &RateLimitsConfig) -> Arc<RateLimits> {
        Arc::new(RateLimits {
            users: Buckets::new(
                Scope::User,
                Rate::new(config.user_per_sec, config.user_burst),
            ),
            addresses: Buckets::new(Scope::Ip, Rate::new(config.ip_per_sec, config.ip_burst)),
            upgrades: Buckets::new(
                Scope::Upgrade,
                Rate::new(config.upgrades_per_ip_per_sec, config.upgrades_per_ip_burst),
            ),
            config: config.clone(),
        })
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        exempt(&self.config.exempt_networks, ip)
    }

    /// An upgrade from `ip`: allowed, or refused (and counted).
    pub fn upgrade(&self, ip: IpAddr) -> Result<(), Limited> {
        self.upgrade_at(ip, Instant::now())
    }

    fn upgrade_at(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        if self.exempt(ip) {
            return Ok(());
        }
        self.upgrades
            .take(&AddressKey::of(ip), now)
            .inspect_err(count)
    }

    /// A request by `user` from `ip`: allowed (a token taken from both buckets), or refused
    /// (and counted) with no token taken from either, so a user held back by the address
    /// limit keeps their own budget.
    fn request_at(&self, user: &UserId, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        let mut users = self.users.map.lock().expect("bucket lock poisoned");
        if self.exempt(ip) {
            return take_from(&mut users, Scope::User, self.users.rate, user, now)
                .inspect_err(count);
        }
        // Always users, then addresses: one lock order everywhere.
        let mut addresses = self.addresses.map.lock().expect("bucket lock poisoned");
        let key = AddressKey::of(ip);
        let user_level = users
            .get(user)
            .map_or(self.users.rate.burst, |b| b.level(self.users.rate, now));
        let address_level = addresses.get(&key).map_or(self.addresses.rate.burst, |b| {
            b.level(self.addresses.rate, now)
        });
        if user_level >= 1.0 && address_level >= 1.0 {
            take_from(&mut users, Scope::User, self.users.rate, user, now)?;
            take_from(&mut addresses, Scope::Ip, self.addresses.rate, &key, now)?;
            return Ok(());
        }
        // Refused: the longer wait of the two is when the request would pass.
        let waits = [
            (user_level < 1.0).then(|| Limited {
                scope: Scope::User,
                retry_after: self.users.rate.wait_for_one(user_level),
            }),
            (address_level < 1.0).then(|| Limited {
                scope: Scope::Ip,
                retry_after: self.addresses.rate.wait_for_one(address_level),
            }),
        ];
        let limited = waits
            .into_iter()
            .flatten()
            .max_by_key(|l| l.retry_after)
            .expect("one of the two refused");
        count(&limited);
        Err(limited)
    }

    /// Drop the buckets of users and addresses that have been idle long enough to be full.
    fn sweep(&self, now: Instant) {
        for (buckets, scope) in [
            (self.users.sweep(now), Scope::User),
            (self.addresses.sweep(now), Scope::Ip),
            (self.upgrades.sweep(now), Scope::Upgrade),
        ] {
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!(telemetry::GATEWAY_RATE_LIMIT_BUCKETS, "scope" => scope.as_str())
                .set(buckets as f64);
        }
    }

    /// Sweep every `sweep_secs`, for as long as the gateway runs.
    pub async fn sweep_forever(self: Arc<Self>) {
        let period = Duration::from_secs(self.config.sweep_secs);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep(Instant::now());
        }
    }

    /// Buckets held now, over all scopes.
    #[cfg(test)]
    fn buckets(&self) -> usize {
        self.users.map.lock().unwrap().len()
            + self.addresses.map.lock().unwrap().len()
            + self.upgrades.map.lock().unwrap().len()
    }
}

fn exempt(networks: &[ipnet::IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.iter().any(|n| n.contains(&ip))
}

/// The connections each address holds open, from accept to close, at most `max` each
/// (`exempt_networks` are not counted). Addresses with none open take no memory.
pub struct ConnectionCounts {
    max: usize,
    exempt_networks: Vec<ipnet::IpNet>,
    open: Mutex<HashMap<AddressKey, usize>>,
}

/// One counted connection; dropping it (when the connection, upgraded or not, has closed)
/// gives its place back.
pub struct ConnectionSlot {
    counts: Arc<ConnectionCounts>,
    key: Option<AddressKey>,
}

impl ConnectionCounts {
    pub fn new(max: usize, exempt_networks: &[ipnet::IpNet]) -> Arc<ConnectionCounts> {
        Arc::new(ConnectionCounts {
            max,
            exempt_networks: exempt_networks.to_vec(),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a new connection from `ip`, or `None` when it holds `max` already.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let key = if exempt(&self.exempt_networks, ip) {
            None
        } else {
            let key = AddressKey::of(ip);
            let mut open = self.open.lock().expect("connection counts poisoned");
            let count = open.entry(key).or_insert(0);
            if *count >= self.max {
                return None;
            }
            *count += 1;
            Some(key)
        };
        Some(ConnectionSlot {
            counts: Arc::clone(self),
            key,
        })
    }

    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self.counts.open.lock().expect("connection counts poisoned");
        if let std::collections::hash_map::Entry::Occupied(mut entry) = open.entry(key) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

fn count(limited: &Limited) {
    metrics::counter!(telemetry::GATEWAY_RATE_LIMITED_TOTAL, "scope" => limited.scope.as_str())
        .increment(1);
}

/// One socket's record of its refused requests, to tell a client that backs off from one
/// that floods, and to hold the socket's requests until its refused one would pass.
pub struct Flood {
    limit: u32,
    window: Duration,
    window_start: Instant,
    refused: u32,
    /// Until when the socket's requests are refused, and which limit refused the first.
    held: Option<(Instant, Scope)>,
}

/// What to do with a request of a socket.
pub enum Verdict {
    Pass,
    /// Answer this frame instead.
    Refuse(Box<ServerFrame>),
    /// Close the socket (1008) with this reason.
    Close(&'static str),
}

/// Shortest time a socket's requests are held after one was refused: longer than the round
/// trip in which a client still sends requests it wrote before the refusal reached it.
const MIN_HOLD: Duration = Duration::from_secs(1);

/// The close reason of a socket that kept sending while limited.
pub const FLOOD_CLOSE_REASON: &str = "rate limit: too many requests while limited";

impl Flood {
    pub fn new(config: &RateLimitsConfig) -> Flood {
        Flood {
            limit: config.flood_limited_requests,
            window: Duration::from_secs(config.flood_window_secs),
            window_start: Instant::now(),
            refused: 0,
            held: None,
        }
    }

    /// The verdict on the text frame `text` of `user`'s socket from `ip`.
    pub fn check(&mut self, limits: &RateLimits, user: &UserId, ip: IpAddr, text: &str) -> Verdict {
        self.check_at(limits, user, ip, text, Instant::now())
    }

    fn check_at(
        &mut self,
        limits: &RateLimits,
        user: &UserId,
        ip: IpAddr,
        text: &str,
        now: Instant,
    ) -> Verdict {
        // After a refusal the socket's later requests are refused too, for the wait and at
        // least [`MIN_HOLD`]: those the client sent before it learned of the refusal must not
        // pass once a token is back and overtake the refused one, which the client sends
        // again only after the wait.
        let limited = match self.held {
            Some((until, scope)) if now < until => {
                let limited = Limited {
                    scope,
                    retry_after: until - now,
                };
                count(&limited);
                limited
            }
            _ => match limits.request_at(user, ip, now) {
                Ok(()) => {
                    self.held = None;
                    return Verdict::Pass;
                }
                Err(mut limited) => {
                    limited.retry_after = limited.retry_after.max(MIN_HOLD);
                    self.held = Some((now + limited.retry_after, limited.scope));
                    limited
                }
            },
        };
        if now.duration_since(self.window_start) > self.window {
            self.window_start = now;
            self.refused = 0;
        }
        self.refused += 1;
        if self.refused >= self.limit {
            return Verdict::Close(FLOOD_CLOSE_REASON);
        }
        Verdict::Refuse(Box::new(ServerFrame::rate_limited(
            request_id(text),
            limited.retry_after_ms(),
        )))
    }
}

/// The `id` of a request frame, when it has a valid one, as its error would name it.
fn request_id(text: &str) -> Option<ClientMsgId> {
    match ClientFrame::parse(text) {
        Ok(frame) => frame.id().cloned(),
        Err(e) => e.request_id().cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_max_connections_and_closing_one_frees_a_place() {
        let counts = ConnectionCounts::new(2, &["127.0.0.0/8".parse().unwrap()]);
        let first = counts.open(ip("10.0.0.1")).expect("first");
        let _second = counts.open(ip("10.0.0.1")).expect("second");
        assert!(counts.open(ip("10.0.0.1")).is_none(), "third over the cap");
        let _other = counts
            .open(ip("10.0.0.2"))
            .expect("another address counts apart");
        drop(first);
        let _third = counts.open(ip("10.0.0.1")).expect("a place was freed");
        let exempt: Vec<_> = (0..5)
            .map(|_| counts.open(ip("127.0.0.1")).unwrap())
            .collect();
        assert_eq!(counts.addresses(), 2, "exempt addresses are not counted");
        drop(exempt);
        drop(_other);
        assert_eq!(
            counts.addresses(),
            1,
            "an address with none open is forgotten"
        );
    }

    fn config() -> RateLimitsConfig {
        RateLimitsConfig {
            user_per_sec: 10,
            user_burst: 3,
            ip_per_sec: 100,
            ip_burst: 5,
            upgrades_per_ip_per_sec: 2,
            upgrades_per_ip_burst: 2,
            exempt_networks: vec!["127.0.0.0/8".parse().unwrap()],
            ..RateLimitsConfig::default()
        }
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_user_gets_the_burst_then_one_request_per_refill() {
        let limits = RateLimits::new(&config());
        let (alice, from) = (user("alice"), ip("192.0.2.1"));
        let start = Instant::now();
        for _ in 0..3 {
            limits.request_at(&alice, from, start).unwrap();
        }
        let limited = limits.request_at(&alice, from, start).unwrap_err();
        assert_eq!(limited.scope, Scope::User);
        assert_eq!(limited.retry_after_ms(), 100, "one token at 10/s");
        let later = start + Duration::from_millis(100);
        limits.request_at(&alice, from, later).unwrap();
        assert!(limits.request_at(&alice, from, later).is_err());
        limits
            .request_at(&user("bob"), from, later)
            .expect("bob has his own bucket");
    }

    #[test]
    fn an_address_limits_all_its_users_and_a_refusal_costs_nobody_a_token() {
        let limits = RateLimits::new(&config());
        let from = ip("2001:db8::1");
        let start = Instant::now();
        for name in ["a", "b", "c", "d", "e"] {
            limits.request_at(&user(name), from, start).unwrap();
        }
        // Another address of the same /64 is the same subscriber.
        let limited = limits
            .request_at(&user("f"), ip("2001:db8::ffff"), start)
            .unwrap_err();
        assert_eq!(limited.scope, Scope::Ip);
        assert_eq!(limited.retry_after_ms(), 10, "one token at 100/s");
        // Refused by the address, "a" kept their two remaining tokens.
        limits
            .request_at(&user("a"), ip("198.51.100.7"), start)
            .unwrap();
        limits
            .request_at(&user("a"), ip("198.51.100.7"), start)
            .unwrap();
        assert_eq!(
            limits
                .request_at(&user("a"), ip("198.51.100.7"), start)
                .unwrap_err()
                .scope,
            Scope::User
        );
        limits
            .request_at(&user("f"), ip("2001:db8:0:1::1"), start)
            .expect("another /64 is another subscriber");
    }

    #[test]
    fn exempt_networks_skip_the_address_limits_only() {
        let limits = RateLimits::new(&config());
        let start = Instant::now();
        for n in 0..20 {
            limits
                .request_at(&user(&format!("u{n}")), ip("127.0.0.1"), start)
                .unwrap();
            limits.upgrade_at(ip("127.0.0.2"), start).unwrap();
            // An IPv4-mapped IPv6 loopback is loopback too.
            limits.upgrade_at(ip("::ffff:127.0.0.1"), start).unwrap();
        }
        let alice = user("alice");
        for _ in 0..3 {
            limits.request_at(&alice, ip("127.0.0.1"), start).unwrap();
        }
        assert_eq!(
            limits
                .request_at(&alice, ip("127.0.0.1"), start)
                .unwrap_err()
                .scope,
            Scope::User
        );
    }

    #[test]
    fn upgrades_are_limited_per_address() {
        let limits = RateLimits::new(&config());
        let start = Instant::now();
        limits.upgrade_at(ip("192.0.2.1"), start).unwrap();
        limits.upgrade_at(ip("192.0.2.1"), start).unwrap();
        let limited = limits.upgrade_at(ip("192.0.2.1"), start).unwrap_err();
        assert_eq!(limited.scope, Scope::Upgrade);
        assert_eq!(limited.retry_after_ms(), 500);
        assert_eq!(limited.retry_after_secs(), 1, "rounded up");
        limits.upgrade_at(ip("192.0.2.2"), start).unwrap();
    }

    #[test]
    fn the_sweep_drops_the_buckets_of_idle_users_and_addresses() {
        let limits = RateLimits::new(&config());
        let start = Instant::now();
        for n in 0..1000 {
            let from = IpAddr::from([10, 0, (n / 256) as u8, (n % 256) as u8]);
            limits
                .request_at(&user(&format!("u{n}")), from, start)
                .unwrap();
            limits.upgrade_at(from, start).unwrap();
        }
        let busy = user("busy");
        limits.request_at(&busy, ip("192.0.2.1"), start).unwrap();
        assert_eq!(limits.buckets(), 3 * 1000 + 2);
        // Not yet refilled: everything stays.
        limits.sweep(start + Duration::from_millis(5));
        assert_eq!(limits.buckets(), 3 * 1000 + 2);
        // Refilled: 1 token at 10/s for users (100 ms), at 100/s for addresses (10 ms), at 2/s
        // for upgrades (500 ms). The busy user took another token just before the sweep.
        let idle = start + Duration::from_millis(600);
        limits.request_at(&busy, ip("192.0.2.1"), idle).unwrap();
        limits.sweep(idle);
        assert_eq!(
            limits.buckets(),
            2,
            "only the busy user's and their address's"
        );
        // A key swept away starts again with a full bucket.
        for _ in 0..2 {
            limits.upgrade_at(ip("10.0.0.1"), idle).unwrap();
        }
    }

    #[test]
    fn a_refused_request_holds_the_sockets_later_ones_until_it_would_pass() {
        let config = RateLimitsConfig {
            user_burst: 1,
            user_per_sec: 10,
            ..config()
        };
        let limits = RateLimits::new(&config);
        let mut flood = Flood::new(&config);
        let mut other_socket = Flood::new(&config);
        let alice = user("alice");
        let from = ip("192.0.2.1");
        let send = r#"{"type":"ping","id":"p-1"}"#;
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let waited = |verdict: Verdict| match verdict {
            Verdict::Refuse(frame) => match *frame {
                ServerFrame::Error { retry_after_ms, .. } => retry_after_ms.unwrap(),
                _ => panic!("refused with rate_limited"),
            },
            _ => panic!("refused with rate_limited"),
        };
        assert!(matches!(
            flood.check_at(&limits, &alice, from, send, at(0)),
            Verdict::Pass
        ));
        // A token is back in 100 ms; the socket is held for a second.
        assert_eq!(
            waited(flood.check_at(&limits, &alice, from, send, at(0))),
            1000
        );
        // A token is back, but the hold answers, and takes no token.
        assert_eq!(
            waited(flood.check_at(&limits, &alice, from, send, at(150))),
            850
        );
        // The hold is the socket's own: another socket of the user meets only the bucket.
        assert!(matches!(
            other_socket.check_at(&limits, &alice, from, send, at(150)),
            Verdict::Pass
        ));
        assert_eq!(
            waited(other_socket.check_at(&limits, &alice, from, send, at(200))),
            1000
        );
        assert!(matches!(
            flood.check_at(&limits, &alice, from, send, at(1000)),
            Verdict::Pass
        ));
    }

    #[test]
    fn a_socket_that_keeps_sending_while_limited_is_closed() {
        let config = RateLimitsConfig {
            user_burst: 1,
            user_per_sec: 1,
            flood_limited_requests: 3,
            ..config()
        };
        let limits = RateLimits::new(&config);
        let mut flood = Flood::new(&config);
        let alice = user("alice");
        let from = ip("192.0.2.1");
        let send = r#"{"type":"ping","id":"p-1"}"#;
        assert!(matches!(
            flood.check(&limits, &alice, from, send),
            Verdict::Pass
        ));
        for _ in 0..2 {
            match flood.check(&limits, &alice, from, send) {
                Verdict::Refuse(frame) => match *frame {
                    ServerFrame::Error {
                        id, retry_after_ms, ..
                    } => {
                        assert_eq!(id.unwrap().as_str(), "p-1");
                        assert!(retry_after_ms.unwrap() <= 1000);
                    }
                    _ => panic!("refused with rate_limited"),
                },
                _ => panic!("refused with rate_limited"),
            }
        }
        assert!(matches!(
            flood.check(&limits, &alice, from, "not json"),
            Verdict::Close(FLOOD_CLOSE_REASON)
        ));
    }
}
