//! Per-branch ingestion actors with group commit.
//!
//! Each branch gets one [`BranchIngestor`] actor, so one branch's sales are stored in a single,
//! serial stream (no lock fights between that branch's terminals) while branches proceed in
//! parallel. While the actor's transaction is running, newly arriving batches queue in its
//! state; when the transaction ends, everything queued goes into the next single
//! [`ledger::ingest_batch`] transaction (group commit), and every waiting request gets its own
//! slice of the outcomes. The transaction runs on the blocking pool, never on an async worker.
//! An event the database refuses is isolated by halving the group ([`commit_isolating`]): it
//! alone is answered `rejected`, every other event of the group is committed.
//!
//! The queue is bounded; a full queue answers `POS_SYNC_STORAGE_FAILED` (503, retryable) at
//! once instead of letting latency grow without bound. Idle actors stop themselves, and the
//! [`IngestRegistry`] starts a fresh one whenever an address turns out dead (stopped or
//! crashed), which is the supervision strategy: an actor holds no state that outlives its
//! queue, so restarting it is always safe.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix::prelude::*;
use thiserror::Error;
use tokio::sync::oneshot;

use crate::db::ledger::{self, IngestOutcome, IngestRequest};
use crate::db::{Database, DbConn, StoreError};
use crate::metrics::Metrics;
use possync_protocol::ErrorCode;

/// Tuning of the branch actors.
#[derive(Debug, Clone, Copy)]
pub struct IngestSettings {
    /// Most events that may wait in one branch actor (queued plus committing).
    pub queue_limit: usize,
    /// An actor with nothing to do for this long stops.
    pub idle_timeout: Duration,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            queue_limit: 10_000,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Why a batch was not ingested. In every case nothing of the batch was stored.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum IngestError {
    /// The branch's queue is full; the terminal should back off and retry.
    #[error("branch ingest queue is full ({limit} events)")]
    QueueFull {
        /// The configured queue limit.
        limit: usize,
    },
    /// The group's transaction failed; it was rolled back.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The actor went away before answering (shutdown or crash).
    #[error("ingestion interrupted")]
    Interrupted,
}

/// What a branch actor answers for one batch: its outcomes in request order, or why none.
pub type IngestResult = Result<Vec<IngestOutcome>, IngestError>;

/// A batch of validated events of one branch, with the channel its answer goes back on.
///
/// The reply travels inside the message (rather than as actix's response) so that a message
/// a stopped actor never received comes back whole from `try_send` and can be re-sent to its
/// replacement, without the registry keeping a copy of every batch just in case.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ingest {
    batch: Vec<IngestRequest>,
    reply: oneshot::Sender<IngestResult>,
}

impl Ingest {
    /// The message for `batch`, and where its answer arrives.
    pub fn new(batch: Vec<IngestRequest>) -> (Ingest, IngestAnswer) {
        let (reply, answer) = oneshot::channel();
        (Ingest { batch, reply }, IngestAnswer(answer))
    }
}

/// The pending answer to one [`Ingest`].
pub struct IngestAnswer(oneshot::Receiver<IngestResult>);

impl IngestAnswer {
    /// Waits for the answer; an actor that went away without answering (shutdown, crash, or a
    /// message dropped unread from its mailbox) yields [`IngestError::Interrupted`].
    pub async fn get(self) -> IngestResult {
        self.0.await.unwrap_or(Err(IngestError::Interrupted))
    }
}

/// The actor that serialises one branch's ingestion.
pub struct BranchIngestor {
    branch_id: String,
    db: Database,
    metrics: Metrics,
    settings: IngestSettings,
    queue: Vec<Ingest>,
    /// Events queued plus events in the running commit.
    waiting_events: usize,
    committing: bool,
    last_active: Instant,
}

impl BranchIngestor {
    /// A new, idle actor for `branch_id`.
    pub fn new(
        branch_id: String,
        db: Database,
        metrics: Metrics,
        settings: IngestSettings,
    ) -> Self {
        BranchIngestor {
            branch_id,
            db,
            metrics,
            settings,
            queue: Vec::new(),
            waiting_events: 0,
            committing: false,
            last_active: Instant::now(),
        }
    }

