//! Issue 5, end to end through the real binary: `kill -9` in the middle of a
//! run, then `--resume`. Tasks that finished before the crash are not sent to
//! the model again (the fake server's log shows it) and the run completes.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::{json, Value};

/// The longest a hanging request is held (the test kills the client well before).
const HANG_AT_MOST: Duration = Duration::from_secs(30);
/// The longest any one step of the test may take.
const STEP_DEADLINE: Duration = Duration::from_secs(30);

struct ServerState {
    /// The last user message of every request, in arrival order.
    requests: Arc<Mutex<Vec<String>>>,
    /// While set, a request whose last user message starts with "Write" hangs.
    hang: Arc<AtomicBool>,
    /// Answer this many requests from now with 503.
    fail_next: Arc<std::sync::atomic::AtomicUsize>,
    /// Clear `hang` after the first hanging request has arrived (hang once).
    hang_once: Arc<AtomicBool>,
}

fn last_user_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|ms| ms.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("<none>")
        .to_string()
}

async fn chat_completions(body: web::Bytes, state: web::Data<ServerState>) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let user = last_user_message(&body);
    state.requests.lock().unwrap().push(user.clone());
    if body["stream"] == json!(true) {
        return HttpResponse::BadRequest().body("this fake server does not stream");
    }
    if state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return HttpResponse::ServiceUnavailable().body("fake overload");
    }
    if user.starts_with("Write") && state.hang.load(Ordering::SeqCst) {
        if state.hang_once.load(Ordering::SeqCst) {
            // This request hangs (bounded); later ones do not.
            state.hang.store(false, Ordering::SeqCst);
            actix_web::rt::time::sleep(Duration::from_secs(5)).await;
        }
        let since = Instant::now();
        while state.hang.load(Ordering::SeqCst) && since.elapsed() < HANG_AT_MOST {
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let head: String = user.chars().take(40).collect();
    HttpResponse::Ok().json(json!({
        "id": "chatcmpl-crash",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": format!("done: {head}")},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    }))
}

/// A fake OpenAI-compatible server on `127.0.0.1:0`, on its own thread with
/// its own actix system; stopped when dropped.
struct FakeServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    hang: Arc<AtomicBool>,
    fail_next: Arc<std::sync::atomic::AtomicUsize>,
    hang_once: Arc<AtomicBool>,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    fn start() -> FakeServer {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let hang = Arc::new(AtomicBool::new(true));
        let fail_next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hang_once = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (recs, flag) = (requests.clone(), hang.clone());
        let (fails, once) = (fail_next.clone(), hang_once.clone());
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(ServerState {
                            requests: recs.clone(),
                            hang: flag.clone(),
                            fail_next: fails.clone(),
                            hang_once: once.clone(),
                        }))
                        .route("/v1/chat/completions", web::post().to(chat_completions))
                })
                .workers(1)
                .disable_signals()
                .bind(("127.0.0.1", 0))
                .expect("bind the fake server");
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle()))
                    .expect("report the address");
                let _ = server.await;
            })
        });
        let (addr, handle) = rx.recv_timeout(STEP_DEADLINE).expect("fake server started");
        FakeServer {
            addr,
            requests,
            hang,
            fail_next,
            hang_once,
            handle,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // Lets any hanging handler end at once, then stops the server.
        self.hang.store(false, Ordering::SeqCst);
        drop(self.handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped on every path.
struct ChildGuard {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl ChildGuard {
    fn spawn(cmd: &mut Command) -> ChildGuard {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn troupe");
        // Drained on threads so a full pipe can never stall the child.
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        ChildGuard {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the exit, killing the child and failing the test past `deadline`.
    /// Returns the status, stdout and stderr.
    fn wait(mut self, deadline: Duration) -> (ExitStatus, String, String) {
        let until = Instant::now() + deadline;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("poll the child") {
                break s;
            }
            if Instant::now() >= until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let (out, err) = self.output();
                panic!("troupe did not exit within {deadline:?}\nstdout:\n{out}\nstderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (out, err) = self.output();
        (status, out, err)
    }

    /// SIGKILL, then reap.
    fn kill9(mut self) -> (ExitStatus, String, String) {
        self.child.kill().expect("kill -9 troupe");
        let status = self.child.wait().expect("reap troupe");
        let (out, err) = self.output();
        (status, out, err)
    }

    /// The output read so far; only call once the child has exited.
    fn output(&mut self) -> (String, String) {
        let join = |h: Option<JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        (join(self.stdout.take()), join(self.stderr.take()))
    }
}

/// Reads `r` to its end on a thread of its own.
fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `troupe --config CFG ARGS...`, isolated from the caller's environment.
fn troupe(cfg: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_troupe"));
    cmd.arg("--config").arg(cfg).args(args).current_dir(dir);
    for k in [
        "TROUPE_CONFIG",
        "TROUPE_STORE_BACKEND",
        "TROUPE_STORE_PATH",
        "TROUPE_MODEL_PROVIDER",
        "TROUPE_MODEL_BASE_URL",
        "TROUPE_MODEL_NAME",
        "TROUPE_TEST_NO_KEY",
        "RUST_LOG",
    ] {
        cmd.env_remove(k);
    }
    cmd
}

/// Runs `troupe ARGS... ` to the end; fails the test unless it succeeds with JSON on stdout.
fn troupe_json(cfg: &Path, dir: &Path, args: &[&str]) -> Value {
    let (status, out, err) = ChildGuard::spawn(&mut troupe(cfg, dir, args)).wait(STEP_DEADLINE);
    assert!(
        status.success(),
        "troupe {args:?} failed ({status})\nstdout:\n{out}\nstderr:\n{err}"
    );
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("troupe {args:?}: stdout is not JSON ({e}):\n{out}"))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + STEP_DEADLINE;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn task_status<'a>(run: &'a Value, task: &str) -> Option<&'a str> {
    run["tasks"]
        .as_array()?
        .iter()
        .find(|t| t["task_id"] == task)?
        .get("status")?
        .as_str()
}

#[test]
fn kill_9_mid_run_then_resume_does_not_resend_finished_tasks() {
    let server = FakeServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.toml");
    // TOML literal strings ('...') keep Windows-style or odd paths verbatim.
    std::fs::write(
        &cfg,
        format!(
            "[store]\npath = '{db}'\nsync = \"normal\"\n\n\
             [model]\nprovider = \"openai\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"fake\"\n\
             api_key_env = \"TROUPE_TEST_NO_KEY\"\ntimeout_secs = 60\nmax_retries = 0\n\n\
             [agents]\ndir = '{agents}'\n\n\
             [workflow]\nmax_parallel = 1\n",
            db = tmp.path().join("t.db").display(),
            addr = server.addr,
            agents = repo().join("agents").display(),
        ),
    )
    .unwrap();
    let pipeline = repo().join("pipelines").join("article.toml");
    let pipeline = pipeline.to_str().unwrap();

    // 1. Run until the model is asked to write (research and outline are
    //    then done and stored), and kill -9 troupe mid-request.
    let child = ChildGuard::spawn(&mut troupe(
        &cfg,
        tmp.path(),
        &["run", pipeline, "--input", "topic=qubits", "--json"],
    ));
    wait_until("the Write request", || {
        server.requests().iter().any(|r| r.starts_with("Write"))
    });
    let (status, out, err) = child.kill9();
    assert!(
        !status.success(),
        "troupe was killed, yet: {status}\n{out}\n{err}"
    );
    let before = server.requests();
    let starts: Vec<&str> = before
        .iter()
        .map(|r| r.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        starts,
        ["Research", "Outline", "Write"],
        "requests before the crash: {before:#?}"
    );

    // 2. The run was left `running`, with research and outline succeeded.
    let runs = troupe_json(&cfg, tmp.path(), &["runs", "list", "--json"]);
    let list = runs["runs"].as_array().expect("runs list");
    assert_eq!(list.len(), 1, "{runs:#}");
    let id = list[0]["id"].as_str().expect("run id").to_string();
    assert_eq!(list[0]["status"], "running", "{runs:#}");
    let shown = troupe_json(&cfg, tmp.path(), &["runs", "show", &id, "--json"]);
    assert_eq!(shown["status"], "running", "{shown:#}");
    assert_eq!(
        task_status(&shown, "research"),
        Some("succeeded"),
        "{shown:#}"
    );
    assert_eq!(
        task_status(&shown, "outline"),
        Some("succeeded"),
        "{shown:#}"
    );
    assert_ne!(task_status(&shown, "write"), Some("succeeded"), "{shown:#}");
    assert_eq!(task_status(&shown, "review"), None, "{shown:#}");

    // 3. Resume: only write and review reach the model; the run completes.
    server.hang.store(false, Ordering::SeqCst);
    let seen = server.requests().len();
    let report = troupe_json(
        &cfg,
        tmp.path(),
        &["run", pipeline, "--resume", &id, "--json"],
    );
    assert_eq!(report["id"], id.as_str(), "{report:#}");
    assert_eq!(report["status"], "succeeded", "{report:#}");
    for task in ["research", "outline", "write", "review"] {
        assert_eq!(
            task_status(&report, task),
            Some("succeeded"),
            "{task}: {report:#}"
        );
    }
    let after = server.requests()[seen..].to_vec();
    assert_eq!(after.len(), 2, "requests after the resume: {after:#?}");
    assert!(after[0].starts_with("Write"), "{after:#?}");
    assert!(after[1].starts_with("Review"), "{after:#?}");
    assert!(
        !after
            .iter()
            .any(|r| r.starts_with("Research") || r.starts_with("Outline")),
        "a finished task was sent again: {after:#?}"
    );

    // The outline stored before the crash fed the resumed write.
    assert!(after[0].contains("done: Outline"), "{after:#?}");
    let shown = troupe_json(&cfg, tmp.path(), &["runs", "show", &id, "--json"]);
    assert_eq!(shown["status"], "succeeded", "{shown:#}");
}

/// Retries and timeouts of pipeline tasks against an OpenAI-compatible
/// server over HTTP: the first call fails with 503, the first `Write…` call
/// hangs past the task's timeout — both tasks succeed on their retry.
#[tokio::test]
async fn retries_and_timeouts_against_the_fake_model_server() {
    use troupe::model::{OpenAiModel, OpenAiSettings};
    use troupe::store::RunStatus;
    use troupe::workflow::{run_pipeline, Pipeline, RunOptions};

    let server = FakeServer::start();
    server.fail_next.store(1, Ordering::SeqCst);
    server.hang_once.store(true, Ordering::SeqCst);
    let settings = OpenAiSettings {
        base_url: format!("http://{}/v1", server.addr),
        model: "fake".into(),
        api_key: None,
        temperature: None,
        max_tokens: None,
        timeout: Duration::from_secs(20),
        max_retries: 0, // the task's retries are what is tested
        backoff: Duration::from_millis(10),
    };
    let model = Arc::new(OpenAiModel::new(settings).expect("client"));
    let mut config = troupe::Config::default();
    config.agents.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
    let rt = troupe::Runtime::builder()
        .config(config)
        .memory_store()
        .model(model)
        .build()
        .await
        .expect("runtime");
    let text = r#"
name = "retry"
[[task]]
id = "research"
agent = "researcher"
retries = 1
prompt = "Research qubits"
[[task]]
id = "write"
agent = "writer"
depends_on = ["research"]
retries = 1
timeout_secs = 1
prompt = "Write about {{ tasks.research.output }}"
"#;
    let p = Pipeline::parse("retry.toml", text).expect("pipeline");
    let opts = RunOptions {
        retry_backoff: Duration::from_millis(10),
        ..RunOptions::default()
    };
    let report = run_pipeline(&rt, &p, "retry.toml", opts, None)
        .await
        .expect("run");
    assert_eq!(report.run.status, RunStatus::Succeeded, "{report:?}");
    let attempts: Vec<(String, u32)> = report
        .tasks
        .iter()
        .map(|t| (t.task_id.clone(), t.attempts))
        .collect();
    assert_eq!(
        attempts,
        [("research".to_string(), 2), ("write".to_string(), 2)]
    );
    let seen: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    assert_eq!(seen, ["Research", "Research", "Write", "Write"]);
}
