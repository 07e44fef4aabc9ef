//! The results: a markdown report (tables + ratios Custodia/nginx and against bare Pingora) and an SVG plot of throughput
//! and p99 latency against concurrency.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::load::LoadResult;
use crate::machine_cpu::MachineShare;

pub const DIRECT: &str = "direct to a worker";
pub const AUTH_OFF: &str = "custodia, session check off";
pub const AUTH_ON: &str = "custodia, session check on";
/// The same with `[server] fast_path = false`: every request through Pingora's proxy.
pub const AUTH_ON_PINGORA_PATH: &str = "custodia, session check on, pingora path";
pub const NGINX: &str = "nginx least_conn";
/// nginx sent the requests of the session-check-on rows: the same session cookie on each.
pub const NGINX_COOKIE: &str = "nginx least_conn, with the session cookie";
pub const PINGORA: &str = "bare pingora round_robin";
pub const SLOW_LEAST: &str = "custodia least_conn";
pub const SLOW_LEAST_TIME: &str = "custodia least_time";
pub const SLOW_RR: &str = "custodia round_robin";
pub const SLOW_NGINX: &str = "nginx least_conn";

/// One measured run, reduced to what the report shows.
#[derive(Clone, Debug)]
pub struct Measured {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Proxy user+sys CPU per request (µs); None when no proxy is in the path.
    pub cpu_us_per_request: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    pub non_2xx: u64,
    /// Where the machine's CPU went over the window; None when it was not read.
    pub machine: Option<MachineShare>,
}

impl Measured {
    /// A load run's figures; the CPU figures are the probe's to fill in.
    pub fn from_result(result: &LoadResult) -> Measured {
        Measured {
            rps: result.throughput(),
            p50_ms: result.p50_ms(),
            p99_ms: result.p99_ms(),
            cpu_us_per_request: None,
            requests: result.requests,
            errors: result.errors,
            non_2xx: result.non_2xx,
            machine: None,
        }
    }
}

pub struct Row {
    pub target: &'static str,
    pub concurrency: usize,
    pub measured: Option<Measured>,
    pub note: Option<String>,
}

pub struct SlowRow {
    pub target: &'static str,
    pub concurrency: usize,
    pub measured: Option<Measured>,
    pub slow_share: Option<f64>,
    pub note: Option<String>,
}

pub struct MemoryRow {
    pub target: &'static str,
    pub wanted: usize,
    pub held: usize,
    pub rss_before: u64,
    pub rss_held: u64,
    pub note: Option<String>,
}

pub struct Report {
    pub machine: Vec<(String, String)>,
    pub settings: String,
    pub concurrency: Vec<usize>,
    pub rows: Vec<Row>,
    /// The second opinion: the goal rows again, driven by wrk instead of our load generator.
    pub wrk_rows: Vec<Row>,
    pub slow: Vec<SlowRow>,
    pub memory: Vec<MemoryRow>,
}

fn errors_cell(m: &Measured) -> String {
    if m.errors == 0 && m.non_2xx == 0 {
        "0".into()
    } else {
        format!("**{} errors, {} non-2xx**", m.errors, m.non_2xx)
    }
}

fn find_in<'a>(rows: &'a [Row], target: &str, c: usize) -> Option<&'a Measured> {
    rows.iter()
        .find(|r| r.target == target && r.concurrency == c)
        .and_then(|r| r.measured.as_ref())
}

/// The table of measured rows: target, concurrency, req/s, latency, proxy CPU, errors.
fn rows_table(out: &mut String, rows: &[Row]) {
    let _ = writeln!(
        out,
        "| target | concurrency | req/s | p50 ms | p99 ms | proxy CPU µs/req | requests | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        match (&r.measured, &r.note) {
            (Some(m), _) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {} |",
                    r.target,
                    r.concurrency,
                    m.rps,
                    m.p50_ms,
                    m.p99_ms,
                    m.cpu_us_per_request
                        .map(|v| format!("{v:.1}"))
                        .unwrap_or_else(|| "–".into()),
                    m.requests,
                    errors_cell(m)
                );
            }
            (None, note) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | | | | | |",
                    r.target,
                    r.concurrency,
                    note.as_deref().unwrap_or("not measured")
                );
            }
        }
    }
}

