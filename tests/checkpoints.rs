//! Checkpoints, restore, versions, branches, fork and merge; the supervisor's
//! automatic checkpoints; consistency of a checkpoint taken under load.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use troupe::checkpoint::CheckpointKind;
use troupe::config::Config;
use troupe::store::{MemoryStore, Role, SyncMode};
use troupe::test_utils::ScriptedModel;
use troupe::{Runtime, Session};

fn contents(h: &[troupe::Message]) -> Vec<String> {
    h.iter().map(|m| m.content.clone()).collect()
}

async fn memory_rt() -> Runtime {
    Runtime::builder()
        .memory_store()
        .model(ScriptedModel::new())
        .build()
        .await
        .unwrap()
}

async fn sqlite_rt(dir: &Path) -> Runtime {
    let mut c = Config::default();
    c.store.path = dir.join("cp.db");
    c.store.sync = SyncMode::Normal;
    Runtime::builder()
        .config(c)
        .model(ScriptedModel::new())
        .build()
        .await
        .unwrap()
}

async fn journey(rt: &Runtime) {
    let s = rt.session("alice").open().await.unwrap();
    s.chat("hello").await.unwrap();
    s.update_preference("style", "short").await.unwrap();
    let cp = s.checkpoint("before approach A").await.unwrap();
    assert_eq!(cp.label.as_deref(), Some("before approach A"));
    s.chat("What if we use approach A?").await.unwrap();
    s.update_preference("style", "long").await.unwrap();
    let meta = s.restore(&cp).await.unwrap();
    assert_eq!(meta.interactions, 1);
    assert_eq!(s.preferences().await.unwrap()["style"], "short");
    assert_eq!(
        contents(&s.history().await.unwrap()),
        ["hello", "reply to: hello"]
    );
    s.chat("What if we use approach B?").await.unwrap();
    assert_eq!(
        contents(&s.history().await.unwrap()),
        [
            "hello",
            "reply to: hello",
            "What if we use approach B?",
            "reply to: What if we use approach B?"
        ]
    );
    // Both branches exist, each grown from the checkpoint.
    let branches = s.branches().await.unwrap();
    assert_eq!(branches.len(), 2, "{branches:?}");
    assert!(branches
        .iter()
        .all(|b| b.grew_from.as_deref() == Some(cp.id.as_str())));
    assert_eq!(branches.iter().filter(|b| b.current).count(), 1);
    // Switch to the A branch: its history is whole again.
    let a = branches.iter().find(|b| !b.current).unwrap();
    s.switch_branch(a).await.unwrap();
    let h = contents(&s.history().await.unwrap());
    assert_eq!(h[2], "What if we use approach A?");
    // Versions.
    let v1 = s.save_version("after onboarding").await.unwrap();
    s.chat("more").await.unwrap();
    let v2 = s.save_version("later").await.unwrap();
    assert_eq!((v1, v2), (1, 2));
    let versions = s.list_versions().await.unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0].description.as_deref(), Some("after onboarding"));
    s.restore_version(v1).await.unwrap();
    assert_eq!(s.history().await.unwrap().len(), 4);
    assert!(s.restore_version(99).await.is_err());
    // Fork: a new session at the checkpoint, sharing its messages.
    let forked = s.fork(&cp, "alice-experiment").await.unwrap();
    assert_eq!(
        contents(&forked.history().await.unwrap()),
        ["hello", "reply to: hello"]
    );
    assert_eq!(forked.preferences().await.unwrap()["style"], "short");
    forked.chat("in the fork").await.unwrap();
    assert_eq!(forked.history().await.unwrap().len(), 4);
    // The parent did not see the fork's turn.
    assert!(!contents(&s.history().await.unwrap()).contains(&"in the fork".to_string()));
    assert!(
        s.fork(&cp, "alice-experiment").await.is_err(),
        "fork onto an existing id"
    );
    // A checkpoint of another session cannot be restored here.
    let other_cp = forked.checkpoint("fork cp").await.unwrap();
    let err = s.restore(&other_cp).await.unwrap_err();
    assert!(err.to_string().contains("belongs to session"), "{err}");
}

#[tokio::test]
async fn the_checkpoint_journey_on_memory() {
    journey(&memory_rt().await).await;
}

