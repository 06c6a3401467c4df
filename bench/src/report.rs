//! Results: medians with min and max over the repetitions, ratios to the floor and to each
//! peer, as JSON, a Markdown table and PNG charts.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::sample::Sample;

/// Median, min and max of the repetitions of one (suite, scenario, system, size).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    /// Every repetition failed (e.g. a peer's rules did not load in time).
    pub failed: bool,
    pub note: String,
}

type Key = (String, String, u64); // (suite, scenario, size)
/// Points (size, median) by system, by (suite, scenario).
type Series = BTreeMap<(String, String), BTreeMap<String, Vec<(f64, f64)>>>;

fn stats(samples: &[Sample]) -> BTreeMap<Key, BTreeMap<String, Stat>> {
    let mut groups: BTreeMap<(Key, String), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups
            .entry((
                (s.suite.clone(), s.scenario.clone(), s.size),
                s.system.clone(),
            ))
            .or_default()
            .push(s);
    }
    let mut out: BTreeMap<Key, BTreeMap<String, Stat>> = BTreeMap::new();
    for ((key, system), ss) in groups {
        let mut v: Vec<f64> = ss.iter().filter(|s| s.ok).map(|s| s.value).collect();
        v.sort_by(f64::total_cmp);
        let note = ss
            .iter()
            .map(|s| s.note.as_str())
            .find(|n| !n.is_empty())
            .unwrap_or("")
            .to_owned();
        let stat = if v.is_empty() {
            Stat {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
                failed: true,
                note,
            }
        } else {
            let m = v.len();
            let median = if m % 2 == 1 {
                v[m / 2]
            } else {
                (v[m / 2 - 1] + v[m / 2]) / 2.0
            };
            Stat {
                median,
                min: v[0],
                max: v[m - 1],
                n: m,
                failed: false,
                note,
            }
        };
        out.entry(key).or_default().insert(system, stat);
    }
    out
}

#[derive(Serialize, Deserialize)]
struct Results {
    machine: serde_json::Value,
    settings: serde_json::Value,
    samples: Vec<Sample>,
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    serde_json::json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "date": std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default(),
        "veth_offloads": "GRO off, GSO/TSO on (veth defaults)",
    })
}

/// Writes results.json, results.md and the charts into `out`.
pub fn write(samples: &[Sample], out: &Path, settings: &serde_json::Value) -> Result<()> {
    let r = Results {
        machine: machine(),
        settings: settings.clone(),
        samples: samples.to_vec(),
    };
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(&r)?)?;
    render(&r, out)
}

/// Rewrites the Markdown and charts from a saved results.json.
pub fn rewrite(json: &Path, out: &Path) -> Result<()> {
    let r: Results = serde_json::from_slice(&std::fs::read(json)?).context("read results")?;
    std::fs::create_dir_all(out)?;
    render(&r, out)
}

fn fmt_stat(s: &Stat, unit: &str) -> String {
    if s.failed {
        return if s.note.is_empty() {
            "failed".into()
        } else {
            format!("— ({})", s.note)
        };
    }
    let f = |v: f64| match unit {
        "s" if v < 1.0 => format!("{:.1} ms", v * 1e3),
        "s" => format!("{v:.2} s"),
        "ns/packet" => format!("{v:.0}"),
        _ => format!("{v:.0}"),
    };
    if s.n > 1 {
        format!("{} [{}–{}]", f(s.median), f(s.min), f(s.max))
    } else {
        f(s.median)
    }
}

fn ratio(a: Option<&Stat>, b: Option<&Stat>, lower_is_better: bool) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !a.failed && !b.failed && b.median > 0.0 && a.median > 0.0 => {
            let r = if lower_is_better {
                b.median / a.median
            } else {
                a.median / b.median
            };
            format!("{r:.2}×")
        }
        (Some(a), Some(b)) if !a.failed && b.failed => "peer failed".into(),
        _ => "–".into(),
    }
}

