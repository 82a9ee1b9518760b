//! `tether broker drain NAME` on real processes: control, two `tether-broker`s and real
//! agents. The drain reaches the broker over its control channel and does what SIGTERM
//! does (GoAway with a jittered reconnect delay, make-before-break, then the process
//! exits); `tether broker list` shows it draining; the request is admin-only and audited.
//! Also the global `--control URL` / `TETHER_CONTROL_URL` and `tether control replicas`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::operators::{audit_entries, tether};
use common::{bin, wait_for, AgentProc, BrokerProc};
use serde_json::Value;

/// The reconnect jitter the test brokers announce in `GoAway` (`common::cluster`).
const JITTER: Duration = Duration::from_millis(200);
/// Appliances in the fleet.
const FLEET: usize = 6;

/// `tether broker list --output json` as the admin: broker `name`'s row.
fn broker_row(c: &Cluster, name: &str) -> Option<Value> {
    let out = c.tether(&["broker", "list", "--output", "json"]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v["brokers"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
}

/// Which appliances each broker's admin API lists now (a broker that does not answer
/// lists none).
async fn sessions_on(admins: &[SocketAddr]) -> Vec<String> {
    let http = common::http();
    let mut out = Vec::new();
    for a in admins {
        let Ok(resp) = http
            .get(format!("http://{a}/v1/sessions"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        else {
            continue;
        };
        let Ok(v) = resp.json::<Value>().await else {
            continue;
        };
        for s in v.as_array().into_iter().flatten() {
            if let Some(id) = s["appliance_id"].as_str() {
                out.push(id.to_owned());
            }
        }
    }
    out
}

/// For each appliance, the longest time it was seen on no broker: from the first poll
/// that missed it to the next poll that found it again.
struct Offline {
    admins: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(String, Duration)>>,
}

impl Offline {
    fn watch(ids: Vec<String>, admins: Vec<SocketAddr>) -> Offline {
        let admins = Arc::new(Mutex::new(admins));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (admins.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut missing_since: Vec<Option<Instant>> = vec![None; ids.len()];
            let mut longest = vec![Duration::ZERO; ids.len()];
            while !s.load(Ordering::Relaxed) {
                let polled = a.lock().unwrap().clone();
                let start = Instant::now();
                let seen = sessions_on(&polled).await;
                for (i, id) in ids.iter().enumerate() {
                    if seen.contains(id) {
                        if let Some(since) = missing_since[i].take() {
                            longest[i] = longest[i].max(since.elapsed());
                        }
                    } else if missing_since[i].is_none() {
                        missing_since[i] = Some(start);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for (i, since) in missing_since.iter().enumerate() {
                if let Some(since) = since {
                    longest[i] = longest[i].max(since.elapsed());
                }
            }
            ids.into_iter().zip(longest).collect()
        });
        Offline { admins, stop, task }
    }

    fn set_admins(&self, admins: Vec<SocketAddr>) {
        *self.admins.lock().unwrap() = admins;
    }

    async fn finish(self) -> Vec<(String, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// `tether exec` in a loop over the fleet until stopped: (appliance, token, exit code,
/// stdout, stderr) per command.
type Outcome = (String, String, i32, String, String);

fn exec_loop(
    ops: &Path,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Outcome>> {
    let ops = ops.to_path_buf();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let id = &ids[n % ids.len()];
            let token = format!("run-{n}");
            let o = Command::new(bin("tether"))
                .args(["exec", id, "--", "echo", &token])
                .env("TETHER_CONFIG_DIR", &ops)
                .output()
                .unwrap();
            out.push((
                id.clone(),
                token,
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ));
            n += 1;
        }
        out
    })
}

/// Drain `name` with the CLI, see it listed as draining, and wait for its process to exit.
async fn drain_and_wait(c: &Cluster, name: &str, broker: &mut BrokerProc) {
    let out = c
        .tether(&["broker", "drain", name])
        .unwrap_or_else(|e| panic!("tether broker drain {name}: {e}"));
    assert!(out.contains("draining"), "{out}");
    // Shown as draining from the request on (the broker's own report follows), until its
    // channel ends.
    let row = broker_row(c, name).expect("listed");
    assert!(
        row["draining"] == true || row["connected"] == false,
        "{name} right after the drain request: {row}"
    );
    let status = broker.wait_exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "{name} exits cleanly after the drain: {status}"
    );
    // The log reader may trail the exit by a moment.
    let logged = |needle: &'static str| {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !broker.log_contains(needle) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        broker.log_contains(needle)
    };
    assert!(
        logged("control asked this broker to drain"),
        "the drain came over the control channel"
    );
    assert!(logged("drain finished: every session left"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_drains_each_broker_while_commands_run() {
    let mut c = Cluster::new("");
    let mut b1 = c.add_broker("edge-1");
    let mut b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    let ids: Vec<String> = (1..=FLEET).map(|i| format!("app-{i}")).collect();
    let states: Vec<_> = ids.iter().map(|id| c.enroll(id)).collect();
    b1.wait_metric("tether_allowlist_version", FLEET as f64)
        .await;
    b2.wait_metric("tether_allowlist_version", FLEET as f64)
        .await;
    // Half the fleet prefers each broker.
    let _agents: Vec<AgentProc> = states
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let order = if i % 2 == 0 {
                [b1.quic, b2.quic]
            } else {
                [b2.quic, b1.quic]
            };
            c.agent(s, &order)
        })
        .collect();
    for id in &ids {
        c.wait_connected(id, None).await;
    }
    let row = broker_row(&c, "edge-1").unwrap();
    assert_eq!(row["draining"], false, "{row}");
    let table = c.tether(&["broker", "list"]).unwrap();
    assert!(
        table.contains("STATE") && table.contains("serving"),
        "{table}"
    );

    let offline = Offline::watch(ids.clone(), vec![b1.admin, b2.admin]);
    let stop = Arc::new(AtomicBool::new(false));
    let commands = exec_loop(&c.ops, ids.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // edge-1: drain, exit, start again (the "new version") on the same address.
    drain_and_wait(&c, "edge-1", &mut b1).await;
    offline.set_admins(vec![b2.admin]);
    assert_eq!(
        sessions_on(&[b2.admin]).await.len(),
        FLEET,
        "the whole fleet moved to edge-2"
    );
    let b1 = c.restart_broker("edge-1", b1.quic);
    offline.set_admins(vec![b1.admin, b2.admin]);
    c.wait_brokers_up(2).await;
    let row = broker_row(&c, "edge-1").unwrap();
    assert_eq!(
        (row["connected"].as_bool(), row["draining"].as_bool()),
        (Some(true), Some(false)),
        "{row}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // edge-2 likewise: the fleet moves back to the upgraded edge-1.
    drain_and_wait(&c, "edge-2", &mut b2).await;
    offline.set_admins(vec![b1.admin]);
    assert_eq!(
        sessions_on(&[b1.admin]).await.len(),
        FLEET,
        "the whole fleet moved to edge-1"
    );
    let b2 = c.restart_broker("edge-2", b2.quic);
    offline.set_admins(vec![b1.admin, b2.admin]);
    c.wait_brokers_up(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    let outcomes = commands.join().unwrap();
    let longest = offline.finish().await;

    // Every command has exactly one outcome, and the drains failed none of them.
    assert!(
        outcomes.len() >= 4,
        "commands ran during the upgrade: {}",
        outcomes.len()
    );
    for (id, token, code, stdout, stderr) in &outcomes {
        assert_eq!(
            (*code, stdout.trim()),
            (0, token.as_str()),
            "{id} {token}: {stderr}"
        );
    }
    let ended: Vec<Value> = audit_entries(&c.fleet)
        .into_iter()
        .filter(|e| e["action"] == "appliance.exec" && !e["details"]["command_id"].is_null())
        .collect();
    assert_eq!(ended.len(), outcomes.len(), "one outcome entry per command");
    let mut command_ids: Vec<u64> = ended
        .iter()
        .map(|e| e["details"]["command_id"].as_u64().unwrap())
        .collect();
    command_ids.sort_unstable();
    command_ids.dedup();
    assert_eq!(
        command_ids.len(),
        outcomes.len(),
        "no command has two outcomes"
    );
    assert!(ended.iter().all(|e| e["outcome"] == "success"), "{ended:?}");

    // Make-before-break: no appliance was without a session longer than the jitter.
    for (id, gap) in &longest {
        assert!(*gap < JITTER, "{id} was on no broker for {gap:?}");
    }
    // Both drains are audited, by the admin.
    let drains: Vec<(String, String, String)> = audit_entries(&c.fleet)
        .into_iter()
        .filter(|e| e["action"] == "broker.drain")
        .map(|e| {
            (
                e["actor"]["name"].as_str().unwrap_or_default().to_owned(),
                e["target"].as_str().unwrap_or_default().to_owned(),
                e["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let admin = |t: &str| ("admin".to_owned(), t.to_owned(), "success".to_owned());
    assert_eq!(drains, vec![admin("edge-1"), admin("edge-2")]);
    drop(b1);
    drop(b2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_drain_is_for_admins_names_unknown_and_disconnected_brokers_and_is_audited() {
    let mut c = Cluster::new("");
    let broker = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let olga = c.invite_operator("olga", "operator");
    let vic = c.invite_operator("vic", "viewer");
    for dir in [&olga, &vic] {
        let err = tether(dir, &["broker", "drain", "edge-1"]).unwrap_err();
        assert!(err.contains("403 role_forbidden"), "{err}");
    }
    let err = c.tether(&["broker", "drain", "edge-9"]).unwrap_err();
    assert!(err.contains("404 not_found"), "{err}");
    // Added, never started: no channel carries the request.
    let bundle = c.tmp().join("edge-2.json");
    c.tether(&["broker", "add", "edge-2", "--out", bundle.to_str().unwrap()])
        .unwrap();
    let err = c.tether(&["broker", "drain", "edge-2"]).unwrap_err();
    assert!(err.contains("409 broker_not_connected"), "{err}");
    let err = c.tether(&["broker", "drain", "bad/name"]).unwrap_err();
    assert!(err.contains("invalid name"), "{err}");
    // Nothing of that drained edge-1.
    assert_eq!(broker_row(&c, "edge-1").unwrap()["draining"], false);

    let entries: Vec<(String, String, String, Option<String>)> = audit_entries(&c.fleet)
        .into_iter()
        .filter(|e| e["action"] == "broker.drain")
        .map(|e| {
            (
                e["actor"]["name"].as_str().unwrap_or_default().to_owned(),
                e["target"].as_str().unwrap_or_default().to_owned(),
                e["outcome"].as_str().unwrap_or_default().to_owned(),
                e["details"]["code"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let e = |who: &str, target: &str, outcome: &str, code: Option<&str>| {
        (
            who.to_owned(),
            target.to_owned(),
            outcome.to_owned(),
            code.map(str::to_owned),
        )
    };
    assert_eq!(
        entries,
        vec![
            e("olga", "edge-1", "refused", Some("role_forbidden")),
            e("vic", "edge-1", "refused", Some("role_forbidden")),
            e("admin", "edge-2", "refused", Some("broker_not_connected")),
        ]
    );
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_flag_and_env_override_the_stored_control_url() {
    let c = Cluster::new("");
    let url = c.fleet.url();
    let dead = "https://127.0.0.1:1";
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(bin("tether"));
        cmd.args(args).env("TETHER_CONFIG_DIR", &c.ops);
        match env {
            Some(v) => cmd.env("TETHER_CONTROL_URL", v),
            None => cmd.env_remove("TETHER_CONTROL_URL"),
        };
        let o = cmd.output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // The stored URL works; the environment overrides it; the flag overrides both, before
    // or after the subcommand.
    assert_eq!(run(&["broker", "list"], None).0, 0);
    let (code, _, err) = run(&["broker", "list"], Some(dead));
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot reach control at https://127.0.0.1:1"),
        "{err}"
    );
    let (code, _, err) = run(&["--control", &url, "broker", "list"], Some(dead));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["appliance", "list", "--control", dead], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot reach control at https://127.0.0.1:1"),
        "{err}"
    );
    // The stored profile is unchanged.
    let profile: Value =
        serde_json::from_slice(&std::fs::read(c.ops.join("config.json")).unwrap()).unwrap();
    assert_eq!(profile["control_url"], url.as_str());
    // Bad input is a usage error naming the flag.
    for bad in ["http://127.0.0.1:1", "not a url"] {
        let (code, _, err) = run(&["--control", bad, "broker", "list"], None);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("--control"), "{err}");
    }
    // `tether control replicas` answers through the override too (no replica registry on
    // SQLite: an empty list).
    let (code, out, err) = run(
        &["control", "replicas", "--output", "json", "--control", &url],
        Some(dead),
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["replicas"].is_array(), "{v}");
    let (code, out, _) = run(&["control", "replicas"], None);
    assert_eq!(code, 0);
    assert!(out.contains("ADVERTISE"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_up_restarts_a_broker_drained_from_the_cli() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("up");
    let mut child = Command::new(bin("tether"))
        .args(["up", "--appliances", "4", "--port-base", "0", "--data-dir"])
        .arg(&data)
        .env_remove("TETHER_CONTROL_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_line = |needle: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("tether up never printed {needle:?}"),
            }
        }
    };
    wait_line("ready: 4 appliances connected");
    let ops = data.join("operator");
    let out = tether(&ops, &["broker", "drain", "edge-1"]).expect("drain edge-1");
    assert!(out.contains("draining"), "{out}");
    wait_line("broker edge-1 drained");
    wait_line("broker edge-1 serving again");
    // Both channels up again, neither draining.
    let up = wait_for(Duration::from_secs(20), || async {
        let out = tether(&ops, &["broker", "list", "--output", "json"]).ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        let rows = v["brokers"].as_array()?.clone();
        rows.iter()
            .all(|b| b["connected"] == true && b["draining"] == false)
            .then_some(rows)
    })
    .await;
    assert!(up.is_some(), "both brokers serve again");
    // `tether up` is still running, and stops cleanly.
    assert!(child.try_wait().unwrap().is_none());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    wait_line("stopped cleanly");
    let _ = child.wait();
}
