//! A scenario's `[replay]` on a spawned platform: `parley replay rebuild --follow` into a
//! new SQLite file in the run's directory, then `parley replay switch` to it, while the
//! clients keep sending, as an operator moves a live platform to a rebuilt projection. The
//! ledger checks that no event was lost meanwhile; after the sending, one history page read
//! through a gateway shows whether readers moved: its newest message is one the rebuilt
//! target holds and the old store, which the projector left at the switch, does not.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_events::protocol::{ClientFrame, ServerFrame};
use parley_events::{ClientMsgId, ConversationId};
use parley_projections::{ConversationStore, SqliteStore};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use crate::platform::SpawnedPlatform;
use crate::scenario::ReplayPlan;

/// Longest wait for the rebuild to stop after SIGINT, and for the history page.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the `[replay]` plan did, for the report. Times are seconds after sending started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayFigures {
    /// `sqlite:<run dir>/rebuilt.db`.
    pub target: String,
    pub rebuild_started_at_secs: Option<f64>,
    pub switch_started_at_secs: Option<f64>,
    pub switch_ended_at_secs: Option<f64>,
    pub switch_exit: Option<i32>,
    /// What `parley replay switch` printed: standard output, then standard error.
    pub switch_output: String,
    /// Exit code of the rebuild, stopped with SIGINT after the switch.
    pub rebuild_exit: Option<i32>,
    /// What the rebuild printed on standard output.
    pub rebuild_output: String,
    /// After the sending: the old store's position.
    pub old_store_position: Option<u64>,
    /// After the sending, in the conversation of the first send slot: the newest message a
    /// gateway's history page shows, and the rebuilt target's newest up to that one.
    pub newest_shown: Option<u64>,
    pub newest_in_target: Option<u64>,
    pub conversation: Option<String>,
    /// The history page came from the rebuilt target: the target holds its newest message,
    /// and that is above the old store's position (the old store no longer moves).
    pub read_from_target: bool,
    pub error: Option<String>,
}

impl ReplayFigures {
    /// The switch moved every live role and readers read the rebuilt target.
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.switch_exit == Some(0) && self.read_from_target
    }

    /// Lines for the report's table.
    pub fn text(&self) -> String {
        let at = |t: Option<f64>| t.map_or("-".to_owned(), |t| format!("{t:.1} s"));
        let code = |c: Option<i32>| c.map_or("none".to_owned(), |c| c.to_string());
        let mut out = format!(
            "\nReplay into {}: rebuild (--follow) started at {}; switch started at {}, ended at {} (exit {}), printing:\n",
            self.target,
            at(self.rebuild_started_at_secs),
            at(self.switch_started_at_secs),
            at(self.switch_ended_at_secs),
            code(self.switch_exit)
        );
        for line in self.switch_output.lines() {
            out.push_str(&format!("  | {line}\n"));
        }
        out.push_str(&format!(
            "  rebuild stopped with SIGINT after the switch (exit {}): {}\n",
            code(self.rebuild_exit),
            self.rebuild_output.trim()
        ));
        let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        out.push_str(&format!(
            "  after the sending: a gateway's history shows newest {}, the rebuilt target holds {}, the old store stopped at {}: {}\n",
            show(self.newest_shown),
            show(self.newest_in_target),
            show(self.old_store_position),
            if self.read_from_target {
                "read from the rebuilt target"
            } else {
                "NOT shown to come from the rebuilt target"
            }
        ));
        if let Some(e) = &self.error {
            out.push_str(&format!("  error: {e}\n"));
        }
        out
    }
}

/// Rebuild into `<dir>/rebuilt.db` from `plan.rebuild_at_secs` after `sending_start`,
/// switch to it at `plan.switch_at_secs`, then stop the rebuild.
pub async fn rebuild_and_switch(
    platform: Arc<Mutex<SpawnedPlatform>>,
    plan: ReplayPlan,
    sending_start: Instant,
    dir: PathBuf,
) -> ReplayFigures {
    let mut figures = ReplayFigures {
        target: format!("sqlite:{}", dir.join("rebuilt.db").display()),
        ..ReplayFigures::default()
    };
    if let Err(e) = drive(&platform, &plan, sending_start, &dir, &mut figures).await {
        figures.error = Some(e);
    }
    figures
}

