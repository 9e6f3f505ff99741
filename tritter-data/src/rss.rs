//! Resident-set figures of this process, and the memory available to it (Linux `/proc`;
//! `None` elsewhere).

/// A `Name:  <n> kB` line of a `/proc` file, in bytes.
fn proc_field(file: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn status_field(name: &str) -> Option<u64> {
    proc_field("/proc/self/status", name)
}

/// Memory the kernel reckons it can give without swapping (`MemAvailable`), bytes.
pub fn available() -> Option<u64> {
    proc_field("/proc/meminfo", "MemAvailable:")
}

/// Resets the peak resident set to the current one; returns the current one.
pub fn reset_peak() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    status_field("VmRSS:")
}

/// The peak resident set, bytes.
pub fn peak() -> Option<u64> {
    status_field("VmHWM:")
}
