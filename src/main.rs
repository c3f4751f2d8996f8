//! The `troupe` command: parses arguments and configuration, then calls the
//! library. Exit codes: 0 success, 1 failure, 2 bad usage or configuration,
//! 3 a named thing (session, agent) does not exist.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The binary uses mimalloc: a turn makes many small short-lived allocations
/// on several threads, where it measured faster than the system allocator.
/// (The library leaves the choice of allocator to its users.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use futures::StreamExt;
use serde_json::json;
use troupe::store::SessionFilter;
use troupe::{Config, Error, Runtime, Session, StreamEvent};

mod cli;

#[derive(Parser)]
#[command(
    name = "troupe",
    version,
    about = "Sessions that remember, for multi-agent applications."
)]
struct Cli {
    /// Config file (default: $TROUPE_CONFIG, else ./config.toml if present, else built-in defaults).
    #[arg(long, global = true, env = "TROUPE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with a session: one turn with --message, else an interactive loop.
    Chat(ChatArgs),
    /// List, show, export, import, delete and clean up sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Checkpoints of a session: create, list, restore.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Numbered versions of a session: list, save, restore.
    #[command(subcommand)]
    Versions(VersionsCmd),
    /// Run a pipeline (or resume one with --resume RUN_ID).
    Run(RunArgs),
    /// Check or draw a pipeline without running it.
    #[command(subcommand)]
    Pipeline(PipelineCmd),
    /// Workflow runs: list, show.
    #[command(subcommand)]
    Runs(RunsCmd),
    /// The agent definitions (agents/*.toml).
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Measure the runtime: per-turn overhead, throughput, cold open, memory.
    Bench(troupe::bench::BenchOptions),
    /// A user's long-term memories: list, search, add, forget.
    #[command(subcommand)]
    Memory(cli::memory::MemoryCmd),
    /// Run the daemon: the runtime over HTTP (REST /v1, OpenAI- and PraisonAI-compatible endpoints).
    Serve(cli::serve::ServeArgs),
    /// Signed session tokens for remote clients.
    #[command(subcommand)]
    Token(cli::serve::TokenCmd),
}

