//! CPU time, resident memory and threads of a process, from `/proc` (Linux).

use std::time::Duration;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which the kernel's
/// ABI fixes at 100 on the architectures this runs on (what `getconf CLK_TCK` prints).
const USER_HZ: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User + system CPU time so far.
    pub cpu: Duration,
    pub rss_bytes: u64,
    pub threads: u64,
}

/// Reads `pid` ("self" for this process); `None` if it is gone or not readable.
pub fn sample(pid: &str) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields from 3 on: utime is field 14, stime 15, num_threads 20 (1-based).
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    let cpu_ticks = ticks(14)? + ticks(15)?;
    let threads = ticks(20)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?;
    Some(Sample {
        cpu: Duration::from_millis(cpu_ticks * 1000 / USER_HZ),
        rss_bytes: rss_kib * 1024,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = sample("self").unwrap();
        assert!(s.rss_bytes > 0 && s.threads >= 1, "{s:?}");
    }
}
