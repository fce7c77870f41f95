//! Commit latency of a 3-node openraft cluster on loopback TCP, to ground the cost estimate of
//! `docs/high-availability.md`.
//!
//! Three `openraft::Raft` nodes run in this one process, on one tokio runtime, but they talk to
//! each other only over loopback TCP (each node listens on its own `127.0.0.1` port; an RPC is a
//! length-prefixed JSON frame on a kept-open connection). The leader is asked to commit small
//! entries shaped like a lock operation (`acquire`, a 128-bit session id, one key, a time),
//! first one at a time, then from many concurrent proposers each proposing its own entry, then
//! from as many proposers whose operations a batcher groups into one entry per round (group
//! commit above Raft: while one entry commits, the next batch accumulates). The latency of a
//! write is the time from `client_write` to its answer: appended on the leader, replicated to a
//! majority, applied. Last, the leader is stopped and the time until another node has committed
//! an entry is taken.
//!
//! Two kinds of log storage: `mem` (entries kept in a map, nothing written) and `fsync` (every
//! appended entry is also written to a file and `sync_data`-ed before openraft is told it is
//! flushed, by a flusher thread that group-commits: one sync for every append queued meanwhile;
//! a vote is synced before it counts). The state machine stays in memory in both: it counts the
//! entries it applied and answers each with the count, like a fencing token.
//!
//! Two bare measurements ground the pieces: the round trip of a small request/response over
//! loopback TCP, and the latency of a small `write` + `sync_data` on the disk of `--dir`.
//!
//! Usage: `raft-commit [--entries N] [--concurrency C] [--dir DIR]` (defaults 2000, 16,
//! `target/raft-commit-data`). Not part of the root workspace: build it with its own target dir,
//! `CARGO_TARGET_DIR=$PWD/target cargo run --release` in this directory.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Config, Entry, EntryPayload, LogId, RaftLogId, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, SnapshotPolicy, StorageError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type NodeId = u64;

/// One log entry, shaped like a lock operation of the replicated design.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockOp {
    op: String,
    session: u128,
    key: String,
    at_us: u64,
}

openraft::declare_raft_types!(
    /// An entry is a batch of lock operations (one, unless the proposer batches); the answer is
    /// the counter after the last one.
    pub TypeConfig:
        D = Vec<LockOp>,
        R = u64,
);

type Raft = openraft::Raft<TypeConfig>;

// ---------------------------------------------------------------------------------------------
// Log storage: in memory, optionally with a write + sync_data per append.

#[derive(Clone)]
struct LogStore {
    inner: Arc<Mutex<LogInner>>,
    stats: Arc<AppendStats>,
}

/// How many appends carried how many entries, and how many fsyncs they cost.
#[derive(Default)]
struct AppendStats {
    appends: AtomicU64,
    entries: AtomicU64,
    fsyncs: AtomicU64,
}

struct LogInner {
    last_purged: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    committed: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    /// `Some` in `fsync` mode: the thread that writes and syncs appended entries.
    flusher: Option<std::sync::mpsc::Sender<FlushJob>>,
    /// `Some` in `fsync` mode: every vote is written here and synced before it counts.
    vote_file: Option<std::fs::File>,
}

/// Entries to write and sync, and whom to tell when they are.
type FlushJob = (Vec<u8>, LogFlushed<TypeConfig>);

/// Group commit: takes every job queued, writes them all, syncs once, then tells each job's
/// callback (in order). While one sync runs, the next appends queue up behind it.
fn run_flusher(
    mut file: std::fs::File,
    jobs: std::sync::mpsc::Receiver<FlushJob>,
    stats: Arc<AppendStats>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let mut bytes = Vec::new();
        for (b, _) in &batch {
            bytes.extend_from_slice(b);
        }
        let result = file.write_all(&bytes).and_then(|()| file.sync_data());
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        for (_, callback) in batch {
            callback.log_io_completed(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
        }
    }
}

impl LogStore {
    /// In memory only, or (with `files`: log, vote) also written and synced.
    fn new(files: Option<(std::fs::File, std::fs::File)>) -> Self {
        let stats: Arc<AppendStats> = Arc::default();
        let (flusher, vote_file) = match files {
            Some((log_file, vote_file)) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let thread_stats = stats.clone();
                std::thread::spawn(move || run_flusher(log_file, rx, thread_stats));
                (Some(tx), Some(vote_file))
            }
            None => (None, None),
        };
        LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                last_purged: None,
                log: BTreeMap::new(),
                committed: None,
                vote: None,
                flusher,
                vote_file,
            })),
            stats,
        }
    }
}