#[tokio::test]
async fn the_checkpoint_journey_on_sqlite_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    journey(&sqlite_rt(dir.path()).await).await;
    let rt = sqlite_rt(dir.path()).await;
    let s = rt.session("alice").existing().open().await.unwrap();
    assert_eq!(s.list_versions().await.unwrap().len(), 2);
    assert!(s.branches().await.unwrap().len() >= 2);
    let f = rt
        .session("alice-experiment")
        .existing()
        .open()
        .await
        .unwrap();
    assert_eq!(f.history().await.unwrap().len(), 4);
}

#[tokio::test]
async fn merge_orders_by_time_unions_state_and_reports_conflicts() {
    let rt = memory_rt().await;
    let a = rt.session("a").open().await.unwrap();
    let b = rt.session("b").open().await.unwrap();
    a.chat("a1").await.unwrap();
    b.chat("b1").await.unwrap();
    a.chat("a2").await.unwrap();
    a.set_user_data("color", "red").await.unwrap();
    a.set_user_data("only_a", 1).await.unwrap();
    b.set_user_data("only_b", 2).await.unwrap();
    b.set_user_data("color", "blue").await.unwrap(); // b is updated later: b wins
    let (m, report) = a.merge(&b).await.unwrap();
    assert_eq!(m.id(), "a_merged");
    assert_eq!(report.messages, 6);
    let h = contents(&m.history().await.unwrap());
    assert_eq!(
        h,
        [
            "a1",
            "reply to: a1",
            "b1",
            "reply to: b1",
            "a2",
            "reply to: a2"
        ]
    );
    let ud = m.user_data().await.unwrap();
    assert_eq!(ud["color"], "blue");
    assert_eq!(ud["only_a"], 1);
    assert_eq!(ud["only_b"], 2);
    assert_eq!(report.conflicts.len(), 1);
    let c = &report.conflicts[0];
    assert_eq!((c.key.as_str(), c.winner.as_str()), ("color", "b"));
    assert_eq!(
        (c.a.clone(), c.b.clone()),
        (serde_json::json!("red"), serde_json::json!("blue"))
    );
    assert!(a.merge(&b).await.is_err(), "merging onto an existing id");
}

#[tokio::test]
async fn the_supervisor_checkpoints_every_n_turns_and_keeps_the_newest() {
    let mut c = Config::default();
    c.checkpoint.every = 2;
    c.checkpoint.keep = 3;
    let rt = Runtime::builder()
        .config(c)
        .memory_store()
        .model(ScriptedModel::new())
        .build()
        .await
        .unwrap();
    let s = rt.session("auto").open().await.unwrap();
    let manual = s.checkpoint("mine").await.unwrap();
    for i in 0..12 {
        s.chat(format!("turn {i}")).await.unwrap();
    }
    let cps = s.checkpoints().await.unwrap();
    let autos: Vec<_> = cps
        .iter()
        .filter(|c| c.kind == CheckpointKind::Auto)
        .collect();
    assert_eq!(autos.len(), 3, "{cps:?}");
    // The newest three: after turns 8, 10 and 12, each a whole-turn cut.
    let turns: Vec<u64> = autos.iter().map(|c| c.state.interactions).collect();
    assert_eq!(turns, [8, 10, 12]);
    for cp in &autos {
        let h = rt.store().history(cp.head.unwrap(), None).await.unwrap();
        assert_eq!(h.len() as u64, cp.state.interactions * 2);
        assert_eq!(h.last().unwrap().role, Role::Assistant);
    }
    assert!(
        cps.iter().any(|c| c.id == manual.id),
        "manual checkpoints are kept"
    );
}

#[tokio::test]
async fn a_checkpoint_under_load_is_a_cut_of_whole_turns() {
    let rt = memory_rt().await;
    let s = rt.session("busy").open().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.chat(format!("m{i}")).await.unwrap()
        }));
    }
    let mut cps = Vec::new();
    for _ in 0..10 {
        cps.push(s.checkpoint("under load").await.unwrap());
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    for cp in cps {
        let h = match cp.head {
            Some(head) => rt.store().history(head, None).await.unwrap(),
            None => Vec::new(),
        };
        assert_eq!(h.len() % 2, 0);
        assert_eq!(h.len() as u64, cp.state.interactions * 2);
        for pair in h.chunks(2) {
            assert_eq!(pair[1].content, format!("reply to: {}", pair[0].content));
        }
    }
}