/// Custodia against nginx on the same requests, per concurrency: session check on against
/// nginx sent the cookie, off against nginx without it, and on against nginx without it.
fn goal_ratios(out: &mut String, rows: &[Row], concurrency: &[usize]) {
    let _ = writeln!(
        out,
        "| concurrency | session check | throughput | p99 | CPU per request |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|");
    for &c in concurrency {
        for (label, target, nginx) in [
            ("on", AUTH_ON, NGINX_COOKIE),
            ("off", AUTH_OFF, NGINX),
            ("on, against nginx without the cookie", AUTH_ON, NGINX),
        ] {
            ratio_row(
                out,
                c,
                label,
                find_in(rows, target, c),
                find_in(rows, nginx, c),
            );
        }
    }
}

/// The throughput the goal asks for, as a multiple of nginx's.
const THROUGHPUT_GOAL: f64 = 1.2;

/// Where each request's share of the machine went, for the goal rows, and what proxy CPU per
/// request the throughput goal would need given what the rest of the machine cost.
fn machine_breakdown(out: &mut String, rows: &[Row], concurrency: &[usize]) {
    let targets = [AUTH_OFF, AUTH_ON, NGINX, NGINX_COOKIE];
    let measured = |t: &str, c: usize| {
        find_in(rows, t, c).and_then(|m| Some((m, m.machine?, m.cpu_us_per_request?)))
    };
    if !concurrency
        .iter()
        .any(|&c| targets.iter().any(|t| measured(t, c).is_some()))
    {
        return;
    }
    let _ = writeln!(
        out,
        "| target | concurrency | req/s | machine µs/req | proxy | workers | rest | idle | stolen |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in concurrency {
        for t in targets {
            let Some((m, machine, proxy)) = measured(t, c) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {t} | {c} | {:.0} | {:.1} | {proxy:.1} | {:.1} | {:.1} | {:.0}% | {:.0}% |",
                m.rps,
                machine.busy_us,
                machine.workers_us,
                machine.rest_us(proxy),
                machine.idle_share * 100.0,
                machine.steal_share * 100.0,
            );
        }
    }
    let _ = writeln!(out);
    for &c in concurrency {
        let (Some((ours, machine, proxy)), Some(nginx)) =
            (measured(AUTH_ON, c), find_in(rows, NGINX_COOKIE, c))
        else {
            continue;
        };
        let target = THROUGHPUT_GOAL * nginx.rps;
        let ratio = ours.rps / nginx.rps.max(1e-9);
        if ratio >= THROUGHPUT_GOAL {
            let _ = writeln!(
                out,
                "- c={c}, session check on: {ratio:.2}× nginx's throughput, the goal of \
                 {THROUGHPUT_GOAL:.1}× met."
            );
            continue;
        }
        if !machine.cpu_bound() {
            let _ = writeln!(
                out,
                "- c={c}, session check on: {ratio:.2}× nginx's throughput, short of \
                 {THROUGHPUT_GOAL:.1}×. The cores were {:.0}% idle, so this rate was set by each \
                 request's round trip, not by CPU: no proxy CPU budget says what would reach it.",
                machine.idle_share * 100.0
            );
            continue;
        }
        let others = machine.others_us(proxy);
        let budget = machine.proxy_budget_us(ours.rps, proxy, target);
        let verdict = if budget > 0.0 {
            format!(
                "the proxy would have {budget:.1} µs a request; it took {proxy:.1} µs \
                 ({:.0}% less needed)",
                (1.0 - budget / proxy.max(1e-9)) * 100.0
            )
        } else {
            "the workers and the rest alone would take more than the machine has at that rate"
                .to_string()
        };
        let _ = writeln!(
            out,
            "- c={c}, session check on: {ratio:.2}× nginx's throughput. {THROUGHPUT_GOAL:.1}× \
             nginx's {:.0} req/s is {target:.0} req/s: with the cores as busy as in this window, \
             and the workers and the rest costing what they did behind Custodia ({others:.1} µs \
             a request), {verdict}.",
            nginx.rps
        );
    }
    let _ = writeln!(out);
}

