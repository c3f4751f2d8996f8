//! The `troupe` binary end to end: the session, checkpoint, version and
//! pipeline commands with `--json`, and their exit codes.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

struct Cli {
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Cli {
    fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let agents = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
        std::fs::write(
            &config,
            format!(
                "[store]\npath = \"t.db\"\nsync = \"normal\"\n[agents]\ndir = \"{}\"\n",
                agents.display()
            ),
        )
        .unwrap();
        Cli { config, _dir: dir }
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_troupe"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("TROUPE_STORE_PATH")
            .env_remove("TROUPE_STORE_BACKEND")
            .env_remove("TROUPE_MODEL_PROVIDER")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn json(&self, args: &[&str]) -> Value {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

#[test]
fn checkpoints_versions_branches_fork_merge_and_gc_from_the_command_line() {
    let cli = Cli::new();
    cli.json(&["chat", "-s", "alice", "-m", "hello", "--json"]);
    let cp = cli.json(&[
        "checkpoint",
        "create",
        "alice",
        "--label",
        "first",
        "--json",
    ]);
    let cp_id = cp["id"].as_str().unwrap().to_string();
    assert_eq!(cp["session_id"], "alice");
    assert_eq!(cp["label"], "first");
    cli.json(&["chat", "-s", "alice", "-m", "approach A", "--json"]);
    cli.json(&["checkpoint", "restore", "alice", &cp_id, "--json"]);
    cli.json(&["chat", "-s", "alice", "-m", "approach B", "--json"]);
    let branches = cli.json(&["sessions", "branches", "alice", "--json"]);
    assert_eq!(branches["branches"].as_array().unwrap().len(), 2);
    let list = cli.json(&["checkpoint", "list", "alice", "--json"]);
    assert!(list["checkpoints"].as_array().unwrap().len() >= 2);
    let v = cli.json(&["versions", "save", "alice", "-d", "after B", "--json"]);
    assert_eq!(v["version"], 1);
    let versions = cli.json(&["versions", "list", "alice", "--json"]);
    assert_eq!(versions["versions"][0]["description"], "after B");
    let fork = cli.json(&[
        "sessions", "fork", "alice", &cp_id, "--as", "alice2", "--json",
    ]);
    assert_eq!(fork["messages"], 2);
    cli.json(&["chat", "-s", "bob", "-m", "hi from bob", "--json"]);
    let merged = cli.json(&["sessions", "merge", "alice", "bob", "--json"]);
    assert_eq!(merged["session_id"], "alice_merged");
    let show = cli.json(&["sessions", "show", "alice_merged", "--json"]);
    assert_eq!(
        show["history"].as_array().unwrap().len(),
        merged["messages"].as_u64().unwrap() as usize
    );
    let gc = cli.json(&["sessions", "gc", "alice", "--json"]);
    assert_eq!(gc["report"]["messages_deleted"], 0);
    // Bad input: clear errors and exit codes, nothing changed.
    let (code, _, err) = cli.run(&["checkpoint", "restore", "alice", "no-such-checkpoint"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no-such-checkpoint"), "{err}");
    let (code, _, err) = cli.run(&["sessions", "show", "../etc"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli.run(&["sessions", "fork", "alice", &cp_id, "--as", "alice2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn pipelines_from_the_command_line() {
    let cli = Cli::new();
    let article = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/article.toml");
    let article = article.to_str().unwrap();
    let check = cli.json(&["pipeline", "check", article, "--json"]);
    assert_eq!(
        check["order"],
        serde_json::json!(["research", "outline", "write", "review"])
    );
    let (code, graph, _) = cli.run(&["pipeline", "graph", article, "--format", "dot"]);
    assert_eq!(code, 0);
    assert!(
        graph.contains("digraph") && graph.contains("\"research\" -> \"outline\""),
        "{graph}"
    );
    let run = cli.json(&[
        "run",
        article,
        "--input",
        "topic=qubits",
        "--session",
        "proj",
        "--json",
    ]);
    assert_eq!(run["status"], "succeeded");
    let id = run["id"].as_str().unwrap().to_string();
    let shown = cli.json(&["runs", "show", &id, "--json"]);
    assert_eq!(shown["tasks"].as_array().unwrap().len(), 4);
    let runs = cli.json(&["runs", "list", "--json"]);
    assert_eq!(runs["runs"][0]["id"], id);
    // A missing input is a usage error, and no run is recorded.
    let (code, _, err) = cli.run(&["run", article]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("topic"), "{err}");
    assert_eq!(
        cli.json(&["runs", "list", "--json"])["runs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