#[tokio::test]
async fn checkpoint_creation_does_not_copy_the_history() {
    let rt = memory_rt().await;
    let s = rt.session("long").open().await.unwrap();
    let msgs: Vec<troupe::NewMessage> = (0..5000)
        .map(|i| {
            troupe::NewMessage::new(
                if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                },
                format!("m{i}"),
            )
        })
        .collect();
    s.set_history(msgs).await.unwrap();
    let cp = s.checkpoint("big").await.unwrap();
    // The checkpoint holds a head, not messages: its serialised size is tiny.
    let size = serde_json::to_vec(&cp).unwrap().len();
    assert!(size < 2_000, "checkpoint is {size} bytes");
    let fork = s.fork(&cp, "long-fork").await.unwrap();
    assert_eq!(fork.history().await.unwrap().len(), 5000);
}

/// A simple model of a session: a list of (user, reply) pairs; checkpoints
/// are prefixes; restore truncates; fork copies.
#[derive(Debug, Clone)]
enum Op {
    Chat(u8),
    Checkpoint,
    Restore(usize),
    Fork(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Chat),
        1 => Just(Op::Checkpoint),
        1 => (0usize..8).prop_map(Op::Restore),
        1 => (0usize..8).prop_map(Op::Fork),
    ]
}

async fn run_model(ops: Vec<Op>) {
    let rt = Runtime::builder()
        .store(Arc::new(MemoryStore::new()))
        .model(ScriptedModel::new())
        .build()
        .await
        .unwrap();
    let s = rt.session("p").open().await.unwrap();
    let mut model: Vec<String> = Vec::new();
    let mut cps: Vec<(troupe::checkpoint::Checkpoint, Vec<String>)> = Vec::new();
    let mut forks: Vec<(Session, Vec<String>)> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Chat(n) => {
                let text = format!("msg {step} {n}");
                s.chat(text.clone()).await.unwrap();
                model.push(text.clone());
                model.push(format!("reply to: {text}"));
            }
            Op::Checkpoint => cps.push((
                s.checkpoint(format!("c{step}")).await.unwrap(),
                model.clone(),
            )),
            Op::Restore(i) if !cps.is_empty() => {
                let (cp, at) = &cps[i % cps.len()];
                s.restore(cp).await.unwrap();
                model = at.clone();
            }
            Op::Fork(i) if !cps.is_empty() => {
                let (cp, at) = &cps[i % cps.len()];
                let f = s.fork(cp, format!("f{step}")).await.unwrap();
                f.chat("fork turn").await.unwrap();
                let mut expect = at.clone();
                expect.push("fork turn".into());
                expect.push("reply to: fork turn".into());
                forks.push((f, expect));
            }
            _ => {}
        }
        assert_eq!(
            contents(&s.history().await.unwrap()),
            model,
            "after step {step}"
        );
    }
    for (f, expect) in forks {
        assert_eq!(contents(&f.history().await.unwrap()), expect);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn history_matches_a_simple_model(ops in proptest::collection::vec(op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(run_model(ops));
    }
}

async fn gc_scenario(rt: &Runtime) {
    let s = rt.session("g").open().await.unwrap();
    s.chat("one").await.unwrap();
    s.chat("two").await.unwrap();
    let cp1 = s.checkpoint("cp1").await.unwrap();
    s.chat("abandoned").await.unwrap();
    s.restore(&cp1).await.unwrap();
    s.chat("kept").await.unwrap();
    // Nothing is unreachable yet: the abandoned branch got a checkpoint when we left it.
    assert_eq!(s.collect_garbage().await.unwrap().messages_deleted, 0);
    assert_eq!(s.branches().await.unwrap().len(), 2);
    let guard = s
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.kind == CheckpointKind::Branch)
        .expect("restore checkpoints the branch it leaves");
    // A fork from cp1 keeps cp1's prefix alive even once cp1 is gone.
    let fork = s.fork(&cp1, "g-fork").await.unwrap();
    assert!(s.delete_checkpoint(&guard.id).await.unwrap());
    assert!(s.delete_checkpoint(&cp1.id).await.unwrap());
    assert!(!s.delete_checkpoint(&cp1.id).await.unwrap());
    let report = s.collect_garbage().await.unwrap();
    assert_eq!(report.messages_deleted, 2, "{report:?}"); // "abandoned" and its reply
    assert_eq!(
        contents(&s.history().await.unwrap()),
        [
            "one",
            "reply to: one",
            "two",
            "reply to: two",
            "kept",
            "reply to: kept"
        ]
    );
    assert_eq!(fork.history().await.unwrap().len(), 4);
    assert_eq!(s.branches().await.unwrap().len(), 1);
    // Idempotent, and the session keeps serving.
    assert_eq!(s.collect_garbage().await.unwrap().messages_deleted, 0);
    // Switching branches protects the tip it leaves, as restore does.
    let cp2 = s.checkpoint("cp2").await.unwrap();
    s.chat("on b").await.unwrap();
    s.restore(&cp2).await.unwrap();
    s.chat("on c").await.unwrap();
    let b = s
        .branches()
        .await
        .unwrap()
        .into_iter()
        .find(|b| !b.current)
        .unwrap();
    s.switch_branch(&b).await.unwrap();
    assert_eq!(s.collect_garbage().await.unwrap().messages_deleted, 0);
    let tips: Vec<_> = s.branches().await.unwrap().iter().map(|b| b.head).collect();
    assert_eq!(tips.len(), 2);
    s.chat("after gc").await.unwrap();
    assert_eq!(s.history().await.unwrap().len(), 10);
}

