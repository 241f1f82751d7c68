//! `parley replay verify`: two targets, or a target and the log, compared conversation by
//! conversation through the store's reading interface (what gateways show), so it compares
//! a SQLite file with a CQL keyspace as readily as two files.

use std::collections::{BTreeMap, BTreeSet};

use parley_events::{ConversationId, UserId};
use parley_projections::ConversationStore;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::rebuild::{self, RebuildOptions};
use super::{ReplayError, Target};
use crate::config::Config;
use crate::progress::Progress;

/// Rows read per page.
const PAGE: u32 = 500;

/// The other side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    Target(Target),
    /// The log, projected into a temporary SQLite file up to the first side's position.
    Log,
}

impl std::str::FromStr for Side {
    type Err = ReplayError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "log" => Ok(Side::Log),
            target => target.parse().map(Side::Target),
        }
    }
}

/// One thing the two sides show differently; `None`: that side has no such thing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub conversation: Option<String>,
    /// What differs: `conversation`, `members`, `message <seq>`, `event <seq>`,
    /// `read marker <user>`, `inbox <user>`.
    pub what: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub a: String,
    pub b: String,
    pub a_position: u64,
    pub b_position: u64,
    /// Messages and events above this sequence are left out; when the positions differ,
    /// conversation fields later events change (title, last sequence, members) may differ
    /// for that reason alone.
    pub compared_up_to: u64,
    pub conversations: usize,
    pub equal: bool,
    pub differences: Vec<Difference>,
}

/// Compare `a` with `b`: what `parley replay verify` does.
pub async fn run(
    config: &Config,
    a: &Target,
    b: &Side,
    progress: impl FnOnce(Option<u64>) -> Progress,
    shutdown: &CancellationToken,
) -> Result<Report, ReplayError> {
    let store_a = a.open(config).await?;
    match b {
        Side::Target(b) => {
            let store_b = b.open(config).await?;
            compare(
                (&a.to_string(), &*store_a),
                (&b.to_string(), &*store_b),
                progress,
            )
            .await
        }
        Side::Log => {
            let file = std::env::temp_dir().join(format!(
                "parley-verify-{}.db",
                uuid::Uuid::new_v4().simple()
            ));
            let temp = Target::Sqlite(file.clone());
            let until = store_a.position().await?;
            let options = RebuildOptions {
                until: Some(until),
                ..RebuildOptions::new(temp.clone())
            };
            let compared = async {
                rebuild::run(config, &options, |_| Progress::silent("log"), shutdown).await?;
                let store_b = temp.open(config).await?;
                compare((&a.to_string(), &*store_a), ("log", &*store_b), progress).await
            }
            .await;
            for suffix in ["", "-wal", "-shm"] {
                let mut name = file.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
            compared
        }
    }
}

/// Compare two stores up to the lower of their positions.
pub async fn compare(
    (a_name, a): (&str, &dyn ConversationStore),
    (b_name, b): (&str, &dyn ConversationStore),
    progress: impl FnOnce(Option<u64>) -> Progress,
) -> Result<Report, ReplayError> {
    let (a_position, b_position) = (a.position().await?, b.position().await?);
    let bound = a_position.min(b_position);
    let mut conversations = all_conversations(a).await?;
    conversations.extend(all_conversations(b).await?);
    let progress = progress(Some(conversations.len() as u64));
    let mut differences = Vec::new();
    let mut users = BTreeSet::new();
    for &id in &conversations {
        let (seen_a, users_a) = conversation(a, id, bound).await?;
        let (seen_b, users_b) = conversation(b, id, bound).await?;
        users.extend(users_a);
        users.extend(users_b);
        differ(Some(id), seen_a, seen_b, &mut differences);
        progress.advance(1);
    }
    for user in &users {
        let seen_a = inbox(a, user).await?;
        let seen_b = inbox(b, user).await?;
        differ(None, seen_a, seen_b, &mut differences);
    }
    progress.finish(conversations.len() as u64);
    Ok(Report {
        a: a_name.to_owned(),
        b: b_name.to_owned(),
        a_position,
        b_position,
        compared_up_to: bound,
        conversations: conversations.len(),
        equal: differences.is_empty(),
        differences,
    })
}

fn differ(
    conversation: Option<ConversationId>,
    a: BTreeMap<String, String>,
    mut b: BTreeMap<String, String>,
    differences: &mut Vec<Difference>,
) {
    let mut push = |what: String, a: Option<String>, b: Option<String>| {
        differences.push(Difference {
            conversation: conversation.map(|id| id.to_string()),
            what,
            a,
            b,
        });
    };
    for (what, value_a) in a {
        match b.remove(&what) {
            Some(value_b) if value_b == value_a => {}
            value_b => push(what, Some(value_a), value_b),
        }
    }
    for (what, value_b) in b {
        push(what, None, Some(value_b));
    }
}

async fn all_conversations(
    store: &dyn ConversationStore,
) -> Result<BTreeSet<ConversationId>, ReplayError> {
    let mut all = BTreeSet::new();
    let mut after = None;
    loop {
        let page = store.conversations_page(after, PAGE).await?;
        all.extend(page.iter().copied());
        if page.len() < PAGE as usize {
            return Ok(all);
        }
        after = page.last().copied();
    }
}

fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("store values serialize")
}

