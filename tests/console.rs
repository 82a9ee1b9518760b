//! The fleet console in a real browser (issue 18): Debian's headless Chromium through
//! chromedriver (`tests/common/browser.rs`), against real `tether-control`, broker and agent
//! processes on 127.0.0.1. Each test signs in the way an operator does, with the link
//! `tether console --print-url` prints, and acts through the pages.
//!
//! `scripts/chromium` installs the browser (`./scripts/test` does it). Without it these
//! tests print SKIPPED locally and fail under `CI=true`.
//!
//! Screenshots for review land in `target/console-shots/`: Fleet, Brokers and Audit
//! (`no_console_errors_…`), Trust alerts with a renewal due and the appliance's Trust tab
//! after the renewal (`trust_alert_trigger_renewal`), the revoke form
//! (`revoke_needs_typed_id_…`).
//!
//! One browser at a time: the tests take turns through [`TURN`] (each starts its own
//! control, broker, agents and browser).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::Value;

use common::browser::{shots_dir, spki_pin, Browser};
use common::cluster::Cluster;
use common::control::merge_config;
use common::operators::tether;
use common::{wait_for, AgentProc, BrokerProc};

/// The tests run one at a time: one browser, and the machine's two cores for it.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Enrolled appliances each test starts with (the fleet also has `app-1` and `app-2`,
/// registered but never enrolled).
const APPS: [&str; 3] = ["app-3", "app-4", "app-5"];

struct Console {
    c: Cluster,
    broker: BrokerProc,
    _agents: Vec<(String, AgentProc)>,
    /// `https://127.0.0.1:PORT`, the console's origin.
    origin: String,
    b: Browser,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Control with a console on a port of its own (`extra_toml` merged too), a broker, the
/// [`APPS`] enrolled and connected, and a browser. `None` when the browser is missing
/// outside CI (the test then passes as SKIPPED).
async fn console(test: &str, extra_toml: &str) -> Option<Console> {
    let port = free_port();
    let toml = format!("[console]\nlisten = \"127.0.0.1:{port}\"\n{extra_toml}");
    let mut c = Cluster::new(&toml);
    let pin = spki_pin(&std::fs::read_to_string(c.fleet.data.join("ca/control.pem")).unwrap());
    let b = Browser::start(test, &[pin]).await?;
    let broker = c.add_broker("edge-1");
    let mut agents = Vec::new();
    for id in APPS {
        let state = c.enroll(id);
        // Disabled and enabled again, an agent tries again within a second.
        let agent = AgentProc::start(&state, &[broker.quic], &["--revoked-backoff", "1s"]);
        agents.push((id.to_owned(), agent));
    }
    for id in APPS {
        c.wait_connected(id, Some("edge-1")).await;
    }
    Some(Console {
        c,
        broker,
        _agents: agents,
        origin: format!("https://127.0.0.1:{port}"),
        b,
    })
}

/// `tether console --print-url` as the operator whose config directory is `ops`.
fn login_url(ops: &Path) -> String {
    let out = tether(ops, &["console", "--print-url"]).expect("tether console --print-url");
    out.lines()
        .find(|l| l.starts_with("https://"))
        .unwrap_or_else(|| panic!("a login URL in: {out}"))
        .trim()
        .to_owned()
}

impl Console {
    fn client(&self) -> &Client {
        &self.b.client
    }

    /// Open `path` (under the origin) and wait for the page to load.
    async fn open(&self, path: &str) {
        self.client()
            .goto(&format!("{}{path}", self.origin))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// Sign in with a fresh CLI link as the operator of `ops`; lands on Fleet.
    async fn sign_in_as(&self, ops: &Path) {
        let url = login_url(ops);
        assert!(
            url.starts_with(&format!("{}/console/login/", self.origin)),
            "{url}"
        );
        self.client().goto(&url).await.unwrap();
        let cont = self
            .client()
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::XPath("//button[contains(., 'Continue')]"))
            .await
            .expect("the login page asks to continue as the operator");
        cont.click().await.unwrap();
        self.wait_path("/console/").await;
    }

    async fn sign_in(&self) {
        self.sign_in_as(&self.c.ops).await;
    }