fn write_synced(file: &mut std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    tokio::task::block_in_place(|| {
        file.write_all(bytes)?;
        file.sync_data()
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock().await;
        Ok(inner.log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.inner.lock().await;
        let last = inner.log.values().next_back().map(|e| *e.get_log_id());
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.inner.lock().await;
        if let Some(file) = inner.vote_file.as_mut() {
            let bytes = serde_json::to_vec(vote).expect("a vote serializes");
            write_synced(file, &bytes).map_err(|e| openraft::StorageIOError::write_vote(&e))?;
        }
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().await.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.inner.lock().await.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().await.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let mut inner = self.inner.lock().await;
        let entries: Vec<_> = entries.into_iter().collect();
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.stats
            .entries
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        let mut bytes = Vec::new();
        if inner.flusher.is_some() {
            for entry in &entries {
                serde_json::to_writer(&mut bytes, entry).expect("an entry serializes");
                bytes.push(b'\n');
            }
        }
        for entry in entries {
            inner.log.insert(entry.get_log_id().index, entry);
        }
        match &inner.flusher {
            // Readable at once; flushed (and reported so) by the flusher thread.
            Some(flusher) => flusher
                .send((bytes, callback))
                .expect("the flusher thread runs"),
            None => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.inner.lock().await;
        inner.log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.inner.lock().await;
        inner.last_purged = Some(log_id);
        let keep = inner.log.split_off(&(log_id.index + 1));
        inner.log = keep;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// State machine: counts applied entries (answers each with the count, like a fencing token).

#[derive(Clone, Default)]
struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
}

#[derive(Default, Serialize, Deserialize)]
struct SmInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    counter: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let sm = self.inner.lock().await;
        let data = serde_json::to_vec(&*sm).expect("the state serializes");
        let meta = SnapshotMeta {
            last_log_id: sm.last_applied,
            last_membership: sm.membership.clone(),
            snapshot_id: format!("{:?}", sm.last_applied),
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let sm = self.inner.lock().await;
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<u64>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let mut sm = self.inner.lock().await;
        let mut answers = Vec::new();
        for entry in entries {
            sm.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => answers.push(0),
                EntryPayload::Normal(ops) => {
                    sm.counter += ops.len() as u64;
                    answers.push(sm.counter);
                }
                EntryPayload::Membership(m) => {
                    sm.membership = StoredMembership::new(Some(entry.log_id), m);
                    answers.push(0);
                }
            }
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let state: SmInner =
            serde_json::from_slice(snapshot.get_ref()).expect("a snapshot we wrote");
        *self.inner.lock().await = state;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------
// Network: length-prefixed JSON frames over loopback TCP, one kept-open connection per target.

#[derive(Serialize, Deserialize)]
enum RpcRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

#[derive(Serialize, Deserialize)]
enum RpcResponse {
    Append(AppendEntriesResponse<NodeId>),
    Vote(VoteResponse<NodeId>),
    Snapshot(InstallSnapshotResponse<NodeId>),
    Failed(String),
}

async fn write_frame(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame).await
}

async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// Serves the Raft RPCs of one node on its listener, one task per connection.
async fn serve(listener: TcpListener, raft: Raft) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        stream.set_nodelay(true).expect("nodelay");
        let raft = raft.clone();
        tokio::spawn(async move {
            while let Ok(body) = read_frame(&mut stream).await {
                let request: RpcRequest = serde_json::from_slice(&body).expect("a frame we wrote");
                let response = match request {
                    RpcRequest::Append(r) => match raft.append_entries(r).await {
                        Ok(r) => RpcResponse::Append(r),
                        Err(e) => RpcResponse::Failed(e.to_string()),
                    },
                    RpcRequest::Vote(r) => match raft.vote(r).await {
                        Ok(r) => RpcResponse::Vote(r),
                        Err(e) => RpcResponse::Failed(e.to_string()),
                    },
                    RpcRequest::Snapshot(r) => match raft.install_snapshot(r).await {
                        Ok(r) => RpcResponse::Snapshot(r),
                        Err(e) => RpcResponse::Failed(e.to_string()),
                    },
                };
                let bytes = serde_json::to_vec(&response).expect("a response serializes");
                if write_frame(&mut stream, &bytes).await.is_err() {
                    return;
                }
            }
        });
    }
}

struct Network {
    addrs: Arc<BTreeMap<NodeId, String>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection {
            addr: self.addrs[&target].clone(),
            stream: None,
        }
    }
}

struct Connection {
    addr: String,
    stream: Option<TcpStream>,
}

impl Connection {
    async fn call<E: std::error::Error>(
        &mut self,
        request: RpcRequest,
    ) -> Result<RpcResponse, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
            stream.set_nodelay(true).expect("nodelay");
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        let body = serde_json::to_vec(&request).expect("a request serializes");
        let result = async {
            write_frame(stream, &body).await?;
            read_frame(stream).await
        }
        .await;
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(e) => {
                self.stream = None;
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        match serde_json::from_slice(&bytes).expect("a frame we wrote") {
            RpcResponse::Failed(message) => Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(message),
            ))),
            response => Ok(response),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RpcRequest::Append(rpc)).await? {
            RpcResponse::Append(r) => Ok(r),
            _ => unreachable!("an append is answered by an append"),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(RpcRequest::Snapshot(rpc)).await? {
            RpcResponse::Snapshot(r) => Ok(r),
            _ => unreachable!("a snapshot is answered by a snapshot"),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RpcRequest::Vote(rpc)).await? {
            RpcResponse::Vote(r) => Ok(r),
            _ => unreachable!("a vote is answered by a vote"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster and the measurements.

struct Cluster {
    nodes: Vec<(Raft, LogStore)>,
}

async fn start_cluster(fsync_dir: Option<&Path>) -> Cluster {
    let config = Arc::new(
        Config {
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_policy: SnapshotPolicy::Never,
            ..Default::default()
        }
        .validate()
        .expect("a valid config"),
    );
    let mut listeners = Vec::new();
    let mut addrs = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        addrs.insert(id, listener.local_addr().expect("addr").to_string());
        listeners.push((id, listener));
    }
    let addrs = Arc::new(addrs);
    let mut nodes = Vec::new();
    for (id, listener) in listeners {
        let files = fsync_dir.map(|dir| {
            let create = |name: String| std::fs::File::create(dir.join(name)).expect("create");
            (
                create(format!("node-{id}.log")),
                create(format!("node-{id}.vote")),
            )
        });
        let log = LogStore::new(files);
        let raft = Raft::new(
            id,
            config.clone(),
            Network {
                addrs: addrs.clone(),
            },
            log.clone(),
            StateMachine::default(),
        )
        .await
        .expect("a raft node");
        tokio::spawn(serve(listener, raft.clone()));
        nodes.push((raft, log));
    }
    let members: BTreeMap<NodeId, BasicNode> = addrs
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    nodes[0].0.initialize(members).await.expect("initialize");
    nodes[0]
        .0
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader == Some(1), "node 1 leads")
        .await
        .expect("a leader within 10 s");
    Cluster { nodes }
}

fn op(i: u64) -> LockOp {
    LockOp {
        op: "acquire".into(),
        session: 0x5eed_0000_0000_0000_0000_0000_0000_0000 | u128::from(i),
        key: format!("key-{:05}", i % 1000),
        at_us: 1_780_000_000_000_000 + i,
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn summary(label: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "  {label:<30} n={:<5} p50 {:>8}  p99 {:>8}  max {:>8}  {:>7.0} commits/s",
        lat.len(),
        us(pct(&lat, 0.50)),
        us(pct(&lat, 0.99)),
        us(*lat.last().expect("some")),
        lat.len() as f64 / wall.as_secs_f64()
    );
}

async fn write_one(leader: &Raft, i: u64) -> Duration {
    let start = Instant::now();
    leader.client_write(vec![op(i)]).await.expect("committed");
    start.elapsed()
}

/// A lock operation waiting for its batch to commit, and where its answer (its counter) goes.
type Proposal = (LockOp, tokio::sync::oneshot::Sender<u64>);

/// Group commit above Raft: takes every proposal queued, proposes them as one entry, answers
/// each; while one entry commits, the next batch accumulates.
async fn run_batcher(leader: Raft, mut proposals: tokio::sync::mpsc::Receiver<Proposal>) {
    while let Some(first) = proposals.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match proposals.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (ops, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = ops.len() as u64;
        let last = leader.client_write(ops).await.expect("committed").data;
        for (i, answer) in answers.into_iter().enumerate() {
            let _ = answer.send(last - n + 1 + i as u64);
        }
    }
}

async fn measure_cluster(label: &str, fsync_dir: Option<&Path>, entries: u64, concurrency: u64) {
    let cluster = start_cluster(fsync_dir).await;
    let leader = cluster.nodes[0].0.clone();
    for i in 0..200 {
        write_one(&leader, i).await;
    }
    println!("log storage: {label}");

    let before = append_totals(&cluster);
    let start = Instant::now();
    let mut lat = Vec::new();
    for i in 0..entries {
        lat.push(write_one(&leader, i).await);
    }
    let wall = start.elapsed();
    summary("1 proposer, one at a time", lat, wall);
    print_batching(&cluster, before, entries);

    let before = append_totals(&cluster);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let leader = leader.clone();
        let per_task = entries / concurrency;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in 0..per_task {
                lat.push(write_one(&leader, t * per_task + i).await);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for task in tasks {
        lat.extend(task.await.expect("a proposer"));
    }
    let wall = start.elapsed();
    let n = lat.len() as u64;
    summary(&format!("{concurrency} concurrent proposers"), lat, wall);
    print_batching(&cluster, before, n);

    let (tx, rx) = tokio::sync::mpsc::channel::<Proposal>(4096);
    tokio::spawn(run_batcher(leader.clone(), rx));
    let before = append_totals(&cluster);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let tx = tx.clone();
        let per_task = entries / concurrency;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in 0..per_task {
                let begin = Instant::now();
                let (answer, token) = tokio::sync::oneshot::channel();
                tx.send((op(t * per_task + i), answer))
                    .await
                    .expect("batcher runs");
                token.await.expect("answered");
                lat.push(begin.elapsed());
            }
            lat
        }));
    }
    drop(tx);
    let mut lat = Vec::new();
    for task in tasks {
        lat.extend(task.await.expect("a proposer"));
    }
    let wall = start.elapsed();
    let n = lat.len() as u64;
    summary(
        &format!("{concurrency} proposers, batched entries"),
        lat,
        wall,
    );
    print_batching(&cluster, before, n);

    // Leader loss: stop node 1 (its port then answers every RPC with an error), time until a
    // new leader has committed an entry, and check the counter went on from where it was.
    let before_loss = leader
        .client_write(vec![op(0)])
        .await
        .expect("committed")
        .data;
    let lost = Instant::now();
    leader.shutdown().await.expect("shutdown");
    let mut after_loss = None;
    while after_loss.is_none() {
        for (raft, _) in &cluster.nodes[1..] {
            if let Ok(answer) = raft.client_write(vec![op(1)]).await {
                after_loss = Some((raft.metrics().borrow().id, answer.data));
                break;
            }
        }
        if after_loss.is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (new_leader, counter) = after_loss.expect("set above");
    println!(
        "  {:<30} {:.0} ms until node {new_leader} led and committed (election timeout 500–1000 ms); \
         counter {before_loss} before, {counter} after",
        "leader 1 stopped",
        lost.elapsed().as_secs_f64() * 1e3,
    );
    for (raft, _) in &cluster.nodes[1..] {
        raft.shutdown().await.expect("shutdown");
    }
}