async fn drive(
    platform: &Mutex<SpawnedPlatform>,
    plan: &ReplayPlan,
    sending_start: Instant,
    dir: &Path,
    figures: &mut ReplayFigures,
) -> Result<(), String> {
    let since = |at: Instant| at.duration_since(sending_start).as_secs_f64();
    tokio::time::sleep_until(
        (sending_start + Duration::from_secs_f64(plan.rebuild_at_secs)).into(),
    )
    .await;
    let log = dir.join("logs").join("replay-rebuild.log");
    let log = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let target = figures.target.clone();
    let mut rebuild = tool(platform, &["rebuild", "--follow", "--to", &target])
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting parley replay rebuild: {e}"))?;
    figures.rebuild_started_at_secs = Some(since(Instant::now()));

    tokio::time::sleep_until((sending_start + Duration::from_secs_f64(plan.switch_at_secs)).into())
        .await;
    figures.switch_started_at_secs = Some(since(Instant::now()));
    let switched = tool(platform, &["switch", "--to", &target, "--wait-secs", "30"])
        .output()
        .await
        .map_err(|e| format!("running parley replay switch: {e}"))?;
    figures.switch_ended_at_secs = Some(since(Instant::now()));
    figures.switch_exit = switched.status.code();
    figures.switch_output = format!(
        "{}{}",
        String::from_utf8_lossy(&switched.stdout),
        String::from_utf8_lossy(&switched.stderr)
    );

    // The rebuild follows until interrupted, as an operator's Ctrl-C stops it.
    if let Some(pid) = rebuild.id() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    }
    let mut stdout = rebuild.stdout.take().expect("piped");
    let mut printed = String::new();
    let stopped = tokio::time::timeout(STOP_TIMEOUT, async {
        use tokio::io::AsyncReadExt as _;
        let _ = stdout.read_to_string(&mut printed).await;
        rebuild.wait().await
    })
    .await;
    figures.rebuild_output = printed;
    match stopped {
        Ok(Ok(status)) => figures.rebuild_exit = status.code(),
        Ok(Err(e)) => return Err(format!("waiting for the rebuild: {e}")),
        Err(_) => {
            let _ = rebuild.kill().await;
            return Err(format!(
                "the rebuild did not stop within {} s of SIGINT",
                STOP_TIMEOUT.as_secs()
            ));
        }
    }
    Ok(())
}

/// `parley replay ARGS` with the platform's settings.
fn tool(platform: &Mutex<SpawnedPlatform>, args: &[&str]) -> tokio::process::Command {
    let mut command = platform.lock().unwrap().tool("replay");
    command.args(args);
    command
}

/// After the sending: read the newest message of `conversation` through the gateway at
/// `gateway_url` (as the user of `token`) and compare it with both stores.
pub async fn check_reads(
    figures: &mut ReplayFigures,
    old_store: &Path,
    gateway_url: &str,
    token: &str,
    conversation: ConversationId,
) {
    figures.conversation = Some(conversation.to_string());
    if let Err(e) = compare_reads(figures, old_store, gateway_url, token, conversation).await {
        figures.error.get_or_insert(e);
    }
}

async fn compare_reads(
    figures: &mut ReplayFigures,
    old_store: &Path,
    gateway_url: &str,
    token: &str,
    conversation: ConversationId,
) -> Result<(), String> {
    let rebuilt = figures
        .target
        .strip_prefix("sqlite:")
        .expect("a SQLite target");
    figures.newest_shown =
        tokio::time::timeout(STOP_TIMEOUT, newest_shown(gateway_url, token, conversation))
            .await
            .map_err(|_| "no history page within 30 s".to_owned())??;
    let Some(shown) = figures.newest_shown else {
        return Err("the history page is empty".to_owned());
    };
    // Read after the page: both stores only grow, so the target holds what it showed.
    let open =
        |path: &Path| SqliteStore::open(path).map_err(|e| format!("{}: {e}", path.display()));
    let old = open(old_store)?;
    let new = open(Path::new(rebuilt))?;
    let old_position = old.position().await.map_err(|e| e.to_string())?;
    figures.old_store_position = Some(old_position);
    figures.newest_in_target = new
        .history(conversation, Some(shown + 1), 1)
        .await
        .map_err(|e| e.to_string())?
        .messages
        .first()
        .map(|m| m.seq);
    figures.read_from_target = figures.newest_in_target == Some(shown) && shown > old_position;
    Ok(())
}

/// The newest message of `conversation` a history page from the gateway shows.
async fn newest_shown(
    url: &str,
    token: &str,
    conversation: ConversationId,
) -> Result<Option<u64>, String> {
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{url}?protocol=2&access_token={token}"))
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
    let id = ClientMsgId::parse("replay-check").expect("valid id");
    let frame = ClientFrame::History {
        id: id.clone(),
        conversation,
        before: None,
        after: None,
        limit: Some(1),
    };
    let text = serde_json::to_string(&frame).expect("a frame serializes");
    socket
        .send(Message::text(text))
        .await
        .map_err(|e| e.to_string())?;
    while let Some(message) = socket.next().await {
        let Message::Text(text) = message.map_err(|e| e.to_string())? else {
            continue;
        };
        match serde_json::from_str(&text) {
            Ok(ServerFrame::History {
                id: answered,
                messages,
                ..
            }) if answered == id => {
                let _ = socket.close(None).await;
                return Ok(messages.first().map(|m| m.seq));
            }
            Ok(ServerFrame::Error {
                id: Some(answered),
                code,
                message,
                ..
            }) if answered == id => {
                return Err(format!("history refused: {code:?} {message}"));
            }
            _ => {}
        }
    }
    Err("the gateway closed the socket before the history page".to_owned())
}
