//! Measurements every bench prints beside its figures, read from /proc (Linux).
#![allow(dead_code)] // each bench uses its own subset

/// CPU seconds (user + system) used so far by `which`: `self` (the process),
/// `thread-self` (the calling thread) or a process id. NaN when it cannot be read.
pub fn cpu_seconds(which: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{which}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may hold spaces):
    // utime is the 14th field of the line, stime the 15th, in clock ticks (100 per
    // second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |at: usize| {
        fields
            .get(at)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The 1-, 5- and 15-minute load averages: the machine may be shared.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// Peak resident set size of this process in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
