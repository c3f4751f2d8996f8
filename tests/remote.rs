//! `RemoteSession` against a real daemon on 127.0.0.1:0: the same
//! conversation seen from the client and from the server's own store.

use std::time::Duration;

use futures::StreamExt;
use troupe::client::RemoteSession;
use troupe::server::auth::{issue_token, TokenKeys};
use troupe::server::{Auth, Server, ServerHandle};
use troupe::{Config, Error, Role, Runtime, StreamEvent};

async fn daemon(dir: &std::path::Path, auth: Auth) -> (Runtime, ServerHandle) {
    let mut config = Config::default();
    config.agents.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/agents").into();
    let rt = Runtime::builder()
        .config(config)
        .sqlite(dir.join("troupe.db"))
        .build()
        .await
        .unwrap();
    let server = Server::new(rt.clone(), rt.config().server.clone())
        .auth(auth)
        .bind("127.0.0.1:0")
        .unwrap()
        .run()
        .unwrap();
    (rt, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_session_is_the_servers_session() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, server) = daemon(dir.path(), Auth::off()).await;
    let remote = RemoteSession::connect(server.url(), "r1")
        .user("u1")
        .await
        .unwrap();
    let first = remote.chat("My name is Alice").await.unwrap();
    assert_eq!(first.session_id, "r1");
    let second = remote.chat("What's my name?").await.unwrap();
    // The echo model reports how much history the server sent it.
    assert!(
        second.reply.contains("2 earlier messages"),
        "{}",
        second.reply
    );

    // Streamed: the deltas add up to the reply of the final event, which is durable.
    let mut stream = Box::pin(remote.chat_stream("Stream this").await.unwrap());
    let mut text = String::new();
    let mut done = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            StreamEvent::Delta(d) => text.push_str(&d),
            StreamEvent::Done(r) => done = Some(r),
        }
    }
    let done = done.expect("a Done event");
    assert_eq!(text, done.reply);

    // The client's history is the server's history.
    let remote_history = remote.history().await.unwrap();
    let local = rt.session("r1").existing().open().await.unwrap();
    let local_history = local.history().await.unwrap();
    assert_eq!(remote_history.len(), 6);
    assert_eq!(
        remote_history
            .iter()
            .map(|m| (m.id, m.role, m.content.clone()))
            .collect::<Vec<_>>(),
        local_history
            .iter()
            .map(|m| (m.id, m.role, m.content.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(remote_history.last().unwrap().id, done.message_id);
    assert_eq!(remote.recent(2).await.unwrap().len(), 2);
    let meta = remote.metadata().await.unwrap();
    assert_eq!(meta.user_id.as_deref(), Some("u1"));
    assert_eq!(meta.interactions, 3);

    // Preferences round-trip and are the server's.
    remote.update_preference("language", "fr").await.unwrap();
    assert_eq!(
        local.preferences().await.unwrap().get("language"),
        Some(&serde_json::json!("fr"))
    );

    // Checkpoint, another turn, restore: back to the checkpoint's history.
    let cp = remote.checkpoint("before").await.unwrap();
    assert!(remote
        .checkpoints()
        .await
        .unwrap()
        .iter()
        .any(|c| c.id == cp.id));
    remote.chat("to be undone").await.unwrap();
    assert_eq!(remote.history().await.unwrap().len(), 8);
    remote.restore(&cp).await.unwrap();
    let after = remote.history().await.unwrap();
    assert_eq!(after.len(), 6);
    assert_eq!(after.last().unwrap().role, Role::Assistant);

    // Versions.
    let v = remote.save_version("first").await.unwrap();
    assert_eq!(v, 1);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_cover_the_whole_history_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, server) = daemon(dir.path(), Auth::off()).await;
    let remote = RemoteSession::connect(server.url(), "paged").await.unwrap();
    for i in 0..7 {
        remote.chat(format!("m{i}")).await.unwrap();
    }
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let (page, next) = remote.history_page(Some(3), before).await.unwrap();
        assert!(page.len() <= 3);
        pages.push(page);
        match next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    let joined: Vec<_> = pages
        .into_iter()
        .rev()
        .flatten()
        .map(|m| m.content)
        .collect();
    let whole: Vec<_> = remote
        .history()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(joined.len(), 14);
    assert_eq!(joined, whole);
    assert_eq!(whole[0], "m0");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_open_one_session_and_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TokenKeys::parse("k1:secret-one").unwrap();
    let (_rt, server) = daemon(dir.path(), Auth::new("admin", Some(keys.clone()))).await;
    let url = server.url();

    // No credential: 401, named.
    let err = RemoteSession::connect(&url, "t1").await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Remote {
                status: Some(401),
                ..
            }
        ),
        "{err}"
    );

    RemoteSession::connect(&url, "t1")
        .api_key("admin")
        .await
        .unwrap();
    let token = issue_token(&keys, "t1", Duration::from_secs(60)).unwrap();
    let mine = RemoteSession::connect(&url, "t1")
        .token(&token)
        .existing()
        .await
        .unwrap();
    mine.chat("hello").await.unwrap();

    // The token does not reach another session.
    let err = RemoteSession::connect(&url, "t2")
        .token(&token)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Remote { status: Some(403), code, .. } if code == "forbidden"),
        "{err}"
    );

    // An unknown session with existing(): not found.
    let err = RemoteSession::connect(&url, "nobody")
        .api_key("admin")
        .existing()
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("nobody"), "{err}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_daemon_that_is_down_fails_fast_with_a_clear_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let err = RemoteSession::connect(format!("http://127.0.0.1:{port}"), "s")
        .retries(2)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    match &err {
        Error::Remote {
            status: None,
            code,
            url,
            ..
        } => {
            assert_eq!(code, "unreachable");
            assert!(url.contains(&port.to_string()), "{url}");
        }
        other => panic!("unexpected {other:?}"),
    }
}
