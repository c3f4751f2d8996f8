//! `troupe memory …` and `troupe sessions analytics`.

use clap::Subcommand;
use serde_json::json;
use troupe::memory::{AddOutcome, MemoryItem};
use troupe::{Error, Runtime};

/// `troupe memory`: a user's long-term memories.
#[derive(Subcommand)]
pub enum MemoryCmd {
    /// List a user's memories (oldest first).
    List {
        /// The user.
        #[arg(long)]
        user: String,
        /// Also the superseded ones (kept as history, never recalled).
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Full-text search of a user's memories (best first).
    Search {
        /// The user.
        #[arg(long)]
        user: String,
        /// The words to look for (any of them).
        query: String,
        /// At most this many.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remember something for a user (scored; may be rejected below the threshold).
    Add {
        /// The user.
        #[arg(long)]
        user: String,
        /// What to remember.
        text: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a user's memories and user record everywhere in the store.
    Forget {
        /// The user.
        #[arg(long)]
        user: String,
        /// Also delete the user's sessions and their checkpoints.
        #[arg(long)]
        sessions: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn line(m: &MemoryItem) -> String {
    let mut s = format!(
        "{}  {:<10} score {:.2}  uses {:<3} {}",
        m.created_at.format("%Y-%m-%d %H:%M:%S"),
        m.kind.as_str(),
        m.score,
        m.uses,
        m.content
    );
    if let Some(by) = &m.superseded_by {
        s.push_str(&format!("  (superseded by {by})"));
    }
    s
}

/// Runs `troupe memory …`.
pub async fn run(rt: &Runtime, cmd: MemoryCmd) -> troupe::Result<()> {
    let memories = rt.memories();
    match cmd {
        MemoryCmd::List { user, all, json } => {
            let items = if all {
                memories.history(&user).await?
            } else {
                memories.list(&user).await?
            };
            if json {
                print_json(&json!({ "user_id": user, "memories": items }));
            } else if items.is_empty() {
                println!("no memories for user '{user}'");
            } else {
                for m in &items {
                    println!("{}  {}", m.id, line(m));
                }
            }
        }
        MemoryCmd::Search {
            user,
            query,
            limit,
            json,
        } => {
            let hits = memories.search(&user, &query, limit).await?;
            if json {
                print_json(&json!({ "user_id": user, "query": query, "hits": hits }));
            } else if hits.is_empty() {
                println!("nothing found for user '{user}'");
            } else {
                for h in &hits {
                    println!("{:>7.3}  {}", h.rank, line(&h.item));
                }
            }
        }
        MemoryCmd::Add { user, text, json } => {
            let outcome = memories.add(&user, &text).await?;
            if json {
                print_json(&serde_json::to_value(&outcome).unwrap_or_default());
            } else {
                match &outcome {
                    AddOutcome::Stored {
                        item,
                        superseded,
                        evicted,
                    } => {
                        println!(
                            "stored {} (score {:.2}): {}",
                            item.id, item.score, item.content
                        );
                        if !superseded.is_empty() {
                            println!("  supersedes {}", superseded.join(", "));
                        }
                        if !evicted.is_empty() {
                            println!("  evicted {}", evicted.join(", "));
                        }
                    }
                    AddOutcome::Duplicate { existing } => {
                        println!("already remembered as {existing}")
                    }
                    AddOutcome::Rejected { item, threshold } => println!(
                        "not stored: score {:.2} is below memory.quality_threshold {threshold}",
                        item.score
                    ),
                }
            }
        }
        MemoryCmd::Forget {
            user,
            sessions,
            json,
        } => {
            let report = rt.forget_user(&user, sessions).await?;
            if json {
                print_json(&serde_json::to_value(&report).unwrap_or_default());
            } else {
                println!(
                    "forgot user '{}': {} memories, {} sessions deleted",
                    report.user_id,
                    report.memories_deleted,
                    report.sessions_deleted.len()
                );
            }
        }
    }
    Ok(())
}

/// Runs `troupe sessions analytics SESSION`.
pub async fn analytics(rt: &Runtime, session: String, json: bool) -> troupe::Result<()> {
    let s = rt.session(session.clone()).existing().open().await?;
    let a = s.analytics().await?;
    if json {
        print_json(&serde_json::to_value(&a).map_err(|e| Error::Runtime(e.to_string()))?);
        return Ok(());
    }
    println!(
        "session {}  user {}  turns {}  messages {} ({} from the user)  duration {:.0} s",
        a.session_id,
        a.user_id.as_deref().unwrap_or("-"),
        a.interactions,
        a.messages,
        a.user_messages,
        a.duration_secs
    );
    for (name, st) in &a.agents {
        println!(
            "  {name:<12} replies {:<4} asked {:<4} latency mean {:.1} ms max {:.1} ms  tokens {} in / {} out",
            st.replies,
            st.user_messages,
            st.mean_latency_ms,
            st.max_latency_ms,
            st.prompt_tokens,
            st.completion_tokens
        );
    }
    let topics: Vec<String> = a.topics.iter().map(|(t, n)| format!("{t} ({n})")).collect();
    println!(
        "  topics: {}",
        if topics.is_empty() {
            "-".into()
        } else {
            topics.join(", ")
        }
    );
    match a.feedback.average {
        Some(avg) => println!("  feedback: {} ratings, average {avg:.2}", a.feedback.count),
        None => println!("  feedback: none"),
    }
    Ok(())
}