    /// Wait until the browser shows `path` (query ignored).
    async fn wait_path(&self, path: &str) {
        let shown = wait_for(Duration::from_secs(10), || async {
            let u = self.client().current_url().await.ok()?;
            (u.path() == path).then_some(())
        })
        .await;
        assert!(
            shown.is_some(),
            "the browser reached {path}; it shows {:?}",
            self.client().current_url().await.map(|u| u.to_string())
        );
    }

    async fn body_text(&self) -> String {
        self.client()
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The Fleet header's counts: `data-trust-state` → `data-count`.
    async fn header_counts(&self) -> Vec<(String, u64)> {
        self.read_fresh("the header's counts", || async {
            let mut counts = Vec::new();
            for tile in self
                .client()
                .find_all(Locator::Css("[data-trust-state][data-count]"))
                .await?
            {
                let state = tile.attr("data-trust-state").await?.unwrap_or_default();
                let n = tile.attr("data-count").await?.unwrap_or_default();
                counts.push((state, n.parse().unwrap_or(u64::MAX)));
            }
            Ok(counts)
        })
        .await
    }

    /// The table's rows: (`data-appliance-id`, `data-trust-state`).
    async fn rows(&self) -> Vec<(String, String)> {
        self.read_fresh("the table's rows", || async {
            let mut rows = Vec::new();
            for r in self
                .client()
                .find_all(Locator::Css("tr[data-appliance-id]"))
                .await?
            {
                rows.push((
                    r.attr("data-appliance-id").await?.unwrap_or_default(),
                    r.attr("data-trust-state").await?.unwrap_or_default(),
                ));
            }
            Ok(rows)
        })
        .await
    }

    /// Read the open page with `read`, again from the start if the page replaced its
    /// elements meanwhile (a live update re-renders the table and the header: elements
    /// found just before are then stale).
    async fn read_fresh<T, F, Fut>(&self, what: &str, read: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
    {
        let mut last = None;
        for _ in 0..10 {
            match read().await {
                Ok(v) => return v,
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("cannot read {what} from the page: {last:?}");
    }

    /// The trust state the open page's row for `id` shows (`None`: no row).
    async fn row_state(&self, id: &str) -> Option<String> {
        self.row_attr(id, "data-trust-state").await
    }

    /// Attribute `attr` of the open page's row for `id`.
    async fn row_attr(&self, id: &str, attr: &str) -> Option<String> {
        let row = self
            .client()
            .find(Locator::Css(&format!("tr[data-appliance-id=\"{id}\"]")))
            .await
            .ok()?;
        row.attr(attr).await.ok()?
    }

    /// Click the button (or submit input) whose text contains `text`, inside the element
    /// matching `scope` (CSS), or anywhere.
    async fn click_button(&self, scope: Option<&str>, text: &str) {
        let xpath = format!(
            "//*[self::button or self::a][contains(normalize-space(.), '{text}')] | \
             //input[@type='submit'][contains(@value, '{text}')]"
        );
        // The appliance page reads itself afresh on a live change; an element found just
        // before such a reload is gone, so find and click again.
        let mut last = None;
        for _ in 0..5 {
            let el = match scope {
                Some(css) => match self.client().find(Locator::Css(css)).await {
                    Ok(e) => e.find(Locator::XPath(&format!(".{xpath}"))).await,
                    Err(e) => Err(e),
                },
                None => self.client().find(Locator::XPath(&xpath)).await,
            };
            match el {
                Ok(el) => match el.click().await {
                    Ok(()) => return,
                    Err(e) => last = Some(e.to_string()),
                },
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!("a '{text}' button to click: {last:?}");
    }

    /// Mark the open document, so a later check can tell it was never reloaded.
    async fn mark_document(&self) {
        self.client()
            .execute("window.__loadId = 4242; return true;", vec![])
            .await
            .unwrap();
    }

    async fn document_marked(&self) -> bool {
        self.client()
            .execute("return window.__loadId === 4242;", vec![])
            .await
            .unwrap()
            == Value::Bool(true)
    }

    /// The text of `#live-status`.
    async fn live_status(&self) -> String {
        match self.client().find(Locator::Id("live-status")).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Audit entries (newest last) whose action is `action` and target `target`.
    fn audit(&self, action: &str, target: &str) -> Vec<Value> {
        common::operators::audit_entries(&self.c.fleet)
            .into_iter()
            .filter(|e| e["action"] == action && e["target"] == target)
            .collect()
    }

    /// No JavaScript error, CSP violation or failed load since the last check.
    async fn assert_clean_log(&self, page: &str) {
        let problems = self.b.problems().await;
        assert!(
            problems.is_empty(),
            "{page}: the browser logged {problems:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_cli_link_then_logout() {
    let _turn = TURN.lock().await;
    let Some(t) = console("login_with_cli_link_then_logout", "").await else {
        return;
    };
    let url = login_url(&t.c.ops);
    t.client().goto(&url).await.unwrap();
    let body = t.body_text().await;
    assert!(
        body.contains("admin"),
        "the login page names who is signing in: {body}"
    );
    t.click_button(None, "Continue").await;
    t.wait_path("/console/").await;
    assert!(
        t.body_text().await.contains("app-3"),
        "Fleet lists the appliances"
    );

    // The session cookie: __Host-, HttpOnly, SameSite=Strict, Secure.
    let cookies = t.client().get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name().starts_with("__Host-"))
        .unwrap_or_else(|| panic!("a __Host- cookie: {cookies:?}"));
    assert_eq!(session.http_only(), Some(true), "{session:?}");
    assert_eq!(session.secure(), Some(true), "{session:?}");
    assert_eq!(
        format!("{:?}", session.same_site()),
        "Some(Strict)",
        "{session:?}"
    );
    assert_eq!(session.path(), Some("/"), "{session:?}");
    let login_entries = t.audit("console.login", "admin");
    assert_eq!(login_entries.len(), 1, "the sign-in is audited once");

    // Log out: the session ends, and the used link does not sign in again.
    t.click_button(None, "Log out").await;
    t.wait_path("/console/login").await;
    t.open("/console/").await;
    t.wait_path("/console/login").await;
    t.client().goto(&url).await.unwrap();
    let refused = wait_for(Duration::from_secs(5), || async {
        let e = t.client().find(Locator::Id("login-error")).await.ok()?;
        let text = e.text().await.ok()?;
        (!text.is_empty()).then_some(text)
    })
    .await
    .expect("the used link is refused on its page");
    eprintln!("the used link's page says: {refused}");
    let cont = t
        .client()
        .find(Locator::XPath("//button[contains(., 'Continue')]"))
        .await
        .unwrap();
    assert!(
        !cont.is_displayed().await.unwrap(),
        "no Continue for a used link"
    );
    t.open("/console/").await;
    t.wait_path("/console/login").await;
    assert!(
        !t.audit("console.logout", "admin").is_empty(),
        "the logout is audited"
    );
    // The browser logs the used link's refused preview (403) as a failed load; nothing
    // else.
    let logged = t.b.problems().await;
    assert!(
        logged
            .iter()
            .all(|m| m.contains("/preview") && m.contains("403")),
        "{logged:#?}"
    );
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_summary_matches_cli() {
    let _turn = TURN.lock().await;
    let Some(t) = console("fleet_summary_matches_cli", "").await else {
        return;
    };
    t.c.tether(&["appliance", "disable", "app-4"]).unwrap();
    t.sign_in().await;
    let cli: Value =
        serde_json::from_str(&t.c.tether(&["fleet", "trust", "--output", "json"]).unwrap())
            .unwrap();
    let header = t.header_counts().await;
    let counts = cli["counts"].as_object().unwrap();
    assert!(!counts.is_empty(), "{cli}");
    for (state, n) in counts {
        let shown = header
            .iter()
            .find(|(s, _)| s == state)
            .unwrap_or_else(|| panic!("a header tile for {state}: {header:?}"));
        assert_eq!(
            Some(shown.1),
            n.as_u64(),
            "{state}: the header shows {}, the CLI {n}",
            shown.1
        );
    }
    // Each count links to the table filtered by it.
    let rows = t.rows().await;
    assert_eq!(
        rows.len() as u64,
        cli["total"].as_u64().unwrap(),
        "{rows:?}"
    );
    t.assert_clean_log("fleet").await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_live_in_the_url() {
    let _turn = TURN.lock().await;
    let Some(t) = console("filters_live_in_the_url", "").await else {
        return;
    };
    t.sign_in().await;
    let all = t.rows().await;
    assert_eq!(all.len(), 5, "{all:?}");
    // Follow the not_enrolled tile.
    t.client()
        .find(Locator::Css("a[href*='trust_state=not_enrolled']"))
        .await
        .expect("the not_enrolled tile links to the filtered table")
        .click()
        .await
        .unwrap();
    let only = |rows: &[(String, String)]| {
        !rows.is_empty() && rows.iter().all(|(_, s)| s == "not_enrolled")
    };
    let filtered = wait_for(Duration::from_secs(5), || async {
        let r = t.rows().await;
        only(&r).then_some(r)
    })
    .await
    .expect("only not_enrolled rows");
    assert_eq!(filtered.len(), 2, "{filtered:?}");
    let url = t.client().current_url().await.unwrap();
    assert!(
        url.query()
            .unwrap_or_default()
            .contains("trust_state=not_enrolled"),
        "{url}"
    );
    // Reload keeps the filter.
    t.client().refresh().await.unwrap();
    assert!(only(&t.rows().await), "the filter survives a reload");
    // Another page, then Back: the filter again.
    t.open("/console/?tenant=acme&q=app-3").await;
    let one = t.rows().await;
    assert_eq!(one.len(), 1, "{one:?}");
    t.client().back().await.unwrap();
    let back = wait_for(Duration::from_secs(5), || async {
        let u = t.client().current_url().await.ok()?;
        let r = t.rows().await;
        (u.query()
            .unwrap_or_default()
            .contains("trust_state=not_enrolled")
            && only(&r))
        .then_some(())
    })
    .await;
    assert!(back.is_some(), "Back shows the filtered table again");
    t.assert_clean_log("filters").await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_alert_trigger_renewal() {
    let _turn = TURN.lock().await;
    // Certificates of 20 hours: under a day left, so renewal_due with an alert.
    let Some(mut t) = console(
        "trust_alert_trigger_renewal",
        "[certificates]\nappliance = \"20h\"\n",
    )
    .await
    else {
        return;
    };
    let before = t.c.show("app-3");
    // The vendor lengthens certificates to 30 days; existing ones keep their 20 hours.
    t.c.kill_control();
    merge_config(&t.c.fleet.data, "[certificates]\nappliance = \"30days\"\n");
    t.c.restart_control();
    t.c.wait_connected("app-3", Some("edge-1")).await;
    t.sign_in().await;
    t.open("/console/alerts").await;
    let row = "[data-appliance-id=\"app-3\"]";
    t.client()
        .find(Locator::Css(row))
        .await
        .expect("app-3 has an alert (renewal due)");
    t.b.screenshot("alerts").await;
    t.click_button(Some(row), "Trigger renewal").await;
    // The audit says who and through what.
    let entry = wait_for(Duration::from_secs(5), || async {
        t.audit("appliance.request_renewal", "app-3").pop()
    })
    .await
    .expect("the renewal trigger is audited");
    assert_eq!(entry["actor"]["name"], "admin", "{entry}");
    assert!(
        entry.to_string().contains("console"),
        "via=console: {entry}"
    );
    // The agent renews at its next heartbeat; the alert goes.
    let gone = wait_for(Duration::from_secs(20), || async {
        t.open("/console/alerts").await;
        t.client()
            .find(Locator::Css(row))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the alert for app-3 went away after renewal"
    );
    // An open Trust alerts page follows by itself: app-4 renewed from the CLI leaves it
    // without a reload, app-5's alert stays.
    let row4 = "[data-appliance-id=\"app-4\"]";
    t.client()
        .find(Locator::Css(row4))
        .await
        .expect("app-4 has an alert (renewal due)");
    t.mark_document().await;
    t.c.tether(&["appliance", "renew", "app-4"]).unwrap();
    let gone = wait_for(Duration::from_secs(25), || async {
        t.client()
            .find(Locator::Css(row4))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "app-4's alert left the open page");
    assert!(
        t.document_marked().await,
        "the Trust alerts page was never reloaded"
    );
    t.client()
        .find(Locator::Css("[data-appliance-id=\"app-5\"]"))
        .await
        .expect("app-5's alert stays");
    let after = t.c.show("app-3");
    let serial = |v: &Value| v["certificate"]["serial"].as_str().map(str::to_owned);
    assert_ne!(
        serial(&after),
        serial(&before),
        "a new certificate: {after}"
    );
    // The Trust tab shows the new serial and the previous one with its overlap end.
    t.open("/console/appliances/app-3?tab=trust").await;
    let trust = t.body_text().await;
    let new_serial = serial(&after).unwrap();
    assert!(
        trust.contains(&new_serial),
        "the Trust tab shows {new_serial}: {trust}"
    );
    if let Some(old) = serial(&before) {
        assert!(
            trust.contains(&old),
            "the Trust tab shows the previous {old}: {trust}"
        );
    }
    t.b.screenshot("appliance-trust").await;
    t.assert_clean_log("alerts and trust").await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_needs_typed_id_and_updates_live() {
    let _turn = TURN.lock().await;
    let Some(t) = console("revoke_needs_typed_id_and_updates_live", "").await else {
        return;
    };
    t.sign_in().await;
    const REVOKED: &str = r#"tether_sessions_closed_total{code="revoked"}"#;
    let closed_before = t.broker.metric(REVOKED).await;
    // Tab 1: Fleet, marked so a reload would show.
    let fleet_tab = t.client().window().await.unwrap();
    t.mark_document().await;
    assert_eq!(t.row_state("app-3").await.as_deref(), Some("trusted"));
    // Tab 2: the appliance, its revoke form.
    let tab2 = t.client().new_window(true).await.unwrap();
    t.client().switch_to_window(tab2.handle).await.unwrap();
    t.open("/console/appliances/app-3").await;
    t.click_button(None, "Revoke").await;
    let confirm = t
        .client()
        .wait()
        .at_most(Duration::from_secs(5))
        .for_element(Locator::Css("[name=confirm_id]"))
        .await
        .expect("the revoke form asks for the id");
    let text = t.body_text().await;
    assert!(
        text.contains("enroll again"),
        "the form says what revoke does: {text}"
    );
    t.b.screenshot("revoke-dialog").await;
    // A wrong id: the appliance stays.
    confirm.send_keys("app-4").await.unwrap();
    t.client()
        .find(Locator::Css("[name=reason]"))
        .await
        .unwrap()
        .send_keys("cloned disk found at a customer site")
        .await
        .unwrap();
    let submit = t
        .client()
        .find(Locator::Css(
            "form:has([name=confirm_id]) button[type=submit]",
        ))
        .await
        .expect("the revoke form's submit button");
    if submit.is_enabled().await.unwrap() {
        submit.click().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        t.c.show("app-3")["status"],
        "active",
        "a wrong id revokes nothing"
    );
    // The right id.
    t.open("/console/appliances/app-3").await;
    t.click_button(None, "Revoke").await;
    let confirm = t
        .client()
        .wait()
        .for_element(Locator::Css("[name=confirm_id]"))
        .await
        .unwrap();
    confirm.send_keys("app-3").await.unwrap();
    t.client()
        .find(Locator::Css("[name=reason]"))
        .await
        .unwrap()
        .send_keys("cloned disk found at a customer site")
        .await
        .unwrap();
    let revoked_at = Instant::now();
    t.client()
        .find(Locator::Css(
            "form:has([name=confirm_id]) button[type=submit]",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // Tab 1 changes by itself.
    t.client().switch_to_window(fleet_tab).await.unwrap();
    let live = wait_for(Duration::from_secs(5), || async {
        (t.row_state("app-3").await.as_deref() == Some("trust_revoked")).then_some(())
    })
    .await;
    assert!(
        live.is_some(),
        "the Fleet tab shows app-3 revoked without a reload"
    );
    eprintln!(
        "the other tab showed the revocation {:?} after the click",
        revoked_at.elapsed()
    );
    assert!(
        t.document_marked().await,
        "the Fleet tab was never reloaded"
    );
    t.broker.wait_metric(REVOKED, closed_before + 1.0).await;
    let entry = t
        .audit("appliance.revoke", "app-3")
        .pop()
        .expect("the revocation is audited");
    assert!(
        entry
            .to_string()
            .contains("cloned disk found at a customer site"),
        "the reason is in the audit: {entry}"
    );
    assert!(
        entry.to_string().contains("console"),
        "via=console: {entry}"
    );
    t.assert_clean_log("revoke").await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revoke_form_follows_the_appliance_and_keeps_what_was_typed() {
    let _turn = TURN.lock().await;
    let Some(t) = console(
        "the_revoke_form_follows_the_appliance_and_keeps_what_was_typed",
        "",
    )
    .await
    else {
        return;
    };
    t.sign_in().await;
    t.open("/console/appliances/app-4").await;
    t.click_button(None, "Revoke").await;
    let confirm = t
        .client()
        .wait()
        .at_most(Duration::from_secs(5))
        .for_element(Locator::Css("[name=confirm_id]"))
        .await
        .expect("the revoke form");
    // Wait for the live stream before changing anything behind the page's back.
    let live = wait_for(Duration::from_secs(5), || async {
        (t.live_status().await == "live").then_some(())
    })
    .await;
    assert!(live.is_some(), "the revoke form is live");
    confirm.send_keys("app-").await.unwrap();
    t.client()
        .find(Locator::Css("[name=reason]"))
        .await
        .unwrap()
        .send_keys("disk swap")
        .await
        .unwrap();
    t.mark_document().await;
    let head_status = || async {
        t.client()
            .find(Locator::Id("appliance-head"))
            .await
            .ok()?
            .attr("data-status")
            .await
            .ok()?
    };
    let notice_shown = || async {
        match t.client().find(Locator::Id("revoke-already")).await {
            Ok(n) => n.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    };
    // Disabled from the CLI: the header follows, the form stays as typed.
    t.c.tether(&["appliance", "disable", "app-4"]).unwrap();
    let disabled = wait_for(Duration::from_secs(5), || async {
        (head_status().await.as_deref() == Some("disabled")).then_some(())
    })
    .await;
    assert!(disabled.is_some(), "the header shows app-4 disabled");
    assert!(!notice_shown().await, "not revoked yet");
    // Revoked from the CLI meanwhile: the form says so.
    t.c.tether(&["appliance", "revoke", "app-4"]).unwrap();
    let said = wait_for(Duration::from_secs(5), || async {
        notice_shown().await.then_some(())
    })
    .await;
    assert!(said.is_some(), "the form says app-4 is revoked already");
    assert_eq!(head_status().await.as_deref(), Some("revoked"));
    assert!(t.document_marked().await, "the form was never reloaded");
    let tr = &t;
    let typed = |name: &'static str| async move {
        tr.client()
            .find(Locator::Css(&format!("[name={name}]")))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .unwrap_or_default()
    };
    assert_eq!(typed("confirm_id").await, "app-");
    assert_eq!(typed("reason").await, "disk swap");
    t.b.screenshot("revoke-dialog-revoked-elsewhere").await;
    t.assert_clean_log("revoke form live").await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signed_operations_tab_shows_the_customers_rules_and_manifests() {
    let _turn = TURN.lock().await;
    let Some(t) = console(
        "the_signed_operations_tab_shows_the_customers_rules_and_manifests",
        "",
    )
    .await
    else {
        return;
    };
    // app-1, enrolled now, runs with a customer directory: policy, approver `acme`.
    let state = t.c.enroll("app-1");
    let root = t.c.tmp().to_path_buf();
    let customer = common::customer::customer_dir(&root, common::customer::POLICY);
    let _agent = AgentProc::start(
        &state,
        &[t.broker.quic],
        &["--customer-dir", customer.to_str().unwrap()],
    );
    t.c.wait_connected("app-1", Some("edge-1")).await;
    let policy_sha = tether_ops::sha256_hex(common::customer::POLICY.as_bytes());
    let shown = wait_for(Duration::from_secs(15), || async {
        let v = t.c.show("app-1");
        (v["connection"]["agent_status"]["policy.sha256"] == policy_sha.as_str()).then_some(v)
    })
    .await
    .expect("the agent's status reaches control");
    let approvers = shown["connection"]["agent_status"]["approvers"]
        .as_str()
        .unwrap()
        .to_owned();
    // An observe command runs without approval and leaves a signed manifest.
    let (code, out, err) = t.c.exec(&["app-1", "--", "echo", "console-tab"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("console-tab"), "{out}");
    t.sign_in().await;
    t.open("/console/appliances/app-1?tab=signed").await;
    let text = t.body_text().await;
    // The command's outcome, with its manifest's SHA-256, as control recorded it.
    let outcome = t
        .audit("appliance.exec", "app-1")
        .pop()
        .expect("the command is audited");
    let manifest_sha = outcome["details"]["manifest_sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("a signed manifest in {outcome}"))
        .to_owned();
    for want in [
        policy_sha.as_str(),
        "observe",
        "operate",
        "acme",
        "appliance.exec",
        manifest_sha.as_str(),
    ] {
        assert!(text.contains(want), "the Signed tab shows {want}: {text}");
    }
    let fingerprint = approvers.split_once(':').map_or("", |(_, f)| f);
    assert!(
        !fingerprint.is_empty() && text.contains(fingerprint),
        "the Signed tab shows the approver's fingerprint {approvers}: {text}"
    );
    // An appliance whose agent has no customer directory says so plainly.
    t.open("/console/appliances/app-3?tab=signed").await;
    let plain = t.body_text().await;
    assert!(
        plain.contains("signed-ops/1"),
        "app-3's tab says it did not announce signed operations: {plain}"
    );
    t.open("/console/appliances/app-1?tab=signed").await;
    t.b.screenshot("appliance-signed").await;
    t.assert_clean_log("signed operations tab").await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_enable_round_trip() {
    let _turn = TURN.lock().await;
    let Some(t) = console("disable_enable_round_trip", "").await else {
        return;
    };
    t.sign_in().await;
    t.open("/console/appliances/app-4").await;
    t.click_button(None, "Disable").await;
    let disabled = wait_for(Duration::from_secs(5), || async {
        (t.c.show("app-4")["status"] == "disabled").then_some(())
    })
    .await;
    assert!(disabled.is_some(), "Disable disables");
    let off = wait_for(Duration::from_secs(5), || async {
        t.broker
            .sessions()
            .await
            .iter()
            .all(|s| s["appliance_id"] != "app-4")
            .then_some(())
    })
    .await;
    assert!(off.is_some(), "the disabled appliance's session closed");
    t.open("/console/appliances/app-4").await;
    assert!(t.body_text().await.contains("disabled"));
    t.click_button(None, "Enable").await;
    let enabled = wait_for(Duration::from_secs(5), || async {
        (t.c.show("app-4")["status"] == "active").then_some(())
    })
    .await;
    assert!(enabled.is_some(), "Enable enables");
    t.c.wait_connected("app-4", Some("edge-1")).await;
    for action in ["appliance.disable", "appliance.enable"] {
        let e = t
            .audit(action, "app-4")
            .pop()
            .unwrap_or_else(|| panic!("{action} audited"));
        assert!(e.to_string().contains("console"), "via=console: {e}");
    }
    t.assert_clean_log("disable/enable").await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_sees_no_actions_and_posts_are_refused() {
    let _turn = TURN.lock().await;
    let Some(t) = console("viewer_sees_no_actions_and_posts_are_refused", "").await else {
        return;
    };
    let vic = t.c.invite_operator("vic", "viewer");
    t.sign_in_as(&vic).await;
    t.open("/console/appliances/app-3").await;
    let buttons = t
        .client()
        .find_all(Locator::Css(
            "form[method=post] button, form[method=POST] button",
        ))
        .await
        .unwrap();
    let mut texts = Vec::new();
    for b in buttons {
        texts.push(b.text().await.unwrap());
    }
    assert!(
        texts.iter().all(|t| ![
            "Revoke",
            "Disable",
            "Trigger renewal",
            "Create enrollment token"
        ]
        .iter()
        .any(|a| t.contains(a))),
        "a viewer sees no action buttons: {texts:?}"
    );
    // A forged request from the page itself, with the page's own CSRF token.
    let status = t
        .client()
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
               const field = document.querySelector('input[name=csrf]');
               const token = field ? field.value : '';
               fetch('/console/appliances/app-3/disable', {
                   method: 'POST',
                   headers: {'X-CSRF-Token': token, 'Content-Type': 'application/x-www-form-urlencoded'},
                   body: 'csrf=' + encodeURIComponent(token),
               }).then(r => done(r.status), e => done(String(e)));"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, Value::from(403), "a viewer's POST is refused");
    assert_eq!(t.c.show("app-3")["status"], "active");
    let denied = t
        .audit("appliance.disable", "app-3")
        .into_iter()
        .filter(|e| e["outcome"] != "success")
        .count();
    assert_eq!(denied, 1, "the denial is audited");
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_post_is_refused() {
    let _turn = TURN.lock().await;
    let Some(t) = console("cross_origin_post_is_refused", "").await else {
        return;
    };
    t.sign_in().await;
    // The attacker's page on another origin: a form that posts itself to the console.
    let attacker = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let attacker_addr = attacker.local_addr().unwrap();
    let page = format!(
        "<!doctype html><html><body onload=\"document.forms[0].submit()\">\
         <form method=post action=\"{}/console/appliances/app-3/revoke\">\
         <input name=confirm_id value=app-3><input name=reason value=pwned>\
         </form></body></html>",
        t.origin
    );
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = attacker.accept().await else {
                break;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    t.client()
        .goto(&format!("http://{attacker_addr}/"))
        .await
        .unwrap();
    // The form posts to the console: refused.
    let landed = wait_for(Duration::from_secs(5), || async {
        let u = t.client().current_url().await.ok()?;
        u.as_str().starts_with(&t.origin).then_some(u)
    })
    .await
    .expect("the form was submitted to the console");
    eprintln!("the forged post landed on {landed}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.c.show("app-3")["status"], "active", "nothing revoked");
    assert!(
        t.audit("appliance.revoke", "app-3")
            .iter()
            .all(|e| e["outcome"] != "success"),
        "no successful revoke in the audit"
    );
    let refused = t.audit("console.csrf_refused", "").len()
        + common::operators::audit_entries(&t.c.fleet)
            .iter()
            .filter(|e| e["action"] == "console.csrf_refused")
            .count();
    assert!(refused >= 1, "the refusal is audited");
    let _ = t.b.problems().await;
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_reconnects_after_control_restart() {
    let _turn = TURN.lock().await;
    let Some(mut t) = console("sse_reconnects_after_control_restart", "").await else {
        return;
    };
    t.sign_in().await;
    let live = wait_for(Duration::from_secs(5), || async {
        (t.live_status().await == "live").then_some(())
    })
    .await;
    assert!(
        live.is_some(),
        "the page is live: {:?}",
        t.live_status().await
    );
    t.mark_document().await;
    t.c.kill_control();
    let lost = wait_for(Duration::from_secs(10), || async {
        t.live_status().await.contains("reconnecting").then_some(())
    })
    .await;
    assert!(
        lost.is_some(),
        "the page says it is reconnecting: {:?}",
        t.live_status().await
    );
    t.c.restart_control();
    let back = wait_for(Duration::from_secs(15), || async {
        (t.live_status().await == "live").then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the page is live again: {:?}",
        t.live_status().await
    );
    // Fresh data arrives by itself, without a reload.
    t.c.wait_connected("app-5", Some("edge-1")).await;
    t.mark_document().await;
    t.c.tether(&["appliance", "disable", "app-5"]).unwrap();
    let updated = wait_for(Duration::from_secs(5), || async {
        (t.row_attr("app-5", "data-status").await.as_deref() == Some("disabled")).then_some(())
    })
    .await;
    assert!(
        updated.is_some(),
        "the row follows a change made after the restart"
    );
    assert!(t.document_marked().await, "the page was never reloaded");
    t.b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_console_errors_no_csp_violations_and_screenshots() {
    let _turn = TURN.lock().await;
    let Some(t) = console("no_console_errors_no_csp_violations_and_screenshots", "").await else {
        return;
    };
    // A page before signing in.
    t.open("/console/login").await;
    t.assert_clean_log("/console/login").await;
    t.sign_in().await;
    t.c.tether(&["appliance", "disable", "app-5"]).unwrap();
    let shots = [
        ("/console/", Some("fleet")),
        ("/console/alerts", None),
        ("/console/appliances/app-3?tab=trust", None),
        ("/console/appliances/app-3", None),
        ("/console/brokers", Some("brokers")),
        ("/console/operators", None),
        ("/console/audit", Some("audit")),
        ("/console/account", None),
    ];
    for (path, shot) in shots {
        t.open(path).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(name) = shot {
            let p = t.b.screenshot(name).await;
            assert!(
                std::fs::metadata(&p).unwrap().len() > 1000,
                "{}",
                p.display()
            );
        }
        t.assert_clean_log(path).await;
    }
    eprintln!("screenshots in {}", shots_dir().display());
    t.b.close().await;
}