#[tokio::test]
async fn garbage_collection_removes_only_what_nothing_reaches_memory() {
    gc_scenario(&memory_rt().await).await;
}

#[tokio::test]
async fn garbage_collection_removes_only_what_nothing_reaches_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    gc_scenario(&sqlite_rt(dir.path()).await).await;
}

#[tokio::test]
async fn a_checkpoint_exported_to_a_file_imports_into_another_store_with_the_same_history() {
    let dir = tempfile::tempdir().unwrap();
    let rt = memory_rt().await;
    let s = rt.session("exp").open().await.unwrap();
    s.chat("one").await.unwrap();
    s.set_user_data("k", "v1").await.unwrap();
    let cp = s.checkpoint("here").await.unwrap();
    s.chat("two").await.unwrap();
    s.set_user_data("k", "v2").await.unwrap();
    let path = dir.path().join("cp.json");
    s.save_checkpoint(&cp, &path).await.unwrap();
    let other = sqlite_rt(dir.path()).await;
    let loaded = Session::load(&other, &path).await.unwrap();
    assert_eq!(
        contents(&loaded.history().await.unwrap()),
        ["one", "reply to: one"]
    );
    assert_eq!(loaded.user_data().await.unwrap()["k"], "v1");
    assert_eq!(loaded.metadata().await.unwrap().interactions, 1);
}

async fn edge_cases(rt: &Runtime) {
    // A fork that has not chatted yet survives the deletion of its parent.
    let p = rt.session("parent").open().await.unwrap();
    p.chat("p1").await.unwrap();
    let cp = p.checkpoint("fork point").await.unwrap();
    let f = p.fork(&cp, "child").await.unwrap();
    assert!(rt.delete_session("parent").await.unwrap());
    assert_eq!(
        contents(&f.history().await.unwrap()),
        ["p1", "reply to: p1"]
    );
    let fresh = rt.session("child").existing().open().await.unwrap();
    assert_eq!(fresh.history().await.unwrap().len(), 2);

    // Restoring right after a collection still protects the tip it leaves.
    let s = rt.session("tips").open().await.unwrap();
    s.chat("a").await.unwrap();
    let cp = s.checkpoint("a").await.unwrap();
    s.chat("tip").await.unwrap();
    s.collect_garbage().await.unwrap();
    s.restore(&cp).await.unwrap();
    assert_eq!(s.collect_garbage().await.unwrap().messages_deleted, 0);
    let tip = s
        .branches()
        .await
        .unwrap()
        .into_iter()
        .find(|b| !b.current)
        .expect("the tip left by restore is still a branch");
    let h = rt.store().history(tip.head, None).await.unwrap();
    assert_eq!(h[2].content, "tip");

    // A fork from a checkpoint whose messages were collected is refused, and leaves nothing.
    let g = rt.session("gone").open().await.unwrap();
    g.chat("keep").await.unwrap();
    let keep = g.checkpoint("keep").await.unwrap();
    g.chat("doomed").await.unwrap();
    let doomed = g.checkpoint("doomed").await.unwrap();
    g.restore(&keep).await.unwrap();
    for c in g.checkpoints().await.unwrap() {
        if c.id != keep.id {
            g.delete_checkpoint(&c.id).await.unwrap();
        }
    }
    assert_eq!(g.collect_garbage().await.unwrap().messages_deleted, 2);
    let err = g.fork(&doomed, "from-doomed").await.unwrap_err();
    assert!(err.to_string().contains("no longer exists"), "{err}");
    assert!(rt.session("from-doomed").existing().open().await.is_err());

    // Merging onto an existing id changes nothing.
    let a = rt.session("ma").open().await.unwrap();
    let b = rt.session("mb").open().await.unwrap();
    a.chat("x").await.unwrap();
    b.chat("y").await.unwrap();
    let victim = rt.session("taken").open().await.unwrap();
    victim.chat("mine").await.unwrap();
    assert!(a.merge_as(&b, "taken").await.is_err());
    assert_eq!(
        contents(&victim.history().await.unwrap()),
        ["mine", "reply to: mine"]
    );
}

