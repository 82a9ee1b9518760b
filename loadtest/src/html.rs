//! The report as a page a person would rather look at than read: one self-contained HTML
//! file (inline SVG, no script, no network) next to the JSON, with the headline figures,
//! the Tether/baseline ratios, latency percentiles as bars, and connections, handshakes,
//! memory and CPU over time from the samples, Tether's and the baseline's on the same
//! axes.
//!
//! It renders the JSON form of the report ([`crate::report::Report`] serialized), so it
//! can also be made again from an old `FILE.json`.

use std::fmt::Write as _;

use serde_json::Value;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 240.0;
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

/// A headline figure in the unit its row names: bytes as MiB or KiB (the JSON keeps
/// bytes).
fn fmt_in(v: &Value, key: &str) -> String {
    let div = match key {
        "broker_rss_bytes" => 1048576.0,
        "broker_bytes_per_conn" => 1024.0,
        _ => return fmt(v),
    };
    match num(v) {
        Some(b) => format!("{:.1}", b / div),
        None => fmt(v),
    }
}

/// The `(x, y)` points of a line.
type Points = Vec<(f64, f64)>;

/// One line of a chart: its legend label, its colour and dash, and its `(x, y)` points.
struct Series {
    label: String,
    color: &'static str,
    dash: &'static str,
    points: Vec<(f64, f64)>,
}

/// Tether's line: solid blue.
const TETHER_COLOR: &str = "#2a6fdb";
/// The baseline's: dashed orange (told apart without colour too).
const BASELINE_COLOR: &str = "#d9730d";

/// Chart geometry: plot area inside the margins.
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 40.0;

/// A step of 1, 2 or 5 times a power of ten giving about `ticks` intervals up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// A tick value with as many decimals as its step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// A line chart of several series on the same axes from 0, with a legend, y in `unit`
/// and x in seconds (milliseconds when the whole run is under a second); `None` when no
/// series has two points.
fn series_chart(title: &str, unit: &str, series: &[Series]) -> Option<String> {
    let drawn: Vec<&Series> = series.iter().filter(|s| s.points.len() >= 2).collect();
    if drawn.is_empty() {
        return None;
    }
    let all = || drawn.iter().flat_map(|s| s.points.iter());
    let max_x = all().map(|p| p.0).fold(0.0, f64::max).max(1e-3);
    let max_y = all().map(|p| p.1).fold(0.0, f64::max);
    let (x_scale, x_unit) = if max_x < 1.0 {
        (1000.0, "ms")
    } else {
        (1.0, "s")
    };
    let x_step = nice_step(max_x * x_scale, 6.0);
    let x_top = (max_x * x_scale / x_step).ceil() * x_step;
    let y_step = nice_step(if max_y > 0.0 { max_y } else { 1.0 }, 5.0);
    let y_top = ((max_y / y_step).ceil() * y_step).max(y_step);
    let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let sx = |x: f64| LEFT + x * x_scale / x_top * w;
    let sy = |y: f64| TOP + h - y / y_top * h;
    let title = esc(title);
    let mut out = format!(
        r#"<figure><figcaption>{title}</figcaption>
<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{title}" font-size="11">
"#
    );
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= y_top + y_step / 2.0 {
        let py = sy(y);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{r}" y2="{py:.1}" stroke="{c}"/><text x="{LEFT}" y="{ty:.1}" text-anchor="end" dx="-6">{l}</text>"##,
            r = WIDTH - RIGHT,
            c = if y == 0.0 { "#999" } else { "#eee" },
            ty = py + 4.0,
            l = tick_label(y, y_step),
        );
        y += y_step;
    }
    // X ticks.
    let mut x = 0.0;
    while x <= x_top + x_step / 2.0 {
        let px = LEFT + x / x_top * w;
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" y1="{b}" x2="{px:.1}" y2="{b2}" stroke="#999"/><text x="{px:.1}" y="{ty}" text-anchor="middle">{l}</text>"##,
            b = TOP + h,
            b2 = TOP + h + 4.0,
            ty = TOP + h + 16.0,
            l = tick_label(x, x_step),
        );
        x += x_step;
    }
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="#999"/>
<text x="4" y="{uy}">{unit}</text>
<text x="{cx}" y="{xy}" text-anchor="middle">time since the fleet started, {x_unit}</text>"##,
        b = TOP + h,
        uy = TOP - 10.0,
        unit = esc(unit),
        cx = LEFT + w / 2.0,
        xy = HEIGHT - 6.0,
    );
    // Legend, top right, then the lines.
    let item = |s: &Series| 40.0 + 6.5 * s.label.chars().count() as f64;
    let mut lx = WIDTH - RIGHT - drawn.iter().map(|s| item(s)).sum::<f64>() + 14.0;
    for s in &drawn {
        let _ = writeln!(
            out,
            r##"<line x1="{lx:.1}" y1="{ly}" x2="{lx2:.1}" y2="{ly}" stroke="{c}" stroke-width="2" stroke-dasharray="{d}"/><text x="{tx:.1}" y="{ty}">{l}</text>"##,
            ly = TOP - 14.0,
            lx2 = lx + 22.0,
            c = s.color,
            d = s.dash,
            tx = lx + 26.0,
            ty = TOP - 10.0,
            l = esc(&s.label),
        );
        lx += item(s);
    }
    for s in &drawn {
        let mut poly = String::new();
        for (x, y) in &s.points {
            let _ = write!(poly, "{:.1},{:.1} ", sx(*x), sy(*y));
        }
        let _ = writeln!(
            out,
            r##"<polyline fill="none" stroke="{c}" stroke-width="2" stroke-dasharray="{d}" points="{p}"><title>{l}</title></polyline>"##,
            c = s.color,
            d = s.dash,
            p = poly.trim_end(),
            l = esc(&s.label),
        );
    }
    out.push_str("</svg></figure>\n");
    Some(out)
}

