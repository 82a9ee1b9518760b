//! The report as a page a person would rather look at than read: one self-contained HTML
//! file (inline SVG, no script, no network) next to the JSON, with the headline figures,
//! the Tether/baseline ratios, latency percentiles as bars, and connections, memory and
//! CPU over time from the per-second samples.
//!
//! It renders the JSON form of the report ([`crate::report::Report`] serialized), so it
//! can also be made again from an old `FILE.json`.

use std::fmt::Write as _;

use serde_json::Value;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const PAD: f64 = 44.0;

/// Escape text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fmt(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e15 {
                format!("{}", f as i64)
            } else {
                format!("{f:.3}")
            }
        }
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

/// A line chart of `(x, y)` points, y from 0; `None` when there is nothing to draw.
fn line_chart(title: &str, unit: &str, points: &[(f64, f64)]) -> Option<String> {
    if points.len() < 2 {
        return None;
    }
    let max_x = points.iter().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let max_y = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    let sx = |x: f64| PAD + x / max_x * (WIDTH - 2.0 * PAD);
    let sy = |y: f64| HEIGHT - PAD - y / max_y * (HEIGHT - 2.0 * PAD);
    let mut poly = String::new();
    for (x, y) in points {
        let _ = write!(poly, "{:.1},{:.1} ", sx(*x), sy(*y));
    }
    Some(format!(
        r##"<figure><figcaption>{title}</figcaption>
<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{title}">
<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="#999"/>
<text x="{PAD}" y="{t}" font-size="11" text-anchor="end" dx="-4">{max_y_label}</text>
<text x="{PAD}" y="{b}" font-size="11" text-anchor="end" dx="-4">0</text>
<text x="{r}" y="{xl}" font-size="11" text-anchor="end">{max_x:.0} s</text>
<text x="{PAD}" y="{xl}" font-size="11">{unit}</text>
<polyline fill="none" stroke="#2a6fdb" stroke-width="2" points="{poly}"/>
</svg></figure>
"##,
        title = esc(title),
        b = HEIGHT - PAD,
        r = WIDTH - PAD,
        t = PAD + 4.0,
        xl = HEIGHT - PAD + 18.0,
        max_y_label = short(max_y),
    ))
}

/// Horizontal bars for named values (latency percentiles), skipping nulls.
fn bar_chart(title: &str, unit: &str, bars: &[(&str, Option<f64>)]) -> Option<String> {
    let bars: Vec<(&str, f64)> = bars.iter().filter_map(|(n, v)| Some((*n, (*v)?))).collect();
    if bars.is_empty() {
        return None;
    }
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let row = 24.0;
    let height = PAD + row * bars.len() as f64;
    let mut out = format!(
        r#"<figure><figcaption>{}</figcaption>
<svg viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" aria-label="{}">
"#,
        esc(title),
        esc(title)
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 10.0 + row * i as f64;
        let w = v / max * (WIDTH - 3.0 * PAD - 60.0);
        let _ = writeln!(
            out,
            r##"<text x="{PAD}" y="{ty}" font-size="12" text-anchor="end" dx="-4">{name}</text><rect x="{PAD}" y="{y}" width="{w:.1}" height="16" fill="#2a6fdb"/><text x="{tx:.1}" y="{ty}" font-size="12" dx="4">{val} {unit}</text>"##,
            ty = y + 12.0,
            tx = PAD + w,
            val = short(*v),
            name = esc(name),
            unit = esc(unit),
        );
    }
    out.push_str("</svg></figure>\n");
    Some(out)
}

/// A number short enough for an axis label.
fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The page for `report` (the report's JSON).
pub fn render(report: &Value) -> String {
    let mut out = String::new();
    header(&mut out, report);
    figures(&mut out, report);
    errors(&mut out, report);
    latency(&mut out, report);
    over_time(&mut out, report);
    let _ = write!(
        out,
        "<p>Full data: the JSON report next to this page.</p>\n</body></html>\n"
    );
    out
}

/// The page's head and style, its title and the machine the run was on.
fn header(out: &mut String, report: &Value) {
    let scenario = report["scenario"].as_str().unwrap_or("?");
    // Reports from before `--transport` were all QUIC.
    let transport = report["transport"].as_str().unwrap_or("quic");
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Tether load test: {s} over {t}, {n} appliances</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 60rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .25rem .75rem; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ margin: 1.5rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .25rem; }}
.good {{ color: #17803d; }} .bad {{ color: #b42318; }}
</style></head><body>
<h1>Tether load test: <code>{s}</code> over <code>{t}</code></h1>
<p>{n} appliances over {transport_long}, {b} broker(s); {cores} cores, {mem} GiB, kernel {kernel}, load average {load} at the start, {load_end} at the end.</p>
"#,
        s = esc(scenario),
        t = esc(transport),
        transport_long = esc(match transport {
            "tcp" => "TLS over TCP",
            "quic" => "QUIC",
            other => other,
        }),
        n = fmt(&report["appliances"]),
        b = fmt(&report["brokers"]),
        cores = fmt(&report["machine"]["cores"]),
        mem = num(&report["machine"]["memory_bytes"])
            .map(|m| format!("{:.1}", m / (1u64 << 30) as f64))
            .unwrap_or_else(|| "?".into()),
        kernel = fmt(&report["machine"]["kernel"]),
        load = fmt(&report["machine"]["load_average_1m"]),
        load_end = fmt(&report["machine"]["load_average_1m_end"]),
    );
}