    /// Starts the next group commit if one is due: nothing running and something queued.
    fn commit_next(&mut self, ctx: &mut Context<Self>) {
        if self.committing || self.queue.is_empty() {
            return;
        }
        self.committing = true;
        let group = std::mem::take(&mut self.queue);
        let mut sizes = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut flat = Vec::new();
        for w in group {
            sizes.push(w.batch.len());
            replies.push(w.reply);
            flat.extend(w.batch);
        }
        let total = flat.len();
        self.metrics.ingest_batch_size.observe(total as f64);
        tracing::debug!(branchId = %self.branch_id, events = total, requests = sizes.len(), "group commit");
        let db = self.db.clone();
        let branch_id = self.branch_id.clone();
        let cuts = request_cuts(&sizes);
        let work = tokio::task::spawn_blocking(move || {
            let mut conn = db.conn()?;
            commit_group(&mut conn, &branch_id, &flat, &cuts)
        });
        ctx.spawn(work.into_actor(self).map(move |joined, act, ctx| {
            let result = match joined {
                Ok(Ok(outcomes)) if outcomes.len() == total => Ok(outcomes),
                Ok(Ok(outcomes)) => Err(IngestError::Storage(format!(
                    "storage returned {} outcomes for {total} events",
                    outcomes.len()
                ))),
                Ok(Err(e)) => Err(IngestError::Storage(e.to_string())),
                Err(e) => Err(IngestError::Storage(format!("ingest task failed: {e}"))),
            };
            if let Err(e) = &result {
                tracing::error!(branchId = %act.branch_id, events = total, errorCode = %ErrorCode::PosSyncStorageFailed, cause = %e, "group commit failed");
            }
            distribute(result, &sizes, replies);
            act.waiting_events = act.waiting_events.saturating_sub(total);
            act.metrics.queued_events.sub(total as i64);
            act.committing = false;
            act.last_active = Instant::now();
            act.commit_next(ctx);
        }));
    }
}

/// Offsets in the flat group where one request ends and the next begins (never 0 or the end).
fn request_cuts(sizes: &[usize]) -> Vec<usize> {
    let mut cuts = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for size in sizes {
        at += size;
        cuts.push(at);
    }
    // Inside the group only: a cut at 0 or at the end would split off nothing and recurse
    // forever on the same range.
    cuts.retain(|c| *c > 0 && *c < at);
    cuts.dedup();
    cuts
}

/// Commits a group through [`commit_isolating`], except that a group of several events of
/// which the database refused every one is a storage failure, not a group of bad events:
/// a database that refuses all rows (a full disk, say, which diesel reports like a refused
/// value) must get the retryable 503, never `rejected`, which a till would park. Nothing of
/// such a group was stored, so the 503's "nothing stored" holds.
fn commit_group(
    conn: &mut DbConn,
    branch_id: &str,
    events: &[IngestRequest],
    cuts: &[usize],
) -> Result<Vec<IngestOutcome>, StoreError> {
    let outcomes = commit_isolating(conn, branch_id, events, cuts)?;
    if outcomes.len() > 1 && outcomes.iter().all(|o| *o == IngestOutcome::Refused) {
        return Err(StoreError::Unavailable(format!(
            "the database refused every one of {} events; taken as its own failure",
            outcomes.len()
        )));
    }
    Ok(outcomes)
}