/// The rate of change of a cumulative series (connected appliances, CPU seconds), each
/// point over at least `window` seconds (so 100 ms samples of 10 ms CPU ticks do not
/// jitter), drawn at the middle of its window; never below 0.
fn rate(points: &[(f64, f64)], window: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for i in 1..points.len() {
        let (ti, yi) = points[i];
        // The latest earlier point at least `window` before this one (or the first).
        while j + 1 < i && ti - points[j + 1].0 >= window {
            j += 1;
        }
        let (tj, yj) = points[j];
        if ti > tj {
            out.push(((ti + tj) / 2.0, ((yi - yj) / (ti - tj)).max(0.0)));
        }
    }
    out
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
        ("broker_rss_bytes", "broker RSS, MiB", false),
        (
            "broker_bytes_per_conn",
            "broker memory / connection, KiB",
            false,
        ),
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
        let _ = write!(
            out,
            "<tr><td>{label}</td><td class=\"n\">{}</td>",
            fmt_in(v, key)
        );
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
                fmt_in(&report["baseline"][key], key),
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

/// Connections, handshakes, memory and CPU over time, Tether's samples and the
/// baseline's (`baseline.samples`, when the report has them) on the same axes.
fn over_time(out: &mut String, report: &Value) {
    // The report's detail (with the samples) is flattened into the top level.
    let tether = report["samples"].as_array().cloned().unwrap_or_default();
    let baseline = report["baseline"]["samples"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let baseline_name = match report["transport"].as_str() {
        Some("tcp") => "bare TLS/TCP",
        _ => "bare quinn",
    };
    let points = |samples: &[Value], f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| Some((num(&s["t"])?, f(s)?)))
            .collect()
    };
    let both = |f: &dyn Fn(&Value) -> Option<f64>, g: &dyn Fn(Points) -> Points| {
        vec![
            Series {
                label: "Tether".into(),
                color: TETHER_COLOR,
                dash: "none",
                points: g(points(&tether, f)),
            },
            Series {
                label: baseline_name.into(),
                color: BASELINE_COLOR,
                dash: "6 4",
                points: g(points(&baseline, f)),
            },
        ]
    };
    let same = |p: Vec<(f64, f64)>| p;
    let per_sec = |p: Vec<(f64, f64)>| rate(&p, RATE_WINDOW);
    let percent = |p: Vec<(f64, f64)>| {
        rate(&p, RATE_WINDOW)
            .into_iter()
            .map(|(t, v)| (t, v * 100.0))
            .collect()
    };
    let mib = |v: &Value| num(v).map(|b| b / (1u64 << 20) as f64);
    out.push_str("<h2>Over time</h2>\n");
    if let Some(ms) = num(&report["sample_every_ms"]) {
        let _ = writeln!(
            out,
            "<p>Sampled every {} ms while the fleet connected, then every {} s.</p>",
            ms,
            (ms / 1000.0).max(1.0),
        );
    }
    let charts = [
        series_chart(
            "Appliances connected",
            "appliances",
            &both(&|s| num(&s["connected"]), &same),
        ),
        series_chart(
            "Handshakes per second (growth of the connected count)",
            "per s",
            &both(&|s| num(&s["connected"]), &per_sec),
        ),
        series_chart(
            "Server memory (RSS)",
            "MiB",
            &both(&|s| mib(&s["broker_rss_bytes"]), &same),
        ),
        series_chart(
            "Server CPU",
            "% of a core",
            &both(&|s| num(&s["broker_cpu_seconds"]), &percent),
        ),
        series_chart(
            "Simulator memory (RSS)",
            "MiB",
            &both(&|s| mib(&s["simulator_rss_bytes"]), &same),
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

/// The shortest span a rate (handshakes, CPU) is taken over, seconds.
const RATE_WINDOW: f64 = 0.3;

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
        // Connected, handshakes per second, memory, CPU, simulator memory: Tether only.
        assert_eq!(page.matches("<polyline").count(), 5);
        assert_eq!(page.matches("<title>bare quinn</title>").count(), 0);
        // Human units in the table too.
        assert!(page.contains("<td>broker memory / connection, KiB</td><td class=\"n\">40.0</td><td class=\"n\">35.2</td>"), "{page}");
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

    /// A storm's samples: `secs` seconds every `every` seconds, `n` appliances connecting
    /// at an even pace over the first two thirds, `cpu` cores busy meanwhile.
    fn storm(secs: f64, every: f64, n: f64, cpu: f64, rss_mib: f64) -> Value {
        let steps = (secs / every).round() as usize;
        let list: Vec<Value> = (0..=steps)
            .map(|i| {
                let t = i as f64 * every;
                let done = (t / (secs * 2.0 / 3.0)).min(1.0);
                json!({
                    "t": (t * 1000.0).round() / 1000.0,
                    "connected": (n * done).round(),
                    "broker_rss_bytes": ((10.0 + rss_mib * done) * 1048576.0) as u64,
                    "broker_cpu_seconds": cpu * t.min(secs * 2.0 / 3.0),
                    "simulator_rss_bytes": 50u64 << 20,
                })
            })
            .collect();
        Value::Array(list)
    }

    /// The points of the `nth` polyline drawn for `label`.
    fn points_of(page: &str, label: &str, nth: usize) -> usize {
        let title = format!("<title>{label}</title>");
        let line = page
            .lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(&title))
            .nth(nth)
            .unwrap_or_else(|| panic!("no polyline {nth} for {label}: {page}"));
        let pts = line
            .split("points=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        pts.map(|p| p.split_whitespace().count()).unwrap_or(0)
    }

    #[test]
    fn tether_and_its_baseline_share_each_chart_in_human_units() {
        let report = json!({
            "scenario": "storm", "transport": "quic", "appliances": 2000, "errors": {},
            "sample_every_ms": 100.0,
            "samples": storm(3.0, 0.1, 2000.0, 1.5, 80.0),
            "baseline": {"handshakes_per_sec": 1100.0, "samples": storm(3.0, 0.1, 2000.0, 1.2, 60.0)},
            "ratios": {"handshakes_per_sec": 0.9},
        });
        let page = render(&report);
        // Five charts, each with both lines and a legend naming them.
        for label in ["Tether", "bare quinn"] {
            assert_eq!(
                page.matches(&format!("<title>{label}</title>")).count(),
                5,
                "{label}"
            );
            assert_eq!(page.matches(&format!("\">{label}</text>")).count(), 5);
        }
        assert!(page.contains("stroke-dasharray=\"6 4\""));
        // Human units on the axes.
        assert!(page.contains(">MiB</text>"));
        assert!(page.contains(">% of a core</text>"));
        assert!(page.contains(">appliances</text>"));
        assert!(page.contains("time since the fleet started, s"));
        assert!(page.contains("Sampled every 100 ms while the fleet connected, then every 1 s."));
        // A three-second storm sampled every 100 ms is a line of 31 points, not 3.
        assert!(points_of(&page, "Tether", 0) >= 20);
        assert!(points_of(&page, "bare quinn", 0) >= 20);
        // 1.5 s of CPU per second is 150 % of a core.
        let cpu = page
            .split("<figcaption>Server CPU")
            .nth(1)
            .expect("CPU chart");
        let cpu = cpu.split("</svg>").next().unwrap_or_default();
        assert!(cpu.contains(">150</text>"), "{cpu}");
        assert!(!cpu.contains(">1000</text>"), "{cpu}");
        // Memory in MiB: 10 → 90 MiB, ticks in tens.
        assert!(page.contains(">80</text>"), "{page}");
    }

    #[test]
    fn a_report_without_a_baseline_draws_tether_alone() {
        let page = render(&json!({
            "scenario": "storm", "transport": "tcp", "errors": {},
            "samples": storm(3.0, 0.1, 100.0, 0.5, 5.0),
        }));
        assert_eq!(page.matches("<title>Tether</title>").count(), 5);
        assert!(!page.contains("bare TLS/TCP"));
        assert!(points_of(&page, "Tether", 0) >= 20);
    }

    #[test]
    fn an_old_report_with_per_second_samples_and_no_baseline_samples_renders() {
        // As reports were before the baseline kept its samples: 1 s samples, no
        // `sample_every_ms`, a baseline of headline figures only.
        let page = render(&json!({
            "scenario": "steady", "appliances": 100, "errors": {},
            "broker_rss_bytes": 10485760,
            "samples": storm(5.0, 1.0, 100.0, 0.2, 4.0),
            "baseline": {"handshakes_per_sec": 500.0, "broker_rss_bytes": 8388608},
            "ratios": {"broker_rss_bytes": 1.25},
        }));
        assert!(page.contains("<th>bare quinn</th>"));
        assert!(
            page.contains(
                "<td>broker RSS, MiB</td><td class=\"n\">10.0</td><td class=\"n\">8.0</td>"
            ),
            "{page}"
        );
        assert_eq!(page.matches("<title>Tether</title>").count(), 5);
        assert_eq!(page.matches("<title>bare quinn</title>").count(), 0);
        assert!(!page.contains("Sampled every"));
        assert_eq!(points_of(&page, "Tether", 0), 6);
    }

    #[test]
    fn a_run_under_a_second_has_its_time_axis_in_ms() {
        let page = render(&json!({
            "scenario": "storm", "errors": {},
            "samples": storm(0.6, 0.1, 10.0, 0.1, 1.0),
        }));
        assert!(page.contains("time since the fleet started, ms"), "{page}");
        assert!(page.contains(">500</text>"), "{page}");
    }

    #[test]
    fn rates_come_from_cumulative_samples_over_a_window() {
        // 100 a second, sampled every 100 ms: 100 a second throughout, whatever the window.
        let pts: Vec<(f64, f64)> = (0..=20)
            .map(|i| (i as f64 * 0.1, i as f64 * 10.0))
            .collect();
        let r = rate(&pts, RATE_WINDOW);
        assert_eq!(r.len(), 20);
        assert!(r.iter().all(|(_, v)| (v - 100.0).abs() < 1e-6), "{r:?}");
        // Each point spans at least the window once there is one, drawn at its middle.
        assert!((r[10].0 - (1.1 - 0.15)).abs() < 1e-6, "{r:?}");
        // A falling count is no negative handshake rate.
        assert!(rate(&[(0.0, 5.0), (1.0, 2.0)], 0.3)[0].1 == 0.0);
        assert_eq!(nice_step(173.0, 4.0), 50.0);
        assert_eq!(nice_step(90.0, 5.0), 20.0);
        assert_eq!(nice_step(0.9, 4.0), 0.5);
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(150.0, 50.0), "150");
    }

    #[test]
    fn a_report_without_samples_still_renders() {
        let page = render(&json!({"scenario": "storm", "errors": {}}));
        assert!(page.contains("No errors."));
        assert!(page.contains("Too few samples to draw."));
    }
}
