//! The `troupe serve` and `troupe token` commands, through the binary: the
//! daemon starts from a config file, serves, stops on SIGTERM with exit 0
//! and leaves every acknowledged turn in the store.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use troupe::server::auth::{verify_token, TokenKeys};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_troupe"));
    c.env_remove("TROUPE_CONFIG")
        .env_remove("TROUPE_API_KEY")
        .env_remove("TROUPE_TOKEN_KEYS")
        .env_remove("TROUPE_STORE_PATH")
        .env_remove("TROUPE_STORE_BACKEND")
        .env_remove("TROUPE_MODEL_PROVIDER");
    c
}

fn write_config(dir: &Path, bind: &str) -> std::path::PathBuf {
    let agents = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[store]
path = "data/troupe.db"
sync = "normal"

[agents]
dir = "{}"

[server]
bind = "{bind}"
api_key_env = "TROUPE_TEST_SERVE_ADMIN_KEY"
token_keys_env = "TROUPE_TEST_SERVE_TOKEN_KEYS"
workers = 2
"#,
            agents.display()
        ),
    )
    .unwrap();
    path
}

/// Reads the child's stderr until it says where it listens.
fn listening_url(child: &mut Child) -> String {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("troupe serve did not report its address")
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("troupe serve did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http() -> reqwest::Client {
    troupe::init_tls();
    reqwest::Client::builder()
        .build()
        .or_else(|_| {
            reqwest::Client::builder()
                .tls_certs_only(Vec::<reqwest::Certificate>::new())
                .build()
        })
        .unwrap()
}

#[tokio::test]
async fn serve_answers_then_stops_on_sigterm_with_everything_stored() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let mut child = bin()
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = listening_url(&mut child);
    let http = http();
    let health: Value = http
        .get(format!("{url}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let r = http
        .post(format!("{url}/v1/sessions"))
        .json(&json!({"session_id": "from-bin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r: Value = http
        .post(format!("{url}/v1/sessions/from-bin/chat"))
        .json(&json!({"message": "kept after SIGTERM"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(r["reply"]
        .as_str()
        .unwrap()
        .starts_with("echo: kept after SIGTERM"));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(40)))
            .await
            .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(http.get(format!("{url}/healthz")).send().await.is_err());

    // The store has the turn.
    let mut c = troupe::Config::from_file(&config).unwrap();
    c.store.sync = troupe::config::SyncMode::Normal;
    let rt = troupe::Runtime::builder().config(c).build().await.unwrap();
    let s = rt.session("from-bin").existing().open().await.unwrap();
    let h = s.history().await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].content, "kept after SIGTERM");
}

#[test]
fn serve_refuses_a_public_address_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["serve", "--bind", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("non-loopback"), "{err}");
    assert!(err.contains("TROUPE_TEST_SERVE_ADMIN_KEY"), "{err}");
}

#[test]
fn token_issue_prints_a_token_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["token", "issue", "--session", "user_456", "--ttl", "2h"])
        .env("TROUPE_TEST_SERVE_TOKEN_KEYS", "new:s2,old:s1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let keys = TokenKeys::parse("old:s1,new:s2").unwrap();
    let claims = verify_token(&keys, &token).unwrap();
    assert_eq!(claims.session_id, "user_456");
    assert_eq!(claims.kid, "new", "the first key signs");
    let left = claims.expires_at - chrono::Utc::now().timestamp();
    assert!((7000..=7200).contains(&left), "{left}");

    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["token", "issue", "--session", "u", "--ttl", "30m", "--json"])
        .env("TROUPE_TEST_SERVE_TOKEN_KEYS", "new:s2")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["session_id"], "u");
    assert_eq!(v["kid"], "new");
    assert!(v["token"].as_str().unwrap().starts_with("tt1.new."));

    // No keys, a bad ttl, a bad session id: clear errors, no token.
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["token", "issue", "--session", "u"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TROUPE_TEST_SERVE_TOKEN_KEYS"));
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["token", "issue", "--session", "u", "--ttl", "1y"])
        .env("TROUPE_TEST_SERVE_TOKEN_KEYS", "new:s2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["token", "issue", "--session", "a b"])
        .env("TROUPE_TEST_SERVE_TOKEN_KEYS", "new:s2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}