/// One row of a ratio table: throughput, p99 and CPU per request of `over` against `under`.
fn ratio_row(
    out: &mut String,
    concurrency: usize,
    label: &str,
    over: Option<&Measured>,
    under: Option<&Measured>,
) {
    let _ = writeln!(
        out,
        "| {concurrency} | {label} | {} | {} | {} |",
        ratio(over.map(|m| m.rps), under.map(|m| m.rps)),
        ratio(over.map(|m| m.p99_ms), under.map(|m| m.p99_ms)),
        ratio(
            over.and_then(|m| m.cpu_us_per_request),
            under.and_then(|m| m.cpu_us_per_request)
        ),
    );
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

impl Report {
    pub fn new(machine: Vec<(String, String)>, concurrency: &[usize]) -> Report {
        Report {
            machine,
            settings: String::new(),
            concurrency: concurrency.to_vec(),
            rows: Vec::new(),
            wrk_rows: Vec::new(),
            slow: Vec::new(),
            memory: Vec::new(),
        }
    }

    fn find(&self, target: &str, c: usize) -> Option<&Measured> {
        find_in(&self.rows, target, c)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## End-to-end results\n");
        for (k, v) in &self.machine {
            let _ = writeln!(out, "- {k}: {v}");
        }
        let _ = writeln!(out, "- run: {}\n", self.settings);

        if !self.rows.is_empty() {
            let _ = writeln!(out, "### Throughput, latency, proxy CPU per request\n");
            rows_table(&mut out, &self.rows);
            let _ = writeln!(
                out,
                "\n### Ratios Custodia / nginx (goals: throughput ≥ 1.20× at c=32/256, p99 ≤ 1.00×, CPU ≤ 1.00×)\n"
            );
            let _ = writeln!(
                out,
                "Each row compares the two proxies on the same requests: with the session check on, \
                 every request carries the session cookie, and nginx is sent it too (as a \
                 signed-in user's browser sends it in the seed's stack). The last row per \
                 concurrency compares those requests with nginx's figures for requests without \
                 the cookie.\n"
            );
            goal_ratios(&mut out, &self.rows, &self.concurrency);
            let _ = writeln!(out, "\n### Where the machine's CPU goes, per request\n");
            let _ = writeln!(
                out,
                "The proxy, the three workers and the load generator share the machine's cores, \
                 so what the proxy can serve is bounded by what the others leave it. Per request \
                 answered in the measured window: the busy time of all cores (/proc/stat), the \
                 proxy's and the workers' CPU time (/proc/PID/stat), and the rest: the load \
                 generator, and anything else the machine ran. Idle and stolen (by the \
                 hypervisor): shares of the window's core time.\n"
            );
            machine_breakdown(&mut out, &self.rows, &self.concurrency);
            let _ = writeln!(
                out,
                "### The Pingora floor: bare Pingora / nginx, Custodia / bare Pingora, and the fast path\n"
            );
            let _ = writeln!(
                out,
                "Bare Pingora is pingora-proxy with nothing of Custodia's (round robin, defaults): \
                 what any proxy built on Pingora 0.9 starts from. Custodia / bare Pingora is what \
                 Custodia's edge costs on top of it. The pingora path is Custodia with \
                 `[server] fast_path = false`: every request through Pingora's proxy.\n"
            );
            let _ = writeln!(
                out,
                "| concurrency | of | throughput | p99 | CPU per request |"
            );
            let _ = writeln!(out, "|---:|---|---:|---:|---:|");
            for &c in &self.concurrency {
                let pingora = self.find(PINGORA, c);
                for (label, over, under) in [
                    ("bare pingora / nginx", pingora, self.find(NGINX, c)),
                    (
                        "custodia off / bare pingora",
                        self.find(AUTH_OFF, c),
                        pingora,
                    ),
                    ("custodia on / bare pingora", self.find(AUTH_ON, c), pingora),
                    (
                        "custodia on, pingora path / bare pingora",
                        self.find(AUTH_ON_PINGORA_PATH, c),
                        pingora,
                    ),
                    (
                        "custodia on: fast path / pingora path",
                        self.find(AUTH_ON, c),
                        self.find(AUTH_ON_PINGORA_PATH, c),
                    ),
                ] {
                    ratio_row(&mut out, c, label, over, under);
                }
            }
            let _ = writeln!(out);
        }

        if !self.wrk_rows.is_empty() {
            let _ = writeln!(out, "### Second opinion: wrk\n");
            let _ = writeln!(
                out,
                "The same proxies and requests driven by `wrk -t1` (C, epoll) instead of our load \
                 generator, in the same run: wrk costs the two shared cores less per request, \
                 which leaves more of them to the proxy and the workers.\n"
            );
            rows_table(&mut out, &self.wrk_rows);
            let _ = writeln!(out);
            goal_ratios(&mut out, &self.wrk_rows, &self.concurrency);
            let _ = writeln!(out, "\nWhere the machine's CPU goes under wrk:\n");
            machine_breakdown(&mut out, &self.wrk_rows, &self.concurrency);
        }

        if !self.slow.is_empty() {
            let _ = writeln!(
                out,
                "### One slow worker (of three, +20 ms), concurrency {}\n",
                self.slow[0].concurrency
            );
            let _ = writeln!(
                out,
                "| target | req/s | p50 ms | p99 ms | share sent to the slow worker | errors |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
            for r in &self.slow {
                match &r.measured {
                    Some(m) => {
                        let _ = writeln!(
                            out,
                            "| {} | {:.0} | {:.3} | {:.3} | {:.1}% | {} |",
                            r.target,
                            m.rps,
                            m.p50_ms,
                            m.p99_ms,
                            r.slow_share.unwrap_or(0.0) * 100.0,
                            errors_cell(m)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "| {} | {} | | | | |",
                            r.target,
                            r.note.as_deref().unwrap_or("not measured")
                        );
                    }
                }
            }
            let p99 = |name: &str| {
                self.slow
                    .iter()
                    .find(|r| r.target == name)
                    .and_then(|r| r.measured.as_ref())
                    .map(|m| m.p99_ms)
            };
            let _ = writeln!(
                out,
                "\np99 least_conn / round_robin: {} (goal ≤ 0.50×); custodia least_conn / nginx: {}\n\
                 p99 least_time / round_robin: {}; custodia least_time / nginx: {}\n",
                ratio(p99(SLOW_LEAST), p99(SLOW_RR)),
                ratio(p99(SLOW_LEAST), p99(SLOW_NGINX)),
                ratio(p99(SLOW_LEAST_TIME), p99(SLOW_RR)),
                ratio(p99(SLOW_LEAST_TIME), p99(SLOW_NGINX)),
            );
        }

        if !self.memory.is_empty() {
            let _ = writeln!(out, "### Memory with idle keep-alive clients\n");
            let _ = writeln!(
                out,
                "| proxy | idle clients held | RSS before | RSS holding them | per connection |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|");
            for r in &self.memory {
                if let Some(note) = &r.note {
                    let _ = writeln!(out, "| {} | {note} | | | |", r.target);
                    continue;
                }
                let held = if r.held == r.wanted {
                    r.held.to_string()
                } else {
                    format!("**{} of {}**", r.held, r.wanted)
                };
                let per_conn =
                    r.rss_held.saturating_sub(r.rss_before) as f64 / r.held.max(1) as f64 / 1024.0;
                let _ = writeln!(
                    out,
                    "| {} | {held} | {:.1} MB | {:.1} MB | {per_conn:.1} KB |",
                    r.target,
                    r.rss_before as f64 / 1e6,
                    r.rss_held as f64 / 1e6
                );
            }
            let rss = |name: &str| {
                self.memory
                    .iter()
                    .find(|r| r.target == name && r.note.is_none())
                    .map(|r| r.rss_held as f64)
            };
            let _ = writeln!(
                out,
                "\nRSS custodia / nginx holding them: {} (goal ≤ 1.00×)\n",
                ratio(rss(AUTH_OFF), rss(NGINX))
            );
        }
        out
    }

    /// Two panels side by side: throughput and p99 against concurrency (log scale), one line per
    /// target.
    pub fn plot(&self, path: &Path) -> Result<(), String> {
        let targets = [
            DIRECT,
            AUTH_OFF,
            AUTH_ON,
            AUTH_ON_PINGORA_PATH,
            NGINX,
            NGINX_COOKIE,
            PINGORA,
        ];
        let colors = [
            BLACK,
            BLUE,
            GREEN,
            CYAN,
            RED,
            RGBColor(230, 120, 0),
            MAGENTA,
        ];
        let series = |f: &dyn Fn(&Measured) -> f64| -> Vec<Vec<(f64, f64)>> {
            targets
                .iter()
                .map(|t| {
                    self.concurrency
                        .iter()
                        .filter_map(|&c| self.find(t, c).map(|m| (c as f64, f(m))))
                        .collect()
                })
                .collect()
        };
        let throughput = series(&|m: &Measured| m.rps);
        let p99 = series(&|m: &Measured| m.p99_ms);
        let max_c = self.concurrency.iter().copied().max().unwrap_or(1) as f64;
        let err = |e: &dyn std::fmt::Display| e.to_string();

        let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let panels = root.split_evenly((1, 2));
        for (panel, (title, data, unit)) in panels.iter().zip([
            ("throughput (req/s)", &throughput, "req/s"),
            ("p99 latency (ms)", &p99, "ms"),
        ]) {
            let max_y = data
                .iter()
                .flatten()
                .map(|&(_, y)| y)
                .fold(0.0f64, f64::max)
                .max(1e-3)
                * 1.15;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((0.8f64..max_c * 1.25).log_scale(), 0f64..max_y)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc("concurrent keep-alive clients")
                .y_desc(unit)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(|e| err(&e))?;
            for ((name, points), color) in targets.iter().zip(data.iter()).zip(colors) {
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| err(&e))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}