/// The headline figures, with the baseline's and the ratio where there is one.
fn figures(out: &mut String, report: &Value) {
    let fields = [
        ("handshakes_per_sec", "handshakes / s", true),
        ("connect_p50_ms", "connect p50, ms", false),
        ("connect_p99_ms", "connect p99, ms", false),
        ("broker_rss_bytes", "broker RSS, bytes", false),
        ("broker_bytes_per_conn", "broker bytes / connection", false),
        ("broker_cpu_seconds", "broker CPU, s", false),
        ("command_rtt_p50_ms", "command round trip p50, ms", false),
        ("command_rtt_p99_ms", "command round trip p99, ms", false),
        ("revoke_to_close_p50_ms", "revoke → close p50, ms", false),
        ("revoke_to_close_p99_ms", "revoke → close p99, ms", false),
        (
            "revoked_reconnects_accepted",
            "revoked reconnects accepted",
            false,
        ),
    ];
    let has_baseline = report["baseline"].is_object();
    out.push_str("<table><tr><th>figure</th><th>Tether</th>");
    if has_baseline {
        let server = match report["transport"].as_str() {
            Some("tcp") => "bare TLS/TCP",
            _ => "bare quinn",
        };
        let _ = write!(out, "<th>{server}</th><th>Tether / baseline</th>");
    }
    out.push_str("</tr>\n");
    for (key, label, higher_is_better) in fields {
        let v = &report[key];
        if v.is_null() {
            continue;
        }
        let _ = write!(out, "<tr><td>{label}</td><td class=\"n\">{}</td>", fmt(v));
        if has_baseline {
            let ratio = &report["ratios"][key];
            let class = match num(ratio) {
                Some(r) if (r >= 1.0) == higher_is_better => "good",
                Some(_) => "bad",
                None => "",
            };
            let _ = write!(
                out,
                "<td class=\"n\">{}</td><td class=\"n {class}\">{}</td>",
                fmt(&report["baseline"][key]),
                fmt(ratio)
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

/// The errors by kind, or that there were none.
fn errors(out: &mut String, report: &Value) {
    if let Some(errors) = report["errors"].as_object().filter(|e| !e.is_empty()) {
        out.push_str("<h2>Errors</h2><table><tr><th>kind</th><th>count</th></tr>\n");
        for (k, v) in errors {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
                esc(k),
                fmt(v)
            );
        }
        out.push_str("</table>\n");
    } else {
        out.push_str("<p>No errors.</p>\n");
    }
}

/// Latency distributions: the percentiles the run measured, as bars.
fn latency(out: &mut String, report: &Value) {
    out.push_str("<h2>Latency</h2>\n");
    // The report's detail is flattened into the top level.
    let d = report;
    let charts = [
        bar_chart(
            "Connect time (start → first session)",
            "ms",
            &[
                ("p50", num(&report["connect_p50_ms"])),
                ("p90", num(&d["connect_p90_ms"])),
                ("p99", num(&report["connect_p99_ms"])),
                ("max", num(&d["connect_max_ms"])),
            ],
        ),
        bar_chart(
            "Command round trip",
            "ms",
            &[
                ("p50", num(&report["command_rtt_p50_ms"])),
                ("p99", num(&report["command_rtt_p99_ms"])),
            ],
        ),
        bar_chart(
            "Revoke → session closed",
            "ms",
            &[
                ("p50", num(&report["revoke_to_close_p50_ms"])),
                ("p99", num(&report["revoke_to_close_p99_ms"])),
            ],
        ),
        bar_chart(
            "Churn: reconnect (fresh agent → session)",
            "ms",
            &[
                ("p50", num(&d["churn"]["reconnect_p50_ms"])),
                ("p90", num(&d["churn"]["reconnect_p90_ms"])),
                ("p99", num(&d["churn"]["reconnect_p99_ms"])),
                ("max", num(&d["churn"]["reconnect_max_ms"])),
            ],
        ),
        bar_chart(
            "Drain: SIGTERM → session on another broker",
            "ms",
            &[
                ("p50", num(&d["drain"]["rejoin_p50_ms"])),
                ("p90", num(&d["drain"]["rejoin_p90_ms"])),
                ("p99", num(&d["drain"]["rejoin_p99_ms"])),
                ("max", num(&d["drain"]["rejoin_max_ms"])),
            ],
        ),
    ];
    for c in charts.into_iter().flatten() {
        out.push_str(&c);
    }
}

/// Connections, memory and CPU over time, from the per-second samples.
fn over_time(out: &mut String, report: &Value) {
    // The report's detail (with the samples) is flattened into the top level.
    let samples = report["samples"].as_array().cloned().unwrap_or_default();
    let series = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| Some((num(&s["t"])?, f(s)?)))
            .collect()
    };
    out.push_str("<h2>Over time</h2>\n");
    let mib = |v: &Value| num(v).map(|b| b / (1u64 << 20) as f64);
    let charts = [
        line_chart(
            "Appliances connected",
            "appliances",
            &series(&|s| num(&s["connected"])),
        ),
        line_chart(
            "Broker memory (RSS)",
            "MiB",
            &series(&|s| mib(&s["broker_rss_bytes"])),
        ),
        line_chart(
            "Broker CPU used since the start",
            "s",
            &series(&|s| num(&s["broker_cpu_seconds"])),
        ),
        line_chart(
            "Simulator memory (RSS)",
            "MiB",
            &series(&|s| mib(&s["simulator_rss_bytes"])),
        ),
    ];
    let mut any = false;
    for c in charts.into_iter().flatten() {
        any = true;
        out.push_str(&c);
    }
    if !any {
        out.push_str("<p>Too few samples to draw.</p>\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_page_shows_figures_ratios_latency_and_time_series() {
        let report = json!({
            "scenario": "steady", "appliances": 100, "brokers": 1,
            "handshakes_per_sec": 900.5, "connect_p50_ms": 10.0, "connect_p99_ms": 40.0,
            "broker_rss_bytes": 1000, "broker_bytes_per_conn": 41000.0,
            "broker_cpu_seconds": 1.5, "command_rtt_p50_ms": null, "command_rtt_p99_ms": null,
            "revoke_to_close_p50_ms": null, "revoke_to_close_p99_ms": null,
            "revoked_reconnects_accepted": null,
            "errors": {"timed_out": 2},
            "machine": {"cores": 2, "memory_bytes": 25276514304u64, "kernel": "6.x <b>", "load_average_1m": 1.5},
            "connect_p90_ms": 30.0, "connect_max_ms": 55.0,
            "samples": [
                {"t": 0.0, "connected": 0, "broker_rss_bytes": 1048576, "broker_cpu_seconds": 0.0, "simulator_rss_bytes": 2097152},
                {"t": 1.0, "connected": 60, "broker_rss_bytes": 3145728, "broker_cpu_seconds": 0.5, "simulator_rss_bytes": 4194304},
                {"t": 2.0, "connected": 100, "broker_rss_bytes": 4194304, "broker_cpu_seconds": 0.7, "simulator_rss_bytes": 5242880}
            ],
            "baseline": {"handshakes_per_sec": 1000.0, "broker_bytes_per_conn": 36000.0},
            "ratios": {"handshakes_per_sec": 0.9, "broker_bytes_per_conn": 1.139}
        });
        let page = render(&report);
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("Tether load test: <code>steady</code> over <code>quic</code>"));
        assert!(page.contains("<th>bare quinn</th>"));
        // Ratios are coloured by which way is better.
        assert!(page.contains(r#"<td class="n bad">0.900</td>"#), "{page}");
        assert!(page.contains(r#"<td class="n bad">1.139</td>"#), "{page}");
        assert!(page.contains("timed_out"));
        // Connect percentiles as bars, three time series as lines.
        assert_eq!(page.matches("<rect ").count(), 4);
        assert_eq!(page.matches("<polyline").count(), 4);
        // Nothing from the report reaches the page unescaped.
        assert!(page.contains("6.x &lt;b&gt;"));
        assert!(!page.contains("Command round trip"));
    }

    #[test]
    fn the_page_says_which_transport_and_which_baseline() {
        let page = render(&json!({
            "scenario": "storm", "transport": "tcp", "appliances": 20, "errors": {},
            "handshakes_per_sec": 100.0,
            "baseline": {"handshakes_per_sec": 110.0}, "ratios": {"handshakes_per_sec": 0.909}
        }));
        assert!(
            page.contains("<code>storm</code> over <code>tcp</code>"),
            "{page}"
        );
        assert!(page.contains("20 appliances over TLS over TCP"), "{page}");
        assert!(page.contains("<th>bare TLS/TCP</th>"), "{page}");
        // Escaped like everything else from the report.
        let odd = render(&json!({"scenario": "storm", "transport": "<x>", "errors": {}}));
        assert!(odd.contains("&lt;x&gt;") && !odd.contains("<x>"));
    }

    #[test]
    fn a_report_without_samples_still_renders() {
        let page = render(&json!({"scenario": "storm", "errors": {}}));
        assert!(page.contains("No errors."));
        assert!(page.contains("Too few samples to draw."));
    }
}