#[tokio::test]
async fn edge_cases_memory() {
    edge_cases(&memory_rt().await).await;
}

#[tokio::test]
async fn edge_cases_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    edge_cases(&sqlite_rt(dir.path()).await).await;
}

#[tokio::test]
async fn garbage_collection_on_a_stale_actor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = sqlite_rt(dir.path()).await;
    let b = sqlite_rt(dir.path()).await;
    let sa = a.session("shared").open().await.unwrap();
    sa.chat("one").await.unwrap();
    let sb = b.session("shared").open().await.unwrap(); // b loads after turn one
    sa.chat("two").await.unwrap(); // b is now stale
    let err = sb.collect_garbage().await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(sa.history().await.unwrap().len(), 4);
    // b reloads and collects nothing (everything is on the head's path).
    assert_eq!(sb.collect_garbage().await.unwrap().messages_deleted, 0);
}

#[tokio::test]
async fn a_tip_covered_only_by_an_automatic_checkpoint_survives_restore_and_gc() {
    let mut c = Config::default();
    c.checkpoint.every = 1;
    c.checkpoint.keep = 1;
    let rt = Runtime::builder()
        .config(c)
        .memory_store()
        .model(ScriptedModel::new())
        .build()
        .await
        .unwrap();
    let s = rt.session("auto-tip").open().await.unwrap();
    s.chat("one").await.unwrap();
    let cp = s.checkpoint("one").await.unwrap();
    s.chat("tip").await.unwrap(); // an automatic checkpoint now points at the tip
    s.restore(&cp).await.unwrap();
    s.chat("other").await.unwrap(); // prunes that automatic checkpoint (keep = 1)
    assert_eq!(s.collect_garbage().await.unwrap().messages_deleted, 0);
    assert!(s
        .branches()
        .await
        .unwrap()
        .iter()
        .any(|b| { !b.current && b.last_message_at.is_some() }));
}

#[tokio::test]
async fn a_replaced_history_stays_reachable_through_gc() {
    let rt = memory_rt().await;
    let s = rt.session("replace").open().await.unwrap();
    s.chat("one").await.unwrap();
    s.chat("two").await.unwrap();
    s.set_history(vec![troupe::NewMessage::new(Role::User, "fresh start")])
        .await
        .unwrap();
    assert_eq!(s.branches().await.unwrap().len(), 2);
    assert_eq!(s.collect_garbage().await.unwrap().messages_deleted, 0);
    let old = s
        .branches()
        .await
        .unwrap()
        .into_iter()
        .find(|b| !b.current)
        .expect("the replaced history is still a branch");
    assert_eq!(rt.store().history(old.head, None).await.unwrap().len(), 4);
}

#[tokio::test]
async fn a_stale_not_found_actor_does_not_hide_a_fork_created_under_its_id() {
    let rt = memory_rt().await;
    let x = rt.session("x").open().await.unwrap();
    x.chat("hello").await.unwrap();
    let p = rt.session("p").open().await.unwrap();
    p.chat("parent").await.unwrap();
    let cp = p.checkpoint("cp").await.unwrap();
    assert!(rt.delete_session("x").await.unwrap());
    assert!(x.chat("after delete").await.is_err()); // an actor for "x" that says "not found"
    let forked = p.fork(&cp, "x").await.unwrap();
    assert_eq!(forked.history().await.unwrap().len(), 2);
    assert_eq!(x.history().await.unwrap().len(), 2);
}