fn render(r: &Results, out: &Path) -> Result<()> {
    let st = stats(&r.samples);
    let mut md = String::new();
    md.push_str(&format!(
        "Machine: {} ({} CPUs, {} GiB), kernel {}, {}. Veth offloads: {}.\n\n",
        r.machine["cpu"].as_str().unwrap_or("?"),
        r.machine["cpus"],
        r.machine["memory_gib"],
        r.machine["kernel"].as_str().unwrap_or("?"),
        r.machine["date"].as_str().unwrap_or("?"),
        r.machine["veth_offloads"].as_str().unwrap_or("?"),
    ));
    md.push_str(&format!(
        "Settings: {}\n\n",
        serde_json::to_string(&r.settings).unwrap_or_default()
    ));
    md.push_str("Cells: median [min–max] over the repetitions. Ratios compare medians; ");
    md.push_str("above 1× netctl is better (faster rate, less time).\n\n");
    for suite in ["prog", "lb", "update"] {
        let rows: Vec<(&Key, &BTreeMap<String, Stat>)> =
            st.iter().filter(|(k, _)| k.0 == suite).collect();
        if rows.is_empty() {
            continue;
        }
        let unit = r
            .samples
            .iter()
            .find(|s| s.suite == suite)
            .map(|s| s.unit.clone())
            .unwrap_or_default();
        match suite {
            "prog" => {
                md.push_str("### prog: ns per packet through BPF_PROG_TEST_RUN\n\n");
                md.push_str("| path | map entries | ns/packet | vs no-op |\n|---|---|---|---|\n");
                for (k, sys) in &rows {
                    let me = sys.get("netctl").or_else(|| sys.get("noop"));
                    let noop = st
                        .get(&(k.0.clone(), "noop_count_only".into(), k.2))
                        .and_then(|m| m.get("noop"));
                    md.push_str(&format!(
                        "| {} | {} | {} | {} |\n",
                        k.1,
                        k.2,
                        me.map(|s| fmt_stat(s, "ns/packet")).unwrap_or_default(),
                        ratio(noop, me, true).replace('×', "× (no-op/path)")
                    ));
                }
                md.push('\n');
            }
            "lb" | "update" => {
                let lower = suite == "update";
                md.push_str(&format!(
                    "### {suite}: {}\n\n",
                    if lower {
                        "time to program services (s)"
                    } else {
                        "rates through the VIP of the last service"
                    }
                ));
                md.push_str("| scenario | services | netctl | iptables | nftables |");
                if !lower {
                    md.push_str(" floor | netctl/floor |");
                }
                md.push_str(" netctl vs iptables | netctl vs nftables |\n|---|---|---|---|---|");
                if !lower {
                    md.push_str("---|---|");
                }
                md.push_str("---|---|\n");
                for (k, sys) in &rows {
                    let u = if lower { "s" } else { unit.as_str() };
                    let cell = |n: &str| sys.get(n).map(|s| fmt_stat(s, u)).unwrap_or("–".into());
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {} |",
                        k.1,
                        k.2,
                        cell("netctl"),
                        cell("iptables"),
                        cell("nftables")
                    ));
                    if !lower {
                        md.push_str(&format!(
                            " {} | {} |",
                            cell("floor"),
                            ratio(sys.get("netctl"), sys.get("floor"), false)
                        ));
                    }
                    md.push_str(&format!(
                        " {} | {} |\n",
                        ratio(sys.get("netctl"), sys.get("iptables"), lower),
                        ratio(sys.get("netctl"), sys.get("nftables"), lower)
                    ));
                }
                md.push('\n');
            }
            _ => {}
        }
    }
    std::fs::write(out.join("results.md"), &md)?;
    if let Err(e) = charts(&st, out) {
        eprintln!("netctl-bench: charts not drawn: {e:#}");
    }
    Ok(())
}

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(path)
            .with_context(|| {
                format!("read {path} (Debian's fonts-dejavu-core; `cargo xtask setup` installs it)")
            })?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path}: not a font"))?;
    let _ = DONE.set(true);
    Ok(())
}

const COLORS: [(&str, RGBColor); 5] = [
    ("netctl", RGBColor(0, 114, 178)),
    ("iptables", RGBColor(213, 94, 0)),
    ("nftables", RGBColor(0, 158, 115)),
    ("floor", RGBColor(90, 90, 90)),
    ("noop", RGBColor(90, 90, 90)),
];

/// One chart per (suite, scenario) of lb and update: the median by size for each system,
/// log-scaled sizes.
fn charts(st: &BTreeMap<Key, BTreeMap<String, Stat>>, out: &Path) -> Result<()> {
    register_font()?;
    let mut series: Series = BTreeMap::new();
    for ((suite, scenario, size), sys) in st {
        if suite == "prog" {
            continue;
        }
        for (name, s) in sys {
            if !s.failed {
                series
                    .entry((suite.clone(), scenario.clone()))
                    .or_default()
                    .entry(name.clone())
                    .or_default()
                    .push(((*size as f64).max(1.0), s.median));
            }
        }
    }
    for ((suite, scenario), by_sys) in &series {
        let file = out.join(format!("{suite}-{scenario}.png"));
        let root = BitMapBackend::new(&file, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let xmax = by_sys.values().flatten().map(|p| p.0).fold(1.0, f64::max) * 1.5;
        let ymin = by_sys
            .values()
            .flatten()
            .map(|p| p.1)
            .fold(f64::MAX, f64::min);
        let ymax = by_sys.values().flatten().map(|p| p.1).fold(0.0, f64::max);
        let title = match suite.as_str() {
            "lb" => format!("lb: {scenario} (/s) vs services configured"),
            _ => format!("update: {scenario} (s) vs services"),
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (0.8f64..xmax).log_scale(),
                // Log scales both ways: sizes span 1 to 100k, times span ms to minutes.
                ((ymin / 2.0).max(1e-5)..ymax * 2.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("services")
            .y_desc(if suite == "update" {
                "seconds"
            } else {
                "per second"
            })
            .label_style(("sans-serif", 14))
            .draw()?;
        for (name, pts) in by_sys {
            let color = COLORS
                .iter()
                .find(|(n, _)| n == name)
                .map(|c| c.1)
                .unwrap_or(BLACK);
            let mut pts = pts.clone();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
    }
    Ok(())
}