/// Commits `events` in as few transactions as the database allows: all in one, and only when
/// the database refuses a row, each half on its own, recursively — so one event the database
/// cannot store never blocks the rest of its branch.
///
/// Halves are cut at request boundaries (`cuts`) while the range spans several requests, so
/// a request is split only once it alone holds the refused row. Halving keeps order: an earlier
/// half commits before a later one, so a key repeated across halves resolves against its first
/// occurrence exactly as inside one transaction. A single event refused while the database
/// still answers (`SELECT 1`) and is refused again, for the same reason, in a fresh transaction
/// is the poison: answered [`IngestOutcome::Refused`]; stored on the second attempt, it is
/// stored; refused differently, the group fails retryably. Finding it costs about 2·log2(n) + 1
/// extra transactions, paid only when a refusal happens. Any other
/// failure — the database unreachable, or silent after a refusal — fails the group with
/// [`StoreError::Unavailable`], so a sale is never refused for the database's own trouble.
fn commit_isolating(
    conn: &mut DbConn,
    branch_id: &str,
    events: &[IngestRequest],
    cuts: &[usize],
) -> Result<Vec<IngestOutcome>, StoreError> {
    match ledger::ingest_batch(conn, events) {
        Err(StoreError::Refused(cause)) if events.len() == 1 => {
            crate::db::select_one(conn).map_err(|e| {
                StoreError::Unavailable(format!(
                    "the database stopped answering after refusing a row ({cause}): {e}"
                ))
            })?;
            let e = &events[0].event;
            // A refusal is final only if it repeats: the same event, in a fresh transaction,
            // refused for the same reason. A refusal caused by the moment (contention, a
            // timeout, a resource the classifier does not know) does not repeat, and a sale
            // is a fact that must not be parked for it.
            match ledger::ingest_batch(conn, events) {
                Err(StoreError::Refused(again)) if again == cause => {
                    tracing::warn!(branchId = %branch_id, terminalId = %e.terminal_id,
                        eventId = e.local_event_id, errorCode = ErrorCode::PosSyncEventInvalid.as_str(),
                        cause = %cause, "the database refused one event twice; the rest of its group is committed");
                    Ok(vec![IngestOutcome::Refused])
                }
                Ok(outcomes) => Ok(outcomes),
                Err(again) => {
                    tracing::warn!(branchId = %branch_id, terminalId = %e.terminal_id,
                        eventId = e.local_event_id, errorCode = ErrorCode::PosSyncStorageFailed.as_str(),
                        first = %cause, second = %again, "a refused event failed differently on its retry; answered retryable");
                    Err(StoreError::Unavailable(format!(
                        "after a refusal ({cause}) the retry failed differently: {again}"
                    )))
                }
            }
        }
        Err(StoreError::Refused(_)) => {
            let mid = events.len() / 2;
            let split = cuts
                .iter()
                .copied()
                .min_by_key(|c| c.abs_diff(mid))
                .unwrap_or(mid);
            let (first, second) = events.split_at(split);
            let first_cuts: Vec<usize> = cuts.iter().copied().filter(|c| *c < split).collect();
            let second_cuts: Vec<usize> = cuts
                .iter()
                .filter(|c| **c > split)
                .map(|c| c - split)
                .collect();
            let mut out = commit_isolating(conn, branch_id, first, &first_cuts)?;
            out.extend(commit_isolating(conn, branch_id, second, &second_cuts)?);
            Ok(out)
        }
        other => other,
    }
}

