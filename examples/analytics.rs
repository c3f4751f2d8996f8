//! Session analytics, offline (echo model, in-memory store): interactions,
//! duration, messages per agent, topics, model latency and tokens per
//! agent, and a satisfaction signal from feedback.
//!
//! `cargo run --example analytics`

use troupe::{Agent, Runtime};

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let rt = Runtime::builder().memory_store().build().await?;
    let tutor = Agent::builder("tutor")
        .role("teacher")
        .instructions("Teach Rust.")
        .build();
    let critic = Agent::builder("critic")
        .instructions("Point out the weakest claim.")
        .build();
    let s = rt
        .session("lesson-1")
        .user("student_7")
        .agent(tutor)
        .agent(critic)
        .open()
        .await?;

    let a = s.chat("Explain Rust ownership").await?;
    let b = s.chat("And borrowing in Rust?").await?;
    let c = s
        .chat_with(
            "critic",
            "Is ownership really simpler than garbage collection?",
        )
        .await?;
    s.feedback(a.message_id, 5.0).await?; // e.g. 1–5 stars
    s.feedback(b.message_id, 4.0).await?;
    s.feedback(c.message_id, 2.0).await?;

    let report = s.analytics().await?;
    println!(
        "session {} (user {:?}): {} interactions, {} messages, {:.2} s",
        report.session_id,
        report.user_id,
        report.interactions,
        report.messages,
        report.duration_secs
    );
    for (agent, st) in &report.agents {
        println!(
            "  {agent:<7} {} replies to {} messages; model latency mean {:.3} ms, max {:.3} ms; tokens {} in / {} out (echo: estimated)",
            st.replies, st.user_messages, st.mean_latency_ms, st.max_latency_ms, st.prompt_tokens, st.completion_tokens
        );
    }
    println!("  topics: {:?}", report.topics);
    println!(
        "  satisfaction: {} ratings, average {:.2}",
        report.feedback.count,
        report.feedback.average.unwrap_or(0.0)
    );
    println!("\nas JSON (troupe sessions analytics ID --json prints the same):");
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    rt.shutdown().await
}