#[derive(Args)]
struct ChatArgs {
    /// Session id (default: a new uuid v4).
    #[arg(long, short)]
    session: Option<String>,
    /// The user the session belongs to.
    #[arg(long, short)]
    user: Option<String>,
    /// The agent to talk to (default: the session's, else `assistant`).
    #[arg(long, short)]
    agent: Option<String>,
    /// Send this one message and exit.
    #[arg(long, short)]
    message: Option<String>,
    /// Print {"session_id", "reply", "message_id"} as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SessionsCmd {
    /// List sessions, most recently updated first.
    List {
        /// Only this user's sessions.
        #[arg(long)]
        user: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show a session: metadata and history (root to head).
    Show {
        /// Session id.
        id: String,
        /// Only the last N messages.
        #[arg(long)]
        limit: Option<usize>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Write a session to a file (JSON, or bincode for .bin).
    Export {
        /// Session id.
        id: String,
        /// The file (default: sessions/ID.json).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Read a session file into the store.
    Import {
        /// The file.
        path: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A session's analytics: interactions, duration, messages and latency per agent, topics, feedback.
    Analytics {
        /// Session id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a session, its checkpoints and the messages nothing else reaches.
    Rm {
        /// Session id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// The branches of a session's conversation tree.
    Branches {
        /// Session id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete the messages nothing reaches any more (no head, checkpoint, version or fork).
    Gc {
        /// Session id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A new session starting at a checkpoint (messages shared, not copied).
    Fork {
        /// Session id.
        id: String,
        /// Checkpoint id.
        checkpoint_id: String,
        /// The new session's id.
        #[arg(long = "as")]
        new_id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A new session with both histories by time and both states merged.
    Merge {
        /// First session (wins ties).
        a: String,
        /// Second session.
        b: String,
        /// The new session's id (default: A_merged).
        #[arg(long = "as")]
        new_id: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete sessions not updated for a while.
    Cleanup {
        /// Age: 30d, 12h, 15m, 45s (a bare number is seconds).
        #[arg(long, value_parser = parse_age)]
        older_than: Duration,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Take a checkpoint (O(1), whatever the history's length).
    Create {
        /// Session id.
        session: String,
        /// A short label.
        #[arg(long)]
        label: Option<String>,
        /// A longer description.
        #[arg(long)]
        description: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List a session's checkpoints, oldest first.
    List {
        /// Session id.
        session: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint (what only it kept reachable goes at the next `sessions gc`).
    Rm {
        /// Session id.
        session: String,
        /// Checkpoint id.
        checkpoint_id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Move the head and small state back to a checkpoint (nothing is deleted).
    Restore {
        /// Session id.
        session: String,
        /// Checkpoint id.
        checkpoint_id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VersionsCmd {
    /// List the saved versions.
    List {
        /// Session id.
        session: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Save a version with a description.
    Save {
        /// Session id.
        session: String,
        /// What this version is.
        #[arg(long, short)]
        description: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Restore a version by number.
    Restore {
        /// Session id.
        session: String,
        /// Version number.
        version: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The pipeline file (TOML or JSON).
    pipeline: PathBuf,
    /// An input, NAME=VALUE (repeatable).
    #[arg(long = "input", short = 'i', value_parser = parse_input)]
    inputs: Vec<(String, String)>,
    /// The session the results go into.
    #[arg(long, short)]
    session: Option<String>,
    /// Continue this run: finished tasks are not run again.
    #[arg(long)]
    resume: Option<String>,
    /// Most tasks at once (default: [workflow] max_parallel).
    #[arg(long)]
    max_parallel: Option<usize>,
    /// Stop starting tasks after the first failure.
    #[arg(long)]
    fail_fast: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_input(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("'{s}' is not NAME=VALUE"))
}

#[derive(Subcommand)]
enum PipelineCmd {
    /// Validate a pipeline (agents, dependencies, cycles, templates).
    Check {
        /// The pipeline file.
        pipeline: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Draw the DAG as Mermaid or Graphviz DOT.
    Graph {
        /// The pipeline file.
        pipeline: PathBuf,
        /// mermaid or dot.
        #[arg(long, default_value = "mermaid")]
        format: troupe::workflow::GraphFormat,
    },
}

#[derive(Subcommand)]
enum RunsCmd {
    /// List runs, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one run and its tasks.
    Show {
        /// Run id.
        run_id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// List the agents.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not an age like 30d, 12h, 15m or 45s"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        "w" => n * 7 * 86_400,
        _ => {
            return Err(format!(
                "'{s}': unknown unit '{unit}' (use s, m, h, d or w)"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match &e {
                e if e.is_not_found() => 3,
                Error::Config(_)
                | Error::Agent(_)
                | Error::Workflow(_)
                | Error::InvalidSessionId { .. } => 2,
                _ => 1,
            })
        }
    }
}

async fn run(cli: Cli) -> troupe::Result<()> {
    let config = Config::discover(cli.config.as_deref())?;
    match cli.command {
        Command::Bench(opts) => return troupe::bench::run_cli(config, opts).await,
        Command::Serve(args) => return cli::serve::serve(config, args).await,
        Command::Token(cmd) => return cli::serve::token(config, cmd).await,
        _ => {}
    }
    let rt = Runtime::builder().config(config).build().await?;
    let result = dispatch(&rt, cli.command).await;
    rt.shutdown().await?;
    result
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn dispatch(rt: &Runtime, command: Command) -> troupe::Result<()> {
    match command {
        Command::Chat(args) => chat(rt, args).await,
        Command::Sessions(cmd) => sessions(rt, cmd).await,
        Command::Checkpoint(cmd) => checkpoints(rt, cmd).await,
        Command::Run(args) => run_pipeline(rt, args).await,
        Command::Pipeline(cmd) => pipeline_cmd(rt, cmd),
        Command::Runs(cmd) => runs(rt, cmd).await,
        Command::Versions(cmd) => versions(rt, cmd).await,
        Command::Agents(AgentsCmd::List { json }) => {
            let agents = rt.agents();
            if json {
                print_json(&json!({ "agents": agents }));
            } else {
                for a in agents {
                    println!("{:<12} {}", a.name, a.role.unwrap_or_default());
                }
            }
            Ok(())
        }
        Command::Memory(cmd) => cli::memory::run(rt, cmd).await,
        Command::Bench(_) | Command::Serve(_) | Command::Token(_) => {
            unreachable!("handled before the runtime starts")
        }
    }
}

async fn chat(rt: &Runtime, args: ChatArgs) -> troupe::Result<()> {
    let mut builder = match &args.session {
        Some(id) => rt.session(id.clone()),
        None => rt.new_session(),
    };
    if let Some(u) = &args.user {
        builder = builder.user(u.clone());
    }
    if let Some(a) = &args.agent {
        builder = builder.agent_named(a.clone());
    }
    let session = builder.open().await?;
    if let Some(message) = args.message {
        let reply = session.chat(message).await?;
        if args.json {
            print_json(&json!({
                "session_id": reply.session_id,
                "reply": reply.reply,
                "message_id": reply.message_id,
                "agent": reply.agent,
            }));
        } else {
            println!("{}", reply.reply);
        }
        return Ok(());
    }
    interactive(&session, args.json).await
}

async fn interactive(session: &Session, json: bool) -> troupe::Result<()> {
    eprintln!(
        "session {} — type a message, /exit or Ctrl-D to leave",
        session.id()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(Ok(line)) = lines.next() else { break };
        let line = line.trim().to_string();
        if line.is_empty() {
            continue;
        }
        if line == "/exit" || line == "/quit" {
            break;
        }
        let mut stream = Box::pin(session.chat_stream(line).await?);
        let mut out = std::io::stdout();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(StreamEvent::Delta(piece)) if !json => {
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                Ok(StreamEvent::Delta(_)) => {}
                Ok(StreamEvent::Done(reply)) => {
                    if json {
                        println!(
                            "{}",
                            json!({"session_id": reply.session_id, "reply": reply.reply, "message_id": reply.message_id})
                        );
                    } else {
                        println!();
                    }
                }
                Err(e) => {
                    println!();
                    eprintln!("error: {e}");
                }
            }
        }
    }
    Ok(())
}

async fn sessions(rt: &Runtime, cmd: SessionsCmd) -> troupe::Result<()> {
    match cmd {
        SessionsCmd::List { user, limit, json } => {
            let list = rt
                .list_sessions(&SessionFilter {
                    user_id: user,
                    limit,
                    ..Default::default()
                })
                .await?;
            if json {
                print_json(&json!({ "sessions": list }));
            } else if list.is_empty() {
                println!("no sessions");
            } else {
                println!("{:<38} {:<14} {:>6}  UPDATED", "SESSION", "USER", "TURNS");
                for s in list {
                    println!(
                        "{:<38} {:<14} {:>6}  {}",
                        s.id,
                        s.user_id.unwrap_or_else(|| "-".into()),
                        s.interactions,
                        s.updated_at.format("%Y-%m-%d %H:%M:%S")
                    );
                }
            }
        }
        SessionsCmd::Show { id, limit, json } => {
            let session = rt.session(id).existing().open().await?;
            let meta = session.metadata().await?;
            let record = session.record().await?;
            let history = match limit {
                Some(l) => session.recent(l).await?,
                None => session.history().await?,
            };
            if json {
                print_json(&json!({
                    "session": meta,
                    "profile": record.profile,
                    "preferences": record.preferences,
                    "user_data": record.user_data,
                    "history": history,
                }));
            } else {
                println!(
                    "session {}  user {}  agents {}  turns {}  created {}  updated {}",
                    meta.session_id,
                    meta.user_id.as_deref().unwrap_or("-"),
                    meta.agents.join(","),
                    meta.interactions,
                    meta.created_at.format("%Y-%m-%d %H:%M:%S"),
                    meta.updated_at.format("%Y-%m-%d %H:%M:%S")
                );
                for m in history {
                    let who = match (&m.agent, m.role) {
                        (Some(a), troupe::Role::Assistant) => a.clone(),
                        _ => m.role.as_str().to_string(),
                    };
                    println!(
                        "[{}] {}: {}",
                        m.created_at.format("%H:%M:%S"),
                        who,
                        m.content
                    );
                }
            }
        }
        SessionsCmd::Export { id, out, json } => {
            let path = out.unwrap_or_else(|| PathBuf::from(format!("sessions/{id}.json")));
            troupe::session::validate_session_id(&id)?;
            let session = rt.session(id.clone()).existing().open().await?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::InvalidRequest(format!("cannot create '{}': {e}", dir.display()))
                })?;
            }
            session.save(&path).await?;
            if json {
                print_json(&json!({"session_id": id, "path": path}));
            } else {
                println!("session {id} written to {}", path.display());
            }
        }
        SessionsCmd::Import { path, json } => {
            let session = Session::load(rt, &path).await?;
            let meta = session.metadata().await?;
            if json {
                print_json(
                    &json!({"session_id": meta.session_id, "interactions": meta.interactions}),
                );
            } else {
                println!(
                    "session {} imported from {}",
                    meta.session_id,
                    path.display()
                );
            }
        }
        SessionsCmd::Analytics { id, json } => cli::memory::analytics(rt, id, json).await?,
        SessionsCmd::Rm { id, json } => {
            let existed = rt.delete_session(&id).await?;
            if !existed {
                return Err(Error::SessionNotFound(id));
            }
            if json {
                print_json(&json!({"deleted": id}));
            } else {
                println!("session {id} deleted");
            }
        }
        SessionsCmd::Branches { id, json } => {
            let s = rt.session(id.clone()).existing().open().await?;
            let branches = s.branches().await?;
            if json {
                print_json(&json!({"session_id": id, "branches": branches}));
            } else {
                for b in branches {
                    println!(
                        "{} {:<24} last {}  from {}",
                        if b.current { "*" } else { " " },
                        b.head.to_string(),
                        b.last_message_at
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "-".into()),
                        b.label.or(b.grew_from).unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        SessionsCmd::Gc { id, json } => {
            let s = rt.session(id.clone()).existing().open().await?;
            let r = s.collect_garbage().await?;
            if json {
                print_json(&json!({"session_id": id, "report": r}));
            } else {
                println!(
                    "session {id}: {} message(s) deleted ({} segment(s) trimmed, {} deleted)",
                    r.messages_deleted, r.segments_trimmed, r.segments_deleted
                );
            }
        }
        SessionsCmd::Fork {
            id,
            checkpoint_id,
            new_id,
            json,
        } => {
            let cp = find_checkpoint(rt, &id, &checkpoint_id).await?;
            let forked = rt.fork(&cp, new_id).await?;
            let n = forked.history().await?.len();
            if json {
                print_json(
                    &json!({"session_id": forked.id(), "forked_from": id, "checkpoint_id": cp.id, "messages": n}),
                );
            } else {
                println!(
                    "session {} forked from {id} at {} ({n} messages)",
                    forked.id(),
                    cp.id
                );
            }
        }
        SessionsCmd::Merge { a, b, new_id, json } => {
            let sa = rt.session(a.clone()).existing().open().await?;
            let sb = rt.session(b.clone()).existing().open().await?;
            let (merged, report) = match new_id {
                Some(n) => sa.merge_as(&sb, n).await?,
                None => sa.merge(&sb).await?,
            };
            if json {
                print_json(
                    &json!({"session_id": merged.id(), "messages": report.messages, "conflicts": report.conflicts}),
                );
            } else {
                println!(
                    "session {} merged from {a} and {b}: {} messages, {} conflicting key(s)",
                    merged.id(),
                    report.messages,
                    report.conflicts.len()
                );
                for c in report.conflicts {
                    println!(
                        "  {}.{}: {} vs {} -> {}",
                        c.section, c.key, c.a, c.b, c.winner
                    );
                }
            }
        }
        SessionsCmd::Cleanup {
            older_than,
            dry_run,
            json,
        } => {
            let ids = if dry_run {
                let cutoff = troupe::runtime::cutoff(older_than)?;
                rt.list_sessions(&SessionFilter {
                    updated_before: Some(cutoff),
                    ..Default::default()
                })
                .await?
                .into_iter()
                .map(|s| s.id)
                .collect()
            } else {
                rt.cleanup(older_than).await?
            };
            if json {
                print_json(&json!({"deleted": ids, "dry_run": dry_run}));
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!("{verb} {} session(s)", ids.len());
                for id in ids {
                    println!("  {id}");
                }
            }
        }
    }
    Ok(())
}

async fn find_checkpoint(
    rt: &Runtime,
    session: &str,
    checkpoint_id: &str,
) -> troupe::Result<troupe::checkpoint::Checkpoint> {
    let s = rt.session(session.to_string()).existing().open().await?;
    s.checkpoints()
        .await?
        .into_iter()
        .find(|c| c.id == checkpoint_id)
        .ok_or_else(|| {
            troupe::store::StoreError::NotFound {
                what: "checkpoint",
                id: format!("{checkpoint_id} (of session {session})"),
            }
            .into()
        })
}

fn checkpoint_json(c: &troupe::checkpoint::Checkpoint) -> serde_json::Value {
    json!({
        "id": c.id,
        "session_id": c.session_id,
        "label": c.label,
        "description": c.description,
        "kind": c.kind,
        "head": c.head,
        "interactions": c.state.interactions,
        "created_at": c.created_at,
    })
}

async fn checkpoints(rt: &Runtime, cmd: CheckpointCmd) -> troupe::Result<()> {
    match cmd {
        CheckpointCmd::Create {
            session,
            label,
            description,
            json,
        } => {
            let s = rt.session(session).existing().open().await?;
            let cp = s
                .checkpoint_with(
                    label,
                    description,
                    troupe::checkpoint::CheckpointKind::Manual,
                )
                .await?;
            if json {
                print_json(&checkpoint_json(&cp));
            } else {
                println!("checkpoint {} of session {}", cp.id, cp.session_id);
            }
        }
        CheckpointCmd::List { session, json } => {
            let s = rt.session(session.clone()).existing().open().await?;
            let list = s.checkpoints().await?;
            if json {
                let items: Vec<_> = list.iter().map(checkpoint_json).collect();
                print_json(&json!({"session_id": session, "checkpoints": items}));
            } else if list.is_empty() {
                println!("no checkpoints");
            } else {
                for c in list {
                    println!(
                        "{}  {:<7} turns {:>4}  {}  {}",
                        c.id,
                        format!("{:?}", c.kind).to_lowercase(),
                        c.state.interactions,
                        c.created_at.format("%Y-%m-%d %H:%M:%S"),
                        c.label.unwrap_or_default()
                    );
                }
            }
        }
        CheckpointCmd::Rm {
            session,
            checkpoint_id,
            json,
        } => {
            let s = rt.session(session.clone()).existing().open().await?;
            if !s.delete_checkpoint(&checkpoint_id).await? {
                return Err(troupe::store::StoreError::NotFound {
                    what: "checkpoint",
                    id: format!("{checkpoint_id} (of session {session})"),
                }
                .into());
            }
            if json {
                print_json(&json!({"deleted": checkpoint_id, "session_id": session}));
            } else {
                println!("checkpoint {checkpoint_id} deleted");
            }
        }
        CheckpointCmd::Restore {
            session,
            checkpoint_id,
            json,
        } => {
            let s = rt.session(session).existing().open().await?;
            let meta = s.restore_id(&checkpoint_id).await?;
            if json {
                print_json(&json!({"session": meta, "checkpoint_id": checkpoint_id}));
            } else {
                println!(
                    "session {} restored to {checkpoint_id} ({} turns)",
                    meta.session_id, meta.interactions
                );
            }
        }
    }
    Ok(())
}

async fn versions(rt: &Runtime, cmd: VersionsCmd) -> troupe::Result<()> {
    match cmd {
        VersionsCmd::List { session, json } => {
            let s = rt.session(session.clone()).existing().open().await?;
            let list = s.list_versions().await?;
            if json {
                print_json(&json!({"session_id": session, "versions": list}));
            } else if list.is_empty() {
                println!("no versions");
            } else {
                for v in list {
                    println!(
                        "v{:<4} {}  {}",
                        v.version,
                        v.timestamp.format("%Y-%m-%d %H:%M:%S"),
                        v.description.unwrap_or_default()
                    );
                }
            }
        }
        VersionsCmd::Save {
            session,
            description,
            json,
        } => {
            let s = rt.session(session.clone()).existing().open().await?;
            let v = s.save_version(description).await?;
            if json {
                print_json(&json!({"session_id": session, "version": v}));
            } else {
                println!("session {session}: saved version {v}");
            }
        }
        VersionsCmd::Restore {
            session,
            version,
            json,
        } => {
            let s = rt.session(session.clone()).existing().open().await?;
            let meta = s.restore_version(version).await?;
            if json {
                print_json(&json!({"session": meta, "version": version}));
            } else {
                println!("session {session} restored to version {version}");
            }
        }
    }
    Ok(())
}

fn load_pipeline(
    rt: &Runtime,
    path: &std::path::Path,
) -> troupe::Result<troupe::workflow::Pipeline> {
    let agents: Vec<String> = rt.agents().into_iter().map(|a| a.name).collect();
    Ok(troupe::workflow::Pipeline::load_checked(path, &agents)?)
}

fn pipeline_cmd(rt: &Runtime, cmd: PipelineCmd) -> troupe::Result<()> {
    match cmd {
        PipelineCmd::Check { pipeline, json } => {
            let p = load_pipeline(rt, &pipeline)?;
            let order: Vec<String> = p.order()?.into_iter().map(str::to_string).collect();
            if json {
                print_json(
                    &json!({"pipeline": p.name, "valid": true, "tasks": p.tasks.len(), "order": order}),
                );
            } else {
                println!(
                    "pipeline '{}' ({}) is valid: {} tasks, order {}",
                    p.name,
                    pipeline.display(),
                    p.tasks.len(),
                    order.join(" -> ")
                );
            }
        }
        PipelineCmd::Graph { pipeline, format } => {
            let p = load_pipeline(rt, &pipeline)?;
            print!("{}", troupe::workflow::graph::render(&p, format));
        }
    }
    Ok(())
}

async fn run_pipeline(rt: &Runtime, args: RunArgs) -> troupe::Result<()> {
    use troupe::workflow::{RunEvent, RunOptions};
    let pipeline = load_pipeline(rt, &args.pipeline)?;
    let wf = &rt.config().workflow;
    let opts = RunOptions {
        inputs: args.inputs.into_iter().collect(),
        session: args.session,
        max_parallel: args.max_parallel.unwrap_or(wf.max_parallel),
        fail_fast: args.fail_fast,
        retry_backoff: Duration::from_millis(wf.retry_backoff_ms),
        resume: args.resume,
        cancel: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = std::time::Instant::now();
    let total = pipeline.tasks.len() as u64;
    // Progress on stderr (stdout stays clean for --json): a bar with the
    // running tasks on a terminal, plain timestamped lines otherwise.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tasks  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    });
    let progress = tokio::spawn(async move {
        let mut running: Vec<String> = Vec::new();
        let say = |line: String| match &bar {
            Some(pb) => pb.println(line),
            None => eprintln!("{line}"),
        };
        while let Some(ev) = rx.recv().await {
            let t = started.elapsed().as_secs_f64();
            match ev {
                RunEvent::Started {
                    run_id,
                    already_done,
                } => {
                    say(format!("[{t:6.1}s] run {run_id} started"));
                    if !already_done.is_empty() {
                        say(format!(
                            "[{t:6.1}s] resuming: already done {}",
                            already_done.join(", ")
                        ));
                        if let Some(pb) = &bar {
                            pb.inc(already_done.len() as u64);
                        }
                    }
                }
                RunEvent::TaskStarted { task, attempt } => {
                    if attempt > 1 {
                        say(format!("[{t:6.1}s] {task}: attempt {attempt}"));
                    } else if bar.is_none() {
                        say(format!("[{t:6.1}s] {task}: started"));
                    }
                    if !running.contains(&task) {
                        running.push(task);
                    }
                }
                RunEvent::TaskRetrying {
                    task,
                    attempt,
                    error,
                } => say(format!(
                    "[{t:6.1}s] {task}: attempt {attempt} failed ({error}); retrying"
                )),
                RunEvent::TaskEnded { task, status, secs } => {
                    running.retain(|r| r != &task);
                    say(format!(
                        "[{t:6.1}s] {task}: {} in {secs:.1}s",
                        status.as_str()
                    ));
                    if let Some(pb) = &bar {
                        pb.inc(1);
                    }
                }
                RunEvent::Ended { status } => {
                    if let Some(pb) = &bar {
                        pb.finish_and_clear();
                    }
                    say(format!("[{t:6.1}s] run {}", status.as_str()));
                }
            }
            if let Some(pb) = &bar {
                pb.set_message(format!("running: {}", running.join(", ")));
            }
        }
    });
    let path = args.pipeline.display().to_string();
    // One WorkflowActor per run; Ctrl-C cancels it: running tasks end and are
    // recorded, the run ends `interrupted`, and `--resume` continues it.
    let handle = troupe::workflow::start_pipeline(rt, pipeline, path, opts, Some(tx));
    let canceller = handle.canceller();
    let mut wait = Box::pin(handle.wait());
    let mut cancelled = false;
    let report = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                eprintln!("interrupted: running tasks finish and are recorded; continue with --resume (Ctrl-C again is ignored; kill -9 is safe too)");
                canceller.cancel().await;
            }
        }
    };
    let _ = progress.await;
    let report = report?;
    if args.json {
        print_json(
            &json!({"id": report.run.id, "pipeline": report.run.pipeline, "status": report.run.status, "tasks": report.tasks}),
        );
    } else {
        for t in &report.tasks {
            println!("== {} ({})", t.task_id, t.status.as_str());
            if let Some(out) = &t.output {
                println!("{out}");
            }
            if let Some(err) = &t.error {
                println!("error: {err}");
            }
        }
        println!("run {} {}", report.run.id, report.run.status.as_str());
    }
    if report.run.status != troupe::store::RunStatus::Succeeded {
        return Err(Error::Runtime(format!(
            "run {} {} (resume with: troupe run {} --resume {})",
            report.run.id,
            report.run.status.as_str(),
            args.pipeline.display(),
            report.run.id
        )));
    }
    Ok(())
}

async fn runs(rt: &Runtime, cmd: RunsCmd) -> troupe::Result<()> {
    let store = rt.store();
    match cmd {
        RunsCmd::List { limit, json } => {
            let list = store.list_runs(limit).await?;
            if json {
                print_json(&json!({"runs": list}));
            } else if list.is_empty() {
                println!("no runs");
            } else {
                for r in list {
                    println!(
                        "{}  {:<12} {:<11} {}",
                        r.id,
                        r.pipeline,
                        r.status.as_str(),
                        r.created_at.format("%Y-%m-%d %H:%M:%S")
                    );
                }
            }
        }
        RunsCmd::Show { run_id, json } => {
            let run = store.get_run(&run_id).await?.ok_or_else(|| {
                troupe::store::StoreError::NotFound {
                    what: "run",
                    id: run_id.clone(),
                }
            })?;
            let tasks = store.task_results(&run_id).await?;
            if json {
                print_json(
                    &json!({"id": run.id, "pipeline": run.pipeline, "status": run.status, "inputs": run.inputs, "session_id": run.session_id, "created_at": run.created_at, "tasks": tasks}),
                );
            } else {
                println!(
                    "run {} of {} ({}): {}",
                    run.id,
                    run.pipeline,
                    run.path,
                    run.status.as_str()
                );
                for t in tasks {
                    println!(
                        "  {:<16} {:<10} attempts {}{}",
                        t.task_id,
                        t.status.as_str(),
                        t.attempts,
                        t.error.map(|e| format!("  error: {e}")).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_age;
    use std::time::Duration;

    #[test]
    fn ages() {
        assert_eq!(parse_age("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert_eq!(parse_age("45").unwrap(), Duration::from_secs(45));
        assert!(parse_age("3x").unwrap_err().contains("unknown unit"));
        assert!(parse_age("soon").is_err());
    }
}