/// (appends, fsyncs) on the leader and on the followers.
fn append_totals(cluster: &Cluster) -> Vec<(u64, u64)> {
    cluster
        .nodes
        .iter()
        .map(|(_, log)| {
            (
                log.stats.appends.load(Ordering::Relaxed),
                log.stats.fsyncs.load(Ordering::Relaxed),
            )
        })
        .collect()
}

fn print_batching(cluster: &Cluster, before: Vec<(u64, u64)>, commits: u64) {
    let after = append_totals(cluster);
    let d: Vec<(u64, u64)> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1))
        .collect();
    println!(
        "  {:<30} leader {}/{}, followers {}/{} and {}/{} (for {} commits)",
        "log appends/fsyncs", d[0].0, d[0].1, d[1].0, d[1].1, d[2].0, d[2].1, commits,
    );
}

/// Round trip of a 64-byte request and a 64-byte answer over loopback TCP.
async fn measure_tcp_rtt(n: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut buf = [7u8; 64];
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&buf).await.expect("write");
        s.read_exact(&mut buf).await.expect("read");
        lat.push(t.elapsed());
    }
    summary("loopback TCP round trip", lat, start.elapsed());
}

/// A 100-byte append + `sync_data` on a file in `dir`.
fn measure_fsync(dir: &Path, n: usize) {
    let path = dir.join("fsync-probe.log");
    let mut file = std::fs::File::create(&path).expect("create");
    let bytes = [b'x'; 100];
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        file.write_all(&bytes).expect("write");
        file.sync_data().expect("sync_data");
        lat.push(t.elapsed());
    }
    summary("write 100 B + sync_data", lat, start.elapsed());
    let _ = std::fs::remove_file(path);
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let entries: u64 = arg(&args, "--entries").map_or(2000, |v| v.parse().expect("--entries N"));
    let concurrency: u64 =
        arg(&args, "--concurrency").map_or(16, |v| v.parse().expect("--concurrency C"));
    let dir =
        PathBuf::from(arg(&args, "--dir").unwrap_or_else(|| "target/raft-commit-data".into()));
    std::fs::create_dir_all(&dir).expect("create --dir");

    println!(
        "3 openraft 0.9.25 nodes in one process (tokio, {} worker threads), RPCs over loopback TCP; \
         {entries} entries per phase",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("pieces:");
    measure_tcp_rtt(entries as usize).await;
    tokio::task::block_in_place(|| measure_fsync(&dir, 500));

    measure_cluster("mem (nothing written)", None, entries, concurrency).await;
    measure_cluster(
        &format!("fsync (write + sync_data per append, in {})", dir.display()),
        Some(&dir),
        entries,
        concurrency,
    )
    .await;
}