/// Hands each waiting request its own slice of the group's outcomes (or the group's error).
fn distribute(result: IngestResult, sizes: &[usize], replies: Vec<oneshot::Sender<IngestResult>>) {
    match result {
        Ok(outcomes) => {
            let mut rest = outcomes.into_iter();
            for (size, reply) in sizes.iter().zip(replies) {
                let mine: Vec<IngestOutcome> = rest.by_ref().take(*size).collect();
                // The requester may have gone (client hung up); its events are stored anyway.
                let _ = reply.send(Ok(mine));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

impl Actor for BranchIngestor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.metrics.branch_actors.inc();
        ctx.set_mailbox_capacity(1024);
        let tick = (self.settings.idle_timeout / 4).max(Duration::from_millis(10));
        ctx.run_interval(tick, |act, ctx| {
            if !act.committing
                && act.queue.is_empty()
                && act.last_active.elapsed() >= act.settings.idle_timeout
            {
                tracing::debug!(branchId = %act.branch_id, "branch actor idle, stopping");
                ctx.stop();
            }
        });
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        // Never drop queued work: an actor with pending batches keeps running.
        if self.committing || !self.queue.is_empty() {
            Running::Continue
        } else {
            Running::Stop
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.metrics.branch_actors.dec();
    }
}

impl Handler<Ingest> for BranchIngestor {
    type Result = ();

    fn handle(&mut self, msg: Ingest, ctx: &mut Self::Context) {
        let n = msg.batch.len();
        self.last_active = Instant::now();
        // The requester may have gone (client hung up); nothing is lost by not answering it.
        if n == 0 {
            let _ = msg.reply.send(Ok(Vec::new()));
            return;
        }
        if self.waiting_events + n > self.settings.queue_limit {
            let limit = self.settings.queue_limit;
            let _ = msg.reply.send(Err(IngestError::QueueFull { limit }));
            return;
        }
        self.queue.push(msg);
        self.waiting_events += n;
        self.metrics.queued_events.add(n as i64);
        self.commit_next(ctx);
    }
}

/// Maps branch ids to their live actor, starting one on first use and replacing dead ones.
pub struct IngestRegistry {
    db: Database,
    metrics: Metrics,
    settings: IngestSettings,
    actors: Mutex<HashMap<String, Addr<BranchIngestor>>>,
}

impl IngestRegistry {
    /// An empty registry; actors start on demand.
    pub fn new(db: Database, metrics: Metrics, settings: IngestSettings) -> Self {
        IngestRegistry {
            db,
            metrics,
            settings,
            actors: Mutex::new(HashMap::new()),
        }
    }

    /// The branch's live actor, or a new one if it has none or its actor's mailbox is closed
    /// (a closed mailbox never reopens, so `connected()` is exactly "a send would come back
    /// `Closed`"). Under the lock, so concurrent callers that met the same dead actor agree
    /// on one replacement.
    fn addr(&self, branch_id: &str) -> Addr<BranchIngestor> {
        let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = actors.get(branch_id).filter(|a| a.connected()) {
            return addr.clone();
        }
        // Drop addresses of actors that stopped, so the map does not grow with old branches.
        actors.retain(|_, a| a.connected());
        let addr = BranchIngestor::new(
            branch_id.to_string(),
            self.db.clone(),
            self.metrics.clone(),
            self.settings,
        )
        .start();
        actors.insert(branch_id.to_string(), addr.clone());
        addr
    }

    /// Ingests `batch` (all of `branch_id`) through that branch's actor and waits for its
    /// group commit. A dead actor (idle-stopped or crashed) hands the message back unread; it
    /// is replaced once and the message re-sent, which is safe because a batch an actor never
    /// received was never stored.
    pub async fn ingest(&self, branch_id: &str, batch: Vec<IngestRequest>) -> IngestResult {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (mut msg, answer) = Ingest::new(batch);
        for _ in 0..2 {
            let addr = self.addr(branch_id);
            match addr.try_send(msg) {
                Ok(()) => return answer.get().await,
                // A full mailbox: wait for room (the actor drains it quickly; it only queues).
                Err(SendError::Full(m)) => {
                    return match addr.send(m).await {
                        Ok(()) => answer.get().await,
                        Err(_) => Err(IngestError::Interrupted),
                    };
                }
                Err(SendError::Closed(m)) => {
                    tracing::warn!(branchId = %branch_id, "branch actor was gone; starting a new one");
                    msg = m;
                }
            }
        }
        Err(IngestError::Interrupted)
    }

    /// Number of branch actors currently registered and alive.
    pub fn live_actors(&self) -> usize {
        let actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        actors.values().filter(|a| a.connected()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn distribute_gives_each_request_its_own_slice_in_order() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let outcomes: Vec<IngestOutcome> = ids
            .iter()
            .map(|id| IngestOutcome::Accepted {
                cloud_event_id: *id,
                chain_break: false,
            })
            .collect();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        let (tx3, mut rx3) = oneshot::channel();
        distribute(Ok(outcomes.clone()), &[2, 0, 3], vec![tx1, tx2, tx3]);
        assert_eq!(rx1.try_recv().ok(), Some(Ok(outcomes[0..2].to_vec())));
        assert_eq!(rx2.try_recv().ok(), Some(Ok(vec![])));
        assert_eq!(rx3.try_recv().ok(), Some(Ok(outcomes[2..5].to_vec())));
    }

    #[test]
    fn cuts_are_the_inner_request_boundaries() {
        assert_eq!(request_cuts(&[3]), Vec::<usize>::new());
        assert_eq!(request_cuts(&[2, 0, 3, 1]), vec![2, 5]);
        assert_eq!(request_cuts(&[0, 4]), Vec::<usize>::new());
        assert_eq!(request_cuts(&[3, 0]), Vec::<usize>::new());
    }

    #[test]
    fn distribute_fails_every_request_of_a_failed_group() {
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        distribute(
            Err(IngestError::Storage("down".into())),
            &[1, 1],
            vec![tx1, tx2],
        );
        for r in [rx1.try_recv(), rx2.try_recv()] {
            assert_eq!(r.ok(), Some(Err(IngestError::Storage("down".into()))));
        }
    }
}