/// What a reader sees of one conversation, by what it is, and its members.
async fn conversation(
    store: &dyn ConversationStore,
    id: ConversationId,
    bound: u64,
) -> Result<(BTreeMap<String, String>, Vec<UserId>), ReplayError> {
    let mut seen = BTreeMap::new();
    if let Some(details) = store.details(id).await? {
        let view = &details.view;
        seen.insert(
            "conversation".into(),
            format!(
                "kind={} title={} last_seq={} created_at={} member_count={}",
                json(&view.kind),
                json(&view.title),
                view.last_seq,
                details.created_at,
                details.member_count
            ),
        );
    }
    let mut members = Vec::new();
    let mut after: Option<UserId> = None;
    loop {
        let page = store.members_page(id, after.as_ref(), PAGE).await?;
        members.extend(page.members);
        if !page.has_more {
            break;
        }
        after = members.last().map(|m| m.user.clone());
    }
    if !members.is_empty() {
        let listed: Vec<String> = members
            .iter()
            .map(|m| format!("{}:{}", m.user, m.role.as_str()))
            .collect();
        seen.insert("members".into(), listed.join(" "));
    }
    let mut from = 0;
    loop {
        let page = store.history_after(id, from, PAGE).await?;
        for message in page.messages.iter().filter(|m| m.seq <= bound) {
            seen.insert(format!("message {}", message.seq), json(message));
        }
        match page.messages.last() {
            Some(last) if page.has_more && last.seq < bound => from = last.seq,
            _ => break,
        }
    }
    let mut from = 0;
    loop {
        let page = store.events_after(id, from, PAGE).await?;
        for event in page.events.iter().filter(|e| e.seq <= bound) {
            seen.insert(format!("event {}", event.seq), json(event));
        }
        match page.events.last() {
            Some(last) if page.has_more && last.seq < bound => from = last.seq,
            _ => break,
        }
    }
    let users: Vec<UserId> = members.into_iter().map(|m| m.user).collect();
    for user in &users {
        let marker = store.read_marker(id, user).await?;
        if marker > 0 {
            seen.insert(format!("read marker {user}"), marker.to_string());
        }
    }
    Ok((seen, users))
}

/// A user's inbox, entry by entry.
async fn inbox(
    store: &dyn ConversationStore,
    user: &UserId,
) -> Result<BTreeMap<String, String>, ReplayError> {
    let mut seen = BTreeMap::new();
    let mut before = None;
    loop {
        let page = store.inbox(user, before, PAGE).await?;
        for entry in &page {
            seen.insert(
                format!("inbox {user} {}", entry.conversation),
                format!(
                    "kind={} title={} role={} last_seq={} last_activity_at={}",
                    json(&entry.kind),
                    json(&entry.title),
                    entry.role.as_str(),
                    entry.last_seq,
                    entry.last_activity_at
                ),
            );
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => before = Some(last.last_seq),
            _ => return Ok(seen),
        }
    }
}

impl Report {
    /// The report for a terminal: a summary line, then one line per difference.
    pub fn text(&self) -> String {
        let mut out = format!(
            "a: {} at position {}\nb: {} at position {}\ncompared {} conversations up to sequence {}\n",
            self.a,
            self.a_position,
            self.b,
            self.b_position,
            self.conversations,
            self.compared_up_to
        );
        if self.a_position != self.b_position {
            out.push_str("the positions differ: fields that later events change may differ for that reason alone\n");
        }
        for d in &self.differences {
            let short = |v: &Option<String>| match v {
                None => "(none)".to_owned(),
                Some(v) if v.chars().count() > 160 => {
                    format!("{}...", v.chars().take(160).collect::<String>())
                }
                Some(v) => v.clone(),
            };
            let place = d
                .conversation
                .as_ref()
                .map_or(String::new(), |c| format!("conversation {c}: "));
            out.push_str(&format!(
                "differs: {place}{}\n  a: {}\n  b: {}\n",
                d.what,
                short(&d.a),
                short(&d.b)
            ));
        }
        if self.equal {
            out.push_str("equal\n");
        } else {
            out.push_str(&format!("{} differences\n", self.differences.len()));
        }
        out
    }
}
